"""The loaded model: what HF processors return (numpy) in, hidden states or embeddings out.

``load_pretrained(dir)`` reads any registered family's checkpoint into an
:class:`EmbeddingModel` on a mesh. ``model(**processor_outputs)`` gives (B, T, D) final hidden
states; ``model.embed(**processor_outputs)`` the (B, D) L2-normalised embeddings — for any batch
the family's HF processor can return (text-only rows anywhere, several images per row, either
padding side). Host work (image layouts, packing, padding the batch to the data-parallel size)
is numpy; each input shape compiles once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from unime_jax import families, sharding
from unime_jax.families.base import Family
from unime_jax.models.config import ConfigError, param_dtype
from unime_jax.models.inputs import ModelInputs
from unime_jax.models.layers import remat_policy
from unime_jax.models.multimodal import encode
from unime_jax.preprocess.example import Example
from unime_jax.preprocess.processor import Processor
from unime_jax.weights import hub, loader


@dataclasses.dataclass
class EmbeddingModel:
    """A model on a mesh with its host processor (see the module doc)."""

    family: Family
    config: Any
    graphdef: nnx.GraphDef
    state: nnx.State
    mesh: Mesh
    processor: Processor

    def __post_init__(self):
        state_shardings = sharding.state_shardings(self.state, self.mesh)

        def forward(state, inputs, pool):
            self.trace_count += 1  # Python side effect: runs only when jit (re)traces
            return encode(nnx.merge(self.graphdef, state), inputs, pool=pool)

        self._forward = jax.jit(forward, in_shardings=(state_shardings, None), static_argnums=2)
        self.trace_count = 0

    @classmethod
    def from_module(cls, module: nnx.Module, family: Family, processor: Processor, mesh: Mesh):
        """Wraps a module (its parameters placed in their shardings on ``mesh``)."""
        graphdef, state = nnx.split(module)
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        return cls(family, module.cfg, graphdef, state, mesh, processor)

    @property
    def module(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state)

    @property
    def data_parallel(self) -> int:
        return sharding.data_parallel_size(self.mesh)

    def batch(
        self, examples: Sequence[Example], *, length: int | None = None, padding_side="right"
    ) -> ModelInputs:
        """Examples → one packed host batch, rows padded to a multiple of the data-parallel
        size (empty rows, sliced off by :meth:`run`), one image group per data-parallel rank."""
        dp = self.data_parallel
        rows = -(-len(examples) // dp) * dp
        empty = Example(
            np.zeros(0, np.int32), np.zeros((0, *examples[0].positions.shape[1:]), np.int32)
        )
        padded = list(examples) + [empty] * (rows - len(examples))
        return self.processor.batch(padded, length=length, groups=dp, padding_side=padding_side)

    def run(self, inputs: ModelInputs, pool: bool, rows: int | None = None) -> np.ndarray:
        """The forward on a host batch; returns the first ``rows`` rows as numpy (every process
        of a multi-host mesh calls this with the same batch and gets the whole result)."""
        device = sharding.put_global(inputs, self.mesh)
        with jax.set_mesh(self.mesh):
            out = self._forward(self.state, device, pool)
        if not out.is_fully_addressable:
            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(jax.device_get(out))[: inputs.num_rows if rows is None else rows]

    def embed_examples(self, examples: Sequence[Example]) -> np.ndarray:
        return self.run(self.batch(examples), pool=True, rows=len(examples))

    def prepare(self, input_ids, attention_mask, **image_outputs) -> ModelInputs:
        """HF processor outputs → our packed batch, in the caller's padding and length."""
        input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
        examples = self.processor.from_hf(input_ids, attention_mask, **image_outputs)
        return self.batch(
            examples, length=input_ids.shape[1], padding_side=padding_side(attention_mask)
        )

    def __call__(self, input_ids, attention_mask, **image_outputs) -> np.ndarray:
        inputs = self.prepare(input_ids, attention_mask, **image_outputs)
        return self.run(inputs, pool=False, rows=len(input_ids))

    def embed(self, input_ids, attention_mask, **image_outputs) -> np.ndarray:
        inputs = self.prepare(input_ids, attention_mask, **image_outputs)
        return self.run(inputs, pool=True, rows=len(input_ids))


def padding_side(attention_mask: np.ndarray) -> str:
    """ "left" or "right", read off a padded batch's mask (each row's tokens must be contiguous)."""
    sides = set()
    for i, row in enumerate(np.asarray(attention_mask)):
        real = np.flatnonzero(row)
        if real.size == 0:
            continue
        if real[-1] - real[0] + 1 != real.size:
            raise ValueError(f"row {i} of attention_mask has padding between tokens")
        if real[0] > 0:
            sides.add("left")
        elif real[-1] < row.size - 1:
            sides.add("right")
    if len(sides) > 1:
        raise ValueError("attention_mask mixes left- and right-padded rows")
    return sides.pop() if sides else "right"


def build_model(
    directory: str | os.PathLike,
    mesh: Mesh,
    *,
    dtype: str = "float32",
    text_only: bool = False,
    remat: str | bool = "none",
    attention: str = "xla",
) -> tuple[Family, Any, nnx.Module, Processor]:
    """(family, config, module with the checkpoint's weights on ``mesh``, processor)."""
    hf_config = hub.read_config(directory)
    try:
        family = families.for_config(hf_config)
        cfg = family.parse_config(hf_config)
    except ConfigError as e:
        raise ConfigError(f"{directory}/config.json: {e.what}", e.fix) from e
    except KeyError as e:
        raise ConfigError(f"{directory}/config.json lacks the required key {e}") from e
    if text_only:
        cfg = family.text_only(cfg)
    dt, policy = param_dtype(dtype), remat_policy(remat)

    def build():
        return family.build(cfg, rngs=nnx.Rngs(0), dtype=dt, remat=policy, attention=attention)

    graphdef, state = loader.load_state(directory, build, family.weight_map(cfg), mesh)
    processor = family.load_processor(directory, cfg, hf_config)
    return family, cfg, nnx.merge(graphdef, state), processor


def load_pretrained(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    dtype: str = "float32",
    text_only: bool = False,
    remat: str | bool = "none",
    attention: str = "xla",
) -> EmbeddingModel:
    """Loads an HF checkpoint directory of any registered family (or a hub id, when a network
    exists) into an :class:`EmbeddingModel`; ``text_only`` builds only the LLM (stage 1)."""
    directory = hub.resolve_checkpoint(path)
    mesh = mesh or sharding.make_mesh()
    family, _, module, processor = build_model(
        directory, mesh, dtype=dtype, text_only=text_only, remat=remat, attention=attention
    )
    return EmbeddingModel.from_module(module, family, processor, mesh)
