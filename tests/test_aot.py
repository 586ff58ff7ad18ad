"""The ahead-of-time check: the real train step compiled by libtpu for a TPU topology on this CPU.

Run as a subprocess (as users run it), so libtpu is loaded outside the test process.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import stage2
from unime_jax import aot, families, sharding, stages
from unime_jax.errors import UsageError
from unime_jax.weights.hub import read_config

REPO = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (requirements-dev.txt) compiles for TPUs",
)


def run_aot(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device is enough: the devices are libtpu's
    proc = subprocess.run(
        [sys.executable, "-m", "unime_jax.aot", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, reports


@pytest.mark.parametrize(
    "name, libtpu, devices",
    [
        ("v5e-16", "v5e:4x4", 16),
        ("v5litepod-4", "v5e:2x2", 4),
        ("v5p-8", "v5p:2x2x1", 4),  # v5p counts TensorCores: 8 cores = 4 chips
        ("v5p-16", "v5p:2x2x2", 8),
        ("v6e-8", "v6e:2x4", 8),
        ("v4-8", "v4:2x2x1", 4),
        ("v5e:4x8", "v5e:4x8", 32),
    ],
)
def test_topology_names(name, libtpu, devices):
    topology = aot.parse_topology(name)
    assert topology.libtpu_name == libtpu and topology.num_devices == devices


def test_unknown_topology_is_a_usage_error():
    with pytest.raises(UsageError, match="v7x-9"):
        aot.parse_topology("v7x-9")


@pytest.mark.slow
@needs_libtpu
def test_tiny_config_compiles_for_v5e_and_reports_memory():
    proc, reports = run_aot(
        "--config=configs/stage2.py:demo", "--topology=v5e-4", "--config.batch_size=16"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = reports
    for key in ("topology", "fits", "headroom_pct", "temp_bytes", "total_bytes", "hbm_bytes"):
        assert key in r
    assert r["topology"] == "v5e-4" and r["devices"] == 4 and r["fits"]
    assert r["hbm_bytes"] == int(15.75 * 2**30) and 0 < r["total_bytes"] < r["hbm_bytes"]
    assert r["flops"] > 0 and r["compile_s"] > 0
    assert "headroom" in proc.stdout.splitlines()[0]  # the table comes first


@pytest.mark.slow
@needs_libtpu
def test_oversized_config_exits_1_and_says_why():
    proc, reports = run_aot(
        "--config=configs/stage2.py:demo",
        "--topology=v5e-4",
        "--config.batch_size=65536",
        "--config.num_chunks=1",
        "--config.query_length=4096",
        "--config.target_length=4096",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: the step does not fit v5e-4" in proc.stderr
    assert "Fix: more GradCache chunks" in proc.stderr
    assert reports and not reports[0]["fits"] and reports[0]["headroom_pct"] < 0


def test_bad_config_is_a_usage_error():
    proc, _ = run_aot("--config=configs/stage2.py:demo", "--topology=v9z-3", timeout=300)
    assert proc.returncode == 2
    assert "error: --topology='v9z-3'" in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "preset, positions",
    [("llava_onevision_7b", ()), ("phi35v", ()), ("qwen2_vl_2b", (3,))],  # M-RoPE: (B, T, 3)
)
def test_abstract_batch_has_the_pipelines_shapes(preset, positions):
    """The compiled step takes what the data pipeline feeds: per side, ids and mask (B, T),
    positions (B, T, *family.position_axes), packed image units per group."""
    cfg = stage2.get_config(preset)
    cfg.batch_size, cfg.num_chunks = 16, 2
    stage, mesh = stages.get(cfg.stage), sharding.make_mesh()
    hf_config = read_config(aot.model_directory(cfg))
    family = families.for_config(hf_config)
    batch = aot.abstract_batch(cfg, stage, family, family.parse_config(hf_config), hf_config, mesh)
    for side, length in stage.lengths(cfg).items():
        inputs = batch[side]
        assert inputs.input_ids.shape == inputs.attention_mask.shape == (16, length)
        assert inputs.positions.shape == (16, length, *positions)
        assert all(a.shape[0] == mesh.size * 2 for a in inputs.images.values())  # groups
