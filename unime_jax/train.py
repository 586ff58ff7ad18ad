"""The training loop, top to bottom: mesh, model, LoRA, state, data, checkpoints, metrics, evals,
and the merged checkpoint at the end. What a stage brings (data, sides, loss, held-out metrics)
comes from its :class:`~unime_jax.stages.base.Stage` object; there are no stage branches here.

Rerunning the same command resumes from the last checkpoint in ``workdir/checkpoints`` with the
exact data position; SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
from flax import nnx
from tqdm.auto import tqdm

from unime_jax import checkpoint, inference, sharding, stages, steps
from unime_jax.data.pipeline import BatchCollator, make_batch_iterator
from unime_jax.embedder import Embedder
from unime_jax.errors import UsageError
from unime_jax.export import hf as export_hf
from unime_jax.files import atomic_write_json
from unime_jax.models import attention
from unime_jax.models.config import PARAM_DTYPES
from unime_jax.models.layers import REMAT_POLICIES
from unime_jax.models.lora import apply_lora
from unime_jax.stages.base import Stage
from unime_jax.train_log import MetricWriter
from unime_jax.weights import hub

log = logging.getLogger(__name__)


def _check(ok: bool, key: str, value, need: str) -> None:
    if not ok:
        raise UsageError(f"--config.{key}={value!r} is out of range", f"it must be {need}")


def validate(cfg, mesh, stage: Stage, *, check_files: bool = True) -> None:
    """Every value the loop reads, checked before anything is built or compiled (without the
    model and data paths when ``check_files`` is False: the ahead-of-time check needs neither)."""
    positive = ("batch_size", "lr", "log_every", "checkpoint_every", "keep_checkpoints")
    for key in positive:
        _check(cfg[key] > 0, key, cfg[key], "> 0")
    non_negative = (
        "num_steps",
        "warmup_steps",
        "num_chunks",
        "weight_decay",
        "grad_clip",
        "lora_rank",
        "seed",
        "worker_count",
        "max_bad_rows",
        "demo_train_rows",
        "demo_eval_size",
    )
    for key in non_negative:
        _check(cfg[key] >= 0, key, cfg[key], ">= 0")
    for key in ("adam_b1", "adam_b2", "lora_dropout"):
        _check(0 <= cfg[key] < 1, key, cfg[key], "in [0, 1)")
    _check(cfg.adam_eps > 0, "adam_eps", cfg.adam_eps, "> 0")
    _check(cfg.lora_rank == 0 or cfg.lora_alpha > 0, "lora_alpha", cfg.lora_alpha, "> 0")
    _check(cfg.dtype in PARAM_DTYPES, "dtype", cfg.dtype, f"one of {sorted(PARAM_DTYPES)}")
    remat = str(cfg.remat).lower() if isinstance(cfg.remat, bool) else cfg.remat
    ok = isinstance(cfg.remat, bool) or remat in REMAT_POLICIES
    _check(ok, "remat", cfg.remat, f"one of {sorted(REMAT_POLICIES)} (or true/false)")
    impls = attention.IMPLEMENTATIONS
    _check(cfg.attention in impls, "attention", cfg.attention, f"one of {impls}")
    for side, length in stage.lengths(cfg).items():
        _check(length > 0, f"{side} length", length, "> 0")
    dp = sharding.data_parallel_size(mesh)
    chunks = num_chunks(cfg, dp)
    if cfg.batch_size % chunks:
        raise UsageError(
            f"batch_size {cfg.batch_size} is not divisible by num_chunks {chunks}",
            "change batch_size or num_chunks (0 chooses it from chunk_rows and the mesh)",
        )
    if (cfg.batch_size // chunks) % dp:
        raise UsageError(
            f"each GradCache chunk ({cfg.batch_size}/{chunks} = {cfg.batch_size // chunks} rows) "
            f"must split over the {dp} data-parallel devices",
            "change batch_size, num_chunks or the mesh (num_chunks=0 picks a valid count)",
        )
    if cfg.num_steps and cfg.warmup_steps > cfg.num_steps:
        raise UsageError(
            f"warmup_steps {cfg.warmup_steps} exceeds num_steps {cfg.num_steps}",
            "lower --config.warmup_steps",
        )
    if check_files and not cfg.model:
        raise UsageError(
            "no model given", "set --config.model to an HF checkpoint directory (or use :demo)"
        )
    stage.validate(cfg, check_files=check_files)


def num_chunks(cfg, data_parallel: int) -> int:
    """``cfg.num_chunks``, or (0) as many chunks as keep ``chunk_rows`` rows per device each."""
    if cfg.num_chunks:
        return cfg.num_chunks
    per_chunk = data_parallel * max(cfg.get("chunk_rows", 1), 1)
    if cfg.batch_size % per_chunk:
        raise UsageError(
            f"batch_size {cfg.batch_size} does not split into chunks of {cfg.chunk_rows} rows on "
            f"each of {data_parallel} data-parallel devices",
            "choose a batch_size that is a multiple of chunk_rows x data-parallel devices",
        )
    return cfg.batch_size // per_chunk


def resolve_model(cfg, workdir: str) -> str:
    """The HF directory the model loads from; ``demo`` materialises the seeded demo model."""
    if cfg.model == "demo":
        from unime_jax.demo.model import base_checkpoint

        return str(base_checkpoint(os.path.join(workdir, "demo_base"), seed=cfg.seed))
    return str(hub.resolve_checkpoint(cfg.model))


def make_data(cfg, stage: Stage, processor, mesh, source=None):
    """The host-local batch iterator of ``stage``, packed for ``cfg.num_chunks`` chunks."""
    source = stage.source(cfg) if source is None else source
    local_dp = sharding.data_parallel_size(mesh) // jax.process_count()
    collator = BatchCollator(
        processor,
        stage.lengths(cfg),
        data_parallel=max(local_dp, 1),
        num_chunks=cfg.num_chunks,
        unit_budget=cfg.get("tile_budget", 0) or None,
        length_buckets=cfg.length_buckets,
    )
    return make_batch_iterator(
        source,
        stage.transform(cfg, processor),
        collator,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        reasons=stage.skip_reasons,
        max_bad_rows=cfg.get("max_bad_rows", 1000),
        worker_count=cfg.worker_count,
    )


def add_lora(cfg, family, module: nnx.Module) -> nnx.Module:
    """``module`` with the configured adapters (``lora_targets``: the family's group names, e.g.
    ``llm,vision_attention``, or module-path regexes); unchanged when ``lora_rank`` is 0."""
    if cfg.lora_rank > 0:
        targets = []
        for name in filter(None, (s.strip() for s in cfg.lora_targets.split(","))):
            targets += family.lora_targets.get(name, [name])
        apply_lora(
            module,
            targets,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            rngs=nnx.Rngs(cfg.seed + 1),
        )
    return module


# What shapes or fills the saved train state: resuming under other values would fail every
# checkpoint's restore or digest check, which must not read as damage.
STATE_KEYS = ("stage", "model", "lora_rank", "lora_targets", "dtype", "clipping")


def _state_keys(cfg) -> dict:
    model = str(cfg.get("model") or "")
    keys = {k: cfg.get(k) for k in STATE_KEYS[:4]}
    keys["model"] = os.path.realpath(os.path.expanduser(model)) if os.path.isdir(model) else model
    # The trained parameters' dtype: LoRA adapters are float32 whatever the frozen base's is.
    keys["dtype"] = "float32 adapters" if keys["lora_rank"] else cfg.get("dtype")
    keys["clipping"] = cfg.get("grad_clip", 0) > 0  # clipping on/off changes the optimizer state
    return keys


def check_resumable(cfg, workdir: str) -> None:
    """A workdir holding checkpoints resumes only under the train-state keys that wrote them
    (its ``config.json``); checked before that file is rewritten."""
    ckpts = os.path.join(workdir, "checkpoints")
    has_steps = os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts))
    if not has_steps or not os.path.exists(os.path.join(workdir, "config.json")):
        return
    with open(os.path.join(workdir, "config.json")) as f:
        before = _state_keys(json.load(f))
    now = _state_keys(cfg)
    changed = [f"{k}={before[k]!r} (now {now[k]!r})" for k in STATE_KEYS if before[k] != now[k]]
    if changed:
        raise UsageError(
            f"{ckpts} holds checkpoints of a run with " + ", ".join(changed),
            "resume with the same values, or pass a new --workdir to start another run",
        )


def split_trainable(cfg, module: nnx.Module):
    """(graphdef, trainable, frozen): the adapters are trained, or every parameter without LoRA."""
    return nnx.split(module, nnx.LoRAParam if cfg.lora_rank > 0 else nnx.Param, ...)


def run(cfg, workdir: str) -> dict:
    """Trains per ``cfg`` in ``workdir`` (resuming if it holds checkpoints); returns results."""
    stage = stages.get(cfg.stage)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    # Values first: preparing may build datasets or run a teacher, which a typo must not cost.
    validate(cfg, mesh, stage, check_files=False)
    os.makedirs(workdir, exist_ok=True)
    cfg = stage.prepare(cfg, workdir).copy_and_resolve_references()
    validate(cfg, mesh, stage)
    check_resumable(cfg, workdir)
    cfg.num_chunks = num_chunks(cfg, sharding.data_parallel_size(mesh))
    lead = jax.process_index() == 0  # one host writes metrics and results

    directory = resolve_model(cfg, workdir)
    family, _, module, processor = inference.build_model(
        directory,
        mesh,
        dtype=cfg.dtype,
        text_only=stage.text_only,
        remat=cfg.remat,
        attention=cfg.attention,
    )
    source = stage.source(cfg)
    cfg.num_steps = stage.num_steps(cfg, len(source))
    validate(cfg, mesh, stage)
    data = make_data(cfg, stage, processor, mesh, source)
    if lead:
        atomic_write_json(
            os.path.join(workdir, "config.json"), json.loads(cfg.to_json_best_effort())
        )

    graphdef, trainable, frozen = split_trainable(cfg, add_lora(cfg, family, module))
    trainable = jax.device_put(trainable, sharding.state_shardings(trainable, mesh))
    frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh))
    log.info(
        "trainable parameters: %s; frozen: %s",
        f"{sum(x.size for x in jax.tree.leaves(trainable)):,}",
        f"{sum(x.size for x in jax.tree.leaves(frozen)):,}",
    )

    tx = steps.make_optimizer(cfg)
    train_step = steps.make_train_step(
        graphdef, tx, cfg, mesh, stage.loss_fn(cfg), stage.sides, trainable, frozen
    )
    state = steps.init_state(trainable, tx, cfg.seed, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
    target = checkpoint.abstract_like(state, steps.train_state_shardings(state.trainable, tx, mesh))
    start = 0
    if (resumed := ckpt.restore_latest(target)) is not None:
        start, state, data_state = resumed
        data.set_state(data_state)
        log.info("resumed from step %d", start)

    held_out = stage.evaluator(cfg)

    def evaluate(trainable) -> dict | None:
        if held_out is None:
            return None
        model = nnx.merge(graphdef, trainable, frozen)
        embedder = inference.EmbeddingModel.from_module(model, family, processor, mesh)
        return held_out(Embedder(embedder, batch_size=64, progress=False))

    results_path = os.path.join(workdir, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    if "before" not in results and (before := evaluate(state.trainable)) is not None:
        results["before"] = before
        _write_results(results_path, results)

    writer = MetricWriter(workdir, enabled=lead)
    preempt = checkpoint.PreemptionFlag()
    bar = tqdm(
        total=cfg.num_steps,
        initial=start,
        desc=f"stage {cfg.stage}",
        unit="step",
        dynamic_ncols=True,
    )
    schedule = steps.make_schedule(cfg.lr, cfg.warmup_steps, cfg.num_steps)
    t0, examples = time.perf_counter(), 0
    step, pending = start, None
    try:
        while step < cfg.num_steps:
            batch = sharding.put_batch(next(data), mesh)
            state, metrics = train_step(state, frozen, batch)
            if pending is not None:  # wait for the previous step: an honest bar, one step queued
                jax.block_until_ready(pending)
                bar.update(1)
            pending = metrics["loss"]
            step += 1
            examples += cfg.batch_size
            if step % cfg.log_every == 0 or step == cfg.num_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - t0
                metrics |= {"lr": float(schedule(step - 1)), "examples_per_s": examples / elapsed}
                writer.write(step, metrics | data.metrics())
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", gnorm=f"{metrics['grad_norm']:.2f}")
                t0, examples = time.perf_counter(), 0
            if step % cfg.checkpoint_every == 0 or step == cfg.num_steps or preempt.requested:
                ckpt.save(step, state, data.get_state(), force=True)
            if preempt.requested:
                log.warning(
                    "stopping at step %d after SIGTERM; rerun the same command to resume", step
                )
                break
        if pending is not None:
            bar.update(1)
    finally:
        bar.close()
        ckpt.close()
        writer.close()
        preempt.restore()
    results["steps"] = step
    if step == cfg.num_steps and (after := evaluate(state.trainable)) is not None:
        results["after"] = after
        print(format_results(results))
    if cfg.export_merged and step == cfg.num_steps:
        out = os.path.join(workdir, "merged")  # export_hf folds the adapters in (on a copy)
        merged = nnx.merge(graphdef, state.trainable, frozen)
        results["merged"] = str(
            export_hf.export_hf(merged, out, base_dir=directory, overwrite=True)
        )
        log.info("merged model written to %s; use it with --config.model=%s", out, out)
    _write_results(results_path, results)
    # Exact (a uint32 per leaf, as checkpoints store), the same on any mesh and process count.
    digest = {"step": step, "digest": checkpoint.digest_list(state.trainable)}
    _write_results(os.path.join(workdir, "final_state_digest.json"), digest)
    return results


def _write_results(path: str, obj) -> None:
    if jax.process_index() == 0:
        atomic_write_json(path, obj)


def format_results(results: dict) -> str:
    before, after = results.get("before", {}), results.get("after", {})
    lines = [f"{'held-out metric (%)':<26}{'before':>10}{'after':>10}"]
    for key in before:
        lines.append(f"{key:<26}{before[key]:>10.2f}{after.get(key, float('nan')):>10.2f}")
    return "\n".join(lines)
