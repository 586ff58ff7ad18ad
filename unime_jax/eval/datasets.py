"""Evaluation-set loaders: COCO / Flickr30K / long-caption retrieval and SugarCrepe (MMEB-eval:
:mod:`unime_jax.eval.mmeb_eval`), and the checking helpers they share.

Every loader validates all of its input before returning and reports problems in a
:class:`DatasetError` whose message names the file, the offending entries (row numbers / ids,
the first :data:`MAX_LISTED` of them plus a count) and what to fix. Rows are never dropped
silently. The policy per loader:

* **Report and raise** (the default everywhere): malformed JSON, a missing or wrongly typed
  field, an empty caption, an image path that is absolute or leaves the image root (checked
  lexically, so a symlinked image directory is fine), an image file that does not exist, a
  caption that points at an unknown image. All problems of a file are collected first, so one
  run shows all of them.
* **Report and count** (only in the retrieval loaders): an image listed in the annotation file
  without any caption cannot be an image→text query, so it is left out of the
  :class:`RetrievalSet` and named in ``RetrievalSet.excluded`` (also emitted as a warning).

Image paths are checked for existence only; decoding errors surface when the images are
embedded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from unime_jax.errors import DataError
from unime_jax.eval.metrics import SUGARCREPE_SPLITS

MAX_LISTED = 20  # problems listed in an error message (the rest are counted)

# ---------------------------------------------------------------------------------------------
# errors and path helpers


class DatasetError(DataError):
    """An evaluation file that cannot be used as is: where and what, and what to fix."""


class Problems:
    """Collects problems of one file and raises them together."""

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def raise_if_any(self, fix: str) -> None:
        if not self.items:
            return
        shown = "\n  ".join(self.items[:MAX_LISTED])
        more = len(self.items) - MAX_LISTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DatasetError(f"{self.source}: {len(self.items)} problem(s):\n  {shown}{tail}", fix)


class BadEntry(Exception):
    pass


def resolve_image(root: str | os.PathLike, raw: Any) -> str:
    """``root / raw`` as a string, for a relative path that stays inside ``root``.

    Raises :class:`BadEntry` for a non-string / empty path, an absolute path or one whose
    ``..`` leaves the root, and for a file that does not exist.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise BadEntry(f"image path {raw!r} is not a non-empty string")
    if raw.startswith(("/", "\\")) or os.path.isabs(raw) or re.match(r"^[A-Za-z]:", raw):
        raise BadEntry(f"image path {raw!r} is absolute; give it relative to the image root")
    rel = posixpath.normpath(raw.replace("\\", "/"))
    if rel == ".." or rel.startswith("../"):
        raise BadEntry(f"image path {raw!r} leaves the image root {str(root)!r}")
    path = Path(root) / rel
    if not path.is_file():
        raise BadEntry(f"image file {str(path)!r} does not exist")
    return str(path)


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "fix the file or re-download it"
        ) from None


def read_json_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, row) pairs of a JSONL file (1-based line numbers) or a JSON list (0-based
    indices); an unparseable JSONL line raises with its line number."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        rows, bad = [], Problems(path)
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    bad.add(f"line {lineno}", f"malformed JSON ({e.msg})")
        bad.raise_if_any("make every non-empty line one JSON object")
        return rows
    data = _load_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data))


def _text(row: dict, key: str) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise BadEntry(f"{key!r} is {value!r}, expected a non-empty string")
    return value.strip()


# ---------------------------------------------------------------------------------------------
# image-text retrieval


@dataclasses.dataclass
class RetrievalSet:
    """Images and their captions; ``image_for_caption[j]`` indexes ``image_paths``.

    ``image_paths`` holds file paths, or the files' bytes (as the TFDS datasets give them: two
    files with the same content are then equal entries, as two paths to them would be two
    entries embedded alike). Every image has at least one caption. ``excluded`` names entries
    of the source that were left out (images without any caption), so counts can be reconciled
    with the source.
    """

    image_paths: list[str | bytes]
    captions: list[str]
    image_for_caption: list[int]
    source: str = ""
    excluded: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if len(self.captions) != len(self.image_for_caption):
            raise ValueError(
                f"{len(self.captions)} captions but {len(self.image_for_caption)} image indices"
            )
        bad = [i for i in self.image_for_caption if not 0 <= i < len(self.image_paths)]
        if bad:
            raise ValueError(f"image indices out of range: {bad[:MAX_LISTED]}")
        paths = [p for p in self.image_paths if not isinstance(p, bytes)]
        if len(set(paths)) != len(paths):
            raise ValueError("image_paths has duplicates; give each image one index")

    def __len__(self) -> int:
        return len(self.image_paths)


