"""ViT vision towers: CLIP (class token, pre-norm, quick-GELU) and SigLIP (no class token).

LLaVA reads ``hidden_states[vision_feature_layer]`` of the tower: the output after that many
encoder layers. Only the layers that reach it are built (CLIP at -2 skips the last layer), and
the post-layernorm / pooling head never influence the features, so they are not built either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.attention import reference_attention
from unime_jax.models.config import VisionConfig
from unime_jax.models.layers import (
    LayerNorm,
    Linear,
    activation,
    param,
    scan_layers,
    stacked,
    subkey,
)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d = cfg.hidden_size
        axes_in, axes_out = ("vision_embed", "vision_heads"), ("vision_heads", "vision_embed")
        self.q_proj = Linear(d, d, axes_in, bias=True, rngs=rngs, dtype=dtype)
        self.k_proj = Linear(d, d, axes_in, bias=True, rngs=rngs, dtype=dtype)
        self.v_proj = Linear(d, d, axes_in, bias=True, rngs=rngs, dtype=dtype)
        self.out_proj = Linear(d, d, axes_out, bias=True, rngs=rngs, dtype=dtype)
        self.num_heads = cfg.num_heads

    def __call__(self, x, key=None):
        n, t, d = x.shape
        split = lambda y: y.reshape(n, t, self.num_heads, d // self.num_heads)  # noqa: E731
        q = split(self.q_proj(x, subkey(key, 0)))
        k = split(self.k_proj(x, subkey(key, 1)))
        v = split(self.v_proj(x, subkey(key, 2)))
        # Tiles are short (577-729 tokens) and attend fully: the exact reference path suffices.
        return self.out_proj(reference_attention(q, k, v, None).reshape(n, t, d), subkey(key, 3))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = Linear(d, f, ("vision_embed", "vision_mlp"), bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = Linear(f, d, ("vision_mlp", "vision_embed"), bias=True, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, key=None):
        return self.fc2(self.act(self.fc1(x, subkey(key, 0))), subkey(key, 1))


class VisionLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = VisionMLP(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, key=None):
        x = x + self.attn(self.layer_norm1(x), subkey(key, 0))
        return x + self.mlp(self.layer_norm2(x), subkey(key, 1))


class VisionTower(nnx.Module):
    """pixel tiles (N, C, H, W) -> features of the selected layer (N, tokens, D)."""

    def __init__(
        self,
        cfg: VisionConfig,
        num_layers: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: str = "none",
    ):
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        clip = cfg.kind == "clip"
        # The patch convolution (stride = kernel = patch) is a matmul over flattened patches.
        self.patch_embed = Linear(
            cfg.num_channels * p * p,
            d,
            ("patch_in", "vision_embed"),
            bias=not clip,
            rngs=rngs,
            dtype=dtype,
        )
        self.class_embed = param(rngs, (d,), ("vision_embed",), dtype=dtype) if clip else None
        n_pos = cfg.num_patches + (1 if clip else 0)
        self.position_embed = param(rngs, (n_pos, d), ("positions", "vision_embed"), dtype=dtype)
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype) if clip else None
        self.layers = stacked(num_layers, lambda r: VisionLayer(cfg, rngs=r, dtype=dtype), rngs)
        self.remat = remat

    def patchify(self, pixels: jax.Array) -> jax.Array:
        """(N, C, H, W) -> (N, patches, C*p*p), flattened in the (C, p, p) order of the conv kernel.

        Like the stride-p "valid" convolution of CLIP / SigLIP, trailing rows and columns that do
        not fill a whole patch are dropped (SigLIP-so400m: 384 px tiles, 27 patches of 14 px).
        """
        n, c, h, w = pixels.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        x = pixels[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)
        return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)

    def __call__(self, pixels: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = self.patch_embed(self.patchify(pixels.astype(self.patch_embed.kernel.dtype)))
        if self.class_embed is not None:
            cls = jnp.broadcast_to(
                self.class_embed[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1])
            )
            x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embed[...].astype(x.dtype)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        return scan_layers(self.layers, x, key=key, remat=self.remat)
