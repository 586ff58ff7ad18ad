"""Reading images, and the exact rescale/normalise table the device applies to uint8 pixels."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from unime_jax.errors import DataError

ImageLike = Image.Image | bytes | str | os.PathLike


class ImageError(DataError):
    """An image that cannot be used: the message names the file."""


class MissingImage(ImageError, FileNotFoundError):
    pass


def load_image(image: ImageLike, root: str | os.PathLike | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image, an encoded file's bytes (as the datasets store
    images) or a path (relative to ``root``), fully decoded.

    Raises :class:`MissingImage` (also a ``FileNotFoundError``) for a missing file and
    :class:`ImageError` for one that does not decode — a truncated JPEG is caught here: the
    pixels are read, not just the header.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as img:
                img.load()
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageError(
                f"an image of {len(image)} bytes cannot be decoded: {e}",
                "the prepared dataset is damaged: build it again with --overwrite",
            ) from e
    path = Path(root, image) if root is not None else Path(image)
    if not path.is_file():
        raise MissingImage(f"image {path} does not exist", "pass the path of an existing image")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(
            f"image {path} cannot be decoded: {e}", "replace the file with a readable image"
        ) from e


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """VLM2Vec's training-time resize: the whole image to ``size`` x ``size`` (bicubic)."""
    if size <= 0 or image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def pixel_lut(image_processor) -> np.ndarray:
    """(C, 256) float32: the value the HF image processor gives a uint8 pixel of each channel.

    Reproduces its arithmetic exactly: rescale in float64 then cast to float32, normalise as
    ``(x - mean) / std`` in float32; disabled steps are skipped.
    """
    p = image_processor
    values = np.arange(256, dtype=np.float64)
    if getattr(p, "do_rescale", True):
        values = values * p.rescale_factor
    values = values.astype(np.float32)
    mean = np.asarray(getattr(p, "image_mean", None) or [0.0] * 3, np.float32)
    std = np.asarray(getattr(p, "image_std", None) or [1.0] * 3, np.float32)
    if not getattr(p, "do_normalize", True):
        mean, std = np.zeros_like(mean), np.ones_like(std)
    return ((values[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)
