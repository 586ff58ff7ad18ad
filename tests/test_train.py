"""The trainer (stage 2 here; stage 1 in test_stage1.py): config validation, the jitted step (compiles once, skips non-finite steps,
GradCache chunking does not change the update, LoRA-only updates), checkpoints and exact resume
after kill -9 and SIGTERM, metrics files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import stage2
from unime_jax import inference, sharding, stages, steps, train
from unime_jax.errors import UsageError
from unime_jax.train_log import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides):
    cfg = stage2.get_config("demo")
    cfg.update(
        batch_size=16,
        num_chunks=2,
        num_steps=6,
        warmup_steps=2,
        log_every=1,
        checkpoint_every=2,
        demo_train_rows=96,
        demo_eval_size=0,
        query_length=48,
        target_length=48,
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model, data and step of the tiny demo config on the 8-device mesh."""
    cfg = tiny_cfg()
    mesh = sharding.make_mesh(dict(cfg.mesh))
    directory = train.resolve_model(cfg, str(tmp_path_factory.mktemp("demo")))
    _, _, module, processor = inference.build_model(directory, mesh, dtype=cfg.dtype)
    graphdef, trainable, frozen = nnx.split(module, nnx.Param, ...)
    tx = steps.make_optimizer(cfg)
    data = train.make_data(cfg, stages.get(2), processor, mesh)
    batches = [sharding.put_batch(next(data), mesh) for _ in range(3)]
    return cfg, mesh, graphdef, trainable, frozen, tx, batches, processor


def make_step(cfg, mesh, graphdef, tx, trainable, frozen):
    stage = stages.get(cfg.stage)
    return steps.make_train_step(
        graphdef, tx, cfg, mesh, stage.loss_fn(cfg), stage.sides, trainable, frozen
    )


def test_config_validation():
    mesh, stage = sharding.make_mesh(), stages.get(2)
    with pytest.raises(UsageError, match="not divisible by num_chunks"):
        train.validate(tiny_cfg(batch_size=18, num_chunks=4), mesh, stage)
    with pytest.raises(UsageError, match="must split over the 8 data-parallel devices"):
        train.validate(tiny_cfg(batch_size=16, num_chunks=4), mesh, stage)
    real = stage2.get_config()
    with pytest.raises(UsageError, match=r"set --config\.model"):
        train.validate(real, mesh, stage)
    real.model = "/some/model"
    with pytest.raises(UsageError, match="convert MMEB-train"):
        train.validate(real, mesh, stage)
    # The paper preset picks its chunk count from the mesh: one row per device per chunk.
    assert train.num_chunks(real, 8) == 128 and train.num_chunks(real, 32) == 32
    for key, value in [("batch_size", -4), ("lr", 0.0), ("lora_dropout", 1.0), ("remat", "x")]:
        with pytest.raises(UsageError, match=f"--config.{key}="):
            train.validate(tiny_cfg(**{key: value}), mesh, stage)


def test_step_compiles_once_and_learns(setup):
    cfg, mesh, graphdef, trainable, frozen, tx, batches, _ = setup
    step_fn = make_step(cfg, mesh, graphdef, tx, trainable, frozen)
    state = steps.init_state(trainable, tx, 0, mesh)
    losses = []
    for batch in batches * 3:
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert step_fn._cache_size() == 1
    assert int(state.step) == 9 and int(state.skipped) == 0
    assert losses[-1] < losses[0]
    for key in ("grad_norm", "false_negative_share", "positive_sim", "hardest_negative_sim"):
        assert np.isfinite(float(metrics[key]))


def test_non_finite_step_is_skipped(setup):
    _, mesh, graphdef, trainable, frozen, _, batches, _ = setup
    cfg = tiny_cfg(warmup_steps=0)  # a real learning rate at step 0: an update would show
    tx = steps.make_optimizer(cfg)
    step_fn = make_step(cfg, mesh, graphdef, tx, trainable, frozen)
    state = steps.init_state(trainable, tx, 0, mesh)
    before = jax.tree.map(np.asarray, state.trainable)
    query = batches[0]["query"]
    poisoned = query.images | {"pixel_lut": query.images["pixel_lut"] * np.nan}
    bad = dict(batches[0], query=query.replace(images=poisoned))
    state, metrics = step_fn(state, frozen, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.skipped) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.trainable), before)
    state, metrics = step_fn(state, frozen, batches[1])  # the next good step does update
    assert np.isfinite(float(metrics["loss"])) and int(state.skipped) == 1
    after = jax.tree.map(np.asarray, state.trainable)
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))
    )


