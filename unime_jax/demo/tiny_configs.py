"""Tiny HF config dicts (LLaVA-OneVision / LLaVA-NeXT, their vision and text sub-configs, and
image processor settings) for the demo model and the parity tests.

Plain dicts that the transformers config classes (``LlavaOnevisionConfig`` / ``LlavaNextConfig``
and their ``vision_config`` / ``text_config``) accept verbatim, with the key names of the real hub
checkpoints, so the loader is tested on exactly what it reads in production.
"""

from __future__ import annotations

import copy
from typing import Any

# ---------------------------------------------------------------------------------------------
# Config dicts. Each carries "model_type": a sub-config dict without one is built with the
# parent's default type *without* the parent's default init kwargs (e.g. vision_use_head=False
# for llava-onevision's SigLIP), so everything that matters is spelled out here.

_VISION_COMMON: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_channels=3, image_size=32,
    patch_size=8
)  # fmt: skip
_VISION: dict[str, dict[str, Any]] = {
    # llava-onevision drops SigLIP's attention-pool head (vision_use_head=False).
    "siglip": dict(
        _VISION_COMMON, model_type="siglip_vision_model", num_hidden_layers=2,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False
    ),
    # 3 layers so that vision_feature_layer=-2 is neither the embeddings nor the last layer.
    "clip": dict(
        _VISION_COMMON, model_type="clip_vision_model", num_hidden_layers=3, projection_dim=32,
        hidden_act="quick_gelu", layer_norm_eps=1e-5
    ),
}  # fmt: skip

_TEXT_COMMON: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, hidden_act="silu",
    num_attention_heads=4, num_key_value_heads=2,  # GQA: 2 query heads share each kv head
    max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False
)  # fmt: skip

_TEXT: dict[str, dict[str, Any]] = {
    # q/k/v biases are hard-wired on in Qwen2Attention; no config key exists for them.
    "qwen2": dict(
        model_type="qwen2", use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}
    ),
    # llava-v1.6-mistral uses Mistral-7B-Instruct-v0.2: no sliding window, rope_theta 1e6.
    "mistral": dict(
        model_type="mistral", sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}
    ),
    "llama": dict(
        model_type="llama", attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}
    ),
}  # fmt: skip

_FAMILIES: dict[str, dict[str, Any]] = {
    "llava_onevision": dict(
        vision="siglip",
        text="qwen2",
        top=dict(
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]],
            vision_aspect_ratio="anyres_max_9",
        ),
    ),
    "llava_next": dict(
        vision="clip",
        text="mistral",
        top=dict(
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",  # drop CLIP's CLS token
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
        ),
    ),
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge so callers can override a single nested key (e.g. text_config)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_vision_config(kind: str, **overrides: Any) -> dict[str, Any]:
    """Tiny ``SiglipVisionConfig`` ("siglip") or ``CLIPVisionConfig`` ("clip") kwargs."""
    return _merge(_VISION[kind], overrides)


def _fold_rope_theta(text_cfg: dict[str, Any]) -> dict[str, Any]:
    """Move a legacy top-level ``rope_theta`` into ``rope_parameters``.

    transformers 5 only uses a bare ``rope_theta`` when ``rope_parameters`` lacks one, so without
    this an override like ``text_config={"rope_theta": 5000.0}`` would be silently ignored.
    """
    if "rope_theta" in text_cfg:
        theta = float(text_cfg.pop("rope_theta"))
        text_cfg["rope_parameters"] = {**text_cfg.get("rope_parameters", {}), "rope_theta": theta}
    return text_cfg


def tiny_text_config(kind: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """Tiny "qwen2" / "mistral" / "llama" decoder config kwargs with ``vocab_size``."""
    cfg = _merge({**_TEXT_COMMON, **_TEXT[kind], "vocab_size": vocab_size}, overrides)
    return _fold_rope_theta(cfg)


def tiny_llava_config(
    family: str,
    vocab_size: int,
    image_token_id: int,
    *,
    vision: str | dict[str, Any] | None = None,
    text: str | dict[str, Any] | None = None,
    video_token_id: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """``LlavaOnevisionConfig`` ("llava_onevision") or ``LlavaNextConfig`` ("llava_next") kwargs.

    ``vision`` / ``text`` pick the sub-config kind by name or give a full sub-config dict; the
    defaults are SigLIP + Qwen2 and CLIP + Mistral. ``overrides`` are merged recursively, so
    ``text_config={"num_hidden_layers": 3}`` changes only that key.
    """
    spec = _FAMILIES[family]
    vision_cfg = (
        vision if isinstance(vision, dict) else tiny_vision_config(vision or spec["vision"])
    )
    text_cfg = (
        text if isinstance(text, dict) else tiny_text_config(text or spec["text"], vocab_size)
    )
    cfg: dict[str, Any] = dict(
        model_type=family,
        vision_config=vision_cfg,
        text_config=text_cfg,
        # The config field is image_token_index; image_token_id is only an attribute_map alias.
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        # The top-level flag decides whether lm_head is tied; LlavaOnevisionConfig also copies a
        # True from text_config, so keep both in agreement.
        tie_word_embeddings=text_cfg.get("tie_word_embeddings", False),
        **spec["top"],
    )
    if family == "llava_onevision":
        # -1 never matches a real id; pass the tokenizer's <video> id when it has one.
        cfg["video_token_index"] = -1 if video_token_id is None else video_token_id
    else:
        grid = vision_cfg["image_size"] // vision_cfg["patch_size"]
        cfg["image_seq_length"] = grid * grid  # base-tile tokens (CLS dropped by "default")
    if "tie_word_embeddings" in overrides:
        cfg["text_config"]["tie_word_embeddings"] = overrides["tie_word_embeddings"]
    cfg = _merge(cfg, overrides)
    _fold_rope_theta(cfg["text_config"])
    return cfg


_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def image_processor_config(
    family: str,
    vision_config: dict[str, Any],
    *,
    image_grid_pinpoints: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Kwargs for ``LlavaOnevisionImageProcessorPil`` / ``LlavaNextImageProcessorPil``.

    The tile size is the vision tower's ``image_size``; the pinpoints must equal the model
    config's ``image_grid_pinpoints`` (family default unless given).
    """
    size = int(vision_config["image_size"])
    pinpoints = image_grid_pinpoints or copy.deepcopy(
        _FAMILIES[family]["top"]["image_grid_pinpoints"]
    )
    common: dict[str, Any] = dict(
        image_grid_pinpoints=pinpoints,
        do_resize=True,
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
        do_pad=True,  # pad the num-tiles axis so a batch stacks into one 5-D array
    )
    if family == "llava_onevision":
        # SigLIP: squash each tile to size x size, no crop, mean/std 0.5 (hub preprocessor_config).
        return dict(
            common,
            size={"height": size, "width": size},
            do_center_crop=False,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    if family == "llava_next":
        # CLIP: shortest-edge resize + centre crop of every tile; the crop height is the tile size.
        return dict(
            common,
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
            image_mean=list(_CLIP_MEAN),
            image_std=list(_CLIP_STD),
        )
    raise ValueError(f"unknown family {family!r}")
