"""A pod in miniature: two processes on this machine, joined by ``jax.distributed.initialize``
over localhost (4 CPU devices each, one 8-device mesh), train the demo with per-host data
blocks and orbax checkpoints, are killed, resume, and end bit for bit where the uninterrupted
two-process run ends — and where one process with 8 devices ends, up to the order in which
cross-process reductions add (gloo's, not XLA's in-process all-reduce).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.resume_trial import small_demo
from unime_jax.train_log import read_jsonl

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
ARGS = small_demo(STEPS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: Path, devices: int, extra: list[str]) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    cmd = [sys.executable, "-m", "unime_jax.main", f"--workdir={workdir}", *ARGS, *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def two_processes(workdir: Path) -> list[subprocess.Popen]:
    port = free_port()
    return [
        launch(
            workdir,
            4,
            [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        )
        for i in range(2)
    ]


def finish(procs: list[subprocess.Popen], timeout: int = 900) -> None:
    for proc in procs:
        out = proc.communicate(timeout=timeout)[0]
        assert proc.returncode == 0, out[-4000:]


def final_params(workdir: Path):
    """The last checkpoint's parameters, restored onto this process's first device (the
    checkpoint's own device layout belongs to the run that wrote it)."""
    checkpointer = ocp.StandardCheckpointer()
    path = workdir / "checkpoints" / str(STEPS) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return checkpointer.restore(path, target)["trainable"]


@pytest.mark.slow
def test_two_processes_kill_resume_equal_one_process(tmp_path):
    reference = tmp_path / "one_process"
    finish([launch(reference, 8, [])])
    straight = tmp_path / "two_processes"
    finish(two_processes(straight))

    pod = tmp_path / "two_processes_killed"
    procs = two_processes(pod)
    deadline = time.time() + 900
    while not (pod / "checkpoints" / "4").exists():
        assert all(p.poll() is None for p in procs), [p.stdout.read()[-3000:] for p in procs]
        assert time.time() < deadline
        time.sleep(0.2)
    for proc in procs:  # the whole "pod" dies at once
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finish(two_processes(pod))  # rerun: both processes resume from the last checkpoint

    # Killed and resumed == uninterrupted, exactly.
    jax.tree.map(np.testing.assert_array_equal, final_params(pod), final_params(straight))
    digests = [json.loads((d / "final_state_digest.json").read_text()) for d in (pod, straight)]
    assert digests[0] == digests[1] and digests[0]["step"] == STEPS
    assert read_jsonl(pod / "metrics.jsonl")[-1]["step"] == STEPS

    # Two processes == one process: the same losses step by step; parameters to within what
    # Adam makes of reductions added in another order (its first steps move every weight by
    # about lr, whatever the gradient's size).
    ref_rows = {r["step"]: r for r in read_jsonl(reference / "metrics.jsonl")}
    for row in read_jsonl(straight / "metrics.jsonl"):
        np.testing.assert_allclose(row["loss"], ref_rows[row["step"]]["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
        final_params(straight),
        final_params(reference),
    )
    # Process 0 wrote the merged export of the multi-host run; it loads like any checkpoint.
    assert (pod / "merged" / "config.json").is_file()
