"""Rotary position embeddings in the HF "rotate_half" layout: 1-D RoPE and M-RoPE.

Positions come from the host (:class:`~unime_jax.models.inputs.ModelInputs`): (B, T) for 1-D
RoPE, (B, T, 3) = (temporal, height, width) for M-RoPE, whose frequency slots are split by
``mrope_section`` between the three axes (with t = h = w it is 1-D RoPE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unime_jax.models.config import RopeSpec


def rope_tables(positions: jax.Array, head_dim: int, rope: RopeSpec) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (B, T, head_dim) for ``positions`` (B, T) or (B, T, 3)."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if positions.ndim == 3:  # M-RoPE: slot j of the half takes its axis' position
        if sum(rope.mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {rope.mrope_section} does not sum to {head_dim // 2}")
        axis = jnp.concatenate(
            [jnp.full((n,), i % 3, jnp.int32) for i, n in enumerate(rope.mrope_section)]
        )
        pos = jnp.take(positions.astype(jnp.float32), axis, axis=-1)  # (B, T, head_dim/2)
        angles = pos * inv_freq
    else:
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, H, hd); cos/sin: (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
