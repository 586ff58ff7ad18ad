"""UniME's datasets as TFDS builders (ArrayRecord), read through grain.

Build once with ``python -m unime_jax.datasets build NAME [--config C] --manual_dir DIR
--data_dir DATA`` (``tfds build``'s flags; ``tfds build ... --imports unime_jax.datasets`` where
TensorFlow is installed; each builder's MANUAL_DOWNLOAD_INSTRUCTIONS say what DIR holds), then
read with the functions below; every reader goes through ``tfds.data_source`` and gives back
what the trainer and the evaluators take:

=================  ====================================  ===========================================
dataset            builder (configs)                      reader → items
=================  ====================================  ===========================================
MMEB-train         ``mmeb_train`` (all, one per dataset)  :func:`source` → pair dicts (PIL images)
SimCSE NLI         ``nli_simcse``                         :func:`nli_corpus` → ``Corpus``
COCO captions      ``coco_captions`` (val2017, mini)      :func:`retrieval_set` → ``RetrievalSet``
Flickr30K / COCO   ``karpathy`` (flickr30k, coco)         :func:`retrieval_set`
ShareGPT4V, Urban  ``long_caption`` (sharegpt4v_1k, ...)  :func:`retrieval_set`
SugarCrepe         ``sugarcrepe`` (val2017, mini)         :func:`sugarcrepe_splits` → items per split
MMEB-eval          ``mmeb_eval`` (rows, images)           :func:`mmeb_eval_rows` → ``MmebRow`` lists
demo world         ``shapes_world`` (pairs, nli, ...)     the reader of the dataset it stands in for
=================  ====================================  ===========================================

Images come back as their files' original bytes (evaluation: hashable, and the embedding
cache's key of a file's bytes is the key of the file) or, for training pairs, as PIL images
over those bytes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from unime_jax.datasets import (
    base,
    coco_captions,
    karpathy,
    long_caption,
    mmeb_eval,
    mmeb_train,
    nli_simcse,
    shapes_world,
    sugarcrepe,
)
from unime_jax.datasets.mmeb_eval import rows as mmeb_eval_rows
from unime_jax.datasets.nli_simcse import corpus as nli_corpus
from unime_jax.datasets.retrieval import retrieval_set
from unime_jax.datasets.sugarcrepe import splits as sugarcrepe_splits
from unime_jax.files import locked

BUILDERS = (
    mmeb_train.MmebTrain,
    mmeb_eval.MmebEval,
    nli_simcse.NliSimcse,
    coco_captions.CocoCaptions,
    karpathy.Karpathy,
    long_caption.LongCaption,
    sugarcrepe.Sugarcrepe,
    shapes_world.ShapesWorld,
)


@dataclasses.dataclass(frozen=True)
class Ref:
    """A dataset named in a config or on a command line: ``name[/config][:split]``, e.g.
    ``mmeb_train/all``, ``nli_simcse``, ``shapes_world/nli:heldout``."""

    name: str
    config: str | None = None
    split: str | None = None

    @classmethod
    def parse(cls, text: str, *, flag: str = "dataset") -> Ref:
        from unime_jax.errors import UsageError

        body, _, split = str(text).strip().partition(":")
        name, _, config = body.partition("/")
        names = sorted(b.name for b in BUILDERS)
        if name not in names or "/" in config or (":" in split):
            raise UsageError(
                f"{flag}={text!r} does not name a dataset",
                f"write NAME[/CONFIG][:SPLIT] with NAME one of {names}, e.g. mmeb_train/all",
            )
        return cls(name, config or None, split or None)

    def __str__(self) -> str:
        config = f"/{self.config}" if self.config else ""
        return f"{self.name}{config}" + (f":{self.split}" if self.split else "")


def source(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    reads: Callable[[dict], Any] | None = None,
) -> base.Records:
    """Random access over a prepared split (``len``, ``[i]``; picklable, for
    ``grain.MapDataset.source``), in generation order. Items by feature spec: pairs →
    ``{"qry", "qry_image", "pos_text", "pos_image", "dataset", "row"}`` (images PIL or None, as
    :func:`unime_jax.data.pairs.normalize_record` takes them); sentences → ``(row_id,
    sentence)``; retrieval → ``{"image": bytes, "file_name", "captions"}``; SugarCrepe →
    ``SugarCrepeItem(bytes, caption, negative)``; MMEB-eval rows / images → dicts with image
    indices / image bytes. ``reads``: the item maker a caller expects (e.g.
    ``mmeb_train.item`` for pairs); another kind of dataset is then a usage error."""
    builder = base.prepared(name, data_dir=data_dir, config=config)
    convert, decoders = builder.reader()
    return base.open_split(builder, split, reads or convert, decoders)


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds a dataset unless it is prepared already (the Python form of ``tfds build``).

    Processes sharing a data directory (the hosts of a pod test, several runs on one machine)
    take turns through a lock file there: one builds, the others then find it prepared."""
    builder = tfds.builder_cls(name)(config=config, data_dir=data_dir)
    with base.quiet_variant_warnings():
        if builder.is_prepared():
            return builder
    with locked(Path(builder.data_dir_root) / f".{name}.lock"), base.quiet_variant_warnings():
        builder = tfds.builder_cls(name)(config=config, data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
            )
    return builder


__all__ = [
    "BUILDERS",
    "Ref",
    "mmeb_eval_rows",
    "nli_corpus",
    "prepare",
    "retrieval_set",
    "source",
    "sugarcrepe_splits",
]
