"""The training loop, top to bottom: mesh, model, LoRA, state, data, checkpoints, metrics, evals.

Rerunning the same command resumes from the last checkpoint in ``workdir/checkpoints`` with the
exact data position; SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from unime_jax import checkpoint, demo, sharding, steps
from unime_jax.data import shapes
from unime_jax.data.pipeline import PairTransform, make_pair_iterator
from unime_jax.embedder import Embedder
from unime_jax.metrics import MetricWriter
from unime_jax.models.config import LlavaConfig
from unime_jax.models.lora import LLM_TARGETS, VISION_ATTENTION_TARGETS, apply_lora
from unime_jax.models.mllm import LlavaModel
from unime_jax.models.runtime import EmbeddingModel
from unime_jax.processing import Processor
from unime_jax.weights import loader

log = logging.getLogger(__name__)

LORA_TARGETS = {"llm": LLM_TARGETS, "vision_attention": VISION_ATTENTION_TARGETS}


class ConfigError(ValueError):
    """A config that cannot run; raised before anything is compiled."""


def validate(cfg, mesh) -> None:
    dp = sharding.data_parallel_size(mesh)
    if cfg.batch_size % cfg.num_chunks:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is not divisible by num_chunks {cfg.num_chunks}"
        )
    chunk = cfg.batch_size // cfg.num_chunks
    if chunk % dp:
        raise ConfigError(
            f"each GradCache chunk ({cfg.batch_size}/{cfg.num_chunks} = {chunk} rows) must split over "
            f"the {dp} data-parallel devices; change batch_size, num_chunks or the mesh"
        )
    if cfg.warmup_steps > cfg.num_steps:
        raise ConfigError(f"warmup_steps {cfg.warmup_steps} exceeds num_steps {cfg.num_steps}")
    if cfg.model != "demo":
        if not cfg.model:
            raise ConfigError(
                "set --config.model to an HF checkpoint directory (or use the :demo preset)"
            )
        if not cfg.train_data or not os.path.isdir(cfg.train_data):
            raise ConfigError(
                f"--config.train_data={cfg.train_data!r} is not a directory; convert MMEB-train with "
                "`python -m unime_jax.data.mmeb --input ... --image-root ... --out DIR`"
            )


def lora_targets(spec: str) -> list[str]:
    out = []
    for name in filter(None, (s.strip() for s in spec.split(","))):
        out += LORA_TARGETS.get(name, [name])
    return out


def build_model(cfg, mesh) -> tuple[LlavaModel, Processor, int]:
    """The model (sharded where loaded), its processor, and the device tile count."""
    if cfg.model == "demo":
        config, processor = demo.build()
        module = LlavaModel(config, rngs=nnx.Rngs(cfg.seed), dtype=jax.numpy.float32)
        return module, processor, config.anyres.max_tiles
    directory = loader.resolve_checkpoint(cfg.model)
    config = LlavaConfig.from_hf(loader.read_config(directory))
    graphdef, state = loader.load_state(
        directory, config, mesh, loader.DTYPES[cfg.dtype], remat=cfg.remat
    )
    return (
        nnx.merge(graphdef, state),
        Processor.from_pretrained(directory, config),
        cfg.max_tiles or config.anyres.max_tiles,
    )


def make_data(cfg, processor: Processor, max_tiles: int):
    if cfg.model == "demo":
        source = shapes.training_rows(cfg.seed, cfg.demo_train_rows, image_size=demo.IMAGE_SIZE)
    else:
        from unime_jax.data.mmeb import open_dataset

        source = open_dataset(cfg.train_data, image_root=cfg.image_root or None)
    transform = PairTransform(
        processor,
        max_tiles=max_tiles,
        query_length=cfg.query_length,
        target_length=cfg.target_length,
    )
    return make_pair_iterator(
        source,
        transform,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        worker_count=cfg.worker_count,
    )


def embedder_for(graphdef, trainable, frozen, config, processor, mesh, max_tiles) -> Embedder:
    """An Embedder over the current parameters (for in-training evaluation)."""
    graphdef_all, state = nnx.split(nnx.merge(graphdef, trainable, frozen))
    model = EmbeddingModel(config, graphdef_all, state, mesh, max_tiles)
    return Embedder(model, processor, batch_size=64, progress=False)


def run(cfg, workdir: str) -> dict:
    """Trains per ``cfg`` in ``workdir`` (resuming if it holds checkpoints); returns results."""
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    validate(cfg, mesh)
    lead = jax.process_index() == 0  # one host writes metrics and results
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=1))

    module, processor, max_tiles = build_model(cfg, mesh)
    if cfg.lora_rank > 0:
        apply_lora(
            module,
            lora_targets(cfg.lora_targets),
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            rngs=nnx.Rngs(cfg.seed + 1),
        )
    trainable_filter = nnx.LoRAParam if cfg.lora_rank > 0 else nnx.Param
    graphdef, trainable, frozen = nnx.split(module, trainable_filter, ...)
    trainable = jax.device_put(trainable, sharding.state_shardings(trainable, mesh))
    frozen = jax.device_put(frozen, sharding.state_shardings(frozen, mesh))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    log.info(
        "trainable parameters: %s; frozen: %s",
        f"{n_train:,}",
        f"{sum(x.size for x in jax.tree.leaves(frozen)):,}",
    )

    tx = steps.make_optimizer(cfg)
    train_step = steps.make_train_step(graphdef, tx, cfg, mesh, trainable, frozen)
    state = steps.init_state(trainable, tx, cfg.seed, mesh)
    data = make_data(cfg, processor, max_tiles)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        target = checkpoint.abstract_like(
            state, steps.train_state_shardings(state.trainable, tx, mesh)
        )
        state, data_state = ckpt.restore(start, target)
        data.set_state(data_state)
        log.info("resumed from step %d", start)

    results_path = os.path.join(workdir, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    is_demo = cfg.model == "demo" and cfg.demo_eval_size > 0
    if is_demo and "before" not in results:
        results["before"] = demo.evaluate(
            embedder_for(graphdef, state.trainable, frozen, module.cfg, processor, mesh, max_tiles),
            n=cfg.demo_eval_size,
        )
        _write_json(results_path, results)

    writer = MetricWriter(workdir, enabled=lead)
    preempt = checkpoint.PreemptionFlag()
    bar = tqdm(total=cfg.num_steps, initial=start, desc="stage 2", unit="step", dynamic_ncols=True)
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
                lr = steps.make_schedule(cfg.lr, cfg.warmup_steps, cfg.num_steps)(step - 1)
                metrics |= {"lr": float(lr), "examples_per_s": examples / elapsed} | data.metrics()
                writer.write(step, metrics)
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
    if is_demo and step == cfg.num_steps:
        results["after"] = demo.evaluate(
            embedder_for(graphdef, state.trainable, frozen, module.cfg, processor, mesh, max_tiles),
            n=cfg.demo_eval_size,
        )
        _write_json(results_path, results)
        print(format_results(results))
    _write_json(
        os.path.join(workdir, "final_state_digest.json"),
        {"step": step, "digest": state_digest(state.trainable)},
    )
    return results


def state_digest(tree) -> float:
    """A float fingerprint of a parameter tree (used to compare resumed and uninterrupted runs)."""
    return float(sum(np.sum(np.abs(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree)))


def _write_json(path: str, obj) -> None:
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def format_results(results: dict) -> str:
    before, after = results.get("before", {}), results.get("after", {})
    lines = [f"{'held-out metric (%)':<26}{'before':>10}{'after':>10}"]
    for key in before:
        lines.append(f"{key:<26}{before[key]:>10.1f}{after.get(key, float('nan')):>10.1f}")
    return "\n".join(lines)
