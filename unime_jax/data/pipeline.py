"""Training rows → packed host batches, with grain: the same iterator for every stage.

A stage supplies a *transform* (one record → ``{side: Example, ...extra arrays}``, or a skip
marker for a bad row) and the pipeline collates global batches with :class:`BatchCollator`: each
side's examples become one :class:`~unime_jax.models.inputs.ModelInputs` (padded to the side's
length, image units packed per group of rows), extra arrays (e.g. stage 1's ``teacher``) are
stacked. The batch is a nested pytree ``{"query": ModelInputs, "target": ModelInputs}`` or
``{"text": ModelInputs, "teacher": array}`` from here to the loss.

The pipeline (:func:`make_batch_iterator`) is grain's dataset API::

    MapDataset.source(records)          random access
      .map_with_index(attach row index)
      .shuffle(seed)                    a new permutation each epoch (seed + epoch)
      .repeat(num_epochs)               None = forever
      [: whole global batches]          finite epochs only
      HostBlock(process_index)          this host's contiguous block of every global batch
      .to_iter_dataset()
      .map(transform)                   tokenise, load + tile images (in workers if any)
      .mp_prefetch(worker_count)        optional worker processes
      .filter(skip bad rows)            in the main process: counts and logs every skip
      .batch(global_batch_size // process_count, batch_fn=collator)

Why this construction rather than ``grain.DataLoader``: every stage is random access until the
per-example map, so the iterator state is tiny and JSON-serialisable (an index per worker plus
the skip counts) and restores exactly; host ``h`` of ``H`` reads block ``h`` of each global batch
(stream positions ``[s*B + h*B/H, s*B + (h+1)*B/H)`` at step ``s``), so all hosts together see
the rows of a one-host run *in the same order* (absent skipped rows) — the global array is the
same, and so is the training — and disjoint across hosts; and filter +
batch run after ``mp_prefetch`` in the main process, so the batches do not depend on the number
of worker processes and skip counts are complete even with workers.

Bad rows at training time (an image deleted or corrupted after conversion, a text that does not
fit its length — it is never truncated, truncation would cut image tokens) are skipped, never
silently: the transform returns a marker, and the filter logs a warning with the row id and
counts it per reason. The counts are part of the iterator state (they survive a restore).
Iterator state: ``{"pipeline": <grain's state>, "skipped": {reason: count}}``; restore with the
same ``worker_count``, source, seed, batch size and host count as the run that saved it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from unime_jax.errors import DataError
from unime_jax.preprocess.example import Example
from unime_jax.preprocess.processor import Processor
from unime_jax.preprocess.text import LENGTH_BUCKETS, bucket_length

log = logging.getLogger(__name__)

SKIP_KEY = "_skip"


def skip(reason: str, row_id: str, detail: str) -> dict[str, str]:
    """The marker a transform returns instead of a bad row's arrays."""
    return {SKIP_KEY: reason, "id": row_id, "detail": detail}


