"""Load an HF checkpoint into a sharded NNX state, without torch, for any registered family.

The model is first built abstractly (``nnx.eval_shape``); each parameter is then created
directly in its target sharding with ``jax.make_array_from_callback``, whose callback reads only
the slice a device owns from the memory-mapped safetensors. No host ever materialises the full
model. Names are matched strictly through the family's :class:`~unime_jax.weights.rules.WeightMap`:
every checkpoint tensor is used by exactly one parameter or skipped for a logged reason.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from unime_jax import sharding
from unime_jax.weights.rules import Transform, WeightMap
from unime_jax.weights.safetensors import CheckpointError, CheckpointReader

log = logging.getLogger(__name__)


def is_stacked(var) -> bool:
    """Whether a parameter stacks layers on its leading axis (one checkpoint tensor per layer)."""
    return "layers" in (var.get_metadata().get("out_sharding") or ())


def _truncation(wmap: WeightMap, target: tuple[str, ...], layer: int | None, name: str):
    """The skip reason for a layer the model does not build (or an error beyond the config)."""
    for first, built, total, reason in wmap.truncated:
        if layer is None or target[0] != first or layer < built:
            continue
        if layer >= total:
            raise CheckpointError(
                f"tensor {name!r} is {first} layer {layer}, but config.json has {total} {first} "
                "layers",
                "use the config.json that belongs to these weights",
            )
        return reason
    return None


def assign(
    reader: CheckpointReader, flat_abstract: dict, wmap: WeightMap
) -> dict[tuple, dict[int | None, tuple[str, Transform]]]:
    """Maps every checkpoint tensor to (param path, layer) or a logged skip; strict both ways."""
    sources: dict[tuple, dict] = collections.defaultdict(dict)
    skipped: dict[str, list[str]] = collections.defaultdict(list)
    unexpected = []
    for name in reader:
        canon = wmap.canonical(name)
        reason = wmap.skip_reason(canon)
        m = wmap.match(canon) if reason is None else None
        if m is not None and (why := _truncation(wmap, m.target, m.layer, name)) is not None:
            reason, m = why, None
        if reason is not None:
            skipped[reason].append(name)
            continue
        if m is None or m.target not in flat_abstract:
            unexpected.append(name)
            continue
        var = flat_abstract[m.target]
        stacked = is_stacked(var)
        if stacked != (m.layer is not None):
            unexpected.append(name)
            continue
        if stacked and m.layer >= var.shape[0]:
            raise CheckpointError(
                f"tensor {name!r} is layer {m.layer}, but config.json has {var.shape[0]} layers",
                "use the config.json that belongs to these weights",
            )
        expected = tuple(var.shape[1:] if stacked else var.shape)
        shape = tuple(reader.shape(name))
        try:
            got = tuple(m.transform.to_param(np.empty(shape, np.uint8)).shape)
        except ValueError:  # e.g. a conv weight that is not 4-D
            got = None
        if got != expected:
            raise CheckpointError(
                f"tensor {name!r} has shape {shape}, but config.json implies "
                f"{m.transform.checkpoint_shape(expected)} (parameter {'/'.join(m.target)} "
                f"{expected})",
                "use the config.json that belongs to these weights",
            )
        if m.layer in sources[m.target]:
            other = sources[m.target][m.layer][0]
            raise CheckpointError(
                f"tensors {other!r} and {name!r} both map to {'/'.join(m.target)}"
            )
        sources[m.target][m.layer] = (name, m.transform)
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} unexpected tensor(s) in {reader.directory}, not part of this "
            f"architecture: {sorted(unexpected)[:10]}",
            "check that config.json's model_type matches the weights",
        )
    missing = []
    for path, var in flat_abstract.items():
        wanted = range(var.shape[0]) if is_stacked(var) else [None]
        for i in wanted:
            if i not in sources[path]:
                item = "/".join(path) + ("" if i is None else f"[layer {i}]")
                missing.append(f"{item} <- {wmap.source_name(path, i) or '?'}")
    if missing:
        raise CheckpointError(
            f"{len(missing)} parameter(s) missing from {reader.directory} (parameter <- "
            f"checkpoint tensor, named without its layout prefix): {missing[:10]}",
            "the download is incomplete or the weights belong to another architecture",
        )
    for reason, names in skipped.items():
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        log.info("skipped %d checkpoint tensor(s) (%s): %s", len(names), shown, reason)
    return sources


def load_state(
    directory: str | os.PathLike,
    build: Callable[[], nnx.Module],
    wmap: WeightMap,
    mesh: Mesh,
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of ``build()`` (a family's model constructor, run abstractly) with
    weights from ``directory``, each parameter created in its sharding on ``mesh``."""
    reader = CheckpointReader(directory)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    flat = dict(abstract_state.flat_state())
    sources = assign(reader, flat, wmap)
    shardings = dict(sharding.state_shardings(abstract_state, mesh).flat_state())

    def fill(path, var):
        per_layer, target_dtype = sources[path], var.dtype

        def callback(index):
            if None in per_layer:
                name, tf = per_layer[None]
                return np.asarray(tf.to_param(reader.get(name))[index], dtype=target_dtype)
            layers = range(var.shape[0])[index[0]]
            parts = [
                per_layer[i][1].to_param(reader.get(per_layer[i][0]))[index[1:]] for i in layers
            ]
            return np.stack(parts).astype(target_dtype)

        target = shardings[path]
        target = target.value if isinstance(target, nnx.Variable) else target
        return jax.make_array_from_callback(var.shape, target, callback)

    for path, var in flat.items():
        var.set_value(fill(path, var))
    return graphdef, abstract_state
