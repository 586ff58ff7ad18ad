"""What a training stage supplies to the one train loop (:func:`unime_jax.train.run`).

A stage is an object, not a flag: its data (source rows and the per-row transform), the sides
of the batch it embeds, its loss, and its held-out evaluation. The loop, the step, GradCache,
checkpoints and metrics are shared; a new objective is a new :class:`Stage` and one registry
line in :mod:`unime_jax.stages`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax

from unime_jax.preprocess.processor import Processor

# loss(embeddings {side: (N, D)}, extras {name: array}, step) -> (loss, metrics)
LossFn = Callable[[dict[str, jax.Array], dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


class Stage(abc.ABC):
    """``number``: ``cfg.stage``; ``sides``: the batch keys that are model inputs (embedded with
    GradCache, in this order); ``text_only``: the stage trains the LLM alone (no vision tower or
    projector is built); ``skip_reasons``: why its transform may skip a row."""

    number: int
    sides: tuple[str, ...]
    text_only: bool
    skip_reasons: tuple[str, ...]

    def prepare(self, cfg, workdir: str):
        """A copy of ``cfg`` with derived values filled in (e.g. demo data files). Default: none."""
        return cfg

    def prepare_abstract(self, cfg):
        """A copy of ``cfg`` for compiling the step without data (:mod:`unime_jax.aot`)."""
        cfg = cfg.copy_and_resolve_references()
        cfg.num_steps = cfg.num_steps or 1000  # only the schedule reads it
        return cfg

    @abc.abstractmethod
    def validate(self, cfg, *, check_files: bool = True) -> None:
        """Raises :class:`~unime_jax.errors.UsageError` for a config this stage cannot run;
        ``check_files``: also that its data exists."""

    @abc.abstractmethod
    def source(self, cfg) -> Sequence[Any]:
        """The training rows (random access)."""

    @abc.abstractmethod
    def transform(self, cfg, processor: Processor) -> grain.transforms.Map:
        """One row → ``{side: Example, ...extras}``, or a skip marker."""

    @abc.abstractmethod
    def lengths(self, cfg) -> dict[str, int]:
        """The longest token sequence of each side."""

    @abc.abstractmethod
    def loss_fn(self, cfg) -> LossFn: ...

    def extras(self, cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per-row arrays of the batch besides the sides: name -> (shape, dtype)."""
        return {}

    def num_steps(self, cfg, num_rows: int) -> int:
        """Optimizer steps to run (default: ``cfg.num_steps``)."""
        return cfg.num_steps

    def evaluator(self, cfg) -> Callable[[Any], dict[str, float]] | None:
        """Held-out metrics of an :class:`~unime_jax.embedder.Embedder`, before and after
        training; None when the config names no held-out set."""
        return None
