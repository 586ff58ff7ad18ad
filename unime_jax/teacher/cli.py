"""Command line: ``python -m unime_jax.teacher --corpus CORPUS --out DIR ...``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from unime_jax.teacher.compute import _DTYPES, NonFiniteEmbeddingError, precompute
from unime_jax.teacher.corpus import read_corpus
from unime_jax.teacher.models import DEFAULT_TEACHER


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unime_jax.teacher",
        description="Precompute L2-normalised teacher embeddings for stage-1 distillation "
        "(offline, resumable: rerun the same command to continue).",
    )
    ap.add_argument("--corpus", required=True, help="SimCSE NLI .csv or one-sentence-per-line text")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        help=f"{DEFAULT_TEACHER} (default) or a local sentence-transformers / HF encoder / "
        "NV-Embed-v2 directory",
    )
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dtype", choices=_DTYPES, default="float32")
    ap.add_argument("--instruction", default=None, help="prefix for every sentence")
    ap.add_argument("--format", choices=("auto", "csv", "txt"), default="auto")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ap.add_argument(
        "--backend", choices=("auto", "sentence-transformers", "transformers"), default="auto"
    )
    ap.add_argument("--overwrite", action="store_true", help="discard existing output in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        corpus = read_corpus(args.corpus, fmt=args.format)
        t0 = time.perf_counter()
        m = precompute(
            corpus,
            args.out,
            teacher=args.teacher,
            batch_size=args.batch_size,
            instruction=args.instruction,
            device=args.device,
            progress=not args.no_progress,
            dtype=args.dtype,
            overwrite=args.overwrite,
            backend=args.backend,
        )
        dt = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, NonFiniteEmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rep = corpus.report
    print(
        f"teacher embeddings: {args.out}\n"
        f"  corpus   {rep.summary() if rep else args.corpus}\n"
        f"  teacher  {m.teacher} ({m.backend}, {m.device or 'n/a'}), dim {m.dim}, {m.dtype}\n"
        f"  rows     {m.count}  sha256 {m.corpus_sha256}\n"
        f"  time     {dt:.1f} s this run, {m.seconds:.1f} s encoding in all "
        f"({m.count / max(m.seconds, 1e-9):.0f} sent/s)\n"
        f"  complete {m.completed}"
    )
    return 0
