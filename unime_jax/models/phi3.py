"""Phi-3 decoder (Phi-3-mini / Phi-3.5-mini, the LLM of Phi-3-V / Phi-3.5-V), without LM head.

It differs from :mod:`unime_jax.models.llm` in two ways. The projections are fused as the
checkpoints store them: ``qkv_proj`` (q | k | v) and ``gate_up_proj`` (gate | up), so LoRA and
PEFT adapt the same modules. And rotary embeddings may be LongRoPE (``rope_scaling.type`` "su" /
"longrope"): per-frequency divisors, ``short_factor`` for sequences of at most
``original_max_position_embeddings`` tokens and ``long_factor`` beyond, with cos/sin scaled by
``sqrt(1 + ln(max_pos / orig_max) / ln(orig_max))``.

Which factors a row gets follows transformers' Phi-3 (``longrope_frequency_update``): the choice
depends on the sequence length (largest position + 1), not on each position, and holds for the
whole sequence. transformers applies it to the padded batch (``position_ids`` default to
``arange(T)``); here it is decided per row from the host's positions (real tokens only), so a
row's embedding never depends on what else is in its batch or on the padding side. Both agree for
every row that the Phi-3-V processor encodes on its own (it does not pad).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.attention import attention
from unime_jax.models.config import ConfigError, RopeSpec, TextConfig
from unime_jax.models.layers import Linear, activation, subkey
from unime_jax.models.llm import DecoderLM
from unime_jax.models.rope import apply_rope, rope_tables


@dataclasses.dataclass(frozen=True)
class LongRope(RopeSpec):
    """LongRoPE ("su"): ``short_factor`` / ``long_factor`` (head_dim / 2 each) divide the
    frequencies; ``attention_factor`` scales cos and sin."""

    kind: str = "longrope"
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    original_max_positions: int = 4096
    attention_factor: float = 1.0

    @classmethod
    def from_phi3(cls, c: dict, head_dim: int) -> LongRope:
        """From a Phi-3 ``config.json``: ``rope_scaling`` (type "su" or "longrope") and the
        top-level ``original_max_position_embeddings`` / ``max_position_embeddings``."""
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        orig = rope.get("original_max_position_embeddings")
        orig = int(orig or c.get("original_max_position_embeddings", 4096))
        factor = rope.get("factor") or c.get("max_position_embeddings", 4096) / orig
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            attention_factor = (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
            )
        short, long = (tuple(float(f) for f in rope[k]) for k in ("short_factor", "long_factor"))
        if len(short) != head_dim // 2 or len(long) != head_dim // 2:
            raise ValueError(
                f"LongRoPE factors have {len(short)} / {len(long)} entries, head_dim / 2 is "
                f"{head_dim // 2}"
            )
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        return cls(
            theta=theta,
            short_factor=short,
            long_factor=long,
            original_max_positions=orig,
            attention_factor=float(attention_factor),
        )


def phi3_text_config(c: dict) -> TextConfig:
    """The decoder of a Phi-3 / Phi-3-V ``config.json`` (flat; Phi3Config's defaults filled in).

    transformers 5.23's ``Phi3Config`` refuses the hub's ``rope_scaling`` of type "su" (it wants
    ``original_max_position_embeddings`` inside the rope dict), so the keys are read here.
    """
    heads = c.get("num_attention_heads", 32)
    hidden = c.get("hidden_size", 3072)
    head_dim = c.get("head_dim") or hidden // heads
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError("a partial_rotary_factor other than 1 is not supported (Phi-3 uses 1)")
    if kind in ("su", "longrope"):
        try:
            spec = LongRope.from_phi3(c, head_dim)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"LongRoPE parameters: {e}") from e
    elif kind == "default":
        spec = RopeSpec(theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    else:
        raise ConfigError(f"rope type {kind!r} is not supported for Phi-3 (su, longrope, default)")
    window = c.get("sliding_window")
    max_positions = c.get("max_position_embeddings", 4096)
    return TextConfig(
        kind="phi3",
        vocab_size=c.get("vocab_size", 32064),
        hidden_size=hidden,
        intermediate_size=c.get("intermediate_size", 8192),
        num_layers=c.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope=spec,
        rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        qkv_bias=False,
        # A window no sequence can exceed (Phi-3.5: 262144) never masks anything.
        sliding_window=window if window and window < max_positions else None,
        hidden_act=c.get("hidden_act", "silu"),
    )


def phi3_rope_tables(positions: jax.Array, head_dim: int, rope: RopeSpec):
    """cos/sin tables (B, T, head_dim) for 1-D ``positions`` (B, T); LongRoPE per row (module
    doc), any other spec through :func:`~unime_jax.models.rope.rope_tables`."""
    if not isinstance(rope, LongRope):
        return rope_tables(positions, head_dim, rope)
    base = rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    short = 1.0 / (jnp.asarray(rope.short_factor, jnp.float32) * base)
    long = 1.0 / (jnp.asarray(rope.long_factor, jnp.float32) * base)
    is_long = jnp.max(positions, axis=1) + 1 > rope.original_max_positions  # (B,)
    inv_freq = jnp.where(is_long[:, None], long, short)  # (B, head_dim / 2)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[:, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * rope.attention_factor, jnp.sin(angles) * rope.attention_factor


class Phi3Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, impl: str = "xla"):
        d, hd = cfg.hidden_size, cfg.head_dim
        fused = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        self.qkv_proj = Linear(d, fused, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.cfg = cfg
        self.impl = impl

    def __call__(self, x, cos, sin, segment_ids, key=None):
        b, t, _ = x.shape
        hd, heads, kv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        qkv = self.qkv_proj(x, subkey(key, 0))
        q, k, v = jnp.split(qkv, [heads * hd, (heads + kv) * hd], axis=-1)
        q = apply_rope(q.reshape(b, t, heads, hd), cos, sin)
        k = apply_rope(k.reshape(b, t, kv, hd), cos, sin)
        out = attention(
            q,
            k,
            v.reshape(b, t, kv, hd),
            segment_ids=segment_ids,
            causal=True,
            window=self.cfg.sliding_window,
            impl=self.impl,
        )
        return self.o_proj(out.reshape(b, t, -1), subkey(key, 1))


class Phi3MLP(nnx.Module):
    """down(act(gate) * up) with gate and up from one fused projection (gate first)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = Linear(d, 2 * f, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down_proj = Linear(f, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, key=None):
        gate, up = jnp.split(self.gate_up_proj(x, subkey(key, 0)), 2, axis=-1)
        return self.down_proj(up * self.act(gate), subkey(key, 1))


class Phi3LM(DecoderLM):
    """The decoder of :mod:`unime_jax.models.llm` with fused projections and LongRoPE."""

    attention_cls = Phi3Attention
    mlp_cls = Phi3MLP

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return phi3_rope_tables(positions, self.cfg.head_dim, self.cfg.rope)
