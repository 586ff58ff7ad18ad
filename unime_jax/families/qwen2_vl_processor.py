"""The Qwen2-VL / Qwen2.5-VL host processor: prompts, ``<|image_pad|>`` expansion, merge-window
units and M-RoPE positions, without torch or torchvision.

Images go through ``Qwen2VLImageProcessorPil`` (smart resize to multiples of patch x merge within
min/max pixels, bicubic); each image becomes one unit per 2x2 merge window
(:mod:`unime_jax.models.qwen_vision`) and one ``<|image_pad|>`` token per unit, as
``Qwen2VLProcessor`` expands it. Positions (L, 3) are numbered on the host in one of two modes:

- ``"transformers"`` (default): transformers 5.x ``get_rope_index`` -- text runs count on, an
  image takes (t, h, w) = (p, p + row, p + col) on its merged grid, then p += max(rows, cols);
- ``"vision_start"``: the older rule (transformers 4.4x-4.5x) that VLM2Vec-Qwen2VL and
  UniME-V2 were trained with -- a row gets M-RoPE for as many images as it has
  ``<|vision_start|><|image_pad|>`` pairs (its first ones); the others, e.g. every image of a
  bare-``<|image_pad|>`` MMEB instruction, get 1-D positions like text.

Choose with ``processor.position_mode = ...`` or the checkpoint's config.json key
``"unime_position_mode"``. Prompts: UniME's "Summary above ... in one word:" through the chat
template (:meth:`image_prompt` / :meth:`text_prompt`); MMEB / VLM2Vec instructions verbatim with
``<|image_1|>`` swapped for a bare ``<|image_pad|>`` (:meth:`instruction`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unime_jax.models.qwen2_vl import QwenVLConfig
from unime_jax.models.qwen_vision import QwenVisionConfig
from unime_jax.preprocess.example import Example, ImageUnits, UnitLayout
from unime_jax.preprocess.images import load_image, pixel_lut
from unime_jax.preprocess.processor import (
    Processor,
    RowImages,
    images_per_prompt,
    row_images,
    unpad,
)
from unime_jax.preprocess.text import IMAGE_PROMPT, TEXT_PROMPT

POSITION_MODES = ("transformers", "vision_start")
POSITION_MODE_KEY = "unime_position_mode"  # optional config.json key: the checkpoint's mode

Span = tuple[int, int, int]  # an image's first token, and its merged grid (rows, cols)


def mrope_positions(length: int, spans: Sequence[Span]) -> np.ndarray:
    """(length, 3) int32 positions with M-RoPE for the images at ``spans`` (in token order);
    every other token counts on from the previous position, like text."""
    pos = np.empty((length, 3), np.int32)
    cur = i = 0
    for start, rows, cols in spans:
        pos[i:start] = (cur + np.arange(start - i))[:, None]
        cur += start - i
        r, c = np.divmod(np.arange(rows * cols), cols)
        pos[start : start + rows * cols] = np.stack([np.full_like(r, cur), cur + r, cur + c], -1)
        cur += max(rows, cols)
        i = start + rows * cols
    pos[i:] = (cur + np.arange(length - i))[:, None]
    return pos


def smart_resize(height: int, width: int, vision: QwenVisionConfig, size: dict) -> tuple[int, int]:
    """The image processor's resize target (transformers' own function)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = vision.patch_size * vision.merge_size
    return smart_resize(height, width, factor, size["shortest_edge"], size["longest_edge"])


def units_per_image(vision: QwenVisionConfig, size: dict, image_size: int = 0) -> int:
    """Merge windows (= image tokens) of one image resized to ``image_size`` square, or the most
    any image can take within ``size["longest_edge"]`` pixels (``image_size`` 0)."""
    window_px = (vision.patch_size * vision.merge_size) ** 2
    if image_size <= 0:
        return size["longest_edge"] // window_px
    h, w = smart_resize(image_size, image_size, vision, size)
    return h * w // window_px


