"""The host-facing model: takes what an HF processor returns (numpy) and runs the jitted forward.

Host work (per-image tile counts, AnyRes gather indices, padding the batch to the data-parallel
size) happens here in numpy; the device gets fixed-shape arrays, so each input shape compiles
exactly once.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from unime_jax import sharding
from unime_jax.models import anyres
from unime_jax.models.config import LlavaConfig
from unime_jax.models.mllm import LlavaModel, last_token_pool

TEXT_KEYS = ("input_ids", "attention_mask")
IMAGE_KEYS = ("pixel_values", "image_index", "image_weight")


def image_inputs(
    input_ids: np.ndarray,
    pixel_values: np.ndarray,
    image_sizes: np.ndarray,
    cfg: LlavaConfig,
    max_tiles: int,
) -> dict[str, np.ndarray]:
    """Pads tiles to ``max_tiles`` and computes the per-token gather map of each example.

    ``pixel_values``: (B, n, C, H, W) as the processor returns it (n = most tiles in the batch);
    examples without image tokens are allowed and get zero tiles.
    """
    spec = cfg.anyres
    b = input_ids.shape[0]
    taps = spec.taps
    tiles = np.zeros((b, max_tiles, *pixel_values.shape[2:]), np.float32)
    index = np.zeros((*input_ids.shape, taps), np.int32)
    weight = np.zeros((*input_ids.shape, taps), np.float32)
    for i in range(b):
        positions = np.flatnonzero(input_ids[i] == cfg.image_token_id)
        if positions.size == 0:
            continue
        size = tuple(int(s) for s in image_sizes[i])
        n = anyres.num_tiles(size, spec)
        if n > max_tiles:
            raise ValueError(
                f"example {i}: an image of size {size} needs {n} tiles, more than max_tiles={max_tiles}; "
                "load the model with a larger max_tiles"
            )
        if n > pixel_values.shape[1]:
            raise ValueError(
                f"example {i}: image of size {size} needs {n} tiles, pixel_values has {pixel_values.shape[1]}"
            )
        idx, w = anyres.image_layout(size, spec)
        if len(idx) != positions.size:
            raise ValueError(
                f"example {i}: {positions.size} image tokens in input_ids, but an image of size {size} "
                f"yields {len(idx)} features; expand the image token with unime_jax.processing "
                "(or the HF processor) for this image size"
            )
        tiles[i, :n] = pixel_values[i, :n]
        index[i, positions] = anyres.resolve_newline(idx, max_tiles, spec)[:, :taps]
        weight[i, positions] = w[:, :taps]
    return {"pixel_values": tiles, "image_index": index, "image_weight": weight}


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Appends all-zero rows (attention mask 0: ignored, sliced off by callers)."""
    if array.shape[0] == rows:
        return array
    pad = np.zeros((rows - array.shape[0], *array.shape[1:]), array.dtype)
    return np.concatenate([array, pad])


@dataclasses.dataclass
class EmbeddingModel:
    """A loaded model on a mesh. ``model(**processor_outputs)`` -> (B, T, D) final hidden states;
    ``model.embed(**processor_outputs)`` -> (B, D) L2-normalised last-token embeddings."""

    config: LlavaConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    mesh: Mesh
    max_tiles: int

    def __post_init__(self):
        state_shardings = sharding.state_shardings(self.state, self.mesh)

        def forward(state, batch, pool):
            self.trace_count += 1  # Python side effect: runs only when jit (re)traces
            model = nnx.merge(self.graphdef, state)
            hidden = model(**batch)
            return last_token_pool(hidden, batch["attention_mask"]) if pool else hidden

        self._forward = jax.jit(forward, in_shardings=(state_shardings, None), static_argnums=2)
        self.trace_count = 0

    @property
    def module(self) -> LlavaModel:
        return nnx.merge(self.graphdef, self.state)

    def prepare(
        self, input_ids, attention_mask, pixel_values=None, image_sizes=None, **unused
    ) -> dict[str, np.ndarray]:
        """Host arrays for the device. Extra processor outputs (e.g. ``batch_num_images``) are
        accepted and ignored: one image per example is what these models' embeddings use."""
        input_ids = np.asarray(input_ids, np.int32)
        batch = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, np.int32)}
        if pixel_values is not None:
            if image_sizes is None:
                raise ValueError("pixel_values given without image_sizes")
            if self.config.vision is None:
                raise ValueError("this model was loaded text-only; it cannot take pixel_values")
            pixel_values = np.asarray(pixel_values, np.float32)
            if pixel_values.ndim == 4:  # a single tile per image
                pixel_values = pixel_values[:, None]
            batch |= image_inputs(
                input_ids, pixel_values, np.asarray(image_sizes), self.config, self.max_tiles
            )
        return batch

    def run(self, batch: dict[str, np.ndarray], pool: bool) -> np.ndarray:
        """Pads the batch to a multiple of the data-parallel size, runs, and un-pads."""
        rows = batch["input_ids"].shape[0]
        dp = sharding.data_parallel_size(self.mesh)
        padded = -(-rows // dp) * dp
        device_batch = sharding.put_batch(
            {k: pad_rows(v, padded) for k, v in batch.items()}, self.mesh
        )
        out = self._forward(self.state, device_batch, pool)
        return np.asarray(jax.device_get(out))[:rows]

    def __call__(
        self, input_ids, attention_mask, pixel_values=None, image_sizes=None, **kwargs
    ) -> np.ndarray:
        return self.run(
            self.prepare(input_ids, attention_mask, pixel_values, image_sizes, **kwargs), pool=False
        )

    def embed(
        self, input_ids, attention_mask, pixel_values=None, image_sizes=None, **kwargs
    ) -> np.ndarray:
        return self.run(
            self.prepare(input_ids, attention_mask, pixel_values, image_sizes, **kwargs), pool=True
        )
