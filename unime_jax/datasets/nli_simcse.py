"""Stage-1 sentences: the SimCSE NLI CSV (or a one-sentence-per-line file), one example per
sentence as :func:`unime_jax.teacher.read_corpus` reads it, with the same row ids in the same
order, so the corpus checksum a teacher file was computed for matches the prepared split."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from unime_jax.datasets import base
from unime_jax.datasets.mmeb_rows import sha256
from unime_jax.errors import DataError
from unime_jax.teacher.corpus import Corpus, CorpusReport, corpus_checksum, read_corpus

FEATURES = tfds.features.FeaturesDict(
    {
        "id": tfds.features.Text(doc="row id: '<row>:<column>' (CSV) or '<line>' (text file)"),
        "sentence": tfds.features.Text(doc="the sentence, verbatim"),
    }
)
SIMCSE_FILE = "nli_for_simcse.csv"


class NliSimcse(base.Builder):
    """SimCSE's NLI triplets (sent0, sent1, hard_neg) as stage-1 sentences (split ``train``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release: read_corpus's rows, ids and report."
    }
    FEATURE_DIGESTS: ClassVar[dict[str, str]] = {"1.0.0": "d4c994cebae0ee29"}
    HOMEPAGE = "https://github.com/princeton-nlp/SimCSE"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download nli_for_simcse.csv (SimCSE's data/download_nli.sh, or
    https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse) into DIR, or put one
    other .csv (columns sent0, sent1, hard_neg) or .txt (one sentence per line) there alone.
    Pass DIR as --manual_dir.
    """

    def _features(self) -> tfds.features.FeaturesDict:
        return FEATURES

    def reader(self):
        return item, None

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", corpus_file(dl_manager.manual_dir))}

    def _generate_examples(self, split: str, path: Path):
        corpus = read_corpus(path, verbose=False)
        self.info.metadata[split] = corpus_metadata(corpus, sha256(path))
        return enumerate({"id": rid, "sentence": s} for rid, s in corpus)


def corpus_file(manual_dir) -> Path:
    """``nli_for_simcse.csv``, else the only .csv / .txt file of the manual dir."""
    root = Path(manual_dir)
    if (root / SIMCSE_FILE).is_file():
        return root / SIMCSE_FILE
    found = sorted(p for p in root.iterdir() if p.suffix.lower() in (".csv", ".txt"))
    if len(found) != 1:
        raise DataError(
            f"nli_simcse: {root} holds {len(found)} .csv/.txt files ({[p.name for p in found]}) "
            f"and no {SIMCSE_FILE}",
            NliSimcse.MANUAL_DOWNLOAD_INSTRUCTIONS.strip(),
        )
    return found[0]


def corpus_metadata(corpus: Corpus, source_sha256: str) -> dict[str, Any]:
    """What a split records about its corpus: read_corpus's report and the checksums."""
    return {
        "report": corpus.report.to_dict(),
        "corpus_sha256": corpus_checksum(corpus),
        "source_sha256": source_sha256,
    }


def item(record: dict[str, Any]) -> tuple[str, str]:
    """A TFDS record → ``(row_id, sentence)``, as :func:`read_corpus` gives it."""
    return base.text(record["id"]), base.text(record["sentence"])


def corpus(
    name: str = "nli_simcse",
    *,
    data_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    split: str = "train",
) -> Corpus:
    """The prepared sentences as a :class:`Corpus` (``[(row_id, sentence)]`` with its
    ``.report``), equal to ``read_corpus`` of the file it was built from; the checksum recorded
    at build time is checked."""
    builder = base.prepared(name, data_dir=data_dir, config=config)
    records = base.open_split(builder, split, item)
    out = Corpus(records)
    meta = builder.info.metadata[split]
    fields = {f.name for f in dataclasses.fields(CorpusReport)}
    out.report = CorpusReport(**{k: v for k, v in meta["report"].items() if k in fields})
    if corpus_checksum(out) != meta["corpus_sha256"]:
        raise DataError(
            f"{records.where}: the sentences do not match the checksum recorded when it was built",
            f"rebuild it: {base.build_command(builder)} --overwrite",
        )
    return out


def recorded(
    name: str = "nli_simcse",
    *,
    data_dir: str | os.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
    split: str = "train",
) -> dict[str, Any]:
    """What the build recorded about a split, without reading its sentences: ``report``
    (read_corpus's, as a dict), ``corpus_sha256`` (what a teacher manifest must match: pass it
    to :func:`unime_jax.teacher.load_teacher_embeddings`) and ``source_sha256`` (the file's)."""
    builder = base.prepared(name, data_dir=data_dir, config=config)
    base.check_reads(builder, item)
    return dict(builder.info.metadata[split])
