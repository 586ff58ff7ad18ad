"""Phi-3-V's HD transform, in numpy and PIL: crops, the global view, and the gather map.

Replicates the hub's ``image_processing_phi3_v.py`` (``Phi3VImageProcessor``) without torch:

* a portrait image is transposed to landscape; ``s`` = the largest scale with
  ``s * ceil(s / ratio) <= num_crops``; the image is resized (PIL bilinear, what torchvision's
  ``resize`` does to a PIL image) to ``w = 336 s``, ``h = int(w / ratio)``, padded with white to
  a multiple of 336 in height (centred), and transposed back;
* ``ToTensor`` + ``Normalize`` in float32 (``x / 255``, then ``(x - mean) / std``);
* the global view is ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``
  of the *normalised* image to 336x336 (:func:`bicubic_resize`, ATen's CPU kernel in float32);
* ``pixel_values`` = [global view, crops in row-major order], ``image_sizes`` = padded (H, W).

Because the global view is resampled after normalisation, its values are not a lookup of uint8
pixels: crops travel to the device as float32 normalised pixels, not uint8 + ``pixel_lut``.

The model side (``hd_transform_order`` "sub_glb") places, for an (h, w) grid of crops with
``side`` (12) merged features per crop side: the crops' features tiled as an (h·side, w·side)
grid with a ``sub_GN`` closing every row, then ``glb_GN``, then the global view's side x side
features with a ``sub_GN`` per row: ``(h·w + 1)·side² + 1 + (h + 1)·side`` tokens (757 for a
square image at 4 crops). :func:`image_layout` writes that as a gather map.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SUB_GN, GLB_GN = -1, -2  # special rows of a group's feature pool (see preprocess.example)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "preprocessor_config.json"


def hd_geometry(width: int, height: int, num_crops: int, crop: int = 336) -> tuple[int, int]:
    """(new_w, new_h) of the resize, in the landscape orientation (hub ``HD_transform``)."""
    if width < height:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    new_w = int((scale - 1) * crop)
    new_h = int(new_w / ratio)
    if new_h == 0:
        raise ValueError(
            f"a {width}x{height} image is too thin for the HD transform (it resizes to height 0)"
        )
    return new_w, new_h


def hd_size(width: int, height: int, num_crops: int, crop: int = 336) -> tuple[int, int]:
    """The padded (H, W) the HD transform gives a ``width`` x ``height`` image (``image_sizes``)."""
    new_w, new_h = hd_geometry(width, height, num_crops, crop)
    padded_h = math.ceil(new_h / crop) * crop
    return (new_w, padded_h) if width < height else (padded_h, new_w)


def num_image_tokens(size_hw: tuple[int, int], crop: int = 336, side: int = 12) -> int:
    """Image tokens for padded size (H, W): ``(h·w + 1)·side² + 1 + (h + 1)·side``."""
    h, w = size_hw[0] // crop, size_hw[1] // crop
    return (h * w + 1) * side * side + 1 + (h + 1) * side


def _fma(a, b, c) -> np.ndarray:
    """float32 ``a * b + c`` with one rounding, like a compiled fused multiply-add: the product
    is exact in float64, the sum is rounded to odd there (TwoSum), then once to float32."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32)
    c = np.asarray(c, np.float32).astype(np.float64)
    s = p + c
    back = s - p
    err = (p - (s - back)) + (c - back)
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (out, 4) and float32 weights (out, 4) of ATen's bicubic (A = -0.75),
    align_corners=False, borders clamped. The arithmetic follows torch's CPU build bit for bit,
    fused multiply-adds included where its compiler contracts them (found by comparing with
    ``torch.nn.functional.interpolate``): src = scale·(dst + 0.5) - 0.5, the first step of the
    inner cubic and the first two of the outer one."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    real = _fma(scale, np.arange(out_size) + f32(0.5), f32(-0.5))
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - index.astype(f32), f32(0), f32(1)).astype(f32)
    a, one = f32(-0.75), f32(1)

    def near(x):  # |x| <= 1
        return _fma(a + 2, x, -(a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return _fma(_fma(a, x, -5 * a), x, 8 * a) * x - 4 * a

    opposite = one - t
    weights = np.stack([far(t + one), near(t), near(opposite), far(opposite + one)], axis=1)
    taps = np.clip(index[:, None] - 1 + np.arange(4), 0, in_size - 1)
    return taps, weights.astype(f32)


def _sum4(values: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    """ATen's ``t0 * w0 + t1 * w1 + t2 * w2 + t3 * w3`` as its compiler contracts it."""
    out = _fma(values[0], weights[0], values[1] * weights[1])
    for v, w in zip(values[2:], weights[2:]):
        out = _fma(v, w, out)
    return out


def bicubic_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, out_h, out_w), equal to torch's CPU bicubic ``interpolate``
    (antialias off): along the width, then along the height."""
    x = np.asarray(x, np.float32)
    ys, wy = _cubic_taps(x.shape[1], out_h)
    xs, wx = _cubic_taps(x.shape[2], out_w)
    rows = _sum4([x[:, :, xs[:, j]] for j in range(4)], [wx[:, j] for j in range(4)])
    return _sum4([rows[:, ys[:, i], :] for i in range(4)], [wy[:, i, None] for i in range(4)])


@functools.lru_cache(maxsize=4096)
def _layout(rows: int, cols: int, side: int, order: str) -> np.ndarray:
    r, c = np.arange(rows * side)[:, None], np.arange(cols * side)[None, :]
    unit = 1 + (r // side) * cols + c // side  # unit 0 is the global view
    crops = unit * side * side + (r % side) * side + c % side
    crops = np.concatenate([crops, np.full((rows * side, 1), SUB_GN)], axis=1).reshape(-1)
    g = np.arange(side * side).reshape(side, side)
    glb = np.concatenate([g, np.full((side, 1), SUB_GN)], axis=1).reshape(-1)
    blocks = [crops, [GLB_GN], glb] if order == "sub_glb" else [glb, [GLB_GN], crops]
    index = np.concatenate(blocks).astype(np.int32)[:, None]
    index.flags.writeable = False  # shared by the cache
    return index


def image_layout(
    size_hw: tuple[int, int], crop: int = 336, side: int = 12, order: str = "sub_glb"
) -> tuple[np.ndarray, np.ndarray]:
    """Gather ``index`` / ``weight`` (tokens, 1) for an image of padded size (H, W): a row of
    the image's units (``unit · side² + feature``) or :data:`SUB_GN` / :data:`GLB_GN`."""
    if order not in ("sub_glb", "glb_sub"):
        raise ValueError(f"hd_transform_order {order!r} is not supported (sub_glb, glb_sub)")
    index = _layout(size_hw[0] // crop, size_hw[1] // crop, side, order)
    return index, np.ones(index.shape, np.float32)


@dataclasses.dataclass(frozen=True)
class HDImageProcessor:
    """The torch-free ``Phi3VImageProcessor`` (its ``preprocessor_config.json`` settings; class
    defaults as in the hub code) for crops of ``crop_size`` (the vision tower's image size)."""

    num_crops: int = 1
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    num_img_tokens: int = 144
    crop_size: int = 336

    @functools.cached_property
    def lut(self) -> np.ndarray:
        """(3, 256) float32: ToTensor then Normalize of each uint8 value, in float32 like torch."""
        values = np.arange(256, dtype=np.float32) / np.float32(255)
        mean = np.asarray(self.image_mean, np.float32)[:, None]
        std = np.asarray(self.image_std, np.float32)[:, None]
        return ((values[None] - mean) / std).astype(np.float32)

    def size(self, width: int, height: int) -> tuple[int, int]:
        return hd_size(width, height, self.num_crops, self.crop_size)

    def units(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """One RGB image -> (1 + h·w, 3, crop, crop) float32 [global view, crops], (H, W)."""
        crop = self.crop_size
        transposed = image.width < image.height
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        new_w, new_h = hd_geometry(image.width, image.height, self.num_crops, crop)
        resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        padded = Image.new("RGB", (new_w, math.ceil(new_h / crop) * crop), (255, 255, 255))
        padded.paste(resized, (0, (padded.height - new_h) // 2))
        if transposed:
            padded = padded.transpose(Image.Transpose.TRANSPOSE)
        array = np.asarray(padded)
        pixels = np.stack([self.lut[c][array[..., c]] for c in range(3)])  # (3, H, W)
        h, w = pixels.shape[1] // crop, pixels.shape[2] // crop
        crops = (
            pixels.reshape(3, h, crop, w, crop).transpose(1, 3, 0, 2, 4).reshape(-1, 3, crop, crop)
        )
        glb = bicubic_resize(pixels, crop, crop)[None]
        return np.concatenate([glb, crops]), (pixels.shape[1], pixels.shape[2])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``preprocessor_config.json`` in the hub's keys."""
        config = {
            "image_processor_type": "Phi3VImageProcessor",
            "processor_class": "Phi3VProcessor",
            "num_crops": self.num_crops,
            "num_img_tokens": self.num_img_tokens,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
        }
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (Path(directory) / CONFIG_FILE).write_text(text)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, crop_size: int = 336
    ) -> HDImageProcessor:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (the Phi-3-V image processor settings)")
        c = json.loads(path.read_text())
        return cls(
            num_crops=int(c.get("num_crops", 1)),
            image_mean=tuple(c.get("image_mean") or CLIP_MEAN),
            image_std=tuple(c.get("image_std") or CLIP_STD),
            num_img_tokens=int(c.get("num_img_tokens", 144)),
            crop_size=crop_size,
        )
