"""Architecture descriptions shared by the families: the decoder LLM and the ViT tower.

Each is a frozen dataclass read from an HF ``config.json`` sub-dict; families compose them (see
:mod:`unime_jax.families`). Options this port cannot represent faithfully fail here, before any
weight is read, with the key that is wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unime_jax.errors import DataError

SUPPORTED_TEXT = ("qwen2", "mistral", "llama")
SUPPORTED_VISION = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


class ConfigError(DataError):
    """A config.json that this port cannot represent faithfully."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embeddings: plain 1-D RoPE (``kind="default"``); families add variants (M-RoPE)."""

    theta: float = 10000.0
    kind: str = "default"
    mrope_section: tuple[int, ...] = ()  # M-RoPE: frequency slots of (t, h, w)

    @classmethod
    def from_hf(cls, c: dict[str, Any], allowed: tuple[str, ...] = ("default",)) -> RopeSpec:
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in allowed:
            raise ConfigError(f"rope type {kind!r} is not supported here (supported: {allowed})")
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        section = tuple(int(s) for s in rope.get("mrope_section", ()))
        return cls(theta=theta, kind=kind, mrope_section=section)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    kind: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, c: dict[str, Any], rope_types: tuple[str, ...] = ("default",)) -> TextConfig:
        kind = c.get("model_type")
        if kind not in SUPPORTED_TEXT:
            raise ConfigError(
                f"text model_type {kind!r} is not supported; use one of {SUPPORTED_TEXT}"
            )
        heads = c["num_attention_heads"]
        window = c.get("sliding_window")
        if kind == "qwen2" and not c.get("use_sliding_window", False):
            window = None
        attention_bias = bool(c.get("attention_bias", False))
        return cls(
            kind=kind,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rope=RopeSpec.from_hf(c, rope_types),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=kind == "llama" and attention_bias,
            mlp_bias=bool(c.get("mlp_bias", False)),
            sliding_window=window,
            hidden_act=c.get("hidden_act", "silu"),
        )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    kind: str  # "clip" (class token, pre-norm) or "siglip" (no class token)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    num_channels: int = 3

    @property
    def patches_per_side(self) -> int:
        """The stride-p valid convolution floors: 384 // 14 = 27."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> VisionConfig:
        kind = SUPPORTED_VISION.get(c.get("model_type"))
        if kind is None:
            raise ConfigError(
                f"vision model_type {c.get('model_type')!r} is not supported; "
                f"use one of {sorted(SUPPORTED_VISION)}"
            )
        return cls(
            kind=kind,
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            image_size=_square(c["image_size"], "image_size"),
            patch_size=_square(c["patch_size"], "patch_size"),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
            hidden_act=c.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"),
            num_channels=c.get("num_channels", 3),
        )


def _square(value: Any, key: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ConfigError(f"non-square vision {key} {value} is not supported")
        value = value[0]
    return int(value)


PARAM_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def param_dtype(name: str):
    """The jnp dtype for a config/CLI dtype name (float32, fp32, bfloat16, bf16)."""
    import jax.numpy as jnp

    if name not in PARAM_DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {sorted(PARAM_DTYPES)}")
    return jnp.dtype(PARAM_DTYPES[name])