def _build_retrieval_set(
    images: Sequence[tuple[str, str]],
    captions_of: dict[str, list[str]],
    source: str,
    max_images: int | None,
) -> RetrievalSet:
    """From (key, path) image entries in order and captions per key: images without captions
    are excluded (reported), then the first ``max_images`` images are kept."""
    excluded = [f"image {key} ({path}): no caption" for key, path in images if not captions_of[key]]
    if excluded:
        warnings.warn(
            f"{source}: {len(excluded)} image(s) without captions left out, e.g. {excluded[0]}",
            stacklevel=3,
        )
    kept = [(key, path) for key, path in images if captions_of[key]]
    if max_images is not None:
        kept = kept[:max_images]
    paths, captions, image_for_caption = [], [], []
    for index, (key, path) in enumerate(kept):
        paths.append(path)
        captions += captions_of[key]
        image_for_caption += [index] * len(captions_of[key])
    return RetrievalSet(paths, captions, image_for_caption, source=source, excluded=excluded)


def load_coco_captions(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    max_images: int | None = None,
) -> RetrievalSet:
    """COCO caption annotations (``captions_*.json``: ``images`` [{id, file_name}],
    ``annotations`` [{image_id, caption}]) → a :class:`RetrievalSet` in ``images`` order, each
    image with its captions in annotation order. ``max_images`` keeps the first N images (that
    have captions). Raises on any problem (see the module docstring); images without captions
    are reported and counted in ``excluded``."""
    path = Path(annotation_file)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (COCO format)")
    if not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{path}: expected an 'annotations' list (COCO caption format)")
    bad = Problems(path)
    images: list[tuple[str, str]] = []
    captions_of: dict[str, list[str]] = {}
    for i, entry in enumerate(data["images"]):
        try:
            if not isinstance(entry, dict) or "id" not in entry:
                raise BadEntry("no 'id'")
            key = str(entry["id"])
            if key in captions_of:
                raise BadEntry(f"duplicate image id {key}")
            image = resolve_image(image_dir, entry.get("file_name"))
        except BadEntry as e:
            bad.add(
                f"images[{i}] (id {entry.get('id') if isinstance(entry, dict) else '?'})", str(e)
            )
            continue
        images.append((key, image))
        captions_of[key] = []
    known_ids = {str(e["id"]) for e in data["images"] if isinstance(e, dict) and "id" in e}
    for i, ann in enumerate(data["annotations"]):
        try:
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise BadEntry("no 'image_id'")
            key = str(ann["image_id"])
            if key not in known_ids:
                raise BadEntry(f"image_id {key} is not in 'images'")
            caption = _text(ann, "caption")
        except BadEntry as e:
            bad.add(
                f"annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})", str(e)
            )
            continue
        if key in captions_of:  # else the image entry itself was bad (already reported)
            captions_of[key].append(caption)
    bad.raise_if_any(
        f"put every image file under {str(image_dir)!r} (paths relative to it) and give every "
        "annotation an existing image_id and a non-empty caption"
    )
    return _build_retrieval_set(images, captions_of, str(path), max_images)


