"""LLaVA-OneVision (SigLIP + Qwen2) and LLaVA-1.6 / LLaVA-NeXT (CLIP + Mistral or Llama).

Config from ``config.json`` (class defaults filled in), the device model
(:mod:`unime_jax.models.llava`), the strict weight table for both tensor-name layouts
(transformers 5.x ``model.language_model.*`` / ``model.vision_tower.*`` and the hub's
``language_model.model.*`` / ``vision_tower.vision_model.*``), the host processor
(:mod:`unime_jax.families.llava_processor`: UniME prompts,
AnyRes tiles and gather maps from :mod:`unime_jax.preprocess.anyres`), LoRA groups and export
fillers.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import numpy as np

from unime_jax import flops
from unime_jax.families.base import (
    DECODER_RULES,
    Family,
    ImageShapes,
    identity_vision_fillers,
    lm_head_filler,
    vision_encoder_rules,
)
from unime_jax.families.llava_processor import LlavaProcessor
from unime_jax.models.config import ConfigError, TextConfig, VisionConfig
from unime_jax.models.llava import LlavaConfig, LlavaModel
from unime_jax.preprocess import anyres
from unime_jax.weights.rules import TRANSPOSE, Conv, Rule, WeightMap
from unime_jax.weights.safetensors import LazyTensor

_L = r"(?P<layer>\d+)"
_VIS = r"vision_tower\.encoder\.layers\." + _L


def _rules(vision: VisionConfig | None) -> tuple[Rule, ...]:
    rules = list(DECODER_RULES)
    if vision is None:
        return tuple(rules)
    conv = Conv((vision.num_channels, vision.patch_size, vision.patch_size))
    rules += [
        Rule(r"vision_tower\.embeddings\.patch_embedding\.weight", "vision/patch_embed/kernel", conv),
        Rule(r"vision_tower\.embeddings\.patch_embedding\.bias", "vision/patch_embed/bias"),
        Rule(r"vision_tower\.embeddings\.class_embedding", "vision/class_embed"),
        Rule(r"vision_tower\.embeddings\.position_embedding\.weight", "vision/position_embed"),
        Rule(r"vision_tower\.pre_layrnorm\.weight", "vision/pre_norm/scale"),
        Rule(r"vision_tower\.pre_layrnorm\.bias", "vision/pre_norm/bias"),
        *vision_encoder_rules(_VIS),
        Rule(r"multi_modal_projector\.linear_(?P<n>[12])\.weight", "projector/linear_{n}/kernel", TRANSPOSE),
        Rule(r"multi_modal_projector\.linear_(?P<n>[12])\.bias", "projector/linear_{n}/bias"),
        Rule(r"image_newline", "image_newline"),
    ]  # fmt: skip
    return tuple(rules)


_SKIPS = (
    (r"lm_head\.weight", "the LM head is not used by an embedding model"),
    (r"vision_tower\.post_layernorm\..*", "LLaVA reads vision features before the post-layernorm"),
    (r"vision_tower\.head\..*", "LLaVA does not use SigLIP's pooling head"),
    (r"vision_tower\.embeddings\.position_ids", "a constant buffer, rebuilt in code"),
)
_TEXT_ONLY_SKIP = (
    r"(vision_tower\.|multi_modal_projector\.|image_newline).*",
    "text-only model: vision tower and projector are not built",
)
_ALIASES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
# What transformers 5.23's save_pretrained writes for these classes.
_SAVE_PREFIXES = (
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
_MODULE_PREFIXES = (
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)


def complete_config(c: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` with the transformers config classes' defaults filled in: hub files omit
    what equals a default (llava-v1.6-mistral-7b-hf lists no hidden_size or layer count)."""
    import transformers

    try:
        return transformers.CONFIG_MAPPING[c["model_type"]].from_dict(c).to_dict()
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"transformers cannot read this {c['model_type']} config: {e}") from e


