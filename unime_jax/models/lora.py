"""LoRA: low-rank adapters on chosen :class:`~unime_jax.models.layers.Linear` layers.

``apply_lora`` attaches ``lora_a`` (in, r) and ``lora_b`` (r, out) as ``nnx.LoRAParam`` to every
Linear whose module path matches one of the target regexes (each family names its groups, e.g.
``llm`` and ``vision_attention``; see :mod:`unime_jax.families`). For stacked (scanned) layers the
adapters get the same leading "layers" axis as the kernel. ``B`` starts at zero, so the adapted
model initially equals the base model exactly. Because they are ``LoRAParam`` variables,
``nnx.split(model, nnx.LoRAParam, ...)`` separates the trainable adapters from the frozen base,
which may stay in bf16.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.layers import Linear

log = logging.getLogger(__name__)


def linear_paths(model: nnx.Module) -> dict[str, Linear]:
    """All Linear layers by '/'-joined module path (e.g. ``llm/layers/attn/q_proj``)."""
    return {
        "/".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Linear)
    }


def apply_lora(
    model: nnx.Module,
    targets: Sequence[str],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
) -> list[str]:
    """Adds adapters in place to the Linear layers matching ``targets``; returns their paths.

    Scaling is ``alpha / rank`` (PEFT's convention). ``A`` is drawn like PEFT's default
    (uniform in ±1/sqrt(fan_in)), ``B`` is zero.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    patterns = [re.compile(t) for t in targets]
    layers = linear_paths(model)
    matched = sorted(path for path in layers if any(p.search(path) for p in patterns))
    if not matched:
        raise ValueError(
            f"LoRA targets {list(targets)} matched no Linear layer; available paths include "
            f"{sorted(layers)[:12]}"
        )
    for path in matched:
        layer = layers[path]
        if layer.lora_a is not None:
            raise ValueError(f"{path} already has a LoRA adapter")
        kernel = layer.kernel
        *lead, d_in, d_out = kernel.shape
        axes = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (*lead, d_in, rank), dtype, -bound, bound)
        layer.lora_a = nnx.LoRAParam(a, out_sharding=(*axes[:-1], "lora"), eager_sharding=False)
        layer.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead, rank, d_out), dtype),
            out_sharding=(*axes[:-2], "lora", axes[-1]),
            eager_sharding=False,
        )
        layer.lora_scale = alpha / rank
        layer.lora_dropout = float(dropout)
    log.info("LoRA r=%d alpha=%g on %d layers: %s", rank, alpha, len(matched), ", ".join(matched))
    return matched


def merge_lora(model: nnx.Module) -> list[str]:
    """Folds every adapter into its kernel (in fp32, cast back) and removes it; returns paths."""
    merged = []
    for path, layer in linear_paths(model).items():
        if layer.lora_a is None:
            continue
        kernel = layer.kernel[...]
        delta = jnp.matmul(
            layer.lora_a[...].astype(jnp.float32), layer.lora_b[...].astype(jnp.float32)
        )
        layer.kernel.set_value(
            (kernel.astype(jnp.float32) + delta * layer.lora_scale).astype(kernel.dtype)
        )
        layer.lora_a = layer.lora_b = None
        layer.lora_scale = layer.lora_dropout = 0.0
        merged.append(path)
    return sorted(merged)
