"""Strict name tables: HF checkpoint tensor names -> paths in our NNX state.

Two checkpoint layouts exist for the same LLaVA models: transformers 5.x ``save_pretrained``
(``model.language_model.*``, ``model.vision_tower.encoder.*``) and the older one on the hub
(``language_model.model.*``, ``vision_tower.vision_model.*``). Names are first canonicalised,
then every canonical name must match exactly one rule (used) or one skip (unused, with the
reason logged); anything else is an error.
"""

from __future__ import annotations

import dataclasses
import re

# (old or new layout prefix, canonical prefix); first match wins.
_CANONICAL_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def canonical_name(name: str) -> str:
    for prefix, canonical in _CANONICAL_PREFIXES:
        if name.startswith(prefix):
            return canonical + name[len(prefix) :]
    return name


@dataclasses.dataclass(frozen=True)
class Rule:
    """``pattern`` matches a canonical name; ``target`` is a '/'-path formatted with the match's
    named groups; a ``layer`` group makes it one slice of a stacked parameter.
    ``transform``: None, "T" (HF Linear (out, in) -> kernel (in, out)) or "conv" (patch conv)."""

    pattern: str
    target: str
    transform: str | None = None


_LINEAR = r"(?P<kind>weight|bias)"

LLAVA_RULES = (
    Rule(r"language_model\.embed_tokens\.weight", "llm/embed_tokens"),
    Rule(
        r"language_model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<p>[qkvo])_proj\.weight",
        "llm/layers/attn/{p}_proj/kernel",
        "T",
    ),
    Rule(
        r"language_model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<p>[qkvo])_proj\.bias",
        "llm/layers/attn/{p}_proj/bias",
    ),
    Rule(
        r"language_model\.layers\.(?P<layer>\d+)\.mlp\.(?P<p>gate|up|down)_proj\.weight",
        "llm/layers/mlp/{p}_proj/kernel",
        "T",
    ),
    Rule(
        r"language_model\.layers\.(?P<layer>\d+)\.mlp\.(?P<p>gate|up|down)_proj\.bias",
        "llm/layers/mlp/{p}_proj/bias",
    ),
    Rule(
        r"language_model\.layers\.(?P<layer>\d+)\.input_layernorm\.weight",
        "llm/layers/input_norm/scale",
    ),
    Rule(
        r"language_model\.layers\.(?P<layer>\d+)\.post_attention_layernorm\.weight",
        "llm/layers/post_attn_norm/scale",
    ),
    Rule(r"language_model\.norm\.weight", "llm/norm/scale"),
    Rule(r"vision_tower\.embeddings\.patch_embedding\.weight", "vision/patch_embed/kernel", "conv"),
    Rule(r"vision_tower\.embeddings\.patch_embedding\.bias", "vision/patch_embed/bias"),
    Rule(r"vision_tower\.embeddings\.class_embedding", "vision/class_embed"),
    Rule(r"vision_tower\.embeddings\.position_embedding\.weight", "vision/position_embed"),
    Rule(r"vision_tower\.pre_layrnorm\.weight", "vision/pre_norm/scale"),
    Rule(r"vision_tower\.pre_layrnorm\.bias", "vision/pre_norm/bias"),
    Rule(
        r"vision_tower\.encoder\.layers\.(?P<layer>\d+)\.self_attn\.(?P<p>q|k|v|out)_proj\.weight",
        "vision/layers/attn/{p}_proj/kernel",
        "T",
    ),
    Rule(
        r"vision_tower\.encoder\.layers\.(?P<layer>\d+)\.self_attn\.(?P<p>q|k|v|out)_proj\.bias",
        "vision/layers/attn/{p}_proj/bias",
    ),
    Rule(
        r"vision_tower\.encoder\.layers\.(?P<layer>\d+)\.layer_norm(?P<n>[12])\.weight",
        "vision/layers/layer_norm{n}/scale",
    ),
    Rule(
        r"vision_tower\.encoder\.layers\.(?P<layer>\d+)\.layer_norm(?P<n>[12])\.bias",
        "vision/layers/layer_norm{n}/bias",
    ),
    Rule(
        r"vision_tower\.encoder\.layers\.(?P<layer>\d+)\.mlp\.fc(?P<n>[12])\.weight",
        "vision/layers/mlp/fc{n}/kernel",
        "T",
    ),
    Rule(
        r"vision_tower\.encoder\.layers\.(?P<layer>\d+)\.mlp\.fc(?P<n>[12])\.bias",
        "vision/layers/mlp/fc{n}/bias",
    ),
    Rule(r"multi_modal_projector\.linear_(?P<n>[12])\.weight", "projector/linear_{n}/kernel", "T"),
    Rule(r"multi_modal_projector\.linear_(?P<n>[12])\.bias", "projector/linear_{n}/bias"),
    Rule(r"image_newline", "image_newline"),
)

# Tensors that exist in LLaVA checkpoints but can never influence an embedding.
LLAVA_SKIPS = (
    (r"lm_head\.weight", "the LM head is not used by an embedding model"),
    (r"vision_tower\.post_layernorm\..*", "LLaVA reads vision features before the post-layernorm"),
    (r"vision_tower\.head\..*", "LLaVA does not use SigLIP's pooling head"),
    (r"vision_tower\.embeddings\.position_ids", "a constant buffer, rebuilt in code"),
)

VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "image_newline")


@dataclasses.dataclass(frozen=True)
class Match:
    target: tuple[str, ...]
    layer: int | None
    transform: str | None


def match(name: str, rules=LLAVA_RULES) -> Match | None:
    for rule in rules:
        m = re.fullmatch(rule.pattern, name)
        if m:
            groups = m.groupdict()
            layer = groups.pop("layer", None)
            target = tuple(rule.target.format(**groups).split("/"))
            return Match(target, None if layer is None else int(layer), rule.transform)
    return None


def source_name(target: tuple[str, ...], layer: int | None, rules=LLAVA_RULES) -> str | None:
    """The canonical checkpoint name that ``match`` maps to ``target`` (and ``layer``), for
    error messages; None when no rule produces ``target``."""
    path = "/".join(target)
    for rule in rules:
        template = re.escape(rule.target).replace(r"\{", "{").replace(r"\}", "}")
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
        m = re.fullmatch(regex, path)
        if m is None or (("(?P<layer>" in rule.pattern) != (layer is not None)):
            continue
        groups = {**m.groupdict(), "layer": str(layer)}
        name = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda g, v=groups: v[g.group(1)], rule.pattern)
        name = name.replace("\\", "")
        back = match(name, rules)
        if back is not None and back.target == tuple(target):
            return name
    return None


def skip_reason(name: str, skips=LLAVA_SKIPS) -> str | None:
    for pattern, reason in skips:
        if re.fullmatch(pattern, name):
            return reason
    return None
