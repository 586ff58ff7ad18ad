"""Stage-1 sentences with their teacher embeddings → fixed-shape host batches.

A stage-1 row is one sentence of the corpus (SimCSE NLI CSV: every non-empty ``sent0``,
``sent1``, ``hard_neg`` cell; see :func:`unime_jax.teacher.read_corpus`) together with the
teacher's precomputed, L2-normalised vector for it. :class:`SentenceTransform` turns a row into::

    text_input_ids       (L,)   int32     chat template around "{sentence}\\nSummary above ..."
    text_attention_mask  (L,)   int32
    teacher              (Dt,)  float32   the teacher vector (Dt may differ from the LLM's D)

The sentence is truncated to ``max_sentence_tokens`` (32, as in E5-V) *before* the prompt is
built, so the template's closing tokens always survive. Batching, shuffling, per-host slicing,
resumable state and skip accounting are the stage-2 pipeline's
(:func:`unime_jax.data.pipeline.make_batch_iterator`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from unime_jax import teacher as teacher_store
from unime_jax.data.pipeline import SKIP_KEY
from unime_jax.processing import Processor

SIDE = "text"


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

    @property
    def teacher_dim(self) -> int:
        return int(self.teacher.shape[1])


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
        raise type(e)(
            f"{e}\nThe teacher embeddings in {teacher_dir} do not belong to {corpus_path}: "
            f"rerun `python -m unime_jax.teacher --corpus {corpus_path} --out NEW_DIR` and point "
            "--config.teacher_dir at it."
        ) from e
    return SentenceSource(corpus, vectors)


def truncate(tokenizer, sentence: str, max_tokens: int) -> str:
    """The sentence cut to its first ``max_tokens`` tokens (unchanged when shorter)."""
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return sentence
    return tokenizer.decode(ids[:max_tokens])


class SentenceTransform(grain.transforms.Map):
    """One stage-1 row → fixed-shape arrays (module doc), or a skip marker."""

    def __init__(self, processor: Processor, *, length: int, max_sentence_tokens: int = 32):
        self.processor = processor
        self.length = length
        self.max_sentence_tokens = max_sentence_tokens

    def prompt(self, sentence: str) -> str:
        p = self.processor
        return p.text_prompt(truncate(p.tokenizer, sentence, self.max_sentence_tokens))

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        try:
            batch = self.processor([self.prompt(record["sentence"])], max_length=self.length)
        except ValueError as e:  # the template plus 32 tokens does not fit `length`
            return {SKIP_KEY: "too_long", "id": record["id"], "detail": str(e)}
        return {
            f"{SIDE}_input_ids": batch["input_ids"][0],
            f"{SIDE}_attention_mask": batch["attention_mask"][0],
            "teacher": np.asarray(record["teacher"], np.float32),
        }
