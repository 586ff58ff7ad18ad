"""What a backbone family plugs in (see :mod:`unime_jax.families` for the registry)."""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unime_jax.preprocess.processor import Processor
from unime_jax.weights.rules import TRANSPOSE, Rule, WeightMap
from unime_jax.weights.safetensors import LazyTensor


@dataclasses.dataclass(frozen=True)
class ImageShapes:
    """What one image costs on device, for budgets and ahead-of-time compilation: ``units`` per
    image, image ``tokens`` in the sequence, the per-unit arrays and per-group constants of
    ``ModelInputs.images`` ((shape, dtype) without the leading axes), and gather ``taps``."""

    units: int
    tokens: int
    unit_arrays: Mapping[str, tuple[tuple[int, ...], Any]]
    constants: Mapping[str, tuple[tuple[int, ...], Any]]
    taps: int


class Family(abc.ABC):
    """One family of HF checkpoints: its config, model, weight names, processor and adapters.

    ``name``: our name; ``model_types``: the ``config.json`` ``model_type`` values it loads;
    ``architecture``: the transformers class an export names in ``config.json``;
    ``lora_targets``: LoRA target groups (e.g. ``llm``, ``vision_attention``) → module-path
    regexes over the model built by :meth:`build`; ``model_class``: the NNX model, built from the
    parsed config (whose ``text_only()`` drops the vision side); ``position_axes``: the trailing
    shape of a row's positions beyond (T,) — () for 1-D RoPE, (3,) for M-RoPE.
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    lora_targets: Mapping[str, tuple[str, ...]]
    model_class: type[nnx.Module]
    position_axes: tuple[int, ...] = ()

    @abc.abstractmethod
    def parse_config(self, hf: dict[str, Any]) -> Any:
        """The model config from an HF ``config.json`` dict (class defaults filled in); raises
        :class:`~unime_jax.models.config.ConfigError` for what the port cannot represent."""

    def text_only(self, cfg: Any) -> Any:
        """The same config without vision tower and projector (stage 1 builds the LLM only)."""
        return cfg.text_only()

    def build(
        self, cfg: Any, *, rngs: nnx.Rngs, dtype=jnp.float32, remat="none", attention="xla"
    ) -> nnx.Module:
        """The NNX model: ``model(inputs: ModelInputs, dropout_key=None) -> (B, T, D)``."""
        return self.model_class(cfg, rngs=rngs, dtype=dtype, remat=remat, attention=attention)

    @abc.abstractmethod
    def weight_map(self, cfg: Any) -> WeightMap:
        """Checkpoint names <-> parameter paths of :meth:`build`'s model, for this config."""

    @abc.abstractmethod
    def processor(self, cfg: Any, hf_config: dict, tokenizer, image_processor=None) -> Processor:
        """The host processor; ``image_processor`` is None for a text-only model."""

    @abc.abstractmethod
    def load_processor(self, directory: str | os.PathLike, cfg: Any, hf_config: dict) -> Processor:
        """The processor from a checkpoint directory's tokenizer and preprocessor files."""

    @abc.abstractmethod
    def image_shapes(self, cfg: Any, hf_config: dict, image_size: int) -> ImageShapes | None:
        """One image resized to ``image_size`` square (0: the largest any size needs); None for
        a text-only config."""

    @abc.abstractmethod
    def forward_flops(self, cfg: Any, rows: int, length: int, units: int) -> float:
        """Analytic forward FLOPs of ``rows`` sequences of ``length`` tokens with ``units``
        image units in all (see :mod:`unime_jax.flops`)."""

    def export_fillers(
        self, cfg: Any, tensors: Mapping[str, LazyTensor], hf_config: dict
    ) -> list[LazyTensor]:
        """Without a base checkpoint: tensors transformers expects that never influence an
        embedding (e.g. the LM head), under canonical names; ``tensors`` are the model's own,
        keyed by canonical name."""
        return []


def lm_head_filler(
    tensors: Mapping[str, LazyTensor], embed_name: str, hf_config: Mapping[str, Any]
) -> list[LazyTensor]:
    """Without a base checkpoint: the LM head (never used by an embedding model) as a copy of
    the input embeddings, unless the config ties them (top level, else its ``text_config``)."""
    text = hf_config.get("text_config") or {}
    if hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)):
        return []
    embed = tensors[embed_name]
    return [LazyTensor("lm_head.weight", embed.shape, embed.dtype, embed.load)]


