"""Training rows → fixed-shape host batches, with grain: stage-2 (query, target) pairs here,
stage-1 sentences via :class:`unime_jax.data.sentences.SentenceTransform` (same iterator).

Records come from :func:`unime_jax.data.mmeb.open_dataset` or any in-memory sequence of dicts
with ``qry`` / ``qry_image`` / ``pos_text`` / ``pos_image`` (the converter's ``*_image_path``
keys are accepted too; an image is a path, a PIL image or ``None``). :class:`PairTransform`
turns one record into numpy arrays of one fixed shape per side::

    {query,target}_input_ids       (L,)                 int32
    {query,target}_attention_mask  (L,)                 int32
    {query,target}_pixel_values    (max_tiles, C, H, W) float32   zeros without an image
    {query,target}_image_index     (L, taps)            int32     per-token tile-feature gather
    {query,target}_image_weight    (L, taps)            float32   (see models.runtime)

with L = ``query_length`` / ``target_length``. Dropping the prefix gives exactly the batch
``EmbeddingModel.run`` takes.

The pipeline (:func:`make_batch_iterator`) is grain's dataset API::

    MapDataset.source(records)          random access
      .map_with_index(attach row index)
      .shuffle(seed)                    a new permutation each epoch (seed + epoch)
      .repeat(num_epochs)               None = forever
      [: whole global batches]          finite epochs only
      [process_index::process_count]    per-host strided shard of the global stream
      .to_iter_dataset()
      .map(PairTransform)               tokenise, load + tile images (in workers if any)
      .mp_prefetch(worker_count)        optional worker processes
      .filter(skip bad rows)            in the main process: counts and logs every skip
      .batch(global_batch_size // process_count, drop_remainder=True)

Why this construction rather than ``grain.DataLoader``: every stage is random access until the
per-example map, so the iterator state is tiny and JSON-serialisable (an index per worker plus
the skip counts) and restores exactly; the host shard is a stride over the *global* shuffled
stream, so step ``s`` of all hosts together sees global stream positions ``[s*B, (s+1)*B)``
— the same rows as a one-host run (absent skipped rows) and disjoint across hosts; and filter +
batch run after ``mp_prefetch`` in the main process, so the batches do not depend on the number
of worker processes (grain interleaves worker outputs in stream order) and skip counts are
complete even with workers. ``DataLoader`` batches inside its workers, which makes batches
depend on ``worker_count`` and leaves filter counts in the workers.

Bad rows at training time (an image deleted or corrupted after conversion, a text that does not
fit its fixed length — it is never truncated, truncation would cut image tokens) are skipped,
never silently: :class:`PairTransform` returns a small marker instead of arrays, and the filter
logs a warning with the row id (``dataset/row`` for converted data, else ``#index``) and counts
it per reason. Read counts with ``iterator.skipped`` (or ``iterator.metrics()``); they are part
of the iterator state, so they survive a checkpoint restore. If you run ``PairTransform`` in
your own pipeline, its markers must be filtered in the process that owns the counts.

Iterator state: ``{"pipeline": <grain's state>, "skipped": {reason: count}}``, plain JSON. Without
workers grain's state is the next stream index; with workers it is one index per worker plus
the interleave position, so restore with the same ``worker_count`` (and the same source, seed,
batch size and host count) as the run that saved it.

Caveat: a skipped row is replaced by the host's next row, so with finite ``num_epochs`` hosts can
end up with different numbers of batches; train for a fixed number of steps with
``num_epochs=None`` (the default).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from unime_jax.models.runtime import image_inputs
from unime_jax.processing import IMAGE_PLACEHOLDER, Processor, load_image

log = logging.getLogger(__name__)

SIDES = ("query", "target")
FIELDS = ("input_ids", "attention_mask", "pixel_values", "image_index", "image_weight")
SKIP_KEY = "_skip"
REASONS = (
    "empty_side",  # neither text nor image on one side
    "placeholder_mismatch",  # <|image_1|> count does not match the image (or raw image tokens)
    "missing_image",  # the image file is gone
    "corrupt_image",  # the image file cannot be decoded
    "too_long",  # the expanded sequence does not fit query_length / target_length
    "too_many_tiles",  # the image needs more tiles than max_tiles
)


class SkipRow(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _pick(record: Mapping[str, Any], *keys: str):
    for key in keys:
        if key in record:
            return record[key]
    return None


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``{"qry", "qry_image", "pos_text", "pos_image", "id"}`` from either key convention."""
    if "dataset" in record and "row" in record:
        row_id = f"{record['dataset']}/{record['row']}"
    elif "_index" in record:
        row_id = f"#{record['_index']}"
    else:
        row_id = "?"
    return {
        "qry": record.get("qry") or "",
        "qry_image": _pick(record, "qry_image", "qry_image_path") or None,
        "pos_text": record.get("pos_text") or "",
        "pos_image": _pick(record, "pos_image", "pos_image_path") or None,
        "id": row_id,
    }


def skip_marker(element: Mapping[str, Any]) -> dict[str, Any] | None:
    """The marker :class:`PairTransform` returns for a bad row, or ``None`` for an example."""
    return element if SKIP_KEY in element else None


