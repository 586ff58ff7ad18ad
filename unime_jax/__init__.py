"""unime_jax: UniME universal multimodal embeddings in JAX / Flax NNX."""

from unime_jax.embedder import Embedder
from unime_jax.inference import EmbeddingModel, load_pretrained

__all__ = ["Embedder", "EmbeddingModel", "load_pretrained"]
