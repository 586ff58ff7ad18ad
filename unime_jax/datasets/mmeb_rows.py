"""MMEB-train rows: reading (parquet / JSONL), numbering and validation — the parser of the
``mmeb_train`` builder (:mod:`unime_jax.datasets.mmeb_train`).

Input files are parquet or JSONL with the MMEB-train columns ``qry``, ``qry_image_path``,
``pos_text``, ``pos_image_path`` (other columns are ignored). A row's dataset is its ``dataset``
column when there is one, else the file's stem; only the first ``max_rows_per_dataset`` rows of
each dataset are used (the paper trains on the first ≤50K of each of the 20 datasets).

Every row is validated before it is written. A bad row is never written and never dropped
silently: it is counted under exactly one reason (the first check that fails, query side
before target side, in the order of :data:`REASONS`) and its id ``(dataset, row)`` is listed in
the dataset's ``conversion_report.json``. ``row`` is the row's 0-based position within its
dataset.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from unime_jax.errors import DataError, UsageError
from unime_jax.preprocess.images import load_image
from unime_jax.preprocess.text import IMAGE_PLACEHOLDER

COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
REPORT = "conversion_report.json"

# Checks in the order they run; a bad row is reported under the first one that fails.
REASONS = (
    "malformed_row",  # unparseable JSONL line, or a field that is not a string / null
    "empty_query",  # no query text and no query image
    "empty_target",  # no target text and no target image
    "placeholder_mismatch",  # <|image_1|> without an image, an image without it, or 2+ of them
    "image_outside_root",  # absolute image path, or one whose `..` leaves the image root
    "missing_image",  # the image file does not exist
    "empty_image_file",  # the image file has 0 bytes
    "corrupt_image",  # PIL cannot decode the file
)
# Text length is not checked here: it depends on the backbone's tokenizer, and training's
# PairTransform skips (and counts) rows too long for the configured lengths.


class BadRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class ConversionReport:
    """What happened to every row read. ``bad_rows[reason]`` lists ``[dataset, row]`` ids."""

    rows_read: int = 0  # rows considered (within max_rows_per_dataset)
    kept: int = 0
    beyond_limit: dict[str, int] = dataclasses.field(default_factory=dict)  # per dataset
    by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    by_dataset: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    bad_rows: dict[str, list[list[Any]]] = dataclasses.field(default_factory=dict)
    malformed: dict[str, str] = dataclasses.field(default_factory=dict)  # "dataset/row" -> where

    @property
    def excluded(self) -> int:
        return sum(self.by_reason.values())

    def _dataset(self, name: str) -> dict[str, int]:
        return self.by_dataset.setdefault(name, {"read": 0, "kept": 0, "excluded": 0})

    def add_good(self, dataset: str) -> None:
        self.rows_read += 1
        self.kept += 1
        d = self._dataset(dataset)
        d["read"] += 1
        d["kept"] += 1

    def add_bad(self, dataset: str, row: int, reason: str, detail: str = "") -> None:
        self.rows_read += 1
        if reason == "malformed_row":  # unreadable lines: say which file and line
            self.malformed[f"{dataset}/{row}"] = detail
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.bad_rows.setdefault(reason, []).append([dataset, row])
        d = self._dataset(dataset)
        d["read"] += 1
        d["excluded"] += 1
        d[reason] = d.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        by_reason = {r: self.by_reason[r] for r in REASONS if r in self.by_reason}
        return {
            "rows_read": self.rows_read,
            "kept": self.kept,
            "excluded": self.excluded,
            "beyond_limit": dict(sorted(self.beyond_limit.items())),
            "by_reason": by_reason,
            "by_dataset": dict(sorted(self.by_dataset.items())),
            "bad_rows": {r: self.bad_rows[r] for r in by_reason},
            "malformed": dict(self.malformed),
        }

    def table(self) -> str:
        """A short human-readable summary: one line per dataset, then per reason."""
        lines = [f"{'dataset':<32}{'read':>9}{'kept':>9}{'excluded':>9}"]
        for name, d in sorted(self.by_dataset.items()):
            lines.append(f"{name:<32}{d['read']:>9}{d['kept']:>9}{d['excluded']:>9}")
        lines.append(f"{'total':<32}{self.rows_read:>9}{self.kept:>9}{self.excluded:>9}")
        for reason in REASONS:
            if reason in self.by_reason:
                first = ", ".join(f"{d}/{r}" for d, r in self.bad_rows[reason][:3])
                more = " ..." if len(self.bad_rows[reason]) > 3 else ""
                lines.append(f"  {reason:<24}{self.by_reason[reason]:>8}   e.g. {first}{more}")
        for name, n in sorted(self.beyond_limit.items()):
            lines.append(f"  {name}: {n} rows beyond max_rows_per_dataset not read")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reading


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A JSONL line that is not a JSON object (or not UTF-8); ``where`` names file and line."""

    where: str


