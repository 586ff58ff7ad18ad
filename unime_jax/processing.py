"""Host preprocessing: UniME prompts, tokenisation, image tiles, image-token expansion, buckets.

transformers' tokenizer, chat template and PIL image processors define the reference behaviour;
we call them directly (the full ``LlavaOnevisionProcessor`` needs torchvision) and expand the
image token exactly as the HF processors do, using :mod:`unime_jax.models.anyres` for the count.
Sequences are padded to a few fixed lengths so the device compiles a handful of shapes only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from unime_jax.models import anyres
from unime_jax.models.config import LlavaConfig

IMAGE_PLACEHOLDER = "<|image_1|>"  # MMEB / Phi-3.5-V placeholder in instruction strings
IMAGE_PROMPT = "Summary above image in one word:"
TEXT_PROMPT = "\nSummary above sentence in one word:"
LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def load_image(
    image: Image.Image | str | os.PathLike, root: str | os.PathLike | None = None
) -> Image.Image:
    """An RGB PIL image from a PIL image or a path; errors name the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(root, image) if root is not None else Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} cannot be decoded: {e}") from e


def bucket_length(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"a sequence of {n} tokens exceeds the largest length bucket {buckets[-1]}")


class Processor:
    """Turns (text, image) pairs into the numpy arrays :class:`EmbeddingModel` takes."""

    def __init__(self, tokenizer, image_processor, config: LlavaConfig):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: LlavaConfig) -> Processor:
        from transformers import (
            AutoTokenizer,
            LlavaNextImageProcessorPil,
            LlavaOnevisionImageProcessorPil,
        )

        tokenizer = AutoTokenizer.from_pretrained(directory)
        image_processor = None
        if config.vision is not None:
            klass = {
                "llava_onevision": LlavaOnevisionImageProcessorPil,
                "llava_next": LlavaNextImageProcessorPil,
            }
            image_processor = klass[config.family].from_pretrained(directory)
        return cls(tokenizer, image_processor, config)

    # ---- prompts (UniME inference prompts per backbone; MMEB rows use their own strings) ----
    def image_prompt(self) -> str:
        if self.config.family == "llava_next":
            return f"[INST] {self.image_token}\n{IMAGE_PROMPT} [/INST]"
        content = [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT + "\n"}]
        return self._chat(content)

    def text_prompt(self, text: str) -> str:
        if self.config.family == "llava_next":
            return f"[INST] {text}{TEXT_PROMPT} [/INST]"
        return self._chat([{"type": "text", "text": text + TEXT_PROMPT + "\n"}])

    def _chat(self, content: list[dict]) -> str:
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def instruction(self, text: str) -> str:
        """An MMEB-style instruction used verbatim, its image placeholder swapped for ours."""
        return text.replace(IMAGE_PLACEHOLDER, self.image_token)

    # ---- batching ----
    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image | None] | None = None,
        *,
        max_length: int | None = None,
        padding_side: str = "right",
    ) -> dict[str, np.ndarray]:
        """Tokenises prompts (each with at most one image token), expands image tokens, pads.

        Returns input_ids/attention_mask (B, L) with L a length bucket (or ``max_length``), and,
        when any image is given, pixel_values (B, n, C, H, W) and image_sizes (B, 2).
        """
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        rows, tiles, sizes = [], [], []
        image_token_id = self.config.image_token_id
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            ids = self.tokenizer(prompt, add_special_tokens=self.config.family == "llava_next")[
                "input_ids"
            ]
            count = ids.count(image_token_id)
            if count > 1 or (count == 1) != (image is not None):
                raise ValueError(
                    f"prompt {i} has {count} image tokens and {'an' if image is not None else 'no'} "
                    "image; exactly one image token per image is supported"
                )
            if image is not None:
                out = self.image_processor(images=[load_image(image)], return_tensors="np")
                size = tuple(int(s) for s in out["image_sizes"][0])
                n = anyres.num_image_tokens(size, self.config.anyres)
                at = ids.index(image_token_id)
                ids = ids[:at] + [image_token_id] * n + ids[at + 1 :]
                tiles.append(out["pixel_values"][0])
                sizes.append(size)
            else:
                tiles.append(None)
                sizes.append((0, 0))
            rows.append(ids)
        longest = max(len(r) for r in rows)
        length = max_length or bucket_length(longest)
        if longest > length:
            too_long = [i for i, r in enumerate(rows) if len(r) > length]
            raise ValueError(f"prompts {too_long} are longer than max_length={length} tokens")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = np.full((len(rows), length), pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(length - len(r), length)
            input_ids[i, sl], mask[i, sl] = r, 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        present = [t for t in tiles if t is not None]
        if present:
            n_max = max(t.shape[0] for t in present)
            pixel_values = np.zeros((len(rows), n_max, *present[0].shape[1:]), np.float32)
            for i, t in enumerate(tiles):
                if t is not None:
                    pixel_values[i, : t.shape[0]] = t
            batch |= {"pixel_values": pixel_values, "image_sizes": np.asarray(sizes, np.int64)}
        return batch
