"""Stage-1 sentences with their teacher embeddings → one :class:`Example` and a teacher vector.

A stage-1 row is one sentence of the corpus (SimCSE NLI CSV: every non-empty ``sent0``,
``sent1``, ``hard_neg`` cell; see :func:`unime_jax.teacher.read_corpus`) together with the
teacher's precomputed, L2-normalised vector for it. The sentence is truncated to
``max_sentence_tokens`` (32, as in E5-V) *before* the prompt is built, so the template's closing
tokens always survive.
"""

from __future__ import annotations

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

SIDE = "text"
REASONS = ("too_long",)


class SentenceSource(Sequence):
    """Random access over ``(row_id, sentence)`` rows and their teacher vectors (a memmap, so a
    273K × 4096 teacher file is paged in row by row, never loaded whole)."""

    def __init__(self, corpus: Sequence[tuple[str, str]], teacher: np.ndarray):
        if len(corpus) != len(teacher):
            raise ValueError(f"{len(corpus)} sentences but {len(teacher)} teacher vectors")
        self.corpus = corpus
        self.teacher = teacher

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_id, sentence = self.corpus[index]
        return {"id": row_id, "sentence": sentence, "teacher": self.teacher[index]}


def open_sentences(
    corpus_path: str | os.PathLike, teacher_dir: str | os.PathLike
) -> SentenceSource:
    """The corpus and its teacher embeddings, refusing a teacher file written for another corpus.

    ``teacher_dir`` is the output of ``python -m unime_jax.teacher --corpus CORPUS --out DIR``;
    its manifest's row count and corpus checksum must match ``corpus_path`` as read now.
    """
    corpus = teacher_store.read_corpus(corpus_path, verbose=False)
    try:
        vectors = teacher_store.load_teacher_embeddings(teacher_dir, corpus)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(
            f"{e}\nThe teacher embeddings in {teacher_dir} do not belong to {corpus_path}",
            f"rerun `python -m unime_jax.teacher --corpus {corpus_path} --out NEW_DIR` and point "
            "--config.teacher_dir at it",
        ) from e
    return SentenceSource(corpus, vectors)


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