class LlavaFamily(Family):
    model_class = LlavaModel
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        # The LLM's attention and MLP projections (UniME stage 1 and 2).
        "llm": (r"^llm/layers/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)$",),
        # The vision tower's attention projections (UniME stage 2, VLM2Vec's default).
        "vision_attention": (r"^vision/layers/attn/(q|k|v|out)_proj$",),
    }

    def __init__(self, name: str, architecture: str, image_processor_class: str):
        self.name = name
        self.model_types = (name,)
        self.architecture = architecture
        self._image_processor_class = image_processor_class

    def parse_config(self, c: dict[str, Any]) -> LlavaConfig:
        if c.get("model_type") != self.name:
            raise ConfigError(f"model_type {c.get('model_type')!r} is not {self.name!r}")
        for key in ("text_config", "vision_config"):
            if not isinstance(c.get(key), dict):
                raise KeyError(key)
        c = complete_config(c)
        layer = c.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigError(f"a list of vision_feature_layer values ({layer}) is not supported")
        strategy = c.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {strategy!r} is not supported")
        token = c.get("image_token_id", c.get("image_token_index"))
        if token is None:
            raise ConfigError("config.json has neither image_token_id nor image_token_index")
        cfg = LlavaConfig(
            family=self.name,
            text=TextConfig.from_hf(c["text_config"]),
            vision=VisionConfig.from_hf(c["vision_config"]),
            image_token_id=int(token),
            feature_layer=layer,
            select_strategy=strategy,
            projector_act=c.get("projector_hidden_act", "gelu"),
            projector_bias=c.get("multimodal_projector_bias", True),
        )
        cfg.vision_layers_used  # noqa: B018 -- validates vision_feature_layer now
        self.anyres_spec(c)  # validates the pinpoints now
        return cfg

    def anyres_spec(self, c: dict[str, Any]) -> anyres.AnyResSpec:
        try:
            return anyres.AnyResSpec.from_hf_config(c)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @functools.lru_cache(maxsize=16)  # noqa: B019 -- families are module-level singletons
    def weight_map(self, cfg: LlavaConfig) -> WeightMap:
        skips, truncated = _SKIPS, ()
        if cfg.vision is None:
            skips = (*_SKIPS, _TEXT_ONLY_SKIP)
        else:
            reason = "vision layers after vision_feature_layer never reach the features"
            truncated = (("vision", cfg.vision_layers_used, cfg.vision.num_layers, reason),)
        return WeightMap(
            rules=_rules(cfg.vision),
            skips=skips,
            aliases=_ALIASES,
            save_prefixes=_SAVE_PREFIXES,
            module_prefixes=_MODULE_PREFIXES,
            truncated=truncated,
        )

    def processor(self, cfg, hf_config, tokenizer, image_processor=None) -> LlavaProcessor:
        spec = self.anyres_spec(hf_config) if cfg.vision is not None else None
        return LlavaProcessor(self.name, cfg, spec, tokenizer, image_processor)

    def load_processor(self, directory: str | os.PathLike, cfg, hf_config) -> LlavaProcessor:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        image_processor = None
        if cfg.vision is not None:
            klass = getattr(transformers, self._image_processor_class)
            image_processor = klass.from_pretrained(directory)
        return self.processor(cfg, hf_config, tokenizer, image_processor)

    def image_shapes(self, cfg, hf_config, image_size: int) -> ImageShapes | None:
        if cfg.vision is None:
            return None
        spec = self.anyres_spec(hf_config)
        if image_size > 0:
            size = (image_size, image_size)
            units, tokens = anyres.num_tiles(size, spec), anyres.num_image_tokens(size, spec)
        else:  # the worst case over the pinpoint grids (an image the size of the largest one)
            units = spec.max_tiles
            tokens = max(anyres.num_image_tokens(p, spec) for p in spec.grid_pinpoints)
        v = cfg.vision
        return ImageShapes(
            units=units,
            tokens=tokens,
            unit_arrays={"pixels": ((v.num_channels, v.image_size, v.image_size), np.uint8)},
            constants={"pixel_lut": ((v.num_channels, 256), np.float32)},
            taps=spec.taps,
        )

    def forward_flops(self, cfg: LlavaConfig, rows: int, length: int, units: int) -> float:
        total = flops.decoder_flops(cfg.text, rows, length)
        if units and cfg.vision is not None:
            clip = cfg.vision.kind == "clip"
            total += flops.vit_flops(cfg.vision, cfg.vision_layers_used, units, class_token=clip)
            d_v, d = cfg.vision.hidden_size, cfg.text.hidden_size
            total += flops.mlp_flops(units * cfg.features_per_tile, d_v, d, d)
        return total

    def export_fillers(self, cfg: LlavaConfig, tensors, hf_config) -> list[LazyTensor]:
        """The LM head is a copy of the input embeddings (unless tied); the vision post-layernorm
        and the vision layers after the feature layer are identities (unit norms, zero weights)."""
        out = lm_head_filler(tensors, "language_model.embed_tokens.weight", hf_config)
        if cfg.vision is not None:
            used, total = cfg.vision_layers_used, cfg.vision.num_layers
            out += identity_vision_fillers(tensors, "vision_tower.", used, total)
        return out


ONEVISION = LlavaFamily(
    "llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionImageProcessorPil"
)
NEXT = LlavaFamily("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextImageProcessorPil")
