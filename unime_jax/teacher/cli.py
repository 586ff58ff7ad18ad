"""Command line: ``python -m unime_jax.teacher --dataset NAME[/CONFIG][:SPLIT] --out DIR ...``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from unime_jax.errors import ArgumentParser, DataError, UsageError, UserError, run_main
from unime_jax.teacher.compute import _DTYPES, NonFiniteEmbeddingError, precompute
from unime_jax.teacher.models import DEFAULT_TEACHER


def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(
        prog="python -m unime_jax.teacher",
        description="Precompute L2-normalised teacher embeddings for stage-1 distillation "
        "(offline, resumable: rerun the same command to continue).",
    )
    ap.add_argument(
        "--dataset",
        required=True,
        help="a prepared sentence dataset, NAME[/CONFIG][:SPLIT] (e.g. nli_simcse; built with "
        "`python -m unime_jax.datasets build nli_simcse --manual_dir DIR --data_dir DATA`)",
    )
    ap.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's)")
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
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ap.add_argument(
        "--backend", choices=("auto", "sentence-transformers", "transformers"), default="auto"
    )
    ap.add_argument("--overwrite", action="store_true", help="discard existing output in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.batch_size <= 0:
        ap.error(f"--batch-size {args.batch_size} must be > 0")
    return run_main(lambda: _run(args))


def _run(args) -> int:
    import unime_jax.datasets as uds

    dataset = uds.Ref.parse(args.dataset, flag="--dataset")
    corpus = uds.nli_corpus(
        dataset.name, data_dir=args.data_dir, config=dataset.config, split=dataset.split or "train"
    )
    t0 = time.perf_counter()
    try:
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
    except UserError:
        raise
    except NonFiniteEmbeddingError as e:
        raise DataError(str(e), "see invalid_rows.json in --out for the rows and values") from e
    except FileNotFoundError as e:
        raise DataError(
            str(e), f"pass a local encoder directory as --teacher, or {DEFAULT_TEACHER}"
        ) from e
    except ImportError as e:
        raise UsageError(
            f"the teacher needs {e.name or 'a package'} ({e})",
            "install the dev requirements: pip install -r requirements-dev.txt",
        ) from e
    except ValueError as e:  # --out holds another corpus's or teacher's vectors
        raise DataError(str(e), "use a new --out, or --overwrite to discard it") from e
    dt = time.perf_counter() - t0
    rep = corpus.report
    print(
        f"teacher embeddings: {args.out}\n"
        f"  corpus   {dataset}: {rep.summary() if rep else len(corpus)}\n"
        f"  teacher  {m.teacher} ({m.backend}, {m.device or 'n/a'}), dim {m.dim}, {m.dtype}\n"
        f"  rows     {m.count}  sha256 {m.corpus_sha256}\n"
        f"  time     {dt:.1f} s this run, {m.seconds:.1f} s encoding in all "
        f"({m.count / max(m.seconds, 1e-9):.0f} sent/s)\n"
        f"  complete {m.completed}"
    )
    return 0
