"""The stored result: :class:`Manifest`, progress files and :func:`load_teacher_embeddings`
(what training calls)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unime_jax.files import atomic_write
from unime_jax.teacher.corpus import corpus_checksum
from unime_jax.teacher.files import (
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    IDS_FILE,
    MANIFEST_FILE,
    PROGRESS_FILE,
)

# --------------------------------------------------------------------------------------
# Manifest / progress files
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Manifest:
    teacher: str
    dim: int
    count: int
    dtype: str
    corpus_sha256: str
    instruction: str | None
    created: str
    completed: bool = False
    completed_at: str | None = None
    normalized: bool = True
    batch_size: int = 0
    backend: str = ""
    device: str = ""
    seconds: float = 0.0  # encoding wall time summed over all runs
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> Manifest:
        p = Path(out_dir) / MANIFEST_FILE
        d = json.loads(p.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def save(self, out_dir: str | os.PathLike) -> None:
        atomic_write(Path(out_dir) / MANIFEST_FILE, self.to_json())


def read_progress(out_dir: str | os.PathLike) -> int:
    """Rows durably written so far (0 if no progress file)."""
    p = Path(out_dir) / PROGRESS_FILE
    if not p.is_file():
        return 0
    return int(json.loads(p.read_text())["rows_done"])


def _write_progress(out_dir: Path, rows_done: int, checksum: str) -> None:
    atomic_write(
        out_dir / PROGRESS_FILE,
        json.dumps({"rows_done": rows_done, "corpus_sha256": checksum}) + "\n",
    )


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------
# Loading (what training calls)
# --------------------------------------------------------------------------------------


def load_teacher_embeddings(
    out_dir: str | os.PathLike, expected_ids_or_checksum: str | Sequence[Any]
) -> np.ndarray:
    """Open ``out_dir/embeddings.npy`` read-only (memmap) after checking it fits the corpus.

    ``expected_ids_or_checksum``: the corpus's sha256 (:func:`corpus_checksum`), the
    ``[(row_id, sentence)]`` list itself, or the list of row ids (compared with ids.txt).
    Raises ValueError naming both values when the count, checksum or ids differ, or when
    the manifest says the precompute is incomplete.
    """
    out = Path(out_dir)
    if not (out / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{out / MANIFEST_FILE} not found: run the teacher precompute")
    m = Manifest.load(out)
    if not m.completed:
        raise ValueError(
            f"{out}: teacher precompute is incomplete ({read_progress(out)} of {m.count} "
            "rows done, manifest completed=false); rerun the same command to resume"
        )
    exp = expected_ids_or_checksum
    if isinstance(exp, str):
        if exp != m.corpus_sha256:
            raise ValueError(
                f"{out}: corpus checksum mismatch: expected {exp}, manifest has "
                f"{m.corpus_sha256} (embeddings were computed for another corpus)"
            )
    else:
        exp = list(exp)
        if len(exp) != m.count:
            raise ValueError(
                f"{out}: row count mismatch: corpus has {len(exp)} rows, manifest has {m.count}"
            )
        if exp and isinstance(exp[0], str):
            ids = (out / IDS_FILE).read_text(encoding="utf-8").splitlines()
            if len(ids) != m.count:
                raise ValueError(f"{out / IDS_FILE}: {len(ids)} ids, manifest says {m.count}")
            for i, (a, b) in enumerate(zip(exp, ids)):
                if a != b:
                    raise ValueError(
                        f"{out}: row id mismatch at row {i}: expected {a!r}, ids.txt has {b!r}"
                    )
        else:
            cs = corpus_checksum(exp)
            if cs != m.corpus_sha256:
                raise ValueError(
                    f"{out}: corpus checksum mismatch: expected {cs}, manifest has "
                    f"{m.corpus_sha256} (embeddings were computed for another corpus)"
                )
    arr = np.load(out / EMBEDDINGS_FILE, mmap_mode="r")
    if arr.shape != (m.count, m.dim) or arr.dtype != np.dtype(m.dtype):
        raise ValueError(
            f"{out / EMBEDDINGS_FILE}: shape {arr.shape} {arr.dtype} does not match the "
            f"manifest ({m.count}, {m.dim}) {m.dtype}"
        )
    return arr
