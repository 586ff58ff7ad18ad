"""The training loop of both stages, top to bottom: mesh, model, LoRA, state, data, checkpoints,
metrics, evals, and (stage 1) the merged checkpoint that stage 2 starts from.

The stages differ only in their data, loss and evaluation (``cfg.stage``: 1 = textual
distillation, see :mod:`unime_jax.stage1`; 2 = hard-negative contrastive tuning). Rerunning
the same command resumes from the last checkpoint in ``workdir/checkpoints`` with the exact data
position; SIGTERM saves and exits cleanly.
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

from unime_jax import checkpoint, demo, sharding, stage1, steps
from unime_jax.data import shapes
from unime_jax.data.pipeline import PairTransform, make_batch_iterator
from unime_jax.embedder import Embedder
from unime_jax.metrics import MetricWriter
from unime_jax.models.lora import LLM_TARGETS, VISION_ATTENTION_TARGETS, apply_lora
from unime_jax.models.mllm import LlavaModel
from unime_jax.models.runtime import EmbeddingModel
from unime_jax.processing import Processor
from unime_jax.weights import export, loader

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
    if cfg.num_steps and cfg.warmup_steps > cfg.num_steps:
        raise ConfigError(f"warmup_steps {cfg.warmup_steps} exceeds num_steps {cfg.num_steps}")
    if not cfg.model:
        raise ConfigError(
            "set --config.model to an HF checkpoint directory (or use the :demo preset)"
        )
    if cfg.stage == 1:
        if cfg.corpus != "demo":
            for field in ("corpus", "teacher_dir"):
                if not cfg[field] or not os.path.exists(cfg[field]):
                    raise ConfigError(
                        f"--config.{field}={cfg[field]!r} does not exist; stage 1 needs the "
                        "corpus and its teacher embeddings from `python -m unime_jax.teacher "
                        "--corpus CORPUS --out TEACHER_DIR`"
                    )
        if not cfg.num_steps and cfg.num_epochs <= 0:
            raise ConfigError("set num_steps or num_epochs (> 0)")
    elif cfg.stage == 2:
        if cfg.train_data != "demo" and (not cfg.train_data or not os.path.isdir(cfg.train_data)):
            raise ConfigError(
                f"--config.train_data={cfg.train_data!r} is not a directory; convert MMEB-train with "
                "`python -m unime_jax.data.mmeb --input ... --image-root ... --out DIR`"
            )
    else:
        raise ConfigError(f"stage must be 1 or 2, got {cfg.stage}")


def lora_targets(spec: str) -> list[str]:
    out = []
    for name in filter(None, (s.strip() for s in spec.split(","))):
        out += LORA_TARGETS.get(name, [name])
    return out


def base_checkpoint(cfg, workdir: str) -> str:
    """The HF directory the model loads from; "demo" materialises the seeded demo model."""
    if cfg.model == "demo":
        return str(demo.base_checkpoint(os.path.join(workdir, "demo_base"), seed=cfg.seed))
    return str(loader.resolve_checkpoint(cfg.model))


def build_model(cfg, mesh, directory: str) -> tuple[LlavaModel, Processor, int]:
    """The model (loaded straight into its shardings), its processor, and the device tile count.

    Stage 1 builds the LLM only: the vision tower and projector are never loaded.
    """
    config = loader.parse_config(directory)
    if cfg.stage == 1:
        config = config.text_only()
    graphdef, state = loader.load_state(
        directory, config, mesh, loader.DTYPES[cfg.dtype], remat=cfg.remat
    )
    max_tiles = 0 if cfg.stage == 1 else (cfg.max_tiles or config.anyres.max_tiles)
    return nnx.merge(graphdef, state), Processor.from_pretrained(directory, config), max_tiles


def make_data(cfg, processor: Processor, max_tiles: int):
    """Stage-2 pairs: the demo world's or converted MMEB-train rows."""
    if cfg.train_data == "demo":
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
    return make_batch_iterator(
        source,
        transform,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        worker_count=cfg.worker_count,
    )


