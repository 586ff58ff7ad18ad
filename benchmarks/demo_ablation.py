"""The paper's stage-2 loss ablation on the offline demo (synthetic shapes world).

    python benchmarks/demo_ablation.py [--workdir runs/ablation] [--variants a,b,...]

Every variant trains the demo preset (configs/stage2.py:demo) from the same seed and data and
reports held-out retrieval R@1 and SugarCrepe-style accuracy; the markdown table is printed and
written to WORKDIR/ablation.md. Takes 2.5 to 6 minutes per variant on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import stage2
from unime_jax import train

VARIANTS = {
    "unime": ("InfoNCE warm start, then hard negatives (k=8, β=0.1)", {}),
    "infonce": ("plain in-batch InfoNCE throughout", {"loss": "infonce"}),
    "no_filter": (
        "InfoNCE warm start, then hard negatives, no false-negative filter",
        {"filter_false_negatives": False},
    ),
    "hard_from_start": ("hard negatives (k=8, β=0.1) from step 0", {"infonce_steps": 0}),
}
COLUMNS = (
    "i2t_R@1",
    "t2i_R@1",
    "sugarcrepe/replace",
    "sugarcrepe/swap",
    "sugarcrepe/add",
    "sugarcrepe/mean",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/ablation")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    rows = []
    for name in args.variants.split(","):
        label, overrides = VARIANTS[name]
        cfg = stage2.get_config("demo")
        cfg.update(overrides)
        start = time.time()
        results = train.run(cfg, os.path.join(args.workdir, name))
        rows.append((label, results["after"], time.time() - start))
        print(json.dumps({"variant": name, "after": results["after"]}), flush=True)
    header = "| stage-2 objective (demo) | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 1)]
    for label, after, _ in rows:
        lines.append(f"| {label} | " + " | ".join(f"{after[c]:.1f}" for c in COLUMNS) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.workdir, "ablation.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
