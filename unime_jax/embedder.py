"""``Embedder``: raw texts and images in, L2-normalised numpy embeddings out.

It applies the backbone's UniME prompts (or MMEB instructions verbatim), batches with a fixed
batch size, a few length buckets and power-of-two image pools (so the device compiles a handful
of shapes), and shows a progress bar on long inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from unime_jax.inference import EmbeddingModel, load_pretrained
from unime_jax.preprocess.example import Example
from unime_jax.preprocess.images import ImageLike
from unime_jax.preprocess.processor import RowImages


class Embedder:
    def __init__(self, model: EmbeddingModel, *, batch_size: int = 8, progress: bool = True):
        dp = model.data_parallel
        self.model = model
        self.processor = model.processor
        self.batch_size = -(-batch_size // dp) * dp  # every batch splits evenly over the mesh
        self.progress = progress

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        mesh: Mesh | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
        progress: bool = True,
    ) -> Embedder:
        model = load_pretrained(path, mesh=mesh, dtype=dtype)
        return cls(model, batch_size=batch_size, progress=progress)

    @property
    def dim(self) -> int:
        return self.model.config.text.hidden_size

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Sentences with the UniME text prompt ("... Summary above sentence in one word:")."""
        p = self.processor
        return self._embed([p.text_prompt(t) for t in texts], [None] * len(texts), "texts")

    def embed_images(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images with the UniME image prompt ("<image> Summary above image in one word:")."""
        return self._embed([self.processor.image_prompt()] * len(images), list(images), "images")

    def embed_instructions(
        self, texts: Sequence[str], images: Sequence[RowImages] | None = None
    ) -> np.ndarray:
        """MMEB-style inputs: instruction strings used verbatim (no chat template), with the
        ``<|image_1|>`` placeholder swapped for the backbone's image token; per row no image,
        one image or several."""
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
            examples = self.processor.encode_batch(prompts[start:stop], images[start:stop])
            empty = Example(np.zeros(0, np.int32), examples[0].positions[:0])
            examples += [empty] * (self.batch_size - len(examples))  # one shape per bucket
            out[start:stop] = self.model.run(self.model.batch(examples), pool=True)[: stop - start]
        return out


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products of L2-normalised embeddings (= cosine similarity)."""
    return a @ b.T
