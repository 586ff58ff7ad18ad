"""Every entry point once, in the runtime install users get (``requirements.txt`` alone: no torch,
no libtpu), on the demo model — run by ``make runtime-check`` (part of ``make test``).

Not a pytest module: it must run in the runtime-only environment, where the test dependencies
are missing on purpose. Exits non-zero with the failing command's output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True
    )
    if proc.returncode != expect:
        sys.exit(
            f"FAILED ({proc.returncode}, expected {expect}): {' '.join(args)}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    print(f"ok: python -m {' '.join(args)}")
    return proc


class HashTeacher:
    """A torch-free stand-in for the teacher: stage 1 itself never needs torch."""

    name, dim = "hash-teacher", 16

    def encode(self, sentences, instruction=None):
        rows = [np.random.default_rng(sum(map(ord, s))).normal(size=self.dim) for s in sentences]
        return np.stack(rows)


def main() -> None:
    for package in ("torch", "libtpu"):
        if importlib.util.find_spec(package) is not None:
            sys.exit(f"{package} is installed: this check must run in the runtime-only venv")
    with tempfile.TemporaryDirectory(prefix="runtime_check_") as tmp:
        tmp = Path(tmp)
        ENV["TFDS_DATA_DIR"] = os.environ["TFDS_DATA_DIR"] = str(tmp / "tfds")
        steps = ["--config.num_steps=3", "--config.warmup_steps=1", "--config.log_every=1"]
        run("unime_jax.main", "--config=configs/stage2.py:demo", f"--workdir={tmp / 's2'}",
            "--config.demo_train_rows=200", "--config.demo_eval_size=40", *steps)  # fmt: skip
        merged = tmp / "s2" / "merged"

        import unime_jax.datasets as uds
        from unime_jax import teacher
        from unime_jax.demo.world import sets

        teacher.write_nli_csv(tmp / "simcse" / "nli.csv", sets.nli_rows(0, 40))
        run("unime_jax.datasets", "build", "nli_simcse", f"--manual_dir={tmp / 'simcse'}")
        teacher.precompute(uds.nli_corpus(), tmp / "t", teacher=HashTeacher())
        run("unime_jax.main", "--config=configs/stage1.py:demo", f"--workdir={tmp / 's1'}",
            f"--config.model={merged}", "--config.corpus=nli_simcse",
            f"--config.teacher_dir={tmp / 't'}", "--config.batch_size=16", "--config.eval_corpus=",
            *steps)  # fmt: skip

        image = tmp / "red.png"
        Image.new("RGB", (50, 30), (200, 20, 20)).save(image)
        out = run("unime_jax.embed", "--model", str(merged), "--text", "a red square",
                  "--image", str(image), "--json").stdout  # fmt: skip
        assert np.array(json.loads(out[out.index("{") :])["similarity"]).shape == (1, 1)

        if (COCO_MINI / "captions_val2017.json").is_file():
            run("unime_jax.eval", "--config=configs/eval.py:coco_mini", f"--workdir={tmp / 'ev'}",
                f"--config.model={merged}", "--config.coco.max_images=10",
                "--config.sugarcrepe.max_items=5", "--config.cache_dir=")  # fmt: skip
        else:
            print("skipped: python -m unime_jax.eval (../shared/data/coco_mini not found)")

        err = run("unime_jax.aot", "--config=configs/stage2.py:demo", "--topology=v5e-4", expect=2)
        assert "pip install libtpu" in err.stderr, err.stderr[-2000:]
    print("runtime check passed")


if __name__ == "__main__":
    main()
