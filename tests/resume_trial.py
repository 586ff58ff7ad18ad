"""One crash-and-resume trial: the demo CLI killed with SIGKILL at seeded random moments (during
start-up and restore, training, checkpoint saves or the final export), rerun until it finishes,
and compared with an uninterrupted run: the final train-state digest (exact, per leaf) and the merged
export must be bit-identical.

Not a test module: ``tests/test_train.py`` runs a few trials, ``benchmarks/resume_trials.py``
runs many.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def small_demo(steps: int) -> list[str]:
    """A stage-2 demo run small enough to run many times: batch 16, checkpoints every 2 steps."""
    return [
        "--config=configs/stage2.py:demo",
        "--config.batch_size=16",
        "--config.num_chunks=2",
        f"--config.num_steps={steps}",
        "--config.warmup_steps=2",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        "--config.demo_train_rows=96",
        "--config.demo_eval_size=0",
        "--config.query_length=48",
        "--config.target_length=48",
    ]


ARGS = [
    *small_demo(STEPS),
    # What resuming must get right: LoRA dropout (masks from the step), the loss switch at 4.
    "--config.lora_rank=4",
    "--config.lora_alpha=8",
    "--config.lora_dropout=0.1",
    "--config.infonce_steps=4",
]


def start(workdir: Path) -> subprocess.Popen:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    cmd = [sys.executable, "-m", "unime_jax.main", f"--workdir={workdir}", *ARGS]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def run(workdir: Path, timeout: float = 900) -> float:
    """Runs (or resumes) the demo in ``workdir`` to the end; returns the seconds it took."""
    begin = time.perf_counter()
    proc = start(workdir)
    out = proc.communicate(timeout=timeout)[0]
    if proc.returncode != 0:
        raise RuntimeError(f"run in {workdir} failed ({proc.returncode}):\n{out[-3000:]}")
    return time.perf_counter() - begin


def outcome(workdir: Path) -> dict:
    """What must be identical across runs: the final train-state digest and the merged export."""
    digest = json.loads((workdir / "final_state_digest.json").read_text())
    merged = workdir / "merged" / "model.safetensors"
    return {"digest": digest, "merged": merged.read_bytes()}


def trial(workdir: Path, reference: Path, seed: int, kills: int = 2, span: float = 40.0) -> dict:
    """Kills the run ``kills`` times at random delays in [1, span] s after each (re)start, then
    lets it finish; returns what happened and whether it matches ``reference``."""
    rng = random.Random(seed)
    events = []
    for _ in range(kills):
        proc = start(workdir)
        delay = rng.uniform(1.0, span)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            found = [p.name for p in (workdir / "checkpoints").glob("[0-9]*")]
            steps = sorted(int(n) for n in found if n.isdigit())
            partial = " + a save in progress" if any(not n.isdigit() for n in found) else ""
            events.append(f"killed at {delay:.1f} s (checkpoints {steps}{partial})")
        else:
            events.append(f"finished before {delay:.1f} s")
        proc.stdout.close()
    run(workdir)
    same = outcome(workdir) == outcome(reference)
    return {"seed": seed, "events": events, "identical": same}