def test_chunking_does_not_change_the_update(setup):
    _, mesh, graphdef, trainable, frozen, _, _, processor = setup
    results = []
    initial = jax.tree.map(np.asarray, trainable)
    for chunks in (1, 2):
        # lr > 0 at step 0, so parameters move; Adam's eps = 1 makes the first update lr * g /
        # (|g| + 1), proportional to the gradient (eps = 1e-8 would turn it into lr * sign(g)).
        c = tiny_cfg(num_chunks=chunks, warmup_steps=0, adam_eps=1.0, lr=1e-2)
        tx = steps.make_optimizer(c)
        # The same rows, packed for this chunk count (image groups follow the chunks).
        data = train.make_data(c, stages.get(2), processor, mesh)
        batch = sharding.put_batch(next(data), mesh)
        step_fn = make_step(c, mesh, graphdef, tx, trainable, frozen)
        state, metrics = step_fn(steps.init_state(trainable, tx, 0, mesh), frozen, batch)
        results.append((float(metrics["loss"]), jax.tree.map(np.asarray, state.trainable)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(initial))
    ]
    assert any(moved)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), results[0][1], results[1][1]
    )


def test_lora_training_updates_only_adapters(tmp_path):
    cfg = tiny_cfg(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, num_steps=2, checkpoint_every=2)
    train.run(cfg, str(tmp_path))
    restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "2" / "state")
    leaves = jax.tree_util.tree_flatten_with_path(restored["trainable"])[0]
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert names and all("lora_a" in n or "lora_b" in n for n in names)
    assert any("vision" in n for n in names) and any("llm" in n for n in names)
    lora_b = [v for p, v in leaves if "lora_b" in jax.tree_util.keystr(p)]
    assert any(np.abs(v).sum() > 0 for v in lora_b)  # B moved away from zero: adapters trained


def test_schedule_warms_up_then_decays_linearly():
    schedule = steps.make_schedule(1e-3, warmup_steps=10, total_steps=110)
    values = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(values, [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_metrics_and_results_files(tmp_path):
    results = train.run(tiny_cfg(num_steps=2, demo_eval_size=12), str(tmp_path))
    assert set(results) >= {"before", "after", "steps"}
    for key in ("i2t_R@1", "t2i_R@1", "sugarcrepe/replace", "sugarcrepe/swap", "sugarcrepe/add"):
        assert 0.0 <= results["after"][key] <= 100.0
    assert json.loads((tmp_path / "results.json").read_text())["after"] == results["after"]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "examples_per_s",
        "false_negative_share",
        "skipped_steps",
        "data/skipped/total",
    ):
        assert key in rows[0]
    assert any(
        p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir()
    )
    assert json.loads((tmp_path / "final_state_digest.json").read_text())["step"] == 2


def _run_cli(workdir, *extra, wait=True):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    args = [
        sys.executable,
        "-m",
        "unime_jax.main",
        "--config=configs/stage2.py:demo",
        f"--workdir={workdir}",
        "--config.batch_size=16",
        "--config.num_chunks=2",
        "--config.num_steps=8",
        "--config.warmup_steps=2",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        "--config.demo_train_rows=96",
        "--config.demo_eval_size=0",
        "--config.query_length=48",
        "--config.target_length=48",
        *extra,
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if wait:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
    return proc


def _final_params(workdir):
    return ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / "8" / "state")[
        "trainable"
    ]


def _wait_for_checkpoint(workdir, step, proc, timeout=600):
    deadline = time.time() + timeout
    while not (Path(workdir) / "checkpoints" / str(step)).exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    _run_cli(reference)
    killed = tmp_path / "killed"
    proc = _run_cli(killed, wait=False)
    _wait_for_checkpoint(killed, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run_cli(killed)
    jax.tree.map(np.testing.assert_array_equal, _final_params(killed), _final_params(reference))
    # The step log of the resumed run continues where the checkpoint was.
    assert read_jsonl(killed / "metrics.jsonl")[-1]["step"] == 8


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _run_cli(tmp_path, wait=False)
    _wait_for_checkpoint(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert "stopping at step" in out and saved[-1] < 8
    _run_cli(tmp_path)
    assert (tmp_path / "checkpoints" / "8").exists()
