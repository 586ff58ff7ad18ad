"""The Qwen2-VL / Qwen2.5-VL vision tower on device: packed merge windows -> LLM-width features.

Native dynamic resolution with static shapes: an image is cut (on the host) into ``m x m``
*merge windows* (m = ``spatial_merge_size`` = 2), the patch groups the PatchMerger turns into one
LLM token. A window is one image unit, so a group's pool of U units holds U·m² patches of any
mix of images and sizes, and yields exactly U feature rows. Per unit (leading axes G, U):

- ``pixels`` (m², C, P·P): the window's patches, uint8 (with ``pixel_lut``) or normalised
  floats, one temporal frame: for a still image the Conv3d's ``temporal_patch_size`` frames are
  copies, so the frame is repeated here rather than sent twice;
- ``coords`` (3,) int32: the window's (row, column) on the merged grid and, for Qwen2.5-VL, its
  window-attention window within the image;
- ``first`` / ``valid`` int32: 1 on an image's first unit / on every real unit (0 = padding).

Attention is block-diagonal: each patch sees the patches of its own image (``cu_seqlens`` in
transformers), or in Qwen2.5-VL's windowed layers those of its own window; both become segment
ids. Patch positions feed the 2-D rotary embedding; nothing is permuted (transformers' window
reordering is undone after its merger, and attention within a segment does not depend on order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unime_jax.models.attention import attention
from unime_jax.models.config import ConfigError
from unime_jax.models.layers import (
    LayerNorm,
    Linear,
    RMSNorm,
    activation,
    scan_layers,
    stacked,
    subkey,
)
from unime_jax.models.pixels import normalise
from unime_jax.models.rope import apply_rope
from unime_jax.models.vision import VisionMLP  # Qwen2-VL's fc2(act(fc1(x))), as CLIP's
from unime_jax.sharding import constrain

_EPS = 1e-6  # hard-wired in transformers' vision blocks and merger


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    kind: str  # "qwen2_vl" (LayerNorm, fc1/fc2 MLP) or "qwen2_5_vl" (RMSNorm, SwiGLU, windows)
    hidden_size: int  # the ViT width (Qwen2-VL's embed_dim)
    intermediate_size: int
    num_layers: int
    num_heads: int
    out_size: int  # the merger's output: the LLM width
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    in_channels: int = 3
    window: int = 0  # Qwen2.5-VL: window side in merged units; 0 = every layer attends fully
    full_layers: tuple[int, ...] = ()  # Qwen2.5-VL: the layers that attend over whole images

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_unit(self) -> int:
        return self.merge_size**2

    @property
    def patch_dim(self) -> int:
        """Values per patch in transformers' ``pixel_values`` rows: C·T·P·P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_hf(cls, kind: str, c: dict[str, Any]) -> QwenVisionConfig:
        """From a completed ``vision_config`` (class defaults filled in)."""
        rope = c.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"vision rope type {rope.get('rope_type')!r} is not supported")
        patch = c["patch_size"]
        if isinstance(patch, list | tuple):
            raise ConfigError(f"a non-square vision patch_size {patch} is not supported")
        common = dict(
            kind=kind,
            num_layers=c["depth"],
            num_heads=c["num_heads"],
            patch_size=int(patch),
            temporal_patch_size=int(c["temporal_patch_size"]),
            merge_size=int(c["spatial_merge_size"]),
            hidden_act=c["hidden_act"],
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            in_channels=int(c.get("in_channels", 3)),
        )
        if kind == "qwen2_vl":  # hidden_size is the merger output there
            d = c["embed_dim"]
            cfg = cls(
                hidden_size=d, intermediate_size=int(d * c["mlp_ratio"]), out_size=c["hidden_size"],
                **common,
            )  # fmt: skip
        else:
            merged_px = common["merge_size"] * common["patch_size"]
            if c["window_size"] % merged_px:
                raise ConfigError(
                    f"vision window_size {c['window_size']} is not a multiple of "
                    f"spatial_merge_size x patch_size = {merged_px}"
                )
            cfg = cls(
                hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                out_size=c["out_hidden_size"], window=c["window_size"] // merged_px,
                full_layers=tuple(int(i) for i in c["fullatt_block_indexes"]), **common,
            )  # fmt: skip
        if cfg.head_dim % 4 or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            raise ConfigError(
                f"vision head_dim {cfg.hidden_size}/{cfg.num_heads} must be a multiple of 4 "
                "(2-D rotary embedding)"
            )
        return cfg


