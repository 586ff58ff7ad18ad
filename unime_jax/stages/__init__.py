"""Training stages as objects (see :mod:`unime_jax.stages.base`), by ``cfg.stage``."""

from __future__ import annotations

from unime_jax.errors import UsageError
from unime_jax.stages.base import Stage
from unime_jax.stages.contrastive import Contrastive
from unime_jax.stages.distill import Distillation

STAGES: dict[int, Stage] = {1: Distillation(), 2: Contrastive()}


def get(number: int) -> Stage:
    if number not in STAGES:
        raise UsageError(
            f"stage {number} does not exist", "use configs/stage1.py or configs/stage2.py"
        )
    return STAGES[number]


__all__ = ["STAGES", "Stage", "get"]
