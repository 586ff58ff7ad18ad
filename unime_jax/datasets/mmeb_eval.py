"""MMEB-eval: the 36 evaluation datasets (a query and its candidates; candidate 0 is the ground
truth), parsed and checked by :func:`unime_jax.eval.mmeb_eval.load_mmeb`.

Candidates repeat across rows (a text→image dataset ranks the same images for every query), so
each image is stored once: config ``rows`` holds queries and candidates with image *indices*,
config ``images`` each dataset's distinct images (sorted by path; the index is the record). Both
have one split per dataset and are built together (``python -m unime_jax.datasets build
mmeb_eval`` builds every config); :func:`rows` joins them back into the
:class:`~unime_jax.eval.mmeb_eval.MmebRow` lists the evaluator takes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from unime_jax.datasets import base
from unime_jax.errors import DataError
from unime_jax.eval.mmeb_eval import MmebRow, canonical_mmeb_name, load_mmeb

NO_IMAGE = -1
ROW_FEATURES = tfds.features.FeaturesDict(
    {
        "dataset": tfds.features.Text(doc="the MMEB dataset (canonical spelling)"),
        "row": tfds.features.Scalar(np.int64, doc="source row (1-based line for JSONL)"),
        "qry_text": tfds.features.Text(doc="query instruction; <|image_1|> marks its image"),
        "qry_image": tfds.features.Scalar(np.int64, doc="image index in `images`, -1 = none"),
        "tgt_text": tfds.features.Sequence(
            tfds.features.Text(), doc="candidate texts; candidate 0 is the ground truth"
        ),
        "tgt_image": tfds.features.Sequence(
            tfds.features.Scalar(np.int64), doc="candidate image indices, -1 = none"
        ),
    }
)
IMAGE_FEATURES = tfds.features.FeaturesDict(
    {
        "image": base.image_feature(),
        "file_name": tfds.features.Text(doc="the image's path under the image root"),
    }
)
DECODERS = {"image": base.RawBytes()}


def split_name(dataset: str) -> str:
    return re.sub(r"\W", "_", dataset)


class MmebEval(base.Builder):
    """MMEB-eval's 36 datasets: queries with candidates (``rows``) and their images
    (``images``), one split per dataset."""

    BUILD_ALL_CONFIGS = True  # rows and images are read together: build both

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release: images stored once."}
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {
        "1.0.0/rows": "862d0c0212cb1970",
        "1.0.0/images": "559fc67b4c2221b5",
    }
    HOMEPAGE = "https://huggingface.co/datasets/TIGER-Lab/MMEB-eval"
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="rows", description="queries and candidates"),
        tfds.core.BuilderConfig(name="images", description="each dataset's distinct images"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download MMEB-eval (https://huggingface.co/datasets/TIGER-Lab/MMEB-eval), e.g.
    `huggingface-cli download TIGER-Lab/MMEB-eval --repo-type dataset --local-dir DIR`, and
    unzip its images inside DIR so that DIR/<qry_img_path> and DIR/<tgt_img_path> of the rows
    exist. Row files (.parquet / .jsonl) are found anywhere under DIR; a file's dataset is its
    stem, or its folder for HF shards (ImageNet-1K/test-00000-of-00001.parquet). Pass DIR as
    --manual_dir; build both configs (building without --config does).
    """

    def _spec_key(self) -> str:
        return f"{self.VERSION}/{self.builder_config.name}"

    def _features(self) -> tfds.features.FeaturesDict:
        return ROW_FEATURES if self.builder_config.name == "rows" else IMAGE_FEATURES

    def reader(self):
        if self.builder_config.name == "rows":
            return row_item, None
        return image_item, DECODERS

    def _split_generators(self, dl_manager):
        root = self.manual_path(dl_manager, is_dir=True)
        out = {}
        for name, rows in load_mmeb(root, root).items():
            split = split_name(name)
            if split in out:
                raise DataError(
                    f"mmeb_eval: datasets {self.info.metadata[split]['dataset']!r} and {name!r} "
                    f"both make split {split!r}",
                    "rename one of the files (or folders)",
                )
            images = sorted({p for r in rows for p in (r.qry_image, *r.tgt_images) if p})
            names = [os.path.relpath(p, root) for p in images]
            digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
            self.info.metadata[split] = {"dataset": name, "images_sha256": digest}
            out[split] = self._generate_examples(rows, images, names)
        return out

    def _generate_examples(self, rows: list[MmebRow], images: list[str], names: list[str]):
        if self.builder_config.name == "images":
            return enumerate(
                {"image": base.checked_image(p, n), "file_name": n} for p, n in zip(images, names)
            )
        index = {p: i for i, p in enumerate(images)}
        return enumerate(
            {
                "dataset": r.dataset,
                "row": r.row,
                "qry_text": r.qry_text,
                "qry_image": index[r.qry_image] if r.qry_image else NO_IMAGE,
                "tgt_text": list(r.tgt_texts),
                "tgt_image": [index[p] if p else NO_IMAGE for p in r.tgt_images],
            }
            for r in rows
        )


