"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT (2-D RoPE, Conv3d patches, 2x2 PatchMerger;
Qwen2.5-VL with RMSNorm, SwiGLU and window attention) + Qwen2 decoder with M-RoPE.

Config from ``config.json`` in the hub's flat layout or transformers 5.x's nested ``text_config``
(class defaults filled in), the device model (:mod:`unime_jax.models.qwen2_vl`), the strict
weight table (hub / ``save_pretrained`` names ``model.layers.*``, ``visual.*``, ``lm_head`` and
the 5.x module names ``model.language_model.*``, ``model.visual.*``), the host processor
(:mod:`unime_jax.families.qwen2_vl_processor`), LoRA groups and export fillers.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, ClassVar

import numpy as np

from unime_jax import flops
from unime_jax.families.base import DECODER_RULES, Family, ImageShapes, lm_head_filler
from unime_jax.families.llava import complete_config
from unime_jax.families.qwen2_vl_processor import (
    POSITION_MODE_KEY,
    QwenVLProcessor,
    units_per_image,
)
from unime_jax.models.config import ConfigError, TextConfig
from unime_jax.models.qwen2_vl import QwenVLConfig, QwenVLModel
from unime_jax.models.qwen_vision import QwenVisionConfig
from unime_jax.weights.rules import TRANSPOSE, Conv, Rule, WeightMap
from unime_jax.weights.safetensors import LazyTensor

_L = r"(?P<layer>\d+)"
_VIS = r"visual\.blocks\." + _L
_MLP = r"(?P<p>fc1|fc2|gate_proj|up_proj|down_proj)"
DEFAULT_MROPE_SECTION = (16, 24, 24)  # Qwen2VLRotaryEmbedding's default


