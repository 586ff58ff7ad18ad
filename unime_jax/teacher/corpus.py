"""Reading the corpus (SimCSE NLI CSV or text lines), its report, validation and checksum."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from unime_jax.errors import DataError, UsageError
from unime_jax.files import atomic_write

CSV_COLUMNS = ("sent0", "sent1", "hard_neg")


@dataclasses.dataclass
class CorpusReport:
    """What :func:`read_corpus` read and what it excluded (never silently)."""

    path: str
    format: str  # "csv" | "txt"
    rows_read: int  # CSV data rows / text lines
    sentences_kept: int
    empty: list[str]  # ids of empty or whitespace-only cells / lines
    non_utf8: list[str]  # ids of cells / lines holding bytes that are not valid UTF-8
    columns: list[str] = dataclasses.field(default_factory=list)  # CSV columns used

    @property
    def excluded(self) -> int:
        return len(self.empty) + len(self.non_utf8)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["n_empty"] = len(self.empty)
        d["n_non_utf8"] = len(self.non_utf8)
        d["n_excluded"] = self.excluded
        return d

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        s = (
            f"{self.path}: {self.rows_read} {'rows' if self.format == 'csv' else 'lines'} read, "
            f"{self.sentences_kept} sentences kept, {self.excluded} excluded "
            f"({len(self.empty)} empty, {len(self.non_utf8)} non-UTF-8)"
        )
        for label, ids in (("empty", self.empty), ("non-UTF-8", self.non_utf8)):
            if ids:
                more = f" ... (+{len(ids) - 10} more)" if len(ids) > 10 else ""
                s += f"\n  {label}: {', '.join(ids[:10])}{more}"
        return s


class Corpus(list):
    """``list[tuple[row_id, sentence]]`` that also carries its :class:`CorpusReport`."""

    report: CorpusReport | None = None


def _has_undecodable(s: str) -> bool:
    # bytes that failed UTF-8 decoding become lone surrogates U+DC80..U+DCFF
    # (errors="surrogateescape"); a valid UTF-8 file never yields surrogates.
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _decode(raw: bytes) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.decode("utf-8", errors="surrogateescape")


def read_corpus(
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    report_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> Corpus:
    """Read a SimCSE NLI CSV or a one-sentence-per-line text file.

    Returns ``[(row_id, sentence), ...]`` (a :class:`Corpus`, whose ``.report`` says what
    was excluded). CSV: header with some of ``sent0, sent1, hard_neg`` (others ignored);
    data row ``r`` (0-based, header excluded) gives ``(f"{r}:sent0", ...)``,
    ``(f"{r}:sent1", ...)``, ``(f"{r}:hard_neg", ...)`` in that order. Text: line ``r``
    (0-based) gives ``(f"{r}", line)`` (the line ending stripped, nothing else).
    Empty / whitespace-only cells and cells with non-UTF-8 bytes are excluded and
    reported (ids + counts) on stderr and in the report, saved to ``report_path`` when
    given (:func:`precompute` also saves it as ``out_dir/corpus_report.json``).
    ``fmt``: "auto" (".csv" suffix → CSV, else text), "csv" or "txt".
    """
    import csv
    import io

    path = Path(path)
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "txt"
    if fmt not in ("csv", "txt"):
        raise UsageError(f"fmt must be 'auto', 'csv' or 'txt', got {fmt!r}", "use one of those")
    text = _decode(path.read_bytes())

    out = Corpus()
    empty: list[str] = []
    bad: list[str] = []

    def add(rid: str, s: str | None) -> None:
        if s is None or not s.strip():
            empty.append(rid)
        elif _has_undecodable(s):
            bad.append(rid)
        else:
            out.append((rid, s))

    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty CSV (no header)", "pass the SimCSE NLI CSV")
        header = [h.strip() for h in header]
        cols = [c for c in CSV_COLUMNS if c in header]
        if not cols:
            raise DataError(
                f"{path}: CSV header {header} has none of the columns {list(CSV_COLUMNS)}",
                "pass the SimCSE NLI CSV (sent0,sent1,hard_neg) or a .txt file, one sentence a line",
            )
        idx = [header.index(c) for c in cols]
        rows = 0
        for r, row in enumerate(reader):
            rows = r + 1
            for c, i in zip(cols, idx):
                add(f"{r}:{c}", row[i] if i < len(row) else None)
    else:
        cols = []
        # split on "\n" only (str.splitlines would also split on U+2028, \x0c, ...)
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
        if lines and lines[-1] == "":
            lines.pop()  # the final newline does not start another line
        rows = len(lines)
        for r, line in enumerate(lines):
            add(str(r), line)

    report = CorpusReport(
        path=str(path),
        format=fmt,
        rows_read=rows,
        sentences_kept=len(out),
        empty=empty,
        non_utf8=bad,
        columns=cols,
    )
    out.report = report
    if report_path is not None:
        report.save(report_path)
    if verbose and report.excluded:
        print(f"[teacher] WARNING: excluded rows\n{report.summary()}", file=sys.stderr)
    return out


def _normalise_items(items: Iterable[Any]) -> list[tuple[str, str]]:
    """Accept ``[(id, sentence)]`` or ``[sentence]`` (ids become "0", "1", ...)."""
    items = list(items)
    if items and all(isinstance(x, str) for x in items):
        return [(str(i), s) for i, s in enumerate(items)]
    pairs = []
    for k, x in enumerate(items):
        if not (isinstance(x, (tuple, list)) and len(x) == 2):
            raise TypeError(f"item {k} is {x!r}: expected a sentence or (row_id, sentence)")
        rid, s = x
        if not isinstance(rid, str) or not isinstance(s, str):
            raise TypeError(f"item {k}: row id and sentence must be str, got {x!r}")
        pairs.append((rid, s))
    return pairs


def _validate_items(pairs: Sequence[tuple[str, str]]) -> None:
    bad_ids = [rid for rid, _ in pairs if not rid or "\n" in rid or "\r" in rid]
    if bad_ids:
        raise ValueError(f"row ids must be non-empty single-line strings: {bad_ids[:10]!r}")
    seen: set[str] = set()
    dup = []
    for rid, _ in pairs:
        if rid in seen:
            dup.append(rid)
        seen.add(rid)
    if dup:
        raise ValueError(f"duplicate row ids: {dup[:10]!r} ({len(dup)} in all)")
    empty = [rid for rid, s in pairs if not s.strip()]
    undecodable = [rid for rid, s in pairs if _has_undecodable(s)]
    if empty or undecodable:
        raise ValueError(
            f"refusing to embed {len(empty)} empty sentences {empty[:10]} and "
            f"{len(undecodable)} sentences with undecodable bytes {undecodable[:10]}: "
            "filter them first (read_corpus does and reports them)"
        )


def corpus_checksum(items: Iterable[Any]) -> str:
    """sha256 hex of the (row_id, sentence) list, order-sensitive and unambiguous.

    Each row is hashed as ``len(id):len(sentence):`` + id + sentence (UTF-8 byte lengths),
    so it does not depend on the file the corpus came from, only on its content.
    """
    h = hashlib.sha256(b"unime-teacher-corpus-v1\n")
    for rid, s in _normalise_items(items):
        b_id = rid.encode("utf-8", "surrogateescape")
        b_s = s.encode("utf-8", "surrogateescape")
        h.update(f"{len(b_id)}:{len(b_s)}:".encode())
        h.update(b_id)
        h.update(b_s)
    return h.hexdigest()


def write_nli_csv(path: str | os.PathLike, rows: Sequence[dict[str, str]]) -> Path:
    """Writes rows in SimCSE's NLI CSV layout (:data:`CSV_COLUMNS`), atomically: the file
    :func:`read_corpus` reads (e.g. a manual dir for the ``nli_simcse`` builder)."""
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, text.getvalue())
