"""Orbax checkpoints of the train state together with the data-iterator state.

Both live in one step directory, written asynchronously and committed atomically by orbax (a
crash mid-save leaves an uncommitted temporary directory that is ignored), so a run killed at
any point resumes from the last complete step with the exact data position.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Starts an async save of ``state`` and the iterator state; returns whether it saved."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores into ``abstract_state`` (ShapeDtypeStructs carrying the target shardings)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

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
