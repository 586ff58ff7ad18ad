"""The precompute itself: :func:`precompute` embeds a corpus into an output directory,
resumably (see the package docstring, :mod:`unime_jax.teacher`)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from unime_jax.files import atomic_write
from unime_jax.teacher.corpus import _normalise_items, _validate_items, corpus_checksum
from unime_jax.teacher.files import (
    _OUTPUT_FILES,
    EMBEDDINGS_FILE,
    IDS_FILE,
    INVALID_FILE,
    MANIFEST_FILE,
    PROGRESS_FILE,
    REPORT_FILE,
)
from unime_jax.teacher.models import DEFAULT_TEACHER, Teacher, _to_numpy, build_teacher
from unime_jax.teacher.store import Manifest, _now, _write_progress, read_progress

_DTYPES = ("float32", "float16")


class NonFiniteEmbeddingError(RuntimeError):
    """The teacher returned NaN/inf (or all-zero) vectors; ``row_ids`` names them."""

    def __init__(self, message: str, row_ids: list[str]):
        super().__init__(message)
        self.row_ids = row_ids


def _teacher_name(teacher: Any) -> str:
    if isinstance(teacher, (str, os.PathLike)):
        name = str(teacher)
        return name.rstrip("/") if name != "/" else name
    return str(teacher.name)


def precompute(
    sentences_with_ids: Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    teacher: str | os.PathLike | Teacher = DEFAULT_TEACHER,
    batch_size: int = 256,
    instruction: str | None = None,
    device: str | None = None,
    progress: bool = True,
    dtype: str = "float32",
    overwrite: bool = False,
    backend: str = "auto",
) -> Manifest:
    """Embed every sentence with the teacher into ``out_dir`` (resumable; see the package doc).

    ``sentences_with_ids``: ``[(row_id, sentence)]`` (e.g. from :func:`read_corpus`) or a
    plain list of sentences (ids "0".."N-1"). ``teacher``: a name/path for
    :func:`build_teacher` or a :class:`Teacher` object. ``instruction``: prefix (NV-Embed:
    its instruction; defaults to :data:`NV_EMBED_STS_INSTRUCTION` there). ``dtype``:
    storage dtype ("float32" default or "float16"); vectors are L2-normalised in float32
    before the cast. Raises :class:`NonFiniteEmbeddingError` (after saving
    ``invalid_rows.json``) if the teacher returns NaN/inf/zero vectors; nothing invalid
    is ever marked done. Returns the final :class:`Manifest`.
    """
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = getattr(sentences_with_ids, "report", None)
    pairs = _normalise_items(sentences_with_ids)
    _validate_items(pairs)
    n = len(pairs)
    if n == 0:
        raise ValueError("empty corpus: nothing to embed")
    checksum = corpus_checksum(pairs)
    name = _teacher_name(teacher)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if overwrite:
        for f in _OUTPUT_FILES:
            for p in (out / f, out / (f + ".tmp")):
                if p.exists():
                    p.unlink()

    # NV-Embed default instruction (only known once the teacher is loaded for a path; for
    # the resume check we compare what the caller asked for, resolved the same way).
    manifest: Manifest | None = None
    done = 0
    if (out / MANIFEST_FILE).is_file():
        manifest = Manifest.load(out)
        _check_resumable(manifest, out, n=n, checksum=checksum, name=name, dtype=dtype)
        if instruction is not None and manifest.instruction != instruction:
            raise ValueError(
                f"{out} was made with instruction {manifest.instruction!r}, not "
                f"{instruction!r}: use a new out_dir or overwrite=True (--overwrite)"
            )
        if manifest.completed:
            if progress:
                print(f"[teacher] {out} is already complete ({n} rows); nothing to do")
            return manifest
        done = read_progress(out)
        if not 0 <= done <= n:
            raise ValueError(f"{out / PROGRESS_FILE}: rows_done={done} outside [0, {n}]")
    elif any((out / f).exists() for f in (EMBEDDINGS_FILE, PROGRESS_FILE, IDS_FILE)):
        raise ValueError(
            f"{out} holds teacher-embedding files but no {MANIFEST_FILE}: refusing to "
            "reuse it; use a new out_dir or overwrite=True (--overwrite)"
        )

    tm: Teacher = (
        build_teacher(teacher, device=device, backend=backend)
        if isinstance(teacher, (str, os.PathLike))
        else teacher
    )
    if instruction is None and manifest is None:
        instruction = getattr(tm, "default_instruction", None)
    if manifest is not None:
        instruction = manifest.instruction
        if int(tm.dim) != manifest.dim:
            raise ValueError(
                f"teacher {name!r} gives dim {tm.dim} but {out} holds dim {manifest.dim}: "
                "use a new out_dir or overwrite=True (--overwrite)"
            )
    dim = int(tm.dim)

    if manifest is None:
        manifest = Manifest(
            teacher=name,
            dim=dim,
            count=n,
            dtype=dtype,
            corpus_sha256=checksum,
            instruction=instruction,
            created=_now(),
            batch_size=batch_size,
            backend=str(getattr(tm, "backend", type(tm).__name__)),
            device=str(getattr(tm, "device", device or "")),
        )
        atomic_write(out / IDS_FILE, "".join(rid + "\n" for rid, _ in pairs))
        if report is not None:
            report.save(out / REPORT_FILE)
        emb = np.lib.format.open_memmap(
            out / EMBEDDINGS_FILE, mode="w+", dtype=np.dtype(dtype), shape=(n, dim)
        )
        emb.flush()
        _write_progress(out, 0, checksum)
        manifest.save(out)  # written last: its presence means the layout above exists
    else:
        if batch_size != manifest.batch_size and progress:
            print(
                f"[teacher] note: resuming with batch_size {batch_size} (first run used "
                f"{manifest.batch_size}); vectors may differ in the last bits",
                file=sys.stderr,
            )
        emb = np.load(out / EMBEDDINGS_FILE, mmap_mode="r+")
        if emb.shape != (n, dim) or emb.dtype != np.dtype(dtype):
            raise ValueError(
                f"{out / EMBEDDINGS_FILE} has shape {emb.shape} {emb.dtype}, expected "
                f"({n}, {dim}) {dtype}: use a new out_dir or overwrite=True (--overwrite)"
            )

    (out / INVALID_FILE).unlink(missing_ok=True)
    sentences = [s for _, s in pairs]
    t0 = time.perf_counter()
    bar = tqdm(
        total=n,
        initial=done,
        unit="sent",
        desc=f"teacher {name}",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        for start in range(done, n, batch_size):
            end = min(start + batch_size, n)
            vecs = _to_numpy(tm.encode(sentences[start:end], instruction=instruction))
            if vecs.shape != (end - start, dim):
                raise ValueError(
                    f"teacher {name!r} returned shape {vecs.shape} for rows {start}:{end}, "
                    f"expected ({end - start}, {dim})"
                )
            finite = np.isfinite(vecs).all(axis=1)
            norms = np.linalg.norm(np.where(finite[:, None], vecs, 0.0), axis=1)
            invalid = ~finite | ~(norms > 0) | ~np.isfinite(norms)
            if invalid.any():
                _fail_invalid(out, pairs, start, vecs, finite, invalid, name)
            unit = vecs / norms[:, None]
            emb[start:end] = unit.astype(dtype)
            emb.flush()  # data durable (msync) before progress may claim it
            _write_progress(out, end, checksum)
            bar.update(end - start)
    finally:
        bar.close()
        manifest.seconds = round(manifest.seconds + time.perf_counter() - t0, 3)
        del emb
        if not manifest.completed:
            manifest.save(out)  # still completed=false; keeps the accumulated time

    manifest.completed = True
    manifest.completed_at = _now()
    manifest.save(out)
    return manifest


def _fail_invalid(out, pairs, start, vecs, finite, invalid, name) -> None:
    rows = [start + int(i) for i in np.flatnonzero(invalid)]
    ids = [pairs[r][0] for r in rows]
    kinds = {
        pairs[start + int(i)][0]: (
            "nan" if np.isnan(vecs[i]).any() else "inf" if not finite[i] else "zero"
        )
        for i in np.flatnonzero(invalid)
    }
    atomic_write(
        out / INVALID_FILE,
        json.dumps({"teacher": name, "rows": rows, "ids": ids, "kind": kinds}, indent=2) + "\n",
    )
    raise NonFiniteEmbeddingError(
        f"teacher {name!r} returned {len(ids)} non-finite or zero vectors (not written; "
        f"progress stays at row {start}); row ids: {ids[:20]}"
        f"{' ...' if len(ids) > 20 else ''} (all in {out / INVALID_FILE})",
        ids,
    )


def _check_resumable(m: Manifest, out: Path, *, n: int, checksum: str, name: str, dtype: str):
    fix = "use a new out_dir or overwrite=True (--overwrite)"
    if m.corpus_sha256 != checksum or m.count != n:
        raise ValueError(
            f"{out} holds embeddings of a different corpus (manifest: {m.count} rows, "
            f"sha256 {m.corpus_sha256}; this corpus: {n} rows, sha256 {checksum}): {fix}"
        )
    if m.teacher != name:
        raise ValueError(f"{out} was made with teacher {m.teacher!r}, not {name!r}: {fix}")
    if m.dtype != dtype:
        raise ValueError(f"{out} stores {m.dtype}, not {dtype}: {fix}")
