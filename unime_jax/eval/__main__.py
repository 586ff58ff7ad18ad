"""Evaluate a model on the paper's benchmarks and write a report.

    python -m unime_jax.eval --config=configs/eval.py[:preset] --workdir=OUT [--config.x=...]

Writes ``OUT/report.json``, ``OUT/report.md`` (our numbers beside the paper's) and PNG plots.
Every benchmark is read from its prepared TFDS dataset (``--config.data_dir``; a task with
``manual_dir`` set builds its dataset from that folder first), and every task's data is loaded
and checked before the model is: an unprepared dataset, or the files a build reads with
malformed rows, missing images or image paths leaving their root, are reported with file and
row, all tasks at once. Embeddings are cached on disk (``--config.cache_dir``) per model
fingerprint, so a rerun embeds nothing (and, for a checkpoint directory, never loads its
weights). Options: configs/eval.py.

User errors end in ``error: ...`` / ``Fix: ...`` without a traceback, exit status 2 (flags,
config values) or 1 (data, model files).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from unime_jax.errors import (
    FLAG_ERRORS,
    DataError,
    UsageError,
    UserError,
    bad_flag,
    config_value,
    run_main,
)
from unime_jax.errors import report as error_report
from unime_jax.eval import report
from unime_jax.eval.cache import (
    CachedEncoder,
    EmbeddingCache,
    checkpoint_fingerprint,
    code_fingerprint,
    digest,
    params_fingerprint,
    processor_fingerprint,
)
from unime_jax.eval.tasks import evaluate, figures, load_tasks
from unime_jax.preprocess.images import ImageError

_FIX = "check the flag against `python -m unime_jax.eval --help` and the keys of configs/eval.py"

log = logging.getLogger("unime_jax.eval")


# ---------------------------------------------------------------------------------------------
# the model


class LazyEncoder:
    """Builds the encoder on first use, so a fully cached rerun never loads the weights."""

    def __init__(self, build: Callable[[], Any], batch_size: int):
        self._build, self._encoder = build, None
        self.batch_size = batch_size

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            self._encoder = self._build()
        return self._encoder

    def embed_texts(self, texts):
        return self.encoder.embed_texts(texts)

    def embed_images(self, images):
        return self.encoder.embed_images(images)

    def embed_instructions(self, texts, images=None):
        return self.encoder.embed_instructions(texts, images)


def check_model_config(cfg) -> None:
    """``cfg.model`` and ``cfg.dtype`` as far as they can be checked without loading anything."""
    from unime_jax.models.config import PARAM_DTYPES

    if not cfg.model:
        raise UsageError(
            "--config.model is empty", "set it to an HF checkpoint directory, or to demo"
        )
    if cfg.dtype not in PARAM_DTYPES:
        raise UsageError(
            f"--config.dtype={cfg.dtype!r} is not a parameter dtype",
            f"use one of {sorted(PARAM_DTYPES)}",
        )


def build_encoder(cfg, mesh) -> tuple[Any, dict]:
    """The encoder ``cfg.model`` names and what fingerprints it (JSON-able parts, hashed into
    the cache key): parameter bits for the in-memory demo model, file contents and stats for a
    checkpoint directory (see :mod:`unime_jax.eval.cache`), plus dtype, tiles and model code."""
    from unime_jax.embedder import Embedder
    from unime_jax.models.config import param_dtype
    from unime_jax.weights.hub import resolve_checkpoint
    from unime_jax.weights.safetensors import CheckpointError

    check_model_config(cfg)
    if cfg.model == "demo":
        import flax.nnx as nnx

        from unime_jax.demo import model as demo_model
        from unime_jax.inference import EmbeddingModel

        _, processor = demo_model.build()
        # Initialised as one compiled program (cached across runs by the compilation cache)
        # rather than op by op: seconds faster; the parameter digest keys the cache either way.
        dtype = param_dtype(cfg.dtype)
        module = nnx.jit(
            lambda: demo_model.FAMILY.build(processor.config, rngs=nnx.Rngs(cfg.seed), dtype=dtype)
        )()
        model = EmbeddingModel.from_module(module, demo_model.FAMILY, processor, mesh)
        encoder = Embedder(model, batch_size=cfg.batch_size, progress=False)
        parts = {
            "model": f"demo (random init, seed {cfg.seed})",
            "kind": "demo",
            "params": params_fingerprint(model.state),
            "processor": processor_fingerprint(processor),
            "dtype": cfg.dtype,
            "code": code_fingerprint(),
        }
        return encoder, parts
    if (Path(cfg.model).expanduser() / "checkpoints").is_dir():
        return load_stage2_workdir(Path(cfg.model).expanduser(), cfg, mesh)
    try:
        directory = resolve_checkpoint(cfg.model)
    except CheckpointError as e:
        raise CheckpointError(f"--config.model: {e.what}", e.fix) from e
    return checkpoint_encoder(directory, cfg, mesh)


def checkpoint_encoder(directory: Path, cfg, mesh) -> tuple[Any, dict]:
    """An HF checkpoint directory as a lazily loaded ``Embedder`` and its fingerprint parts
    (file contents and stats, no weight read: see :func:`checkpoint_fingerprint`)."""
    from unime_jax.embedder import Embedder

    encoder = LazyEncoder(
        lambda: Embedder.from_pretrained(
            directory,
            mesh=mesh,
            dtype=cfg.dtype,
            batch_size=cfg.batch_size,
            progress=False,
        ),
        cfg.batch_size,
    )
    parts = {
        "model": str(directory),
        "kind": "checkpoint",
        "files": checkpoint_fingerprint(directory),
        "dtype": cfg.dtype,
        "code": code_fingerprint(),
    }
    return encoder, parts


def load_stage2_workdir(path: Path, cfg, mesh) -> tuple[Any, dict]:
    """Hook for a training run directory (``config.json`` + ``checkpoints/<step>``).

    A run that wrote ``<workdir>/merged`` (a full HF checkpoint, e.g. the end of stage 1, or
    :func:`unime_jax.export.hf.export_hf`) is evaluated from it. Evaluating a run's latest
    Orbax checkpoint directly goes here, with the contract of :func:`build_encoder`: rebuild the
    run's model from its ``config.json`` (base checkpoint or demo, LoRA settings), restore the
    trainable parameters with :class:`unime_jax.checkpoint.Checkpointer`, wrap the merged model
    in an ``Embedder``, and fingerprint it by the base model's parts plus
    :func:`params_fingerprint` of the restored parameters.
    """
    merged = path / "merged"
    if (merged / "config.json").is_file():
        log.info("%s is a training run; evaluating its merged checkpoint %s", path, merged)
        return checkpoint_encoder(merged, cfg, mesh)
    raise DataError(
        f"--config.model={str(path)!r} is a training run directory without a merged checkpoint "
        "(merged/); evaluating its Orbax checkpoints directly is not supported yet",
        "export the trained model with unime_jax.export.hf.export_hf and pass that directory; "
        f"a demo run's own held-out results are in {path / 'results.json'}",
    )


def run(
    cfg,
    workdir: str | os.PathLike,
    *,
    encoder: Any = None,
    fingerprint_parts: Mapping[str, Any] | None = None,
) -> dict:
    """Runs every task of ``cfg`` and writes the report into ``workdir``; returns the report.

    ``encoder`` replaces the model of ``cfg.model`` (any object with the three ``embed_*``
    methods, e.g. an ``Embedder`` over parameters being trained). Its embeddings go to the disk
    cache only with ``fingerprint_parts`` (JSON-able, identifying it, e.g. ``{"params":
    params_fingerprint(state)}``); without, they are kept in memory for this run only."""
    import jax

    from unime_jax import sharding

    out = Path(workdir)
    references = [r.strip() for r in cfg.reference.split(",") if r.strip()]
    if unknown := [r for r in references if r not in report.PAPER_MODELS]:
        raise UsageError(
            f"--config.reference: unknown {unknown}", f"use some of {sorted(report.PAPER_MODELS)}"
        )
    if encoder is None:
        check_model_config(cfg)  # before the data is read
    tasks = load_tasks(cfg)  # before the model: data problems show in seconds
    lead = jax.process_index() == 0  # one host writes the report and the cache
    if encoder is None:
        encoder, parts = build_encoder(cfg, sharding.make_mesh(dict(cfg.mesh)))
        cache_dir = cfg.cache_dir
    else:
        parts = {"model": type(encoder).__name__, "kind": "encoder", **(fingerprint_parts or {})}
        cache_dir = cfg.cache_dir if fingerprint_parts else ""
    fingerprint = digest(parts)[:32]
    cache = EmbeddingCache(cache_dir or None, fingerprint, meta=parts, writable=lead)
    log.info("model fingerprint %s; %d cached embeddings", fingerprint, len(cache))
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for task in tasks:
        sec, kind = task.section, task.section.kind
        enc = CachedEncoder(encoder, cache, progress=cfg.progress, label=f"{task.name}: ")
        paper = report.paper_numbers(sec.paper, references)
        ref_model = next(iter(paper), None)
        hits, misses, start = cache.hits, cache.misses, time.perf_counter()
        try:
            metrics = evaluate(enc, task)
            stats = {"hits": cache.hits - hits, "misses": cache.misses - misses}
            seconds = time.perf_counter() - start
            extra = figures(
                enc,  # answers from the cache the evaluation just filled
                task,
                metrics,
                out,
                reference=paper.get(ref_model, {}),
                reference_label=report.PAPER_MODELS.get(ref_model, "paper"),
                max_k=cfg.plot_max_k,
                draw=cfg.plots and lead,
            )
        except ImageError as e:  # the datasets store images undecoded: the build kept it
            log.debug("task %s failed", task.name, exc_info=True)
            raise DataError(
                f"task {task.name!r} ({kind}) failed: {e.what} (read from {task.source})",
                "an image file the dataset was built from does not decode: replace it, then "
                "build the dataset again (`python -m unime_jax.datasets build ... --overwrite`, "
                f"or delete it and run with --config.{task.name}.manual_dir)",
            ) from e
        except UserError as e:  # e.g. a checkpoint loaded on first use
            log.debug("task %s failed", task.name, exc_info=True)
            raise type(e)(f"task {task.name!r} ({kind}) failed: {e.what}", e.fix) from e
        except OSError as e:  # e.g. the embedding cache's disk
            log.debug("task %s failed", task.name, exc_info=True)
            raise DataError(
                f"task {task.name!r} ({kind}) failed: {type(e).__name__}: {e}",
                "check the file named above (disk space, permissions), then run again",
            ) from e
        extra["plots"] = [os.path.relpath(p, out) for p in extra.get("plots", [])]
        results[task.name] = {"metrics": metrics, **extra} | {
            "kind": kind,
            "source": task.source,
            "note": sec.note,
            "excluded": task.excluded,
            "paper": paper,
            "seconds": seconds,
            "cache": stats,
        }
        log.info("%s: %s", task.name, headline(results[task.name]))
    result = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {
            "model": parts["model"],
            "kind": parts["kind"],
            "dtype": cfg.dtype,
            "fingerprint": fingerprint,
        },
        "cache": {
            "directory": str(cache.path) if cache.path else "",
            "hits": sum(t["cache"]["hits"] for t in results.values()),
            "misses": sum(t["cache"]["misses"] for t in results.values()),
        },
        "reference": {r: report.PAPER_MODELS[r] for r in references},
        "config": json.loads(cfg.to_json_best_effort()),
        "tasks": results,
    }
    if lead:
        report.write(result, out)
    return result


def headline(task: dict) -> str:
    """The task's main numbers in one line."""
    m = task["metrics"]
    if task["kind"] == "mmeb":
        keys = ["overall_datasets", "overall_meta", "IND", "OOD"]
    elif task["kind"] == "sugarcrepe":
        keys = [k for k in ("replace", "swap", "add") if k in m]
    else:
        keys = [k for k in m if k.endswith("_R@1") or k.endswith("_R@5") or k.endswith("_R@10")]
    return ", ".join(f"{k} {m[k]:.2f}" if m[k] is not None else f"{k} —" for k in keys)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad flags/config, 1: data or model error),
    a user error printed as ``error: ...`` / ``Fix: ...``."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(__doc__)
        return 0
    # Own FlagValues: callable in-process (tests, notebooks) without clashing with other CLIs.
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "configs/eval.py[:preset]", flag_values=fv, sys_argv=argv
    )
    workdir = flags.DEFINE_string("workdir", None, "report, plots", flag_values=fv)
    try:
        fv(argv)
    except (flags.Error, *FLAG_ERRORS) as e:  # a bad flag or override: message, not traceback
        print(error_report(bad_flag(e, _FIX)), file=sys.stderr)
        return UsageError.exit_code
    return run_main(lambda: _evaluate(config, workdir.value))


def _evaluate(config, workdir: str | None) -> int:
    cfg = config_value(config)
    if not workdir:
        raise UsageError(
            "--config and --workdir are required",
            "pass both, e.g. --config=configs/eval.py:coco_mini --workdir=runs/eval",
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/unime_jax/jax"))
    result = run(cfg, workdir)
    for name, task in result["tasks"].items():
        print(f"{name}: {headline(task)}")
    print(f"report: {Path(workdir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
