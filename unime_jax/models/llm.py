"""Decoder LLM of the Llama / Mistral / Qwen2 family, without LM head.

An embedding model reads the final hidden states (after the final norm), so the vocabulary
projection is never built. Layers are stacked and applied with ``lax.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.config import TextConfig
from unime_jax.models.layers import (
    Linear,
    RMSNorm,
    activation,
    apply_rope,
    attention,
    param,
    rope_tables,
    scan_layers,
    stacked,
    subkey,
)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(
            d, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, rngs=rngs, dtype=dtype
        )
        self.k_proj = Linear(
            d,
            cfg.num_kv_heads * hd,
            ("embed", "kv_heads"),
            bias=cfg.qkv_bias,
            rngs=rngs,
            dtype=dtype,
        )
        self.v_proj = Linear(
            d,
            cfg.num_kv_heads * hd,
            ("embed", "kv_heads"),
            bias=cfg.qkv_bias,
            rngs=rngs,
            dtype=dtype,
        )
        self.o_proj = Linear(
            cfg.num_heads * hd, d, ("heads", "embed"), bias=cfg.o_bias, rngs=rngs, dtype=dtype
        )
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, key=None):
        b, t, _ = x.shape
        hd, heads, kv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        q = apply_rope(self.q_proj(x, subkey(key, 0)).reshape(b, t, heads, hd), cos, sin)
        k = apply_rope(self.k_proj(x, subkey(key, 1)).reshape(b, t, kv, hd), cos, sin)
        v = self.v_proj(x, subkey(key, 2)).reshape(b, t, kv, hd)
        return self.o_proj(attention(q, k, v, mask).reshape(b, t, -1), subkey(key, 3))


class GatedMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=bias, rngs=rngs, dtype=dtype)
        self.up_proj = Linear(d, f, ("embed", "mlp"), bias=bias, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(f, d, ("mlp", "embed"), bias=bias, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, key=None):
        hidden = self.act(self.gate_proj(x, subkey(key, 0))) * self.up_proj(x, subkey(key, 1))
        return self.down_proj(hidden, subkey(key, 2))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.attn = SelfAttention(cfg, rngs=rngs, dtype=dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = GatedMLP(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, cos, sin, mask, key=None):
        x = x + self.attn(self.input_norm(x), cos, sin, mask, subkey(key, 0))
        return x + self.mlp(self.post_attn_norm(x), subkey(key, 1))


def causal_padding_mask(attention_mask: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """(B, T, T) boolean: query t sees key s iff s <= t, s is not padding (and within the window)."""
    t = attention_mask.shape[1]
    q_idx, k_idx = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = k_idx <= q_idx
    if sliding_window is not None:
        visible &= k_idx > q_idx - sliding_window
    return visible[None] & attention_mask.astype(bool)[:, None, :]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that count only real tokens, so left and right padding give equal results."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


class DecoderLM(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False):
        self.cfg = cfg
        self.embed_tokens = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype=dtype
        )
        self.layers = stacked(
            cfg.num_layers, lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype), rngs
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.remat = remat

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0)

    def __call__(
        self, inputs_embeds: jax.Array, attention_mask: jax.Array, key: jax.Array | None = None
    ) -> jax.Array:
        """Final hidden states after the final norm, (B, T, D); ``key`` drives LoRA dropout."""
        cos, sin = rope_tables(
            positions_from_mask(attention_mask), self.cfg.head_dim, self.cfg.rope_theta
        )
        mask = causal_padding_mask(attention_mask, self.cfg.sliding_window)
        h = scan_layers(self.layers, inputs_embeds, cos, sin, mask, key=key, remat=self.remat)
        return self.norm(h)