def resolve_stage1(cfg, workdir: str):
    """Stage 1's demo files and epoch-based step count, filled into a copy of ``cfg``."""
    cfg = cfg.copy_and_resolve_references()
    if cfg.corpus == "demo":
        cfg.update(stage1.prepare_demo(cfg, workdir))
    return cfg


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
    if cfg.stage == 1:
        cfg = resolve_stage1(cfg, workdir)

    directory = base_checkpoint(cfg, workdir)
    module, processor, max_tiles = build_model(cfg, mesh, directory)
    eval_set = None
    if cfg.stage == 1:
        data, source = stage1.make_data(cfg, processor)
        eval_set = stage1.open_eval_set(cfg)
        if not cfg.num_steps:
            cfg.num_steps = cfg.num_epochs * len(source) // cfg.batch_size
            log.info(
                "%d epochs of %d sentences = %d steps", cfg.num_epochs, len(source), cfg.num_steps
            )
            validate(cfg, mesh)
    else:
        data = make_data(cfg, processor, max_tiles)
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=1))

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
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        target = checkpoint.abstract_like(
            state, steps.train_state_shardings(state.trainable, tx, mesh)
        )
        state, data_state = ckpt.restore(start, target)
        data.set_state(data_state)
        log.info("resumed from step %d", start)

    def evaluate(trainable) -> dict | None:
        """Held-out metrics: teacher agreement (stage 1) or the demo world's (stage 2)."""
        if cfg.stage == 1 and eval_set is None:
            return None
        if cfg.stage == 2 and (cfg.train_data != "demo" or cfg.demo_eval_size <= 0):
            return None
        embedder = embedder_for(graphdef, trainable, frozen, module.cfg, processor, mesh, max_tiles)
        if cfg.stage == 1:
            return stage1.teacher_agreement(
                embedder, eval_set, max_sentence_tokens=cfg.max_sentence_tokens, cfg=cfg
            )
        return demo.evaluate(embedder, n=cfg.demo_eval_size)

    results_path = os.path.join(workdir, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    if "before" not in results and (before := evaluate(state.trainable)) is not None:
        results["before"] = before
        _write_json(results_path, results)

    writer = MetricWriter(workdir, enabled=lead)
    preempt = checkpoint.PreemptionFlag()
    bar = tqdm(
        total=cfg.num_steps,
        initial=start,
        desc=f"stage {cfg.stage}",
        unit="step",
        dynamic_ncols=True,
    )
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
    if step == cfg.num_steps and (after := evaluate(state.trainable)) is not None:
        results["after"] = after
        print(format_results(results))
    if cfg.export_merged and step == cfg.num_steps:
        results["merged"] = export_merged(graphdef, state.trainable, frozen, directory, workdir)
        follow_up = "start stage 2 with" if cfg.stage == 1 else "evaluate or embed with"
        log.info(
            "merged model written to %s; %s --config.model=%s",
            results["merged"],
            follow_up,
            results["merged"],
        )
    _write_json(results_path, results)
    _write_json(
        os.path.join(workdir, "final_state_digest.json"),
        {"step": step, "digest": state_digest(state.trainable)},
    )
    return results


def export_merged(graphdef, trainable, frozen, base_dir: str, workdir: str) -> str:
    """The trained model as a full HF checkpoint, LoRA folded in. For stage 1 this is the hand-over
    to stage 2: the LLM's adapters merged, the vision tower and projector the base's, untouched.
    For stage 2 it is the final embedding model (Embedder, the eval CLI and transformers load it)."""
    out = os.path.join(workdir, "merged")  # export_hf folds the adapters in (on a copy)
    export.export_hf(nnx.merge(graphdef, trainable, frozen), out, base_dir=base_dir, overwrite=True)
    return out


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
        lines.append(f"{key:<26}{before[key]:>10.2f}{after.get(key, float('nan')):>10.2f}")
    return "\n".join(lines)