class QwenVLProcessor(Processor):
    """Prompts, tokenisation, units and positions for Qwen2-VL / Qwen2.5-VL (module doc)."""

    def __init__(
        self,
        cfg: QwenVLConfig,
        tokenizer,
        image_processor=None,
        position_mode: str = "transformers",
    ):
        super().__init__(tokenizer, cfg.image_token_id, add_special_tokens=False)
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode {position_mode!r} is not one of {POSITION_MODES}")
        self.family, self.config = cfg.family, cfg
        self.image_processor = image_processor
        self.position_mode = position_mode
        self.layout = None
        if cfg.vision is not None and image_processor is not None:
            self.layout = UnitLayout(
                rows_per_unit=1, constants={"pixel_lut": pixel_lut(image_processor)}
            )

    # ---- prompts (UniME's, through the Qwen2-VL chat template) -----------------------------
    def image_prompt(self) -> str:
        return self.chat([{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT + "\n"}])

    def text_prompt(self, text: str) -> str:
        return self.chat([{"type": "text", "text": text + TEXT_PROMPT + "\n"}])

    # ---- images ---------------------------------------------------------------------------
    def max_units(self, image_size: int = 0) -> int:
        return units_per_image(self.config.vision, self._size(), image_size)

    def _size(self) -> dict:
        size = self.image_processor.size
        return {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}

    def _process(self, images: list, raw: bool) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values (Σ patches, C·T·P·P), image_grid_thw (n, 3)); unscaled uint8 values
        when ``raw``."""
        if self.layout is None:
            raise ValueError("this model was loaded text-only; it cannot take images")
        extra = dict(do_rescale=False, do_normalize=False) if raw else {}
        out = self.image_processor(images=images, return_tensors="np", **extra)
        return out["pixel_values"], np.asarray(out["image_grid_thw"], np.int64)

    def _image(
        self, patches: np.ndarray, rows: int, cols: int, at: np.ndarray, raw: bool
    ) -> ImageUnits:
        """One image's ``pixel_values`` rows (gh·gw, C·T·P·P) -> its units (uint8 when ``raw``,
        else normalised floats); ``at``: the sequence positions of its tokens."""
        v = self.config.vision
        t = v.temporal_patch_size
        x = patches.reshape(rows * cols, v.patches_per_unit, v.in_channels, t, v.patch_size**2)
        # The image processor repeats a still image's frame; outside input may hold a video.
        if not raw and not np.array_equal(x, np.repeat(x[:, :, :, :1], t, axis=3)):
            raise ValueError(
                "pixel_values hold different temporal frames (a video?): not supported"
            )
        frame = x[:, :, :, 0].astype(np.uint8 if raw else np.float32)
        r, c = np.divmod(np.arange(rows * cols), cols)
        window = np.zeros_like(r)
        if v.window:  # numbered row by row, so ids are dense within the image
            window = (r // v.window) * -(-cols // v.window) + c // v.window
        first = np.zeros(rows * cols, np.int32)
        first[0] = 1
        arrays = {
            "pixels": frame,
            "coords": np.stack([r, c, window], -1).astype(np.int32),
            "first": first,
            "valid": np.ones(rows * cols, np.int32),
        }
        n = rows * cols
        return ImageUnits(
            arrays, np.asarray(at), np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1))
        )

    def positions(self, ids: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
        """(L, 3) positions of a row with expanded image tokens, in ``position_mode``."""
        if self.position_mode == "vision_start":
            pairs = (ids[:-1] == self.config.vision_start_token_id) & (
                ids[1:] == self.image_token_id
            )
            spans = spans[: int(pairs.sum())]
        return mrope_positions(len(ids), spans)

    def _expand(self, ids: list[int], grids: np.ndarray) -> tuple[list[int], list[Span]]:
        """Each ``<|image_pad|>`` of the prompt repeated once per merge window of its image."""
        m = self.config.vision.merge_size if grids.size else 1
        expanded, spans = [], []
        for token in ids:
            if token != self.image_token_id:
                expanded.append(token)
                continue
            _, gh, gw = (int(g) for g in grids[len(spans)])
            spans.append((len(expanded), gh // m, gw // m))
            expanded += [token] * (gh * gw // (m * m))
        return expanded, spans

    def _row(self, prompt: str, images: list, what: str, raw: bool):
        """(expanded ids, spans, pixel_values, grids) of one prompt and its images."""
        ids = self.tokenize(prompt)
        count = ids.count(self.image_token_id)
        if count != len(images):
            raise ValueError(f"{what} has {count} image token(s) but {len(images)} image(s)")
        pixels, grids = self._process(images, raw) if images else (None, np.zeros((0, 3), int))
        return (*self._expand(ids, grids), pixels, grids)

    def encode(self, prompt: str, images: RowImages = None) -> Example:
        images = [load_image(im) for im in row_images(images)]
        ids, spans, pixels, grids = self._row(prompt, images, "the prompt", raw=True)
        ids = np.asarray(ids, np.int32)
        units, offset = [], 0
        for (start, rows, cols), (_, gh, gw) in zip(spans, grids):
            at = start + np.arange(rows * cols)
            units.append(self._image(pixels[offset : offset + gh * gw], rows, cols, at, raw=True))
            offset += gh * gw
        return Example(ids, self.positions(ids, spans), units)

    def __call__(self, prompts, images=None, *, max_length=None, padding_side="right") -> dict:
        """What ``Qwen2VLProcessor`` returns for these prompts (one ``<|image_pad|>`` per image):
        ``input_ids`` with image tokens expanded, ``attention_mask``, ``mm_token_type_ids`` (1 at
        image tokens), and for the batch's images in order ``pixel_values`` (Σ patches,
        C·T·P·P) normalised and ``image_grid_thw`` (num_images, 3)."""
        images = images_per_prompt(prompts, images)
        rows, pixels, grids = [], [], []
        for i, (prompt, row) in enumerate(zip(prompts, images)):
            row = [load_image(im) for im in row_images(row)]
            ids, _, pv, g = self._row(prompt, row, f"prompt {i}", raw=False)
            rows.append(ids)
            if row:
                pixels.append(pv)
                grids.append(g)
        batch = self.pad_hf_batch(rows, max_length, padding_side)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).astype(np.int64)
        if pixels:
            batch["pixel_values"] = np.concatenate(pixels).astype(np.float32)
            batch["image_grid_thw"] = np.concatenate(grids)
        return batch

    def from_hf(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        **unused,
    ) -> list[Example]:
        """Examples from ``Qwen2VLProcessor`` outputs: image k of the batch (``image_grid_thw``
        order) fills the next run of its gh·gw/4 image tokens, whatever rows hold none or
        several."""
        if mm_token_type_ids is not None and np.any(np.asarray(mm_token_type_ids) > 1):
            raise ValueError("mm_token_type_ids mark video tokens: videos are not supported")
        rows = unpad(input_ids, attention_mask)
        grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw come together")
        if np.any(grids[:, 0] != 1):
            raise ValueError(
                f"image_grid_thw {grids.tolist()} has t != 1: videos are not supported"
            )
        m = self.config.vision.merge_size if grids.size else 1
        offsets = np.concatenate([[0], np.cumsum(grids[:, 1] * grids[:, 2])])
        if pixel_values is not None and len(pixel_values) != offsets[-1]:
            raise ValueError(
                f"pixel_values has {len(pixel_values)} rows, image_grid_thw implies {offsets[-1]}"
            )
        examples, k = [], 0
        for i, ids in enumerate(rows):
            ids = ids.astype(np.int32)
            at_all = np.flatnonzero(ids == self.image_token_id)
            units, spans, used = [], [], 0
            while used < at_all.size:
                if k >= len(grids):
                    raise ValueError(f"row {i} has image tokens beyond the {len(grids)} image(s)")
                rows_k, cols_k = int(grids[k, 1]) // m, int(grids[k, 2]) // m
                at = at_all[used : used + rows_k * cols_k]
                if at.size != rows_k * cols_k or at[-1] - at[0] + 1 != at.size:
                    raise ValueError(
                        f"row {i}: image {k} (grid {grids[k].tolist()}) needs {rows_k * cols_k} "
                        "consecutive image tokens; expand <|image_pad|> with the processor"
                    )
                patches = np.asarray(pixel_values[offsets[k] : offsets[k + 1]], np.float32)
                units.append(self._image(patches, rows_k, cols_k, at, raw=False))
                spans.append((int(at[0]), rows_k, cols_k))
                used += at.size
                k += 1
            examples.append(Example(ids, self.positions(ids, spans), units))
        if k != len(grids):
            raise ValueError(f"{len(grids)} images given, but the batch has tokens for {k}")
        return examples
