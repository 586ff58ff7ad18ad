"""The host processor of the LLaVA families: UniME prompts, tokenisation, AnyRes tiles (uint8
with the exact lookup table) and their gather maps (:mod:`unime_jax.preprocess.anyres`), and the
torch-free equivalent of ``LlavaOnevisionProcessor`` / ``LlavaNextProcessor`` in both directions.
"""

from __future__ import annotations

import numpy as np

from unime_jax.models.llava import LlavaConfig
from unime_jax.preprocess import anyres
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


class LlavaProcessor(Processor):
    """UniME prompts, tokenisation and AnyRes tiles for one LLaVA family (module doc)."""

    def __init__(
        self,
        family: str,
        cfg: LlavaConfig,
        spec: anyres.AnyResSpec | None,
        tokenizer,
        image_processor=None,
    ):
        super().__init__(tokenizer, cfg.image_token_id, add_special_tokens=family == "llava_next")
        self.family, self.config, self.spec = family, cfg, spec
        self.image_processor = image_processor
        self.layout = None
        if cfg.vision is not None and image_processor is not None:
            self.layout = UnitLayout(
                rows_per_unit=spec.patches_per_tile,
                special_rows=1,  # image_newline
                taps=spec.taps,
                constants={"pixel_lut": pixel_lut(image_processor)},
            )

    # ---- prompts (UniME, spec §3) ---------------------------------------------------------
    def image_prompt(self) -> str:
        if self.family == "llava_next":
            return f"[INST] {self.image_token}\n{IMAGE_PROMPT} [/INST]"
        return self.chat([{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT + "\n"}])

    def text_prompt(self, text: str) -> str:
        if self.family == "llava_next":
            return f"[INST] {text}{TEXT_PROMPT} [/INST]"
        return self.chat([{"type": "text", "text": text + TEXT_PROMPT + "\n"}])

    # ---- images ---------------------------------------------------------------------------
    def max_units(self, image_size: int = 0) -> int:
        """Tiles of one image: at ``image_size`` x ``image_size``, or the most any size needs."""
        if image_size > 0:
            return anyres.num_tiles((image_size, image_size), self.spec)
        return self.spec.max_tiles

    def base_only(self, num_images: int) -> bool:
        """OneVision encodes each image of a multi-image row as its base tile only."""
        return self.family == "llava_onevision" and num_images > 1

    def _process(self, images: list, raw: bool) -> dict:
        """The HF image processor on one row's images (uint8 tiles when ``raw``)."""
        if self.layout is None:
            raise ValueError("this model was loaded text-only; it cannot take images")
        batch = [images] if self.family == "llava_onevision" else images
        extra = dict(do_rescale=False, do_normalize=False) if raw else {}
        return self.image_processor(images=batch, return_tensors="np", **extra)

    def _unit(self, tiles: np.ndarray, size: tuple[int, int], multi: bool, positions) -> ImageUnits:
        index, weight = anyres.image_layout(size, self.spec, base_only=multi)
        taps = self.spec.taps
        return ImageUnits(
            {"pixels": tiles}, np.asarray(positions), index[:, :taps], weight[:, :taps]
        )

    def encode(self, prompt: str, images: RowImages = None) -> Example:
        images = [load_image(im) for im in row_images(images)]
        ids = self.tokenize(prompt)
        count = ids.count(self.image_token_id)
        if count != len(images):
            raise ValueError(
                f"the prompt has {count} image token(s) but {len(images)} image(s) were given"
            )
        units = []
        if images:
            out = self._process(images, raw=True)
            multi = self.base_only(len(images))
            expanded: list[int] = []
            k = 0
            for token in ids:
                if token != self.image_token_id:
                    expanded.append(token)
                    continue
                size = tuple(int(s) for s in out["image_sizes"][k])
                n_tiles = anyres.num_tiles(size, self.spec, base_only=multi)
                n = anyres.num_image_tokens(size, self.spec, base_only=multi)
                at = len(expanded) + np.arange(n)
                units.append(self._unit(out["pixel_values"][k, :n_tiles], size, multi, at))
                expanded += [self.image_token_id] * n
                k += 1
            ids = expanded
        return Example.sequential(ids, units)

    def __call__(self, prompts, images=None, *, max_length=None, padding_side="right") -> dict:
        """What ``LlavaOnevisionProcessor`` / ``LlavaNextProcessor`` return for these prompts:
        image tokens expanded, ``pixel_values`` (num_images, max_tiles, C, H, W) normalised and
        ``image_sizes`` (num_images, 2) for the batch's images in order, and for OneVision
        ``batch_num_images`` (images per row)."""
        images = images_per_prompt(prompts, images)
        rows, tiles, sizes, counts = [], [], [], []
        for i, (prompt, row) in enumerate(zip(prompts, images)):
            row = [load_image(im) for im in row_images(row)]
            ids = self.tokenize(prompt)
            if ids.count(self.image_token_id) != len(row):
                raise ValueError(
                    f"prompt {i} has {ids.count(self.image_token_id)} image token(s) but "
                    f"{len(row)} image(s)"
                )
            counts.append(len(row))
            if row:
                out = self._process(row, raw=False)
                multi = self.base_only(len(row))
                expanded, k = [], 0
                for token in ids:
                    if token != self.image_token_id:
                        expanded.append(token)
                        continue
                    size = tuple(int(s) for s in out["image_sizes"][k])
                    n = anyres.num_image_tokens(size, self.spec, base_only=multi)
                    expanded += [self.image_token_id] * n
                    tiles.append(out["pixel_values"][k])
                    sizes.append(size)
                    k += 1
                ids = expanded
            rows.append(ids)
        batch = self.pad_hf_batch(rows, max_length, padding_side)
        if tiles:
            n_max = max(t.shape[0] for t in tiles)
            pixel_values = np.zeros((len(tiles), n_max, *tiles[0].shape[1:]), np.float32)
            for k, t in enumerate(tiles):
                pixel_values[k, : t.shape[0]] = t
            batch |= {"pixel_values": pixel_values, "image_sizes": np.asarray(sizes, np.int64)}
            if self.family == "llava_onevision":
                batch["batch_num_images"] = np.asarray(counts, np.int64)
        return batch

    def from_hf(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        image_sizes=None,
        batch_num_images=None,
        **unused,
    ) -> list[Example]:
        """Examples from HF processor outputs: image k of the batch (in row-major token order)
        fills the k-th image's tokens, whatever rows hold no image or several."""
        rows = unpad(input_ids, attention_mask)
        if pixel_values is None:
            for i, ids in enumerate(rows):
                if np.any(ids == self.image_token_id):  # else its features would be the token's
                    raise ValueError(f"row {i} has image tokens, but no pixel_values are given")
            return [Example.sequential(r) for r in rows]
        if image_sizes is None:
            raise ValueError("pixel_values given without image_sizes")
        pixel_values = np.asarray(pixel_values, np.float32)
        if pixel_values.ndim == 4:  # one tile per image
            pixel_values = pixel_values[:, None]
        sizes = [tuple(int(s) for s in size) for size in np.asarray(image_sizes)]
        if batch_num_images is None or self.family != "llava_onevision":
            multi = [False] * len(sizes)
        else:  # transformers: need_patching = [n == 1 for n in batch_num_images for _ in range(n)]
            multi = [int(n) != 1 for n in np.asarray(batch_num_images) for _ in range(int(n))]
        if len(multi) != len(sizes):
            raise ValueError(
                f"batch_num_images counts {len(multi)} images, image_sizes {len(sizes)}"
            )
        examples, k = [], 0
        for i, ids in enumerate(rows):
            positions = np.flatnonzero(ids == self.image_token_id)
            units, used = [], 0
            while used < positions.size:
                if k >= len(sizes):
                    raise ValueError(
                        f"row {i} has image tokens beyond the {len(sizes)} image(s) given"
                    )
                n = anyres.num_image_tokens(sizes[k], self.spec, base_only=multi[k])
                n_tiles = anyres.num_tiles(sizes[k], self.spec, base_only=multi[k])
                if used + n > positions.size or n_tiles > pixel_values.shape[1]:
                    raise ValueError(
                        f"row {i}: image {k} of size {sizes[k]} yields {n} features in "
                        f"{n_tiles} tiles, but the row has {positions.size - used} image tokens "
                        f"left and pixel_values {pixel_values.shape[1]} tiles; expand the image "
                        "token with the processor for this image size"
                    )
                at = positions[used : used + n]
                if at[-1] - at[0] != n - 1:
                    raise ValueError(
                        f"row {i}: the {n} image tokens of image {k} are not one unbroken run; "
                        "expand the image token with the processor"
                    )
                units.append(self._unit(pixel_values[k, :n_tiles], sizes[k], multi[k], at))
                used += n
                k += 1
            examples.append(Example.sequential(ids, units))
        if k != len(sizes):
            raise ValueError(f"{len(sizes)} images given, but the batch has tokens for {k}")
        return examples
