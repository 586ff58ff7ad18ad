"""Device mesh, the logical-axis rules table, and helpers that turn logical names into shardings.

Every parameter carries logical axis names (e.g. ``("embed", "mlp")``) as NNX metadata; this
module is the single place that maps them onto the physical mesh axes ``data``, ``fsdp`` and
``tensor``. Activations use the same table through :func:`constrain`, inside code traced under
``jax.set_mesh(mesh)`` (the train step and the embedding forward are).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters are sharded FSDP-style on their model dimension and
# Megatron-style on heads / MLP width; the batch is split over both data-parallel axes.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "vision_embed": ("fsdp",),
    "vision_mlp": ("tensor",),
    "vision_heads": ("tensor",),
    "patch_in": None,
    "positions": None,
    "layers": None,
    "norm": None,
    "lora": None,
    "length": None,
}


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh; by default all devices go to ``fsdp``.

    Axis types are Auto: the compiler propagates shardings, which lets model code reshape and
    gather freely (Explicit axes, ``jax.make_mesh``'s new default, reject much of that).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"fsdp": len(devices)})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh, rules=None
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec, dropping mesh axes a dimension can't split.

    A dimension is only sharded over mesh axes whose product divides it (e.g. 2 KV heads on a
    4-way tensor axis stay replicated); each mesh axis is used at most once per array.
    """
    rules = RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in unime_jax.sharding.RULES")
        axes = [a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1]
        if shape is not None:
            kept = []
            for a in axes:
                if shape[i] % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                    kept.append(a)
            axes = kept
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """``x`` constrained to the sharding its logical axis ``names`` map to on the current mesh
    (set with ``jax.set_mesh``); unchanged when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of an (abstract or concrete) NNX state."""

    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh))

    return jax.tree.map(
        one, state, is_leaf=lambda x: isinstance(x, nnx.Variable | nnx.VariableState)
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a host batch array: leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch (any pytree of arrays) on the mesh, leading axes over (data, fsdp).

    With several processes each host passes its local slice and the global array is assembled;
    on one host this is a plain sharded ``device_put``.
    """

    def put(value):
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        if jax.process_count() == 1:
            return jax.device_put(value, sharding)
        return jax.make_array_from_process_local_data(sharding, value)

    return jax.tree.map(put, batch)


def put_global(batch: Any, mesh: Mesh) -> Any:
    """Places a batch that every process holds whole (e.g. the Embedder's): each process hands
    over only the shards its devices own."""

    def put(value):
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        if jax.process_count() == 1:
            return jax.device_put(value, sharding)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, batch)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
