"""What the image–text retrieval builders share (COCO captions, Flickr30K / COCO Karpathy,
ShareGPT4V-1K / Urban1K, the shapes world's held-out set): one example per image with its
captions, and the reader that gives back the :class:`~unime_jax.eval.datasets.RetrievalSet`
the evaluators take, images as their files' bytes.

The loaders of :mod:`unime_jax.eval.datasets` parse and check the files (all problems of a
file are reported together and stop the build); images without captions are left out there and
named in the split's metadata (``excluded``), as ``RetrievalSet.excluded``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from unime_jax.datasets import base, beam
from unime_jax.eval.datasets import RetrievalSet

FEATURES = tfds.features.FeaturesDict(
    {
        "image": base.image_feature(),
        "file_name": tfds.features.Text(doc="the image's path under the image folder"),
        "captions": tfds.features.Sequence(
            tfds.features.Text(), doc="its captions, in annotation order"
        ),
    }
)
DECODERS = {"image": base.RawBytes()}


class RetrievalBuilder(base.Builder, skip_registration=True):
    """What the retrieval builders share: their features (:data:`FEATURES`, digest
    ``dc48270a9d7161fa`` at 1.0.0), their reader and the examples of a loaded set."""

    def _features(self) -> tfds.features.FeaturesDict:
        return FEATURES

    def reader(self):
        return item, DECODERS

    def _generate_examples(self, split: str, dataset: RetrievalSet, image_dir):
        return generate(self, split, dataset, image_dir)


def generate(builder: base.Builder, split: str, dataset: RetrievalSet, image_dir: str | Path):
    """The examples of a loaded set, in its image order (a Beam transform where Beam is
    installed); records the loader's source and exclusions in the split's metadata."""
    captions: list[list[str]] = [[] for _ in dataset.image_paths]
    for caption, i in zip(dataset.captions, dataset.image_for_caption):
        captions[i].append(caption)
    items = [
        (path, os.path.relpath(path, image_dir), caps)
        for path, caps in zip(dataset.image_paths, captions)
    ]
    builder.info.metadata[split] = {"source": dataset.source, "excluded": dataset.excluded}
    if beam.available():
        return beam.keyed_examples(items, example)
    return enumerate(example(x) for x in items)


def example(item: tuple[Any, str, list[str]]) -> dict[str, Any]:
    """``(image, file name, captions)`` → an example; the image is a path (TFDS stores the
    file's bytes as they are) or already encoded bytes, checked to decode."""
    image, file_name, captions = item
    image = base.checked_image(image, file_name)
    return {"image": image, "file_name": file_name, "captions": captions}


def item(record: dict[str, Any]) -> dict[str, Any]:
    """A TFDS record → ``{"image": bytes, "file_name": str, "captions": [str]}``."""
    return {
        "image": record["image"],
        "file_name": base.text(record["file_name"]),
        "captions": [base.text(c) for c in record["captions"]],
    }


def load(
    builder: tfds.core.DatasetBuilder, split: str, max_images: int | None = None
) -> RetrievalSet:
    """A prepared split as a :class:`RetrievalSet` whose ``image_paths`` are image bytes (the
    first ``max_images`` images, as the loaders' ``max_images``)."""
    records = base.open_split(builder, split, item, DECODERS)
    n = len(records) if max_images is None else min(max_images, len(records))
    images, captions, image_for_caption = [], [], []
    for i, x in enumerate(records._getitems(range(n))):
        images.append(x["image"])
        captions += x["captions"]
        image_for_caption += [i] * len(x["captions"])
    meta = builder.info.metadata.get(split, {})
    return RetrievalSet(
        images,
        captions,
        image_for_caption,
        source=meta.get("source", records.where),
        excluded=list(meta.get("excluded", [])),
    )


def retrieval_set(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    split: str = "test",
    max_images: int | None = None,
) -> RetrievalSet:
    """A prepared retrieval set (``coco_captions``, ``karpathy``, ``long_caption`` or
    ``shapes_world`` with the ``retrieval`` config) for :func:`evaluate_retrieval`."""
    return load(base.prepared(name, data_dir=data_dir, config=config), split, max_images)