def _read_rows(path: Path) -> Iterator[dict[str, Any] | Malformed]:
    """Rows of a parquet or JSONL file as dicts; :class:`Malformed` for a line that is not one."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(
                f"{path}: not a readable parquet file ({e})", "download it again"
            ) from None
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataError(
                f"{path}: missing MMEB-train columns {missing}",
                "convert the MMEB-train files as published",
            )
        columns = [*COLUMNS, "dataset"] if "dataset" in names else list(COLUMNS)
        yield from pq.read_table(path, columns=columns).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield Malformed(
                        f"{path.name} line {number}: not UTF-8 ({e.reason} at byte {e.start})"
                    )
                    continue
                except json.JSONDecodeError as e:
                    yield Malformed(f"{path.name} line {number}: not JSON ({e.msg})")
                    continue
                yield (
                    row
                    if isinstance(row, dict)
                    else Malformed(
                        f"{path.name} line {number}: a JSON {type(row).__name__}, not an object"
                    )
                )
    else:
        raise UsageError(f"{path}: unsupported input format", "pass .parquet or .jsonl files")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# validation


class Validator:
    """Checks rows against the image root; each image file is decoded once."""

    def __init__(self, image_root: Path):
        self.root = image_root
        self._images: dict[str, BadRow | None] = {}  # validated relative path -> failure

    def image(self, raw: str) -> str:
        """The normalised relative path of a valid image; raises BadRow otherwise."""
        if raw.startswith(("/", "\\")) or os.path.isabs(raw):
            raise BadRow("image_outside_root", raw)
        rel = posixpath.normpath(raw.replace("\\", "/"))
        if rel == ".." or rel.startswith("../"):
            raise BadRow("image_outside_root", raw)
        if rel not in self._images:
            self._images[rel] = self._check_file(self.root / rel)
        if self._images[rel] is not None:
            raise self._images[rel]
        return rel

    @staticmethod
    def _check_file(path: Path) -> BadRow | None:
        if not path.is_file():
            return BadRow("missing_image", str(path))
        if path.stat().st_size == 0:
            return BadRow("empty_image_file", str(path))
        try:
            load_image(path)  # decodes the pixels: a JPEG cut short fails here, as in training
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
            return BadRow("corrupt_image", f"{path}: {e}")
        return None

    def side(self, text: str, image: str, empty_reason: str) -> str:
        """Checks one side (query or target); returns its normalised image path ("" if none)."""
        if not text.strip() and not image:
            raise BadRow(empty_reason)
        n = text.count(IMAGE_PLACEHOLDER)
        if n > 1 or (n == 1) != bool(image):
            raise BadRow(
                "placeholder_mismatch", f"{n} placeholders, {'an' if image else 'no'} image"
            )
        return self.image(image) if image else ""

    def row(self, row: dict[str, Any] | Malformed) -> dict[str, str]:
        if isinstance(row, Malformed):
            raise BadRow("malformed_row", row.where)
        fields = {}
        for key in COLUMNS:
            value = row.get(key)
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise BadRow("malformed_row", f"{key} is {type(value).__name__}")
            fields[key] = value
        qry_image = self.side(fields["qry"], fields["qry_image_path"], "empty_query")
        pos_image = self.side(fields["pos_text"], fields["pos_image_path"], "empty_target")
        return {**fields, "qry_image_path": qry_image, "pos_image_path": pos_image}


def numbered_rows(
    paths: Sequence[Path],
    max_rows_per_dataset: int,
    report: ConversionReport,
    sources: list[dict[str, Any]] | None = None,
    *,
    names: Sequence[str] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, int, dict[str, Any] | Malformed]]:
    """``(dataset, row, raw row)`` for every row of ``paths`` within the per-dataset limit.

    A row's dataset is its ``dataset`` column, else ``names[i]`` for ``paths[i]`` (default: the
    file's stem); ``row`` counts that dataset's rows across files. Rows beyond the limit are
    counted in ``report.beyond_limit``; rows of a dataset ``keep`` rejects are passed over
    without counting (a subset keeps the row numbers it has among all datasets). Each file's
    path, sha256 and rows per dataset are appended to ``sources`` once it is read.
    """
    seen: collections.Counter[str] = collections.Counter()
    for i, path in enumerate(paths):
        default = names[i] if names is not None else path.stem
        datasets: collections.Counter[str] = collections.Counter()
        for row in _read_rows(path):
            name = row.get("dataset") if isinstance(row, dict) else None
            name = str(name) if name else default
            if keep is not None and not keep(name):
                continue
            if seen[name] >= max_rows_per_dataset:
                report.beyond_limit[name] = report.beyond_limit.get(name, 0) + 1
                continue
            yield name, seen[name], row
            seen[name] += 1
            datasets[name] += 1
        if sources is not None:
            sources.append({"path": str(path), "sha256": sha256(path), "rows": dict(datasets)})


def validated_records(
    rows: Iterable[tuple[str, int, dict[str, Any] | Malformed]],
    validator: Validator,
    report: ConversionReport,
) -> Iterator[dict[str, Any]]:
    """The record of each good row (its fields, ``dataset`` and ``row``), in order; every bad row
    is counted in ``report`` under its first failing check and never yielded."""
    for name, index, row in rows:
        try:
            fields = validator.row(row)
        except BadRow as e:
            report.add_bad(name, index, e.reason, e.detail)
            continue
        report.add_good(name)
        yield {**fields, "dataset": name, "row": index}
