"""Backbone families as plug-ins, looked up by the ``model_type`` of a checkpoint's config.json.

Loader, export, processing, the data pipeline, the Embedder and evaluation consult this
registry; none of them names a family. To add one, write ``families/<name>.py`` (a
:class:`~unime_jax.families.base.Family`: config, model, weight table, processor and prompts,
LoRA groups) with its device modules under ``models/``, and add it to :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from unime_jax.families import llava, phi3_v, qwen2_vl
from unime_jax.families.base import Family
from unime_jax.models.config import ConfigError

FAMILIES: tuple[Family, ...] = (
    llava.ONEVISION,
    llava.NEXT,
    qwen2_vl.QWEN2_VL,
    qwen2_vl.QWEN2_5_VL,
    phi3_v.PHI3_V,
)

_BY_MODEL_TYPE = {t: family for family in FAMILIES for t in family.model_types}


def get(model_type: str) -> Family:
    """The family that loads checkpoints of this ``model_type``."""
    if model_type not in _BY_MODEL_TYPE:
        raise ConfigError(
            f"model_type {model_type!r} is not supported",
            f"use a checkpoint of one of {sorted(_BY_MODEL_TYPE)}",
        )
    return _BY_MODEL_TYPE[model_type]


def for_config(hf_config: dict[str, Any]) -> Family:
    return get(hf_config.get("model_type"))


__all__ = ["FAMILIES", "Family", "for_config", "get"]
