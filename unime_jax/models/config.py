"""Architecture descriptions, read from HF ``config.json`` dicts.

Each piece (vision tower, LLM, multimodal wrapper) has its own frozen dataclass so that new
backbones (Qwen2-VL, Phi-3.5-V) can add a tower, a layout or an LLM variant without touching
the others. Unsupported options fail here, before any weight is read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unime_jax.models.anyres import AnyResSpec

SUPPORTED_TEXT = ("qwen2", "mistral", "llama")
SUPPORTED_VISION = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
SUPPORTED_FAMILIES = ("llava_next", "llava_onevision")


class ConfigError(ValueError):
    """A config.json that this port cannot represent faithfully."""


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
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> TextConfig:
        kind = c.get("model_type")
        if kind not in SUPPORTED_TEXT:
            raise ConfigError(
                f"text model_type {kind!r} is not supported; use one of {SUPPORTED_TEXT}"
            )
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported (only default RoPE)")
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
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
            rope_theta=float(theta),
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
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

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
            image_size=c["image_size"],
            patch_size=c["patch_size"],
            layer_norm_eps=c.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
            hidden_act=c.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"),
            num_channels=c.get("num_channels", 3),
        )


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA-NeXT / LLaVA-OneVision model: vision tower -> projector -> AnyRes layout -> LLM."""

    family: str
    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int
    feature_layer: int = -1
    select_strategy: str = "full"  # "default" drops the class token
    projector_act: str = "gelu"
    projector_bias: bool = True
    anyres: AnyResSpec | None = None

    @property
    def vision_layers_used(self) -> int:
        """How many vision layers reach the selected features (hidden_states[feature_layer])."""
        n = self.vision.num_layers
        used = n + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer
        if not 0 < used <= n:
            raise ConfigError(
                f"vision_feature_layer {self.feature_layer} is out of range for {n} layers"
            )
        return used

    def text_only(self) -> LlavaConfig:
        """The same model without vision tower and projector (stage 1 trains only the LLM)."""
        return dataclasses.replace(self, vision=None, anyres=None)

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> LlavaConfig:
        family = c.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"model_type {family!r} is not supported; use one of {SUPPORTED_FAMILIES}"
            )
        layer = c.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigError(f"a list of vision_feature_layer values ({layer}) is not supported")
        strategy = c.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported")
        token = c.get("image_token_id", c.get("image_token_index"))
        if token is None:
            raise ConfigError("config.json has neither image_token_id nor image_token_index")
        return cls(
            family=family,
            text=TextConfig.from_hf(c["text_config"]),
            vision=VisionConfig.from_hf(c["vision_config"]),
            image_token_id=int(token),
            feature_layer=layer,
            select_strategy=strategy,
            projector_act=c.get("projector_hidden_act", "gelu"),
            projector_bias=c.get("multimodal_projector_bias", True),
            anyres=AnyResSpec.from_hf_config(c),
        )
