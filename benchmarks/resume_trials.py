"""Crash-and-resume trials: the demo run killed with SIGKILL at seeded random moments — during
start-up and checkpoint restore, training steps, asynchronous checkpoint saves, the final export —
rerun until it finishes, and compared bit for bit with one uninterrupted run (final train-state
digest and the merged HF export). See ``tests/resume_trial.py``.

    .venv/bin/python benchmarks/resume_trials.py [--trials 10] [--kills 2] [--seed 0]

About a minute per trial on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests import resume_trial  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=2, help="kills per trial before it may finish")
    parser.add_argument(
        "--span",
        type=float,
        default=0.0,
        help="kill within this many s of a start (default: 0.8 x the uninterrupted run's time)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="resume_trials_") as tmp:
        tmp = pathlib.Path(tmp)
        reference_s = resume_trial.run(tmp / "reference")
        span = args.span or 0.8 * reference_s
        print(f"reference run: {reference_s:.0f} s; kills drawn in [1, {span:.0f}] s of a start")
        identical = kills = 0
        for i in range(args.trials):
            seed = args.seed + i
            start = time.perf_counter()
            result = resume_trial.trial(
                tmp / f"trial{i}", tmp / "reference", seed, args.kills, span
            )
            identical += result["identical"]
            kills += sum(e.startswith("killed") for e in result["events"])
            verdict = "identical" if result["identical"] else "DIFFERENT"
            print(f"trial {i} (seed {seed}, {time.perf_counter() - start:.0f} s): {verdict}; "
                  + "; ".join(result["events"]))  # fmt: skip
        print(
            f"{identical} of {args.trials} trials ended bit-identical to the uninterrupted run "
            f"({kills} SIGKILLs landed mid-run)"
        )
        sys.exit(0 if identical == args.trials else 1)


if __name__ == "__main__":
    main()
