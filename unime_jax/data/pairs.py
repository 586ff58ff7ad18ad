"""Stage-2 rows (MMEB-train style query/target pairs) → one :class:`Example` per side.

Records come from a prepared pairs dataset (``unime_jax.datasets.source("mmeb_train", ...)``)
or any in-memory sequence of dicts with ``qry`` / ``qry_image`` / ``pos_text`` / ``pos_image``
(``*_image_path`` keys are accepted too; an image is a path, bytes, a PIL image or ``None``).
Each side's instruction is used verbatim with ``<|image_1|>`` swapped for the backbone's image token (no
chat template in stage 2). A bad row becomes a skip marker naming the reason (:data:`REASONS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain

from unime_jax.data.pipeline import skip
from unime_jax.preprocess.example import Example
from unime_jax.preprocess.images import load_image, resize_square
from unime_jax.preprocess.processor import Processor
from unime_jax.preprocess.text import IMAGE_PLACEHOLDER

SIDES = ("query", "target")
REASONS = (
    "empty_side",  # neither text nor image on one side
    "placeholder_mismatch",  # <|image_1|> count does not match the image (or raw image tokens)
    "missing_image",  # the image file is gone
    "corrupt_image",  # the image file cannot be decoded
    "too_long",  # the expanded sequence does not fit query_length / target_length
    "too_many_tiles",  # the image needs more units than max_units
)


class SkipRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _pick(record: Mapping[str, Any], *keys: str):
    for key in keys:
        if key in record:
            return record[key]
    return None


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"qry", "qry_image", "pos_text", "pos_image", "id"}`` from either key convention."""
    if "dataset" in record and "row" in record:
        row_id = f"{record['dataset']}/{record['row']}"
    elif "_index" in record:
        row_id = f"#{record['_index']}"
    else:
        row_id = "?"
    return {
        "qry": record.get("qry") or "",
        "qry_image": _pick(record, "qry_image", "qry_image_path") or None,
        "pos_text": record.get("pos_text") or "",
        "pos_image": _pick(record, "pos_image", "pos_image_path") or None,
        "id": row_id,
    }


class PairTransform(grain.transforms.Map):
    """One record → ``{"query": Example, "target": Example}``, or a skip marker.

    ``lengths``: the longest sequence each side may have; ``max_units``: image units one row may
    take (LLaVA: tiles); ``image_size``: resize every image to this square first (VLM2Vec's and
    UniME's 336 px training images; 0 keeps the original size).
    """

    def __init__(
        self,
        processor: Processor,
        *,
        lengths: Mapping[str, int],
        max_units: int,
        image_size: int = 0,
    ):
        self.processor = processor
        self.lengths = dict(lengths)
        self.max_units = max_units
        self.image_size = image_size

    def encode(self, side: str, text: str, image) -> Example:
        """One side → its Example; raises :class:`SkipRow`."""
        if not text.strip() and image is None:
            raise SkipRow("empty_side", side)
        n = text.count(IMAGE_PLACEHOLDER)
        if n > 1 or (n == 1) != (image is not None):
            raise SkipRow("placeholder_mismatch", f"{side}: {n} placeholders")
        if image is not None:
            try:
                image = resize_square(load_image(image), self.image_size)
            except FileNotFoundError as e:
                raise SkipRow("missing_image", str(e)) from e
            except Exception as e:  # anything a broken file makes PIL raise
                raise SkipRow("corrupt_image", str(e)) from e
        try:
            example = self.processor.encode(self.processor.instruction(text), image)
        except ValueError as e:  # the text holds raw image tokens of the backbone
            raise SkipRow("placeholder_mismatch", f"{side}: {e}") from e
        if len(example) > self.lengths[side]:
            raise SkipRow("too_long", f"{side}: {len(example)} > {self.lengths[side]} tokens")
        if example.num_units > self.max_units:
            raise SkipRow(
                "too_many_tiles", f"{side}: {example.num_units} > {self.max_units} image units"
            )
        return example

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        r = normalize_record(record)
        try:
            query = self.encode("query", r["qry"], r["qry_image"])
            target = self.encode("target", r["pos_text"], r["pos_image"])
        except SkipRow as e:
            return skip(e.reason, r["id"], e.detail)
        return {"query": query, "target": target}
