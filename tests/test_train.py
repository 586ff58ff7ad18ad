"""The trainer (stage 2 here; stage 1 in test_stage1.py): config validation, the jitted step (compiles once, skips non-finite steps,
GradCache chunking does not change the update, LoRA-only updates), checkpoints and exact resume
after kill -9 and SIGTERM, metrics files."""

import json
import re
import signal
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import stage2
from tests import resume_trial
from unime_jax import inference, sharding, stages, steps, train
from unime_jax.errors import DataError, UsageError
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
    with pytest.raises(DataError, match=r"mmeb_train/all/1\.0\.0 is not prepared") as e:
        train.validate(real, mesh, stage)
    assert "python -m unime_jax.datasets build mmeb_train --config all" in e.value.fix
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


def _final_params(workdir):
    return ocp.StandardCheckpointer().restore(
        Path(workdir) / "checkpoints" / str(resume_trial.STEPS) / "state"
    )["trainable"]


def _wait_for_checkpoint(workdir, step, proc, timeout=600):
    deadline = time.time() + timeout
    while not (Path(workdir) / "checkpoints" / str(step)).exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, float]:
    """The reference of the resume tests and its time: the demo with LoRA dropout and the
    InfoNCE -> hard-negative switch inside the run (see tests/resume_trial.py)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, resume_trial.run(workdir)


@pytest.fixture(scope="module")
def uninterrupted(reference_run) -> Path:
    return reference_run[0]


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    proc = resume_trial.start(killed)
    _wait_for_checkpoint(killed, 4, proc)  # the step-4 directory appears: possibly mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_trial.run(killed)
    jax.tree.map(np.testing.assert_array_equal, _final_params(killed), _final_params(uninterrupted))
    assert resume_trial.outcome(killed) == resume_trial.outcome(uninterrupted)
    # The step log of the resumed run continues where the checkpoint was.
    assert read_jsonl(killed / "metrics.jsonl")[-1]["step"] == resume_trial.STEPS


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3])  # benchmarks/resume_trials.py runs many more
def test_killed_at_random_moments_ends_bit_identical(tmp_path, reference_run, seed):
    reference, seconds = reference_run
    span = 0.8 * seconds  # as benchmarks/resume_trials.py: kills inside a run's lifetime
    result = resume_trial.trial(tmp_path / "run", reference, seed=seed, kills=2, span=span)
    # The first kill meets a fresh start, which lasts about the reference's time: it lands.
    assert result["events"][0].startswith("killed"), result
    assert result["identical"], result


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
    proc = resume_trial.start(tmp_path)
    _wait_for_checkpoint(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = int(re.search(r"stopping at step (\d+)", out).group(1))
    assert stopped < resume_trial.STEPS
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == stopped  # the step it stopped at is saved, not only the last periodic one
    resume_trial.run(tmp_path)
    jax.tree.map(
        np.testing.assert_array_equal, _final_params(tmp_path), _final_params(uninterrupted)
    )


def test_paper_preset_features_train_and_remat_is_exact(tmp_path):
    """What the paper presets use and the demo does not: the hard-negative loss from step 0,
    LoRA with dropout, recomputation (remat: in float32 it changes no loss value at all) and a
    bfloat16 frozen base (trains, finite)."""
    losses = {}
    for name, dtype, remat in (("fp32", "float32", "none"), ("fp32_remat", "float32", "full"),
                               ("bf16_remat", "bfloat16", "full")):  # fmt: skip
        cfg = tiny_cfg(
            loss="hard_negative",
            infonce_steps=0,
            dtype=dtype,
            lora_rank=4,
            lora_alpha=8.0,
            lora_dropout=0.1,
            remat=remat,
            num_steps=3,
            warmup_steps=0,
            lr=1e-3,
            export_merged=False,
        )
        train.run(cfg, str(tmp_path / name))
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        losses[name] = [r["loss"] for r in rows]
        assert all(np.isfinite(losses[name])) and rows[-1]["skipped_steps"] == 0
        assert "hard_negative_loss" not in rows[0] and "false_negative_share" in rows[0]
    np.testing.assert_allclose(losses["fp32_remat"], losses["fp32"], rtol=1e-6)
    np.testing.assert_allclose(losses["bf16_remat"], losses["fp32"], rtol=5e-2)  # bf16 rounding
    restored = ocp.StandardCheckpointer().restore(
        tmp_path / "bf16_remat" / "checkpoints" / "3" / "state"
    )
    lora_b = [v for p, v in jax.tree_util.tree_flatten_with_path(restored["trainable"])[0]
              if "lora_b" in jax.tree_util.keystr(p)]  # fmt: skip
    assert lora_b and all(v.dtype == np.float32 for v in lora_b)  # adapters stay float32
    assert any(np.abs(v).sum() > 0 for v in lora_b)  # and trained
