"""Retrieval and compositional metrics on embedding matrices (numpy, exact)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The 7 SugarCrepe splits, in the paper's order, and the groups it reports.
SUGARCREPE_SPLITS = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
)
SUGARCREPE_GROUPS = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}


def recall_at_k(
    scores: np.ndarray, positives: Sequence[Sequence[int]], ks=(1, 5, 10)
) -> dict[int, float]:
    """Share of queries (rows of ``scores``) with any positive candidate in their top k, in %.

    Ties with negatives are broken against the query (a constant model scores chance, not
    100%); ties among the query's own positives do not count against it.
    """
    scores = np.asarray(scores, np.float64)
    if scores.shape[0] != len(positives):
        raise ValueError(f"{scores.shape[0]} queries but {len(positives)} positive lists")
    rank = np.empty(scores.shape[0])
    for i, pos in enumerate(positives):
        if len(pos) == 0:
            raise ValueError(f"query {i} has no positive candidate")
        best = scores[i, list(pos)].max()
        negatives = np.ones(scores.shape[1], bool)
        negatives[list(pos)] = False
        rank[i] = np.sum(scores[i] > best) + np.sum(scores[i, negatives] == best)
    return {k: float(np.mean(rank < k) * 100) for k in ks}


def image_text_retrieval(
    text_emb: np.ndarray, image_emb: np.ndarray, image_for_text: Sequence[int], ks=(1, 5, 10)
) -> dict[str, float]:
    """Text→image and image→text R@k; an image query is correct if any of its captions is in
    the top k. ``image_for_text[j]`` is the image that caption j describes."""
    image_for_text = np.asarray(image_for_text)
    scores = text_emb @ image_emb.T
    t2i = recall_at_k(scores, [[i] for i in image_for_text], ks)
    captions_of = [np.flatnonzero(image_for_text == i).tolist() for i in range(image_emb.shape[0])]
    i2t = recall_at_k(scores.T, captions_of, ks)
    return {f"t2i_R@{k}": v for k, v in t2i.items()} | {f"i2t_R@{k}": v for k, v in i2t.items()}


def compositional_accuracy(
    image_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray
) -> float:
    """SugarCrepe: % of items with cos(image, caption) > cos(image, negative caption)."""
    pos = np.sum(image_emb * pos_emb, axis=-1)
    neg = np.sum(image_emb * neg_emb, axis=-1)
    return float(np.mean(pos > neg) * 100)


def sugarcrepe_summary(split_accuracy: dict[str, float]) -> dict[str, float]:
    """Per-split accuracies plus the Replace/Swap/Add plain means of their present sub-splits."""
    out = dict(split_accuracy)
    for group, splits in SUGARCREPE_GROUPS.items():
        present = [split_accuracy[s] for s in splits if s in split_accuracy]
        if present:
            out[group] = float(np.mean(present))
    return out