def row_item(record: dict[str, Any]) -> dict[str, Any]:
    """A ``rows`` record → ``{"dataset", "row", "qry_text", "qry_image", "tgt_text",
    "tgt_image"}`` (image indices, -1 = none)."""
    return {
        "dataset": base.text(record["dataset"]),
        "row": int(record["row"]),
        "qry_text": base.text(record["qry_text"]),
        "qry_image": int(record["qry_image"]),
        "tgt_text": tuple(base.text(t) for t in record["tgt_text"]),
        "tgt_image": tuple(int(i) for i in record["tgt_image"]),
    }


def image_item(record: dict[str, Any]) -> bytes:
    return record["image"]


def rows(
    *,
    data_dir: str | os.PathLike | None = None,
    datasets: Iterable[str] | None = None,
    max_rows: int | None = None,
) -> dict[str, list[MmebRow]]:
    """``{dataset: rows}`` (the first ``max_rows`` of each; ``datasets`` selects by name) with
    images as bytes, each distinct image read once, for :func:`evaluate_mmeb`."""
    row_builder = base.prepared("mmeb_eval", data_dir=data_dir, config="rows")
    image_builder = base.prepared("mmeb_eval", data_dir=data_dir, config="images")
    wanted = None if datasets is None else {canonical_mmeb_name(d) for d in datasets}
    out = {}
    for split, meta in row_builder.info.metadata.items():
        if wanted is not None and canonical_mmeb_name(meta["dataset"]) not in wanted:
            continue
        if image_builder.info.metadata.get(split) != meta:
            raise DataError(
                f"mmeb_eval: the rows and images of {meta['dataset']} in "
                f"{row_builder.data_dir_root} were built from different files",
                f"rebuild both: {base.build_command(row_builder)}",
            )
        records = base.open_split(row_builder, split, row_item)
        n = len(records) if max_rows is None else min(max_rows, len(records))
        items = records._getitems(range(n))
        needed = sorted({i for x in items for i in (x["qry_image"], *x["tgt_image"]) if i >= 0})
        images = base.open_split(image_builder, split, image_item, DECODERS)
        data = dict(zip(needed, images._getitems(needed))) | {NO_IMAGE: None}
        out[meta["dataset"]] = [
            MmebRow(
                x["dataset"],
                x["row"],
                x["qry_text"],
                data[x["qry_image"]],
                x["tgt_text"],
                tuple(data[i] for i in x["tgt_image"]),
            )
            for x in items
        ]
    if wanted is not None and (missing := wanted - {canonical_mmeb_name(d) for d in out}):
        raise DataError(
            f"mmeb_eval in {row_builder.data_dir_root} has no {sorted(missing)}",
            f"use some of {sorted(m['dataset'] for m in row_builder.info.metadata.values())}",
        )
    return out
