"""MMEB-train (stage 2): query/target pairs of the 20 MMEB training datasets, validated row by row.

Every row goes through the checks of :mod:`unime_jax.datasets.mmeb_rows` (malformed
lines, empty sides, placeholder/image mismatches, images outside the root, missing, empty or
undecodable images); a bad row is never written and is listed in ``conversion_report.json``
beside the prepared data, under the first check it fails. Only the first
``max_rows_per_dataset`` rows of each dataset are read (the paper's first ≤50K). Text length is
not checked here: it depends on the backbone's tokenizer, and training skips (and counts) a row
that does not fit its lengths. With Apache Beam installed the rows are validated and encoded
in a Beam pipeline (:mod:`unime_jax.datasets.beam`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from unime_jax.datasets import base, beam, mmeb_rows
from unime_jax.errors import DataError
from unime_jax.eval.mmeb_eval import MMEB_IND, canonical_mmeb_name

log = logging.getLogger(__name__)

REPORT = mmeb_rows.REPORT  # conversion_report.json: mmeb_rows.ConversionReport
INPUT_SUFFIXES = (".parquet", ".jsonl")
FEATURES = tfds.features.FeaturesDict(
    {
        "qry": tfds.features.Text(doc="query instruction; <|image_1|> marks the query image"),
        "qry_image": base.optional_image_feature("the query image (0 or 1): the file's bytes"),
        "qry_image_path": tfds.features.Text(doc="its path under the image root ('' = none)"),
        "pos_text": tfds.features.Text(doc="target instruction; <|image_1|> marks its image"),
        "pos_image": base.optional_image_feature("the target image (0 or 1): the file's bytes"),
        "pos_image_path": tfds.features.Text(doc="its path under the image root ('' = none)"),
        "dataset": tfds.features.Text(doc="the MMEB training dataset (folder, column or file)"),
        "row": tfds.features.Scalar(np.int64, doc="0-based row number within its dataset"),
    }
)
DECODERS = {"qry_image": base.RawBytes(), "pos_image": base.RawBytes()}


def config_name(dataset: str) -> str:
    return re.sub(r"\W", "_", dataset).lower()


@dataclasses.dataclass(eq=False, kw_only=True)
class MmebTrainConfig(tfds.core.BuilderConfig):
    subset: str = ""  # an MMEB dataset name (canonical spelling); "" = all of them
    variant: str = "original"  # which files of a <Subset>/ folder: <variant>-*.parquet|jsonl
    max_rows_per_dataset: int = 50_000


class MmebTrain(base.Builder):
    """MMEB-train query/target pairs (stage 2 of UniME), validated; one config per dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release: rows validated by mmeb_rows, images as file bytes."
    }
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {"1.0.0": "1f3411275f9cd550"}
    HOMEPAGE = "https://huggingface.co/datasets/TIGER-Lab/MMEB-train"
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        MmebTrainConfig(name="all", description="all 20 training datasets"),
        *(
            MmebTrainConfig(name=config_name(d), subset=d, description=f"MMEB-train {d}")
            for d in sorted(MMEB_IND)
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download MMEB-train (https://huggingface.co/datasets/TIGER-Lab/MMEB-train), e.g.
    `huggingface-cli download TIGER-Lab/MMEB-train --repo-type dataset --local-dir DIR`, and
    unzip its images inside DIR so that DIR/<qry_image_path> and DIR/<pos_image_path> of the
    rows exist. Pass DIR as --manual_dir. Row files are read from DIR/<Dataset>/<variant>-*
    (.parquet or .jsonl; variant `original` by default) and from DIR/*.parquet|*.jsonl (the
    dataset is then the `dataset` column, else the file's stem).
    """

    def _features(self) -> tfds.features.FeaturesDict:
        return FEATURES

    def reader(self):
        return item, DECODERS

    def _split_generators(self, dl_manager):
        root = self.manual_path(dl_manager, is_dir=True)
        files = input_files(root, self.builder_config)
        if not files:
            raise DataError(
                f"{self.info.full_name}: no row files in {root}",
                self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip(),
            )
        return {"train": self._generate_examples(root, files)}

    def _generate_examples(self, root: Path, files: list[tuple[Path, str]]):
        cfg = self.builder_config
        report = mmeb_rows.ConversionReport()
        sources: list[dict[str, Any]] = []
        rows = mmeb_rows.numbered_rows(
            [p for p, _ in files],
            cfg.max_rows_per_dataset,
            report,
            sources,
            names=[n for _, n in files],
            keep=keep_fn(cfg.subset),
        )
        if beam.available():
            return beam.validated_examples(
                list(rows), root, report, sources, self.data_path / REPORT
            )
        return self._examples(rows, root, report, sources)

    def _examples(self, rows, root: Path, report: mmeb_rows.ConversionReport, sources: list):
        validator = mmeb_rows.Validator(root)
        for key, record in enumerate(mmeb_rows.validated_records(rows, validator, report)):
            yield key, example(record, root)
        self.write_json(REPORT, report.to_dict() | {"sources": sources})
        log.info("%s\n%s", self.info.full_name, report.table())


def keep_fn(subset: str):
    """The dataset-name filter of a config (None = every dataset)."""
    if not subset:
        return None
    want = canonical_mmeb_name(subset)
    return lambda name: canonical_mmeb_name(name) == want


def input_files(root: Path, cfg: MmebTrainConfig) -> list[tuple[Path, str]]:
    """``(file, default dataset name)``: top-level row files (named by their stem), then each
    ``<Dataset>/<variant>-*`` file (named by its folder), in sorted order."""
    files = [(p, p.stem) for p in sorted(root.iterdir()) if p.suffix in INPUT_SUFFIXES]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if cfg.subset and canonical_mmeb_name(folder.name) != canonical_mmeb_name(cfg.subset):
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in INPUT_SUFFIXES and path.stem.startswith(cfg.variant):
                files.append((path, folder.name))
    return files


def example(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """A validated record (image paths relative to ``root``) → its TFDS example."""

    def image(rel: str) -> list[bytes]:
        return [(root / rel).read_bytes()] if rel else []

    return {
        **record,
        "qry_image": image(record["qry_image_path"]),
        "pos_image": image(record["pos_image_path"]),
    }


def item(record: dict[str, Any]) -> dict[str, Any]:
    """A TFDS record → the dict :func:`unime_jax.data.pairs.normalize_record` takes (PIL images)."""

    def image(images: list[bytes]):
        return base.decode_image(images[0]) if len(images) else None

    return {
        "qry": base.text(record["qry"]),
        "qry_image": image(record["qry_image"]),
        "pos_text": base.text(record["pos_text"]),
        "pos_image": image(record["pos_image"]),
        "dataset": base.text(record["dataset"]),
        "row": int(record["row"]),
    }


def report(*, data_dir: str | os.PathLike | None = None, config: str = "all") -> dict[str, Any]:
    """The build's ``conversion_report.json``: counts per reason / dataset, bad row ids, sources."""
    return base.read_json(base.prepared("mmeb_train", data_dir=data_dir, config=config), REPORT)
