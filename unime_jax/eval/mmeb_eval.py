"""MMEB-eval: the 36 datasets with their meta-tasks and IND/OOD split, and the row loader.

Rows are validated like every evaluation file (:mod:`unime_jax.eval.datasets`): all problems of
a file are reported together, with row numbers, in a :class:`DatasetError`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from unime_jax.eval.datasets import (
    BadEntry,
    DatasetError,
    Problems,
    read_json_rows,
    resolve_image,
)

MMEB_META_TASKS: dict[str, tuple[str, ...]] = {
    "classification": (
        "ImageNet-1K",
        "N24News",
        "HatefulMemes",
        "VOC2007",
        "SUN397",
        "Place365",
        "ImageNet-A",
        "ImageNet-R",
        "ObjectNet",
        "Country211",
    ),
    "vqa": (
        "OK-VQA",
        "A-OKVQA",
        "DocVQA",
        "InfographicsVQA",
        "ChartQA",
        "Visual7W",
        "ScienceQA",
        "VizWiz",
        "GQA",
        "TextVQA",
    ),
    "retrieval": (
        "VisDial",
        "CIRR",
        "VisualNews_t2i",
        "VisualNews_i2t",
        "MSCOCO_t2i",
        "MSCOCO_i2t",
        "NIGHTS",
        "WebQA",
        "FashionIQ",
        "Wiki-SS-NQ",
        "OVEN",
        "EDIS",
    ),
    "grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
MMEB_DATASETS: tuple[str, ...] = tuple(d for names in MMEB_META_TASKS.values() for d in names)
MMEB_IND: frozenset[str] = frozenset(
    {
        "ImageNet-1K",
        "N24News",
        "HatefulMemes",
        "VOC2007",
        "SUN397",
        "OK-VQA",
        "A-OKVQA",
        "DocVQA",
        "InfographicsVQA",
        "ChartQA",
        "Visual7W",
        "VisDial",
        "CIRR",
        "VisualNews_t2i",
        "VisualNews_i2t",
        "MSCOCO_t2i",
        "MSCOCO_i2t",
        "NIGHTS",
        "WebQA",
        "MSCOCO",
    }
)
MMEB_OOD: frozenset[str] = frozenset(MMEB_DATASETS) - MMEB_IND
UNKNOWN = "unknown"


def _name_key(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


_CANONICAL = {_name_key(d): d for d in MMEB_DATASETS}


def canonical_mmeb_name(name: str) -> str:
    """The MMEB spelling of a dataset name, matching case-insensitively and ignoring ``-``,
    ``_`` and spaces (``imagenet_1k`` → ``ImageNet-1K``); unknown names come back unchanged."""
    return _CANONICAL.get(_name_key(name), name)


def mmeb_meta_task(name: str) -> str:
    """``classification`` / ``vqa`` / ``retrieval`` / ``grounding``, or ``unknown``."""
    name = canonical_mmeb_name(name)
    for task, names in MMEB_META_TASKS.items():
        if name in names:
            return task
    return UNKNOWN


def mmeb_split(name: str) -> str:
    """``IND`` (one of the 20 training sets), ``OOD`` (the other 16) or ``unknown``."""
    name = canonical_mmeb_name(name)
    if name in MMEB_IND:
        return "IND"
    return "OOD" if name in MMEB_OOD else UNKNOWN


@dataclasses.dataclass(frozen=True)
class MmebRow:
    """One MMEB-eval query and its candidates; the ground truth is candidate 0. Image paths
    are resolved (``None`` = no image); ``row`` is the source row number (for messages)."""

    dataset: str
    row: int
    qry_text: str
    qry_image: str | None
    tgt_texts: tuple[str, ...]
    tgt_images: tuple[str | None, ...]


_SHARD_STEM = re.compile(r"^(test|eval|validation|train|data)(-\d+-of-\d+)?$")


def mmeb_dataset_name(path: str | os.PathLike) -> str:
    """A file's dataset: its stem, or its folder's name for HF shard files such as
    ``ImageNet-1K/test-00000-of-00001.parquet``; canonicalised when it is an MMEB name."""
    path = Path(path)
    stem = path.parent.name if _SHARD_STEM.match(path.stem) else path.stem
    return canonical_mmeb_name(stem)


MMEB_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
IMAGE_PLACEHOLDER = "<|image_1|>"


def _mmeb_raw_rows(path: Path) -> tuple[str, list[tuple[int, Any]]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        missing = [c for c in MMEB_COLUMNS if c not in names]
        if missing:
            raise DatasetError(
                f"{path}: missing MMEB-eval columns {missing} (has {names}); expected "
                f"{list(MMEB_COLUMNS)}"
            )
        return "row", list(enumerate(pq.read_table(path, columns=list(MMEB_COLUMNS)).to_pylist()))
    if path.suffix in (".jsonl", ".json"):
        return ("line" if path.suffix == ".jsonl" else "row"), read_json_rows(path)
    raise DatasetError(f"{path}: unsupported format {path.suffix!r}; use .parquet or .jsonl")


def _side(text: Any, image: Any, image_root: str | os.PathLike, what: str):
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise BadEntry(f"{what} text is {type(text).__name__}, expected a string")
    if image is not None and not isinstance(image, str):
        raise BadEntry(f"{what} image path is {type(image).__name__}, expected a string")
    image = resolve_image(image_root, image) if image else None
    if not text.strip() and image is None:
        raise BadEntry(f"{what} has neither text nor image")
    n = text.count(IMAGE_PLACEHOLDER)
    if n > 1 or (n == 1) != (image is not None):
        raise BadEntry(
            f"{what} has {n} {IMAGE_PLACEHOLDER} placeholder(s) and {'an' if image else 'no'} image"
        )
    return text, image


def load_mmeb_file(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    dataset: str | None = None,
    max_rows: int | None = None,
) -> list[MmebRow]:
    """MMEB-eval rows (parquet, JSONL or a JSON list) with columns ``qry_text``,
    ``qry_img_path``, ``tgt_text`` (list), ``tgt_img_path`` (list); ground truth at candidate
    0. ``dataset`` defaults to :func:`mmeb_dataset_name`. Image paths are relative to
    ``image_root``; ``""`` / null means no image, and an empty or null ``tgt_img_path`` means
    text-only candidates. Raises on any bad row (malformed JSON, wrong types, unequal candidate
    lists, no candidates, an empty side, a placeholder/image mismatch, an image outside the
    root or missing), listing row numbers. ``max_rows`` keeps the first N rows (checked)."""
    path = Path(path)
    name = canonical_mmeb_name(dataset) if dataset else mmeb_dataset_name(path)
    label, raw_rows = _mmeb_raw_rows(path)
    if max_rows is not None:
        raw_rows = raw_rows[:max_rows]
    bad = Problems(path)
    rows = []
    for number, raw in raw_rows:
        try:
            if not isinstance(raw, dict):
                raise BadEntry(f"expected an object, got {type(raw).__name__}")
            missing = [c for c in ("qry_text", "tgt_text") if c not in raw]
            if missing:
                raise BadEntry(f"missing {missing}")
            qry_text, qry_image = _side(
                raw["qry_text"], raw.get("qry_img_path"), image_root, "query"
            )
            texts, images = raw["tgt_text"], raw.get("tgt_img_path")
            if isinstance(texts, str) or not isinstance(texts, list):
                raise BadEntry(f"tgt_text is {type(texts).__name__}, expected a list")
            if not texts:
                raise BadEntry("no candidates (tgt_text is empty)")
            if images is None or (isinstance(images, list) and not images):
                images = [None] * len(texts)
            if not isinstance(images, list) or len(images) != len(texts):
                raise BadEntry(
                    f"tgt_img_path has {len(images) if isinstance(images, list) else images!r} "
                    f"entries but tgt_text has {len(texts)}"
                )
            sides = [
                _side(t, im, image_root, f"candidate {c}")
                for c, (t, im) in enumerate(zip(texts, images))
            ]
        except BadEntry as e:
            bad.add(f"{label} {number}", str(e))
            continue
        rows.append(
            MmebRow(
                name,
                number,
                qry_text,
                qry_image,
                tuple(t for t, _ in sides),
                tuple(im for _, im in sides),
            )
        )
    bad.raise_if_any(
        f"give every row a query and candidate 0 = the ground truth, with image paths under "
        f"{str(image_root)!r} and one {IMAGE_PLACEHOLDER} per image"
    )
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows


def load_mmeb(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    image_root: str | os.PathLike,
    *,
    max_rows: int | None = None,
) -> dict[str, list[MmebRow]]:
    """Several MMEB-eval files (or a directory, searched recursively for ``*.parquet`` /
    ``*.jsonl``) → ``{dataset: rows}``; files of one dataset (HF shards) are concatenated in
    sorted path order. Names outside the 36 MMEB datasets are kept (their meta-task is
    ``unknown``, see :func:`unime_jax.eval.evaluators.evaluate_mmeb`)."""
    if isinstance(paths, str | os.PathLike):
        root = Path(paths)
        if root.is_dir():
            files = sorted(
                p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file()
            )
            if not files:
                raise DatasetError(f"{root}: no .parquet or .jsonl files")
        else:
            files = [root]
    else:
        files = sorted(Path(p) for p in paths)
    out: dict[str, list[MmebRow]] = {}
    for file in files:
        name = mmeb_dataset_name(file)
        have = len(out.get(name, []))
        left = None if max_rows is None else max_rows - have
        if left is not None and left <= 0:
            continue
        out.setdefault(name, []).extend(load_mmeb_file(file, image_root, max_rows=left))
    return out
