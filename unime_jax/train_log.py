"""Training metrics: a JSONL log and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

from tensorboardX import SummaryWriter


class MetricWriter:
    """``write(step, {...})`` appends one JSON line to ``metrics.jsonl`` and a scalar per key to
    TensorBoard (``tensorboard --logdir WORKDIR/tensorboard``). Only the first process writes."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3)}
        record |= {k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in clean.items():
            self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