def vision_rope(coords: jax.Array, cfg: QwenVisionConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin (G, N, head_dim) of the 2-D rotary embedding: ``head_dim/4`` frequencies applied
    to the patch row, the same to the column, concatenated, then repeated (rotate_half layout).
    ``coords`` (G, U, 3) are merged-grid coordinates; patch j of a unit sits at (m·row + j // m,
    m·col + j % m)."""
    m = cfg.merge_size
    j = jnp.arange(m * m)
    rows = m * coords[..., 0:1] + j // m  # (G, U, m²)
    cols = m * coords[..., 1:2] + j % m
    g = coords.shape[0]
    spatial = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    angles = jnp.concatenate(
        [rows.reshape(g, -1, 1) * inv_freq, cols.reshape(g, -1, 1) * inv_freq], axis=-1
    )
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def segments(images: dict, cfg: QwenVisionConfig) -> jax.Array:
    """(2, G, N) int32 per-patch segment ids (0 = padding): [whole images, attention windows]."""
    valid = images["valid"].astype(jnp.int32)
    per_image = jnp.cumsum(images["first"].astype(jnp.int32), axis=1) * valid  # (G, U)
    per_window = per_image
    if cfg.window:  # window ids are dense within an image, so they stay below the pool size
        u = per_image.shape[1]
        per_window = jnp.where(valid > 0, (per_image - 1) * u + images["coords"][..., 2] + 1, 0)
    both = jnp.stack([per_image, per_window])
    return jnp.repeat(both, cfg.patches_per_unit, axis=2)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, impl="xla"):
        d = cfg.hidden_size
        axes_in, axes_out = ("vision_embed", "vision_heads"), ("vision_heads", "vision_embed")
        self.qkv = Linear(d, 3 * d, axes_in, bias=True, rngs=rngs, dtype=dtype)
        self.proj = Linear(d, d, axes_out, bias=True, rngs=rngs, dtype=dtype)
        self.num_heads, self.impl = cfg.num_heads, impl

    def __call__(self, x, cos, sin, segment_ids, key=None):
        g, n, d = x.shape
        qkv = self.qkv(x, subkey(key, 0)).reshape(g, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # transformers rotates in fp32 and casts back.
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = attention(q, k, v, segment_ids=segment_ids, causal=False, impl=self.impl)
        return self.proj(out.reshape(g, n, d), subkey(key, 1))


class VisionGatedMLP(nnx.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, f = cfg.hidden_size, cfg.intermediate_size
        axes_in, axes_out = ("vision_embed", "vision_mlp"), ("vision_mlp", "vision_embed")
        self.gate_proj = Linear(d, f, axes_in, bias=True, rngs=rngs, dtype=dtype)
        self.up_proj = Linear(d, f, axes_in, bias=True, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(f, d, axes_out, bias=True, rngs=rngs, dtype=dtype)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, key=None):
        hidden = self.act(self.gate_proj(x, subkey(key, 0))) * self.up_proj(x, subkey(key, 1))
        return self.down_proj(hidden, subkey(key, 2))


def _norm(cfg: QwenVisionConfig, dim: int, rngs: nnx.Rngs, dtype) -> nnx.Module:
    klass = LayerNorm if cfg.kind == "qwen2_vl" else RMSNorm
    return klass(dim, _EPS, rngs=rngs, dtype=dtype)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, impl="xla"):
        self.norm1 = _norm(cfg, cfg.hidden_size, rngs, dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, impl=impl)
        self.norm2 = _norm(cfg, cfg.hidden_size, rngs, dtype)
        mlp = VisionMLP if cfg.kind == "qwen2_vl" else VisionGatedMLP
        self.mlp = mlp(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x, full, cos, sin, segment_ids, key=None):
        """``full``: this layer attends over whole images (else within windows)."""
        seg = jnp.where(full, segment_ids[0], segment_ids[1])
        x = x + self.attn(self.norm1(x), cos, sin, seg, subkey(key, 0))
        return x + self.mlp(self.norm2(x), subkey(key, 1))


class PatchMerger(nnx.Module):
    """Norm per patch, the m² patches of a window concatenated, Linear -> GELU -> Linear."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d = cfg.hidden_size * cfg.patches_per_unit
        self.norm = _norm(cfg, cfg.hidden_size, rngs, dtype)
        self.linear_0 = Linear(
            d, d, ("vision_embed", "vision_mlp"), bias=True, rngs=rngs, dtype=dtype
        )
        self.linear_2 = Linear(
            d, cfg.out_size, ("vision_mlp", "embed"), bias=True, rngs=rngs, dtype=dtype
        )
        self.patches_per_unit = cfg.patches_per_unit

    def __call__(self, x, key=None):
        g, n, d = x.shape
        x = self.norm(x).reshape(g, n // self.patches_per_unit, self.patches_per_unit * d)
        return self.linear_2(activation("gelu")(self.linear_0(x, subkey(key, 0))), subkey(key, 1))


class QwenVisionTower(nnx.Module):
    """A group pool of merge windows -> one LLM-width feature row per window, (G, U, out)."""

    def __init__(
        self,
        cfg: QwenVisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        remat: str = "none",
        attention: str = "xla",
    ):
        self.cfg = cfg
        # The Conv3d (stride = kernel) is a matmul over flattened (C, T, P, P) patches.
        self.patch_embed = Linear(
            cfg.patch_dim, cfg.hidden_size, ("patch_in", "vision_embed"), rngs=rngs, dtype=dtype
        )
        self.blocks = stacked(
            cfg.num_layers,
            lambda r: VisionBlock(cfg, rngs=r, dtype=dtype, impl=attention),
            rngs,
        )
        self.merger = PatchMerger(cfg, rngs=rngs, dtype=dtype)
        self.remat = remat

    def __call__(self, images: dict, key: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        pixels = normalise(images["pixels"], images.get("pixel_lut"), channel_axis=2)
        g, u, mm, c, pp = pixels.shape
        frames = jnp.broadcast_to(pixels[..., None, :], (g, u, mm, c, cfg.temporal_patch_size, pp))
        x = frames.reshape(g, u * mm, cfg.patch_dim).astype(self.patch_embed.kernel.dtype)
        x = constrain(self.patch_embed(x), "batch", None, None)
        cos, sin = vision_rope(images["coords"], cfg)
        full = jnp.asarray([i in cfg.full_layers or not cfg.window for i in range(cfg.num_layers)])
        x = scan_layers(  # Qwen2.5-VL mixes windowed and full-attention layers: `full`
            self.blocks, x, cos, sin, segments(images, cfg), per_layer=full, key=key,
            remat=self.remat,
        )  # fmt: skip
        return self.merger(x, subkey(key, cfg.num_layers))
