"""Decoder LLM of the Llama / Mistral / Qwen2 family, without LM head.

An embedding model reads the final hidden states (after the final norm), so the vocabulary
projection is never built. Layers are stacked and applied with ``lax.scan``; positions come from
the host (1-D, or 3-D for M-RoPE), so one decoder serves every family.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.attention import attention
from unime_jax.models.config import TextConfig
from unime_jax.models.layers import Linear, RMSNorm, activation, param, scan_layers, stacked, subkey
from unime_jax.models.rope import apply_rope, rope_tables


class SelfAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, impl: str = "xla"):
        d, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.qkv_bias
        kv = cfg.num_kv_heads * hd
        self.q_proj = Linear(
            d, cfg.num_heads * hd, ("embed", "heads"), bias=bias, rngs=rngs, dtype=dtype
        )
        self.k_proj = Linear(d, kv, ("embed", "kv_heads"), bias=bias, rngs=rngs, dtype=dtype)
        self.v_proj = Linear(d, kv, ("embed", "kv_heads"), bias=bias, rngs=rngs, dtype=dtype)
        self.o_proj = Linear(
            cfg.num_heads * hd, d, ("heads", "embed"), bias=cfg.o_bias, rngs=rngs, dtype=dtype
        )
        self.cfg = cfg
        self.impl = impl

    def __call__(self, x, cos, sin, segment_ids, key=None):
        b, t, _ = x.shape
        hd, heads, kv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        q = apply_rope(self.q_proj(x, subkey(key, 0)).reshape(b, t, heads, hd), cos, sin)
        k = apply_rope(self.k_proj(x, subkey(key, 1)).reshape(b, t, kv, hd), cos, sin)
        v = self.v_proj(x, subkey(key, 2)).reshape(b, t, kv, hd)
        out = attention(
            q,
            k,
            v,
            segment_ids=segment_ids,
            causal=True,
            window=self.cfg.sliding_window,
            impl=self.impl,
        )
        return self.o_proj(out.reshape(b, t, -1), subkey(key, 3))


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
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        impl: str = "xla",
        attention_cls: type[nnx.Module] = SelfAttention,
        mlp_cls: type[nnx.Module] = GatedMLP,
    ):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.attn = attention_cls(cfg, rngs=rngs, dtype=dtype, impl=impl)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = mlp_cls(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, cos, sin, segment_ids, key=None):
        x = x + self.attn(self.input_norm(x), cos, sin, segment_ids, subkey(key, 0))
        return x + self.mlp(self.post_attn_norm(x), subkey(key, 1))


class DecoderLM(nnx.Module):
    """Embeddings, stacked decoder layers (``lax.scan``) and the final norm. A decoder variant
    (e.g. :class:`~unime_jax.models.phi3.Phi3LM`) subclasses it with its own attention and MLP
    classes and rotary tables."""

    attention_cls: type[nnx.Module] = SelfAttention
    mlp_cls: type[nnx.Module] = GatedMLP

    def __init__(
        self,
        cfg: TextConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: str = "none",
        attention: str = "xla",
    ):
        self.cfg = cfg
        self.embed_tokens = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype=dtype
        )
        layer = functools.partial(
            DecoderLayer,
            cfg,
            dtype=dtype,
            impl=attention,
            attention_cls=self.attention_cls,
            mlp_cls=self.mlp_cls,
        )
        self.layers = stacked(cfg.num_layers, lambda r: layer(rngs=r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.remat = remat

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], input_ids, axis=0)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin tables of ``positions`` ((B, T), or (B, T, 3) for M-RoPE)."""
        return rope_tables(positions, self.cfg.head_dim, self.cfg.rope)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        attention_mask: jax.Array,
        positions: jax.Array,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states after the final norm, (B, T, D); ``key`` drives LoRA dropout."""
        cos, sin = self.rope(positions)
        segment_ids = attention_mask.astype(jnp.int32)  # 1 = token, 0 = padding
        h = scan_layers(
            self.layers, inputs_embeds, cos, sin, segment_ids, key=key, remat=self.remat
        )
        return self.norm(h)
