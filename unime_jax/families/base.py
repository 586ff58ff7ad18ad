"""What a backbone family plugs in (see :mod:`unime_jax.families` for the registry)."""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from unime_jax.preprocess.processor import Processor
from unime_jax.weights.rules import WeightMap
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
    regexes over the model built by :meth:`build`.
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    lora_targets: Mapping[str, tuple[str, ...]]

    @abc.abstractmethod
    def parse_config(self, hf: dict[str, Any]) -> Any:
        """The model config from an HF ``config.json`` dict (class defaults filled in); raises
        :class:`~unime_jax.models.config.ConfigError` for what the port cannot represent."""

    @abc.abstractmethod
    def text_only(self, cfg: Any) -> Any:
        """The same config without vision tower and projector (stage 1 builds the LLM only)."""

    @abc.abstractmethod
    def build(
        self, cfg: Any, *, rngs: nnx.Rngs, dtype=jnp.float32, remat="none", attention="xla"
    ) -> nnx.Module:
        """The NNX model: ``model(inputs: ModelInputs, dropout_key=None) -> (B, T, D)``."""

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
