"""Orbax checkpoints of the train state with the data-iterator state, verified on restore.

Each step directory holds the train state, the data-iterator state and a digest of the state
(per-leaf sums of the parameters' bit patterns, exact and order-free), written asynchronously and
committed atomically by orbax: a crash mid-save leaves an uncommitted temporary that is ignored.
On restore the newest step whose files read back *and* whose state matches its digest (and is
finite) wins; a damaged or incomplete step is reported (step, path, reason) and the previous one
is tried; when none is good the run stops with an error instead of training from garbage.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from unime_jax.errors import DataError

log = logging.getLogger(__name__)


@jax.jit
def state_digest(tree: Any) -> list[jax.Array]:
    """One uint32 per leaf: the wrapping sum of each element's bit pattern mixed with its
    position. Integer sums do not depend on the order of addition, so the value is the same on
    any mesh; a flipped bit, a swapped pair or a NaN anywhere changes it."""

    def one(x):
        x = jnp.asarray(x)
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
        index = jnp.arange(bits.size, dtype=jnp.uint32)
        return jnp.sum((bits ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B))

    return [one(x) for x in jax.tree.leaves(tree)]


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats])) if floats else True


def digest_list(tree: Any) -> list[int]:
    return [int(d) for d in jax.device_get(state_digest(tree))]


def _reason(error: Exception) -> str:
    """The first line of an orbax / tensorstore error, without its multi-kilobyte spec dumps."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(" [tensorstore_spec")[0][:400]


def _drop_closed_loop_noise(unraisable, previous=sys.unraisablehook) -> None:
    """After a failed read, tensorstore callbacks find orbax's event loop closed and Python
    prints a traceback for each (hundreds); they are harmless and would bury the real error."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
        return
    previous(unraisable)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        sys.unraisablehook = _drop_closed_loop_noise
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "digest")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Starts an async save of ``state``, the iterator state and the state's digest. A state
        with non-finite values is refused: it would replace good checkpoints with a bad one."""
        if not bool(all_finite(state)):
            raise DataError(
                f"the train state is not finite at step {step}; not saving it over the "
                f"checkpoints in {self.directory}",
                "lower --config.lr or check the data; rerun to resume from the last checkpoint",
            )
        digest = {"step": int(step), "leaves": digest_list(state)}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                digest=ocp.args.JsonSave(digest),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores step ``step`` into ``abstract_state`` (ShapeDtypeStructs carrying the target
        shardings) and verifies it; raises :class:`DataError` saying why it is not usable."""
        where = os.path.join(self.directory, str(step))
        error = None
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    digest=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types for missing / damaged files
            error = DataError(f"checkpoint step {step} ({where}) cannot be read: {_reason(e)}")
        # Each process reads only its own shards: all must agree before the (collective) digest
        # check, or a shard damaged on one host would leave the others waiting or on another step.
        if jax.process_count() > 1:
            read = multihost_utils.process_allgather(np.int32(error is None))
            if error is None and not np.all(read):
                error = DataError(
                    f"checkpoint step {step} ({where}) cannot be read on another host"
                )
        if error is not None:
            raise error
        state, digest = restored["state"], restored["digest"]
        if not isinstance(digest, dict) or digest.get("leaves") != digest_list(state):
            raise DataError(f"checkpoint step {step} ({where}) does not match its digest")
        if not bool(all_finite(state)):
            raise DataError(f"checkpoint step {step} ({where}) holds non-finite values")
        return state, restored["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest usable step as ``(step, state, data_state)``, falling back past damaged
        ones (each reported); None when there is no checkpoint at all."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        problems, damaged = [], []
        for step in steps:
            try:
                state, data_state = self.restore(step, abstract_state)
            except DataError as e:
                log.error("%s; trying the previous checkpoint", e.what)
                problems.append(e.what)
                damaged.append(step)
                continue
            if damaged:
                self._quarantine(damaged)
                log.warning("resuming from step %d, the newest usable checkpoint", step)
            return step, state, data_state
        if problems:
            raise DataError(
                f"no usable checkpoint in {self.directory}: " + "; ".join(problems),
                "delete the damaged step directories (or the whole checkpoints/ directory to "
                "start over) and rerun",
            )
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves damaged step directories aside (``<dir>.damaged/<step>``): training will write
        those steps again, and nothing is deleted that someone may want to inspect."""
        if jax.process_index() == 0:
            aside = self.directory + ".damaged"
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}-{int(time.time())}")
                os.replace(os.path.join(self.directory, str(step)), target)
                log.warning("moved the damaged step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("unime_jax checkpoint quarantine")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with target shardings, for a sharded restore without a host copy.

    ``shardings`` may be a prefix of ``tree`` (as jit's in_shardings may), e.g. one sharding in
    place of an NNX Variable node.
    """
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    prefix_leaves, prefix_def = jax.tree.flatten(shardings, is_leaf=is_sharding)
    subtrees = prefix_def.flatten_up_to(tree)
    abstract = [
        jax.tree.map(lambda x, s=s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub)
        for s, sub in zip(prefix_leaves, subtrees)
    ]
    return prefix_def.unflatten(abstract)


class PreemptionFlag:
    """Set by SIGTERM (what a TPU VM receives before preemption); the loop checks it every step,
    saves a checkpoint and exits cleanly instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
