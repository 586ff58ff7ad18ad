"""MMEB-train → validated ArrayRecord shards (stage 2 data); :mod:`unime_jax.data.mmeb_train` reads them.

Input files are parquet or JSONL with the MMEB-train columns ``qry``, ``qry_image_path``,
``pos_text``, ``pos_image_path`` (other columns are ignored). A row's dataset is its ``dataset``
column when there is one, else the file's stem; only the first ``max_rows_per_dataset`` rows of
each dataset are used (the paper trains on the first ≤50K of each of the 20 datasets).

Every row is validated before it is written. A bad row is never written and never dropped
silently: it is counted under exactly one reason (the first check that fails, query side
before target side, in the order of :data:`REASONS`) and its id ``(dataset, row)`` is listed in
``conversion_report.json``. ``row`` is the row's 0-based position within its dataset.

Output (``out_dir``)::

    mmeb-00000-of-0000N.array_record   JSON records {"qry", "qry_image_path", "pos_text",
                                        "pos_image_path", "dataset", "row"}, image paths
                                        relative to the image root ("" = no image)
    manifest.json                      count, shards, image_root, source files + sha256, time
    conversion_report.json             counts per reason / dataset, bad row ids per reason

Conversion is deterministic (same inputs, same shard bytes; only the manifest's ``created``
time differs) and atomic: everything is written to a temporary sibling directory that is
renamed to ``out_dir`` at the end, so a crash never leaves a dataset that looks complete.

CLI::

    python -m unime_jax.data.mmeb_convert --input A.parquet --input B.jsonl --image-root DIR --out DIR \
        [--tokenizer DIR --max-text-tokens N] [--max-rows-per-dataset N] [--overwrite]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import json
import math
import os
import posixpath
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from unime_jax.preprocess.text import IMAGE_PLACEHOLDER

COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
RECORD_KEYS = (*COLUMNS, "dataset", "row")
FORMAT = "unime_jax.mmeb_train/1"
MANIFEST = "manifest.json"
REPORT = "conversion_report.json"
SHARD_ROWS = 100_000  # default shard size when num_shards is not given

# Checks in the order they run; a bad row is reported under the first one that fails.
REASONS = (
    "malformed_row",  # unparseable JSONL line, or a field that is not a string / null
    "empty_query",  # no query text and no query image
    "empty_target",  # no target text and no target image
    "placeholder_mismatch",  # <|image_1|> without an image, an image without it, or 2+ of them
    "image_outside_root",  # absolute image path, or one whose `..` leaves the image root
    "missing_image",  # the image file does not exist
    "empty_image_file",  # the image file has 0 bytes
    "corrupt_image",  # PIL cannot identify / verify the file
    "too_long",  # more than max_text_tokens text tokens (image tokens not counted)
)


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

    def add_bad(self, dataset: str, row: int, reason: str) -> None:
        self.rows_read += 1
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


def _read_rows(path: Path) -> Iterator[dict[str, Any] | None]:
    """Rows of a parquet or JSONL file as dicts; ``None`` for an unparseable JSONL line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path}: missing MMEB-train columns {missing}")
        columns = [*COLUMNS, "dataset"] if "dataset" in names else list(COLUMNS)
        yield from pq.read_table(path, columns=columns).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield row if isinstance(row, dict) else None
    else:
        raise ValueError(f"{path}: unsupported input format (use .parquet or .jsonl)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# validation


class _Validator:
    def __init__(self, image_root: Path, tokenizer, max_text_tokens: int | None):
        self.root = image_root
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
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
            with Image.open(path) as img:
                img.verify()
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

    def text_length(self, text: str) -> None:
        if self.tokenizer is None or self.max_text_tokens is None:
            return
        plain = text.replace(IMAGE_PLACEHOLDER, "")
        n = len(self.tokenizer(plain, add_special_tokens=False)["input_ids"])
        if n > self.max_text_tokens:
            raise BadRow("too_long", f"{n} > {self.max_text_tokens} tokens")

    def row(self, row: dict[str, Any] | None) -> dict[str, str]:
        if row is None:
            raise BadRow("malformed_row", "not a JSON object")
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
        self.text_length(fields["qry"])
        self.text_length(fields["pos_text"])
        return {**fields, "qry_image_path": qry_image, "pos_image_path": pos_image}


# ---------------------------------------------------------------------------------------------
# conversion


def _load_tokenizer(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)


def _write_shards(records: list[bytes], directory: Path, num_shards: int) -> list[dict[str, Any]]:
    from array_record.python.array_record_module import ArrayRecordWriter

    shards = []
    for i in range(num_shards):
        lo, hi = len(records) * i // num_shards, len(records) * (i + 1) // num_shards
        name = f"mmeb-{i:05d}-of-{num_shards:05d}.array_record"
        writer = ArrayRecordWriter(str(directory / name), "group_size:1")
        for record in records[lo:hi]:
            writer.write(record)
        writer.close()
        shards.append({"path": name, "count": hi - lo})
    return shards


def convert(
    inputs: Sequence[str | os.PathLike],
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    max_text_tokens: int | None = None,
    max_rows_per_dataset: int = 50_000,
    num_shards: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Validates MMEB-train rows and writes the good ones as ArrayRecord shards (module doc).

    ``tokenizer`` is a tokenizer or a directory to load one from; with ``max_text_tokens`` a row
    whose query or target text has more text tokens is excluded as ``too_long``.
    ``num_shards`` defaults to one shard per 100K rows. ``progress`` shows a bar over rows;
    the report table is always printed.
    """
    if max_text_tokens is not None and tokenizer is None:
        raise ValueError("max_text_tokens needs a tokenizer")
    if max_rows_per_dataset < 1:
        raise ValueError(f"max_rows_per_dataset must be positive, got {max_rows_per_dataset}")
    root = Path(image_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory")
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    paths = [Path(p).resolve() for p in inputs]
    if not paths:
        raise ValueError("no input files")
    validator = _Validator(root, _load_tokenizer(tokenizer), max_text_tokens)
    report = ConversionReport()

    # Read everything first (cheap) so the progress bar over validation knows its total.
    rows: list[tuple[str, int, dict[str, Any] | None]] = []
    seen: collections.Counter[str] = collections.Counter()
    sources = []
    for path in paths:
        datasets: collections.Counter[str] = collections.Counter()
        for row in _read_rows(path):
            name = row.get("dataset") if row is not None else None
            name = str(name) if name else path.stem
            if seen[name] >= max_rows_per_dataset:
                report.beyond_limit[name] = report.beyond_limit.get(name, 0) + 1
                continue
            rows.append((name, seen[name], row))
            seen[name] += 1
            datasets[name] += 1
        sources.append({"path": str(path), "sha256": _sha256(path), "rows": dict(datasets)})

    from tqdm.auto import tqdm

    records = []
    for name, index, row in tqdm(rows, desc="validating rows", unit="row", disable=not progress):
        try:
            fields = validator.row(row)
        except BadRow as e:
            report.add_bad(name, index, e.reason)
            continue
        report.add_good(name)
        record = {**fields, "dataset": name, "row": index}
        records.append(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())

    num_shards = num_shards or max(1, math.ceil(len(records) / SHARD_ROWS))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = _write_shards(records, tmp, num_shards)
        (tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        manifest = {
            "format": FORMAT,
            "count": len(records),
            "shards": shards,
            "image_root": str(root),
            "sources": sources,
            "datasets": {k: v["kept"] for k, v in sorted(report.by_dataset.items())},
            "max_rows_per_dataset": max_rows_per_dataset,
            "max_text_tokens": max_text_tokens,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        # The manifest is written last: a directory without one is never a dataset.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(report.table())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unime_jax.data.mmeb_convert",
        description="Validate MMEB-train parquet/JSONL files and write ArrayRecord shards.",
    )
    parser.add_argument(
        "--input", action="append", required=True, help="parquet or JSONL file (repeat)"
    )
    parser.add_argument("--image-root", required=True, help="directory image paths are under")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--tokenizer", help="tokenizer directory for --max-text-tokens")
    parser.add_argument("--max-text-tokens", type=int)
    parser.add_argument("--max-rows-per-dataset", type=int, default=50_000)
    parser.add_argument("--num-shards", type=int)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.max_text_tokens is not None and args.tokenizer is None:
        parser.error("--max-text-tokens needs --tokenizer")
    report = convert(
        args.input,
        args.image_root,
        args.out,
        tokenizer=args.tokenizer,
        max_text_tokens=args.max_text_tokens,
        max_rows_per_dataset=args.max_rows_per_dataset,
        num_shards=args.num_shards,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"wrote {report.kept} records to {Path(args.out).resolve()}; excluded {report.excluded}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
