"""Stage-1 sentences with their teacher embeddings → one :class:`Example` and a teacher vector.

A stage-1 row is one sentence of a prepared sentence dataset (``nli_simcse``: every non-empty
``sent0``, ``sent1``, ``hard_neg`` cell of SimCSE's NLI CSV, in the order
:func:`unime_jax.teacher.read_corpus` gives them) together with the teacher's precomputed,
L2-normalised vector for it. The sentence is truncated to
``max_sentence_tokens`` (32, as in E5-V) *before* the prompt is built, so the template's closing
tokens always survive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from unime_jax import teacher as teacher_store
from unime_jax.data.pipeline import skip
from unime_jax.errors import DataError
from unime_jax.preprocess.processor import Processor
from unime_jax.preprocess.text import truncate

log = logging.getLogger(__name__)

SIDE = "text"
REASONS = ("too_long",)


class SentenceSource(Sequence):
    """Random access over ``(row_id, sentence)`` rows and their teacher vectors (a memmap, so a
    273K × 4096 teacher file is paged in row by row, never loaded whole); ``rows`` selects the
    usable ones (all by default)."""

    def __init__(
        self,
        corpus: Sequence[tuple[str, str]],
        teacher: np.ndarray,
        rows: Sequence[int] | None = None,
    ):
        if len(corpus) != len(teacher):
            raise ValueError(f"{len(corpus)} sentences but {len(teacher)} teacher vectors")
        self.corpus = corpus
        self.teacher = teacher
        self.rows = np.arange(len(corpus)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(self.rows[index])
        row_id, sentence = self.corpus[i]
        return {"id": row_id, "sentence": sentence, "teacher": self.teacher[i]}


def bad_teacher_rows(vectors: np.ndarray, block: int = 65536) -> np.ndarray:
    """Indices of teacher vectors that are non-finite or zero (read block by block)."""
    bad = []
    for start in range(0, len(vectors), block):
        part = np.asarray(vectors[start : start + block], np.float32)
        ok = np.isfinite(part).all(axis=1) & (np.abs(part).sum(axis=1) > 0)
        bad.append(start + np.flatnonzero(~ok))
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def open_sentences(
    corpus: Sequence[tuple[str, str]],
    checksum: str,
    teacher_dir: str | os.PathLike,
    bad_rows: str = "error",
    *,
    name: str = "the corpus",
) -> SentenceSource:
    """``(row_id, sentence)`` rows (a prepared split, random access) and their teacher
    embeddings, refusing a teacher file written for another corpus.

    ``teacher_dir`` is the output of ``python -m unime_jax.teacher --dataset NAME --out DIR``;
    its manifest's corpus checksum must be ``checksum`` (recorded when the dataset was built).
    Teacher vectors that are non-finite or zero are an error naming their rows
    (``bad_rows="error"``) or are left out, counted and logged (``"skip"``): never trained on.
    """
    try:
        vectors = teacher_store.load_teacher_embeddings(teacher_dir, checksum)
        if len(vectors) != len(corpus):
            raise ValueError(f"{len(vectors)} teacher vectors for {len(corpus)} sentences")
    except (ValueError, FileNotFoundError) as e:
        raise DataError(
            f"{e}\nThe teacher embeddings in {teacher_dir} do not belong to {name}",
            f"rerun `python -m unime_jax.teacher --dataset {name} --out NEW_DIR` and point "
            "--config.teacher_dir at it",
        ) from e
    bad = bad_teacher_rows(vectors)
    if bad.size and bad_rows != "skip":
        ids = [corpus[i][0] for i in bad[:10]]
        raise DataError(
            f"{bad.size} teacher vector(s) in {teacher_dir} are non-finite or zero: rows {ids}"
            + (" ..." if bad.size > 10 else ""),
            f"recompute the teacher (`python -m unime_jax.teacher --dataset {name} --out "
            "NEW_DIR`), or leave those rows out with --config.teacher_bad_rows=skip",
        )
    if bad.size:
        log.warning(
            "leaving out %d sentence(s) whose teacher vector is non-finite or zero: %s",
            bad.size,
            [corpus[i][0] for i in bad[:10]],
        )
    return SentenceSource(corpus, vectors, np.setdiff1d(np.arange(len(corpus)), bad))


class SentenceTransform(grain.transforms.Map):
    """One stage-1 row → ``{"text": Example, "teacher": vector}``, or a skip marker."""

    def __init__(self, processor: Processor, *, length: int, max_sentence_tokens: int = 32):
        self.processor = processor
        self.length = length
        self.max_sentence_tokens = max_sentence_tokens

    def prompt(self, sentence: str) -> str:
        p = self.processor
        return p.text_prompt(truncate(p.tokenizer, sentence, self.max_sentence_tokens))

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        example = self.processor.encode(self.prompt(record["sentence"]))
        if len(example) > self.length:  # the template plus 32 tokens does not fit `length`
            return skip("too_long", record["id"], f"{len(example)} > {self.length} tokens")
        return {SIDE: example, "teacher": np.asarray(record["teacher"], np.float32)}
