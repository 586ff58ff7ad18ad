"""The host processor of a family: prompts, tokenisation, images → examples → batches.

Each family subclasses :class:`Processor` (see :mod:`unime_jax.families`) and implements:

- ``encode(prompt, images)`` → :class:`~unime_jax.preprocess.example.Example`: the fast path
  used by training, the Embedder and evaluation (uint8 units, exact device normalisation);
- ``__call__(prompts, images)`` → what the family's HF processor returns (the torch-free
  equivalent: ``input_ids``, ``attention_mask``, ``pixel_values``, ...), for parity with
  transformers and for users who bring HF processor outputs;
- ``from_hf(**processor_outputs)`` → examples, for any batch the HF processor can return
  (text-only rows anywhere, several images per row, either padding side).

Prompts (UniME's, per backbone) and batching are shared here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unime_jax.models.inputs import ModelInputs
from unime_jax.preprocess.example import Example, UnitLayout, collate
from unime_jax.preprocess.images import ImageLike
from unime_jax.preprocess.text import IMAGE_PLACEHOLDER, bucket_length

RowImages = ImageLike | Sequence[ImageLike] | None  # no image, one image, or several


def row_images(images: RowImages) -> list:
    """A row's images as a list (``None`` → ``[]``, one image → ``[image]``)."""
    if images is None:
        return []
    if isinstance(images, list | tuple):
        return list(images)
    return [images]


def images_per_prompt(prompts: Sequence[str], images: Sequence[RowImages] | None) -> list:
    """Each prompt's row images (``images`` None: no images anywhere); one entry per prompt."""
    images = list(images) if images is not None else [None] * len(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
    return images


class Processor:
    """Shared behaviour; ``family``, ``tokenizer``, ``image_token_id``, ``layout`` are set by
    the subclass (``layout`` is None for a text-only model)."""

    family: str
    layout: UnitLayout | None

    def __init__(self, tokenizer, image_token_id: int, *, add_special_tokens: bool):
        self.tokenizer = tokenizer
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.add_special_tokens = add_special_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    # ---- prompts --------------------------------------------------------------------------
    def image_prompt(self) -> str:
        raise NotImplementedError

    def text_prompt(self, text: str) -> str:
        raise NotImplementedError

    def instruction(self, text: str) -> str:
        """An MMEB-style instruction used verbatim, its image placeholder swapped for ours."""
        return text.replace(IMAGE_PLACEHOLDER, self.image_token)

    def chat(self, content: list[dict]) -> str:
        """One user turn through the tokenizer's chat template, with the generation prompt."""
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    # ---- encoding -------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]

    def encode(self, prompt: str, images: RowImages = None) -> Example:
        raise NotImplementedError

    def __call__(
        self,
        prompts: Sequence[str],
        images: Sequence[RowImages] | None = None,
        *,
        max_length: int | None = None,
        padding_side: str = "right",
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def from_hf(self, input_ids, attention_mask, **image_outputs) -> list[Example]:
        raise NotImplementedError

    def max_units(self, image_size: int = 0) -> int:
        """Image units one image takes (resized to ``image_size`` square; 0: the worst case)."""
        raise NotImplementedError

    # ---- batching -------------------------------------------------------------------------
    def encode_batch(
        self, prompts: Sequence[str], images: Sequence[RowImages] | None = None
    ) -> list[Example]:
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
        return [self.encode(p, im) for p, im in zip(prompts, images)]

    def batch(
        self,
        examples: Sequence[Example],
        *,
        length: int | None = None,
        groups: int = 1,
        row_groups: Sequence[int] | None = None,
        unit_budget: int | None = None,
        padding_side: str = "right",
    ) -> ModelInputs:
        """Examples → one packed batch (numpy, see :func:`~unime_jax.preprocess.example.collate`);
        ``length`` defaults to the bucket of the longest."""
        if length is None:
            length = bucket_length(max(len(e) for e in examples))
        layout = self.layout if self.layout is not None else UnitLayout(rows_per_unit=1)
        return collate(
            examples,
            layout,
            length=length,
            pad_id=self.pad_id,
            groups=groups,
            row_groups=row_groups,
            unit_budget=unit_budget,
            padding_side=padding_side,
        )

    def pad_hf_batch(
        self, rows: list[list[int]], max_length: int | None, padding_side: str
    ) -> dict[str, np.ndarray]:
        """Token rows padded like an HF processor with ``padding=True`` (to a length bucket)."""
        longest = max(len(r) for r in rows)
        length = max_length or bucket_length(longest)
        if longest > length:
            too_long = [i for i, r in enumerate(rows) if len(r) > length]
            raise ValueError(f"prompts {too_long} are longer than max_length={length} tokens")
        input_ids = np.full((len(rows), length), self.pad_id, np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(length - len(r), length)
            input_ids[i, sl], mask[i, sl] = r, 1
        return {"input_ids": input_ids, "attention_mask": mask}


def unpad(input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
    """The real tokens of each row of a padded batch (either side)."""
    return [np.asarray(ids)[np.asarray(m) > 0] for ids, m in zip(input_ids, attention_mask)]