def _rules(vision: QwenVisionConfig | None) -> tuple[Rule, ...]:
    rules = list(DECODER_RULES)
    if vision is None:
        return tuple(rules)
    v = vision
    conv = Conv((v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
    rules += [
        Rule(r"visual\.patch_embed\.proj\.weight", "vision/patch_embed/kernel", conv),
        Rule(_VIS + r"\.norm(?P<n>[12])\.weight", "vision/blocks/norm{n}/scale"),
        Rule(_VIS + r"\.norm(?P<n>[12])\.bias", "vision/blocks/norm{n}/bias"),
        Rule(_VIS + r"\.attn\.(?P<p>qkv|proj)\.weight", "vision/blocks/attn/{p}/kernel", TRANSPOSE),
        Rule(_VIS + r"\.attn\.(?P<p>qkv|proj)\.bias", "vision/blocks/attn/{p}/bias"),
        Rule(_VIS + r"\.mlp\." + _MLP + r"\.weight", "vision/blocks/mlp/{p}/kernel", TRANSPOSE),
        Rule(_VIS + r"\.mlp\." + _MLP + r"\.bias", "vision/blocks/mlp/{p}/bias"),
        Rule(r"visual\.merger\.ln_q\.weight", "vision/merger/norm/scale"),
        Rule(r"visual\.merger\.ln_q\.bias", "vision/merger/norm/bias"),
        Rule(r"visual\.merger\.mlp\.(?P<n>[02])\.weight", "vision/merger/linear_{n}/kernel", TRANSPOSE),
        Rule(r"visual\.merger\.mlp\.(?P<n>[02])\.bias", "vision/merger/linear_{n}/bias"),
    ]  # fmt: skip
    return tuple(rules)


_SKIPS = ((r"lm_head\.weight", "the LM head is not used by an embedding model"),)
_TEXT_ONLY_SKIP = (r"visual\..*", "text-only model: the vision tower is not built")
# Canonical names: language_model.* and visual.*. The hub's and save_pretrained's model.* is the
# LLM; transformers 5.x's module tree nests both under model.
_ALIASES = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("model.", "language_model."),
)
_SAVE_PREFIXES = (("language_model.", "model."),)
_MODULE_PREFIXES = (
    ("language_model.", "model.language_model."),
    ("visual.", "model.visual."),
)


def vision_flops(v: QwenVisionConfig, units: int, units_per_image: int) -> float:
    """Forward FLOPs of ``units`` merge windows (images of ``units_per_image`` each) through the
    tower: patch embedding, layers (attention over the image, or its window), merger."""
    d, f, n = v.hidden_size, v.intermediate_size, units * v.patches_per_unit
    mlp = (3 if v.kind == "qwen2_5_vl" else 2) * d * f
    image = units_per_image * v.patches_per_unit
    window = min(image, (v.window * v.merge_size) ** 2) if v.window else image
    full = len(v.full_layers) if v.window else v.num_layers
    keys = full * image + (v.num_layers - full) * window
    total = 2 * n * (v.patch_dim * d + v.num_layers * (4 * d * d + mlp)) + 4 * n * d * keys
    return float(total + flops.mlp_flops(units, 4 * d, 4 * d, v.out_size))


class QwenVLFamily(Family):
    model_class = QwenVLModel
    position_axes = (3,)  # M-RoPE: temporal, height, width
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        # The LLM's attention and MLP projections (UniME stage 1 and 2).
        "llm": (r"^llm/layers/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)$",),
        # The vision tower's attention projections (fused qkv, proj), VLM2Vec's default.
        "vision_attention": (r"^vision/blocks/attn/(qkv|proj)$",),
    }

    def __init__(self, name: str, architecture: str):
        self.name = name
        self.model_types = (name,)
        self.architecture = architecture

    def parse_config(self, c: dict[str, Any]) -> QwenVLConfig:
        if c.get("model_type") != self.name:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not {self.name!r}")
        c = complete_config(c)  # the flat hub layout comes back nested
        text = dict(c["text_config"])
        if text.get("use_sliding_window"):
            raise ConfigError(
                "use_sliding_window=true is not supported (no published model uses it)"
            )
        # Qwen2-VL's attention has q/k/v biases and head_dim = hidden_size / heads, whatever
        # head_dim a config lists: the Qwen2 decoder.
        text_cfg = TextConfig.from_hf(text | {"model_type": "qwen2", "head_dim": None})
        if not text_cfg.rope.mrope_section:
            rope = dataclasses.replace(text_cfg.rope, mrope_section=DEFAULT_MROPE_SECTION)
            text_cfg = dataclasses.replace(text_cfg, rope=rope)
        if sum(text_cfg.rope.mrope_section) != text_cfg.head_dim // 2:
            raise ConfigError(
                f"mrope_section {list(text_cfg.rope.mrope_section)} does not sum to head_dim/2 = "
                f"{text_cfg.head_dim // 2}"
            )
        vision = QwenVisionConfig.from_hf(self.name, c["vision_config"])
        if vision.out_size != text_cfg.hidden_size:
            raise ConfigError(
                f"the vision merger outputs {vision.out_size}, the LLM is {text_cfg.hidden_size} wide"
            )
        return QwenVLConfig(
            family=self.name,
            text=text_cfg,
            vision=vision,
            image_token_id=int(c["image_token_id"]),
            vision_start_token_id=int(c["vision_start_token_id"]),
        )

    @functools.lru_cache(maxsize=16)  # noqa: B019 -- families are module-level singletons
    def weight_map(self, cfg: QwenVLConfig) -> WeightMap:
        skips = _SKIPS if cfg.vision is not None else (*_SKIPS, _TEXT_ONLY_SKIP)
        return WeightMap(
            rules=_rules(cfg.vision),
            skips=skips,
            aliases=_ALIASES,
            save_prefixes=_SAVE_PREFIXES,
            module_prefixes=_MODULE_PREFIXES,
        )

    def processor(self, cfg, hf_config, tokenizer, image_processor=None) -> QwenVLProcessor:
        mode = hf_config.get(POSITION_MODE_KEY, "transformers")
        return QwenVLProcessor(cfg, tokenizer, image_processor, position_mode=mode)

    def load_processor(self, directory: str | os.PathLike, cfg, hf_config) -> QwenVLProcessor:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        image_processor = None
        if cfg.vision is not None:
            image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(directory)
        return self.processor(cfg, hf_config, tokenizer, image_processor)

    def image_shapes(self, cfg, hf_config, image_size: int) -> ImageShapes | None:
        """Sizes under the image processor's default min/max pixels (hub Qwen2-VL's)."""
        if cfg.vision is None:
            return None
        from transformers import Qwen2VLImageProcessorPil

        v = cfg.vision
        units = units_per_image(v, dict(Qwen2VLImageProcessorPil.size), image_size)
        return ImageShapes(
            units=units,
            tokens=units,
            unit_arrays={
                "pixels": ((v.patches_per_unit, v.in_channels, v.patch_size**2), np.uint8),
                "coords": ((3,), np.int32),
                "first": ((), np.int32),
                "valid": ((), np.int32),
            },
            constants={"pixel_lut": ((v.in_channels, 256), np.float32)},
            taps=1,
        )

    def forward_flops(self, cfg: QwenVLConfig, rows: int, length: int, units: int) -> float:
        """Images counted as one per row (``units / rows`` windows each)."""
        total = flops.decoder_flops(cfg.text, rows, length)
        if units and cfg.vision is not None:
            total += vision_flops(cfg.vision, units, max(units // max(rows, 1), 1))
        return total

    def export_fillers(self, cfg: QwenVLConfig, tensors, hf_config) -> list[LazyTensor]:
        """The LM head as a copy of the input embeddings (unless tied, as in Qwen2-VL-2B)."""
        return lm_head_filler(tensors, "language_model.embed_tokens.weight", hf_config)


QWEN2_VL = QwenVLFamily("qwen2_vl", "Qwen2VLForConditionalGeneration")
QWEN2_5_VL = QwenVLFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