def identity_vision_fillers(
    tensors: Mapping[str, LazyTensor], prefix: str, used: int, total: int
) -> list[LazyTensor]:
    """Without a base checkpoint: a ViT's post-layernorm and its layers ``used..total-1`` (after
    the feature layer: they never reach the features) as identities — unit norm weights, every
    other tensor zero — shaped like layer 0's, under ``prefix`` (e.g. ``vision_tower.``)."""

    def constant(name: str, like: LazyTensor, fill: float) -> LazyTensor:
        load = functools.partial(np.full, like.shape, fill, like.dtype)
        return LazyTensor(name, like.shape, like.dtype, load)

    norm = tensors[prefix + "encoder.layers.0.layer_norm1.weight"]
    out = [
        constant(prefix + "post_layernorm.weight", norm, 1.0),
        constant(prefix + "post_layernorm.bias", norm, 0.0),
    ]
    first = [(n, t) for n, t in tensors.items() if n.startswith(prefix + "encoder.layers.0.")]
    for layer in range(used, total):
        for name, t in first:
            name = name.replace(".layers.0.", f".layers.{layer}.", 1)
            out.append(constant(name, t, float("layer_norm" in name and name.endswith("weight"))))
    return out


_LAYER = r"language_model\.layers\.(?P<layer>\d+)"
# A Llama-style decoder (Qwen2, Mistral, Llama) under canonical ``language_model.*`` names:
# separate q/k/v/o and gate/up/down projections (biases where the checkpoint has them), RMSNorms.
DECODER_RULES: tuple[Rule, ...] = (
    Rule(r"language_model\.embed_tokens\.weight", "llm/embed_tokens"),
    Rule(_LAYER + r"\.self_attn\.(?P<p>[qkvo])_proj\.weight", "llm/layers/attn/{p}_proj/kernel", TRANSPOSE),
    Rule(_LAYER + r"\.self_attn\.(?P<p>[qkvo])_proj\.bias", "llm/layers/attn/{p}_proj/bias"),
    Rule(_LAYER + r"\.mlp\.(?P<p>gate|up|down)_proj\.weight", "llm/layers/mlp/{p}_proj/kernel", TRANSPOSE),
    Rule(_LAYER + r"\.mlp\.(?P<p>gate|up|down)_proj\.bias", "llm/layers/mlp/{p}_proj/bias"),
    Rule(_LAYER + r"\.input_layernorm\.weight", "llm/layers/input_norm/scale"),
    Rule(_LAYER + r"\.post_attention_layernorm\.weight", "llm/layers/post_attn_norm/scale"),
    Rule(r"language_model\.norm\.weight", "llm/norm/scale"),
)  # fmt: skip


def vision_encoder_rules(layers: str) -> tuple[Rule, ...]:
    """A CLIP / SigLIP encoder's per-layer tensors under ``layers`` (a pattern ending in the
    ``(?P<layer>...)`` group): q/k/v/out projections, two LayerNorms, fc1/fc2."""
    return (
        Rule(layers + r"\.self_attn\.(?P<p>q|k|v|out)_proj\.weight", "vision/layers/attn/{p}_proj/kernel", TRANSPOSE),
        Rule(layers + r"\.self_attn\.(?P<p>q|k|v|out)_proj\.bias", "vision/layers/attn/{p}_proj/bias"),
        Rule(layers + r"\.layer_norm(?P<n>[12])\.weight", "vision/layers/layer_norm{n}/scale"),
        Rule(layers + r"\.layer_norm(?P<n>[12])\.bias", "vision/layers/layer_norm{n}/bias"),
        Rule(layers + r"\.mlp\.fc(?P<n>[12])\.weight", "vision/layers/mlp/fc{n}/kernel", TRANSPOSE),
        Rule(layers + r"\.mlp\.fc(?P<n>[12])\.bias", "vision/layers/mlp/fc{n}/bias"),
    )  # fmt: skip