def row_groups(rows: int, data_parallel: int, num_chunks: int) -> np.ndarray:
    """The image group of each host row, laid out for GradCache's interleaved chunks.

    Rows are split contiguously over the (host-local) data-parallel ranks, and chunk j takes
    rows j, j + c, j + 2c, ... (see :mod:`unime_jax.gradcache`); the rows one rank holds for one
    chunk form one group (group ``rank * c + j``), so after chunking every group's rows and
    units sit on one device and the per-group gather stays local.
    """
    per_rank = rows // data_parallel
    r = np.arange(rows)
    return (r // per_rank) * num_chunks + r % num_chunks


@dataclasses.dataclass
class BatchCollator:
    """A global batch of transformed elements → the nested batch (module doc).

    ``lengths``: each side's token length (the longest allowed); with ``length_buckets`` a side
    is padded only to the smallest bucket that holds its longest row in the batch. ``groups``
    image groups per side (``data_parallel * num_chunks``), each with ``unit_budget`` units
    (None: the power of two above the batch's largest need).
    """

    processor: Processor
    lengths: Mapping[str, int]
    data_parallel: int = 1
    num_chunks: int = 1
    unit_budget: int | None = None
    length_buckets: bool = False

    def side_length(self, side: str, examples: Sequence[Example]) -> int:
        if not self.length_buckets:
            return self.lengths[side]
        buckets = [b for b in LENGTH_BUCKETS if b < self.lengths[side]] + [self.lengths[side]]
        return bucket_length(max(len(e) for e in examples), buckets)

    def __call__(self, elements: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        groups = row_groups(len(elements), self.data_parallel, self.num_chunks)
        for key, first in elements[0].items():
            values = [e[key] for e in elements]
            if isinstance(first, Example):
                out[key] = self.processor.batch(
                    values,
                    length=self.side_length(key, values),
                    groups=self.data_parallel * self.num_chunks,
                    row_groups=groups,
                    unit_budget=self.unit_budget,
                )
            elif key != "id":
                out[key] = np.stack(values)
        return out


class _DropBadRows(grain.transforms.Filter):
    """Drops skip markers, counting and logging each; runs in the iterating (main) process.

    ``limit`` consecutive bad rows (0: no limit) end the run with an error: a dataset whose
    images all vanished would otherwise be skipped through forever without a single step.
    """

    def __init__(self, limit: int = 0):
        self.counts: collections.Counter[str] = collections.Counter()
        self.limit, self.run = limit, collections.Counter()

    def filter(self, element: Mapping[str, Any]) -> bool:
        if SKIP_KEY not in element:
            self.run.clear()
            return True
        reason = element[SKIP_KEY]
        self.counts[reason] += 1
        self.run[reason] += 1
        log.warning("skipping row %s (%s): %s", element["id"], reason, element["detail"])
        if self.limit and sum(self.run.values()) >= self.limit:
            raise DataError(
                f"{self.limit} rows in a row were unusable ({dict(self.run)}; the last: row "
                f"{element['id']}: {element['detail']})",
                "check the data (the skipped rows' reasons above; rebuild a damaged dataset with "
                "--overwrite), or raise --config.max_bad_rows",
            )
        return False


class BatchIterator(grain.DatasetIterator):
    """The host-local batch iterator; ``get_state()`` is a JSON-serialisable dict
    ``{"pipeline": <grain state>, "skipped": {reason: count}}`` and ``set_state`` restores both,
    so a resumed iterator yields exactly the batches an uninterrupted one would."""

    def __init__(
        self, parent: grain.DatasetIterator, dropper: _DropBadRows, reasons: Sequence[str]
    ):
        super().__init__(parent)
        self._dropper = dropper
        self.reasons = tuple(reasons)

    def __next__(self) -> dict[str, Any]:
        return next(self._parent)

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped so far, per reason (since the start of training, across restores)."""
        return dict(sorted(self._dropper.counts.items()))

    def metrics(self, prefix: str = "data/skipped/") -> dict[str, int]:
        return {f"{prefix}{r}": self._dropper.counts.get(r, 0) for r in self.reasons} | {
            f"{prefix}total": sum(self._dropper.counts.values())
        }

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skipped": self.skipped}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._dropper.counts = collections.Counter(state.get("skipped", {}))


class HostBlock(grain.MapDataset):
    """Host ``index`` of ``count``'s rows of each global batch of ``batch`` rows: the contiguous
    block ``[index * batch / count, (index + 1) * batch / count)`` of every batch, so the global
    array the hosts assemble has the rows of a one-host run in the same order."""

    def __init__(self, parent: grain.MapDataset, *, index: int, count: int, batch: int):
        super().__init__(parent)
        self._index, self._count, self._batch = index, count, batch
        self._local = batch // count

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def _global(self, i: int) -> int:
        step, offset = divmod(i, self._local)
        return step * self._batch + self._index * self._local + offset

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global(index)]

    def __str__(self) -> str:
        return f"HostBlock({self._index}/{self._count} of {self._batch})"


@dataclasses.dataclass(frozen=True)
class _AttachIndex:
    """Adds the source index (``_index``) to a record, for row ids in skip warnings."""

    size: int

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        return {**record, "_index": index % self.size}


def _mark_flags_parsed() -> None:
    # grain worker processes read absl flags; outside app.run they are unparsed (and raise).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_batch_iterator(
    source: Sequence[Mapping[str, Any]],
    transform: grain.transforms.Map,
    collator: BatchCollator,
    *,
    global_batch_size: int,
    seed: int,
    reasons: Sequence[str] = (),
    max_bad_rows: int = 1000,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Host-local batches of ``global_batch_size // process_count`` rows (module doc).

    ``reasons``: the skip reasons the transform can report (for zero-filled metrics);
    ``max_bad_rows``: consecutive unusable rows that stop the run (0: never);
    ``process_index`` / ``process_count`` default to JAX's; each host gets its block of every
    global batch of the shuffled stream (disjoint across hosts, see :class:`HostBlock`).
    """
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by {process_count} processes"
        )
    n = len(source)
    if n == 0:
        raise DataError(f"{source!r} holds no rows to train on", "check the dataset and its config")
    ds = grain.MapDataset.source(source).map_with_index(_AttachIndex(n))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:  # whole global batches only, so that every host steps equally
        ds = ds[: len(ds) // global_batch_size * global_batch_size]
    if process_count > 1:
        ds = HostBlock(ds, index=process_index, count=process_count, batch=global_batch_size)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)).map(
        transform
    )
    if worker_count > 0:
        _mark_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    dropper = _DropBadRows(max_bad_rows)
    batch = global_batch_size // process_count
    it = it.filter(dropper).batch(batch, drop_remainder=True, batch_fn=collator)
    return BatchIterator(iter(it), dropper, reasons)
