"""Evaluation protocols (spec §4) over any encoder with the :class:`~unime_jax.embedder.Embedder`
methods ``embed_texts(texts)``, ``embed_images(images)`` and ``embed_instructions(texts,
images)``, each returning L2-normalised ``(N, D)`` arrays. Evaluators embed every distinct
input once and return plain dicts (percentages).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Protocol

import numpy as np

from unime_jax.eval import metrics
from unime_jax.eval.cache import EmbeddingCache, with_cache
from unime_jax.eval.datasets import RetrievalSet
from unime_jax.eval.mmeb_eval import (
    MMEB_DATASETS,
    MMEB_META_TASKS,
    UNKNOWN,
    MmebRow,
    canonical_mmeb_name,
    mmeb_meta_task,
    mmeb_split,
)


class Encoder(Protocol):
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_images(self, images: Sequence) -> np.ndarray: ...

    def embed_instructions(
        self, texts: Sequence[str], images: Sequence | None = None
    ) -> np.ndarray: ...


def _unique(items: Sequence[Hashable]) -> tuple[list, np.ndarray]:
    """Distinct items in first-seen order, and each item's index into them."""
    index: dict = {}
    where = np.array([index.setdefault(x, len(index)) for x in items], dtype=np.int64)
    return list(index), where


def _embed(fn, inputs: list, *args) -> np.ndarray:
    emb = np.asarray(fn(inputs, *args), np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(inputs):
        raise ValueError(f"encoder returned shape {emb.shape} for {len(inputs)} inputs")
    return emb


def evaluate_retrieval(
    encoder: Encoder,
    dataset: RetrievalSet,
    ks: Sequence[int] = (1, 5, 10),
    *,
    cache: EmbeddingCache | None = None,
) -> dict:
    """Text→image and image→text R@k (%): captions via ``embed_texts``, images via
    ``embed_images``, each distinct caption / image embedded once. An image query is correct if
    any of its captions is in its top k; ties count against the query (see
    :func:`metrics.recall_at_k`). Also returns ``num_images`` and ``num_captions``. With a
    ``cache``, embeddings are looked up there first and new ones stored."""
    if not dataset.captions:
        raise ValueError("the retrieval set has no captions")
    encoder = with_cache(encoder, cache)
    texts, text_index = _unique(dataset.captions)
    images, image_index = _unique(dataset.image_paths)
    text_emb = _embed(encoder.embed_texts, texts)[text_index]
    image_emb = _embed(encoder.embed_images, images)[image_index]
    out = metrics.image_text_retrieval(text_emb, image_emb, dataset.image_for_caption, ks)
    return out | {"num_images": len(dataset.image_paths), "num_captions": len(dataset.captions)}


def evaluate_sugarcrepe(
    encoder: Encoder,
    splits: Mapping[str, Sequence[Sequence[str]]],
    *,
    cache: EmbeddingCache | None = None,
) -> dict:
    """SugarCrepe accuracy (%) per split plus the Replace/Swap/Add means of the splits present
    (:func:`metrics.sugarcrepe_summary`). ``splits`` maps a split name to ``(image, caption,
    negative)`` items. An item is correct iff cos(image, caption) > cos(image, negative), so a
    tie is wrong. Each distinct image and caption (positive or negative, across all splits) is
    embedded once. ``num_items`` gives the item count per split. ``cache`` as in
    :func:`evaluate_retrieval`."""
    encoder = with_cache(encoder, cache)
    items = [(s, item) for s, split_items in splits.items() for item in split_items]
    empty = [s for s, split_items in splits.items() if not split_items]
    if empty:
        raise ValueError(f"SugarCrepe split(s) without items: {empty}")
    images, image_index = _unique([it[0] for _, it in items])
    texts, text_index = _unique([t for _, it in items for t in (it[1], it[2])])
    image_emb = _embed(encoder.embed_images, images)[image_index]
    text_emb = _embed(encoder.embed_texts, texts)[text_index]
    pos_emb, neg_emb = text_emb[0::2], text_emb[1::2]
    split_of = np.array([s for s, _ in items])
    accuracy = {
        s: metrics.compositional_accuracy(
            image_emb[split_of == s], pos_emb[split_of == s], neg_emb[split_of == s]
        )
        for s in splits
    }
    return metrics.sugarcrepe_summary(accuracy) | {
        "num_items": {s: len(v) for s, v in splits.items()}
    }


def mmeb_precision_at_1(query_emb: np.ndarray, candidate_emb: np.ndarray) -> bool:
    """Whether candidate 0 (the ground truth) is the strict, unique argmax of the query's
    scores over its own candidates; a tie with another candidate counts as wrong."""
    scores = candidate_emb.astype(np.float64) @ query_emb.astype(np.float64)
    return bool(scores.shape[0] == 1 or scores[0] > scores[1:].max())


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def evaluate_mmeb(
    encoder: Encoder,
    rows_by_dataset: Mapping[str, Sequence[MmebRow]],
    *,
    cache: EmbeddingCache | None = None,
) -> dict:
    """MMEB Precision@1 (%) per dataset and aggregated.

    Queries and candidates go through ``embed_instructions`` (texts verbatim, image per input
    or ``None``); each distinct ``(text, image)`` input of a dataset is embedded once, whether it
    is a query or a candidate. A row is correct iff candidate 0 scores strictly higher than every
    other candidate of that row (ties are wrong, so a constant encoder scores 0, not 100).

    Returns::

        per_dataset        {dataset: P@1}                    every dataset given
        num_rows           {dataset: rows}
        meta_task          {classification|vqa|retrieval|grounding: mean P@1 of its datasets}
        IND, OOD           mean P@1 over the IND (20 training sets) / OOD datasets present
        overall_datasets   mean over the known MMEB datasets present ("mean over 36")
        overall_meta       mean of the meta-task means present ("mean of 4 meta-tasks")
        unknown_datasets   names outside the 36 (reported per dataset, left out of every
                           aggregate so aggregates stay comparable with MMEB numbers)
        missing_datasets   MMEB datasets not given (aggregates are then partial)

    An aggregate whose group is empty is ``None``. Dataset names are canonicalised
    (``imagenet_1k`` → ``ImageNet-1K``). ``cache`` as in :func:`evaluate_retrieval`.
    """
    encoder = with_cache(encoder, cache)
    per_dataset: dict[str, float] = {}
    num_rows: dict[str, int] = {}
    for raw_name, rows in rows_by_dataset.items():
        name = canonical_mmeb_name(raw_name)
        if name in per_dataset:
            raise ValueError(f"dataset {name!r} given twice (as {raw_name!r})")
        if not rows:
            raise ValueError(f"dataset {raw_name!r} has no rows")
        inputs = []
        for r in rows:
            if len(r.tgt_texts) != len(r.tgt_images) or not r.tgt_texts:
                raise ValueError(f"{raw_name} row {r.row}: candidate texts/images do not match")
            inputs.append((r.qry_text, r.qry_image))
            inputs += list(zip(r.tgt_texts, r.tgt_images))
        unique, index = _unique(inputs)
        emb = _embed(encoder.embed_instructions, [t for t, _ in unique], [im for _, im in unique])[
            index
        ]
        correct, start = [], 0
        for r in rows:
            n = len(r.tgt_texts)
            correct.append(mmeb_precision_at_1(emb[start], emb[start + 1 : start + 1 + n]))
            start += 1 + n
        per_dataset[name] = float(np.mean(correct) * 100)
        num_rows[name] = len(rows)
    known = {d: v for d, v in per_dataset.items() if mmeb_meta_task(d) != UNKNOWN}
    meta = {
        task: _mean(v for d, v in known.items() if d in names)
        for task, names in MMEB_META_TASKS.items()
    }
    meta = {task: v for task, v in meta.items() if v is not None}
    return {
        "per_dataset": per_dataset,
        "num_rows": num_rows,
        "meta_task": meta,
        "IND": _mean(v for d, v in known.items() if mmeb_split(d) == "IND"),
        "OOD": _mean(v for d, v in known.items() if mmeb_split(d) == "OOD"),
        "overall_datasets": _mean(known.values()),
        "overall_meta": _mean(meta.values()),
        "unknown_datasets": sorted(set(per_dataset) - set(known)),
        "missing_datasets": [d for d in MMEB_DATASETS if d not in per_dataset],
    }
