"""Model definitions (Flax NNX) and the checkpoint loader entry point."""

from unime_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from unime_jax.models.mllm import LlavaModel, last_token_pool
from unime_jax.models.runtime import EmbeddingModel
from unime_jax.weights.loader import load_pretrained

__all__ = [
    "EmbeddingModel",
    "LlavaConfig",
    "LlavaModel",
    "TextConfig",
    "VisionConfig",
    "last_token_pool",
    "load_pretrained",
]