def load_flickr30k(
    karpathy_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    split: str | None = "test",
    max_images: int | None = None,
) -> RetrievalSet:
    """Karpathy-style ``dataset_flickr30k.json`` (``images`` [{filename, split, sentences:
    [{raw}]}]) → the images of ``split`` (``None``: all) with their ``raw`` sentences. COCO's
    ``dataset_coco.json`` also gives each image a ``filepath`` (``val2014``): its image is then
    ``filepath/filename`` under ``image_dir``. Raises on any problem in the selected split;
    images without sentences are reported and counted."""
    path = Path(karpathy_file)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (Karpathy format)")
    bad = Problems(path)
    images: list[tuple[str, str]] = []
    captions_of: dict[str, list[str]] = {}
    seen_splits = set()
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            bad.add(f"images[{i}]", "not an object")
            continue
        seen_splits.add(entry.get("split"))
        if split is not None and entry.get("split") != split:
            continue
        key = str(i)
        try:
            name = entry.get("filename")
            if isinstance(entry.get("filepath"), str) and isinstance(name, str):
                name = posixpath.join(entry["filepath"], name)  # COCO's: val2014/<filename>
            image = resolve_image(image_dir, name)
            sentences = entry.get("sentences")
            if not isinstance(sentences, list):
                raise BadEntry("'sentences' is not a list")
            caps = [_text(s, "raw") for s in sentences]
        except BadEntry as e:
            bad.add(f"images[{i}] ({entry.get('filename')!r})", str(e))
            continue
        images.append((key, image))
        captions_of[key] = caps
    bad.raise_if_any(
        f"put every image file under {str(image_dir)!r} and give every sentence a 'raw' string"
    )
    if not images:
        raise DatasetError(
            f"{path}: no images with split {split!r}; the file has splits {sorted(map(str, seen_splits))}"
        )
    return _build_retrieval_set(images, captions_of, str(path), max_images)


def load_caption_pairs(
    path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    max_images: int | None = None,
) -> RetrievalSet:
    """One caption per image (ShareGPT4V-1K, Urban1K): a JSON list or JSONL of
    ``{"image": path, "caption": text}`` with paths relative to ``image_dir``. An image listed
    twice gets both captions (one image index). Raises on any problem; row numbers in errors
    are 1-based lines for JSONL and 0-based list indices for JSON."""
    path = Path(path)
    label = "line" if path.suffix == ".jsonl" else "row"
    bad = Problems(path)
    images: list[tuple[str, str]] = []
    captions_of: dict[str, list[str]] = {}
    for number, row in read_json_rows(path):
        try:
            if not isinstance(row, dict):
                raise BadEntry(f"expected an object, got {type(row).__name__}")
            image = resolve_image(image_dir, row.get("image"))
            caption = _text(row, "caption")
        except BadEntry as e:
            bad.add(f"{label} {number}", str(e))
            continue
        if image not in captions_of:
            images.append((image, image))
            captions_of[image] = []
        captions_of[image].append(caption)
    bad.raise_if_any(
        f'give every row {{"image": <path under {str(image_dir)!r}>, "caption": <text>}}'
    )
    return _build_retrieval_set(images, captions_of, str(path), max_images)


# ---------------------------------------------------------------------------------------------
# SugarCrepe


class SugarCrepeItem(NamedTuple):
    image_path: str
    caption: str
    negative: str


def load_sugarcrepe(
    directory: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    splits: Iterable[str] = SUGARCREPE_SPLITS,
) -> dict[str, list[SugarCrepeItem]]:
    """SugarCrepe split files ``<directory>/<split>.json`` (``{id: {filename, caption,
    negative_caption}}``) → ``{split: [(image_path, caption, negative), ...]}`` in file order.
    Raises if a requested split file is missing or any item is bad (ids in the message)."""
    directory = Path(directory)
    missing = [s for s in splits if not (directory / f"{s}.json").is_file()]
    if missing:
        raise DatasetError(
            f"{directory}: SugarCrepe split file(s) missing: {', '.join(f'{s}.json' for s in missing)}; "
            "download them from the SugarCrepe repository (data/) or pass splits=..."
        )
    out = {}
    for split in splits:
        path = directory / f"{split}.json"
        data = _load_json(path)
        if not isinstance(data, dict):
            raise DatasetError(
                f"{path}: expected an object {{id: item}}, got {type(data).__name__}"
            )
        bad = Problems(path)
        items = []
        for key, item in data.items():
            try:
                if not isinstance(item, dict):
                    raise BadEntry("not an object")
                image = resolve_image(image_dir, item.get("filename"))
                items.append(
                    SugarCrepeItem(image, _text(item, "caption"), _text(item, "negative_caption"))
                )
            except BadEntry as e:
                bad.add(f"id {key}", str(e))
        bad.raise_if_any(
            f"put every image under {str(image_dir)!r} and give every item 'filename', "
            "'caption' and 'negative_caption'"
        )
        out[split] = items
    return out