class PairTransform(grain.transforms.Map):
    """One record → the fixed-shape arrays of both sides (module doc), or a skip marker."""

    def __init__(
        self,
        processor: Processor,
        *,
        max_tiles: int,
        query_length: int,
        target_length: int,
        image_root: str | os.PathLike | None = None,
    ):
        self.processor = processor
        self.max_tiles = max_tiles
        self.lengths = {"query": query_length, "target": target_length}
        self.image_root = image_root  # for relative image paths in in-memory records
        vision = processor.config.vision
        self._tile_shape = (
            None if vision is None else (vision.num_channels, *[vision.image_size] * 2)
        )

    def encode(self, side: str, text: str, image) -> dict[str, np.ndarray]:
        """One side → ``{field: array}`` without the batch axis; raises :class:`SkipRow`."""
        p, length = self.processor, self.lengths[side]
        if not text.strip() and image is None:
            raise SkipRow("empty_side", side)
        n = text.count(IMAGE_PLACEHOLDER)
        if n > 1 or (n == 1) != (image is not None):
            raise SkipRow("placeholder_mismatch", f"{side}: {n} placeholders")
        if image is not None:
            try:
                image = load_image(
                    image, None if isinstance(image, Image.Image) else self.image_root
                )
            except FileNotFoundError as e:
                raise SkipRow("missing_image", str(e)) from e
            except Exception as e:  # anything a broken file makes PIL raise
                raise SkipRow("corrupt_image", str(e)) from e
        try:
            batch = p([p.instruction(text)], [image], max_length=length)
        except ValueError as e:
            reason = "too_long" if "longer than max_length" in str(e) else "placeholder_mismatch"
            raise SkipRow(reason, f"{side}: {e}") from e
        out = {k: batch[k][0] for k in ("input_ids", "attention_mask")}
        if self._tile_shape is None:  # text-only model
            return out
        if image is None:  # zeros of the same shapes, so that every example stacks
            pixels = np.zeros((1, 1, *self._tile_shape), np.float32)
            sizes = np.zeros((1, 2), np.int64)
        else:
            pixels, sizes = batch["pixel_values"], batch["image_sizes"]
        try:
            extra = image_inputs(batch["input_ids"], pixels, sizes, p.config, self.max_tiles)
        except ValueError as e:
            raise SkipRow("too_many_tiles", f"{side}: {e}") from e
        return out | {k: v[0] for k, v in extra.items()}

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        r = normalize_record(record)
        try:
            query = self.encode("query", r["qry"], r["qry_image"])
            target = self.encode("target", r["pos_text"], r["pos_image"])
        except SkipRow as e:
            return {SKIP_KEY: e.reason, "id": r["id"], "detail": e.detail}
        return {f"query_{k}": v for k, v in query.items()} | {
            f"target_{k}": v for k, v in target.items()
        }


class _DropBadRows(grain.transforms.Filter):
    """Drops skip markers, counting and logging each; runs in the iterating (main) process."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    def filter(self, element: Mapping[str, Any]) -> bool:
        marker = skip_marker(element)
        if marker is None:
            return True
        self.counts[marker[SKIP_KEY]] += 1
        log.warning("skipping row %s (%s): %s", marker["id"], marker[SKIP_KEY], marker["detail"])
        return False


class BatchIterator(grain.DatasetIterator):
    """The host-local batch iterator. ``get_state()`` is a JSON-serialisable dict:
    ``{"pipeline": <grain state>, "skipped": {reason: count}}``; ``set_state`` restores both, so a
    resumed iterator yields exactly the batches an uninterrupted one would. Being a grain
    ``DatasetIterator``, it also works with ``grain.checkpoint`` / orbax's grain handler."""

    def __init__(self, parent: grain.DatasetIterator, dropper: _DropBadRows):
        super().__init__(parent)
        self._dropper = dropper

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    @property
    def skipped(self) -> dict[str, int]:
        """Rows skipped so far, per reason (since the start of training, across restores)."""
        return dict(sorted(self._dropper.counts.items()))

    def metrics(self, prefix: str = "data/skipped/") -> dict[str, int]:
        return {f"{prefix}{r}": self._dropper.counts.get(r, 0) for r in REASONS} | {
            f"{prefix}total": sum(self._dropper.counts.values())
        }

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skipped": self.skipped}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._dropper.counts = collections.Counter(state.get("skipped", {}))


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
    transform: PairTransform,
    *,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shuffle: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 4,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Host-local batches of ``global_batch_size // process_count`` examples (module doc).

    ``process_index`` / ``process_count`` default to JAX's; each host gets every
    ``process_count``-th row of the global shuffled stream (disjoint across hosts).
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
        raise ValueError("the source is empty")
    ds = grain.MapDataset.source(source).map_with_index(_AttachIndex(n))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:  # whole global batches only, so that every host steps equally
        ds = ds[: len(ds) // global_batch_size * global_batch_size]
    ds = ds[process_index::process_count]
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
    dropper = _DropBadRows()
    it = it.filter(dropper).batch(global_batch_size // process_count, drop_remainder=True)
    return BatchIterator(iter(it), dropper)
