"""``Embedder``: raw texts and images in, L2-normalised numpy embeddings out.

It applies the backbone's UniME prompts (or MMEB instructions verbatim), batches with a fixed
batch size and a few length buckets (so the device compiles a handful of shapes), and shows a
progress bar on long inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh
from PIL import Image
from tqdm.auto import tqdm

from unime_jax import sharding
from unime_jax.models.runtime import EmbeddingModel, pad_rows
from unime_jax.processing import Processor
from unime_jax.weights.loader import load_pretrained, resolve_checkpoint

ImageLike = Image.Image | str | os.PathLike


class Embedder:
    def __init__(
        self,
        model: EmbeddingModel,
        processor: Processor,
        *,
        batch_size: int = 8,
        progress: bool = True,
    ):
        dp = sharding.data_parallel_size(model.mesh)
        self.model = model
        self.processor = processor
        self.batch_size = -(-batch_size // dp) * dp  # every batch splits evenly over the mesh
        self.progress = progress

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        mesh: Mesh | None = None,
        dtype: str = "float32",
        max_tiles: int | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ) -> Embedder:
        directory = resolve_checkpoint(path)
        model = load_pretrained(directory, mesh=mesh, dtype=dtype, max_tiles=max_tiles)
        return cls(
            model,
            Processor.from_pretrained(directory, model.config),
            batch_size=batch_size,
            progress=progress,
        )

    @property
    def dim(self) -> int:
        return self.model.config.text.hidden_size

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Sentences with the UniME text prompt ("... Summary above sentence in one word:")."""
        return self._embed(
            [self.processor.text_prompt(t) for t in texts], [None] * len(texts), "texts"
        )

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images with the UniME image prompt ("<image> Summary above image in one word:")."""
        return self._embed([self.processor.image_prompt()] * len(images), list(images), "images")

    def embed_instructions(
        self, texts: Sequence[str], images: Sequence[ImageLike | None] | None = None
    ) -> np.ndarray:
        """MMEB-style inputs: instruction strings used verbatim (no chat template), with the
        ``<|image_1|>`` placeholder swapped for the backbone's image token; images optional per row."""
        images = list(images) if images is not None else [None] * len(texts)
        return self._embed([self.processor.instruction(t) for t in texts], images, "inputs")

    def _embed(self, prompts: list[str], images: list, what: str) -> np.ndarray:
        out = np.zeros((len(prompts), self.dim), np.float32)
        starts = range(0, len(prompts), self.batch_size)
        bar = tqdm(
            starts,
            desc=f"embedding {what}",
            unit="batch",
            disable=not self.progress or len(starts) < 2,
        )
        for start in bar:
            stop = min(start + self.batch_size, len(prompts))
            batch = self.processor(prompts[start:stop], images[start:stop])
            batch = {k: pad_rows(v, self.batch_size) for k, v in batch.items()}
            out[start:stop] = self.model.embed(**batch)[: stop - start]
        return out


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products of L2-normalised embeddings (= cosine similarity)."""
    return a @ b.T
