"""Report plots (matplotlib, Agg backend, PNG): similarity distributions of positives vs hardest
negatives (the paper's Fig. 3), recall@k curves, and per-task score bars. Every function takes
plain numpy / dict inputs, writes one PNG and returns its path."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global backend switch, no display needed


def _check(scores: np.ndarray, positives: Sequence[Sequence[int]]) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] != len(positives):
        raise ValueError(f"scores of shape {scores.shape} for {len(positives)} positive lists")
    empty = [i for i, pos in enumerate(positives) if len(pos) == 0]
    if empty:
        raise ValueError(f"queries {empty[:10]} have no positive candidate")
    return scores


def positive_and_hardest_negative(
    scores: np.ndarray, positives: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per query (row of ``scores``): the similarity of its best positive and of its most
    similar negative (``nan`` for a query whose row holds only positives). Row by row, so a
    COCO-5K-sized matrix needs no second copy."""
    scores = _check(scores, positives)
    best_pos = np.empty(scores.shape[0])
    hardest = np.full(scores.shape[0], np.nan)
    for i, pos in enumerate(positives):
        row = scores[i].astype(np.float64)
        best_pos[i] = row[list(pos)].max()
        row[list(pos)] = -np.inf
        if np.isfinite(row).any():
            hardest[i] = row.max()
    return best_pos, hardest


def recall_curve(scores: np.ndarray, positives: Sequence[Sequence[int]], max_k: int) -> np.ndarray:
    """Recall@k in % for k = 1..max_k (capped at the candidate count), ties with negatives
    counted against the query as in :func:`unime_jax.eval.metrics.recall_at_k`."""
    scores = _check(scores, positives)
    rank = np.empty(scores.shape[0])
    for i, pos in enumerate(positives):
        row = scores[i].astype(np.float64)
        best = row[list(pos)].max()
        negative = np.ones(row.size, bool)
        negative[list(pos)] = False
        rank[i] = np.sum(row > best) + np.sum(row[negative] == best)
    ks = np.arange(1, min(max_k, scores.shape[1]) + 1)
    return (rank[None, :] < ks[:, None]).mean(axis=1) * 100


def _save(fig, path: str | os.PathLike) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)


def similarity_histogram(
    scores: np.ndarray,
    positives: Sequence[Sequence[int]],
    path: str | os.PathLike,
    *,
    title: str = "",
    bins: int = 40,
) -> str:
    """Histograms of each query's positive similarity and hardest-negative similarity (the
    paper's Fig. 3): a discriminative model separates the two; a collapsed one overlaps them.
    The legend gives the means and the share of queries whose positive beats every negative."""
    pos, neg = positive_and_hardest_negative(scores, positives)
    neg_ok = neg[np.isfinite(neg)]
    values = np.concatenate([pos, neg_ok])
    lo, hi = float(values.min()), float(values.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
    separated = float(np.mean(pos > np.nan_to_num(neg, nan=-np.inf)) * 100)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.hist(pos, edges, alpha=0.6, color="tab:blue", label=f"positive (mean {pos.mean():.3f})")
    if neg_ok.size:
        ax.hist(
            neg_ok,
            edges,
            alpha=0.6,
            color="tab:red",
            label=f"hardest negative (mean {neg_ok.mean():.3f})",
        )
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("queries")
    ax.set_title(f"{title}\npositive > hardest negative for {separated:.1f}% of {len(pos)} queries")
    ax.legend(fontsize=8)
    return _save(fig, path)


def recall_curves(
    curves: Mapping[str, np.ndarray], path: str | os.PathLike, *, title: str = ""
) -> str:
    """Recall@k (%) against k = 1..K, one line per direction (e.g. ``{"text→image": ...}``)."""
    if not curves:
        raise ValueError("no recall curves to plot")
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for name, curve in curves.items():
        curve = np.asarray(curve, np.float64)
        ax.plot(
            np.arange(1, curve.size + 1),
            curve,
            marker="." if curve.size <= 20 else None,
            label=name,
        )
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def score_bars(
    scores: Mapping[str, float | None],
    path: str | os.PathLike,
    *,
    reference: Mapping[str, float] | None = None,
    reference_label: str = "paper",
    title: str = "",
    ylabel: str = "%",
    chance: float | None = None,
) -> str:
    """One bar per name (``None`` values are left out), with ``reference`` values (e.g. the
    paper's) as a second bar where given and an optional dashed chance line."""
    names = [n for n, v in scores.items() if v is not None]
    if not names:
        raise ValueError("no scores to plot")
    ours = np.array([scores[n] for n in names], np.float64)
    ref = np.array([(reference or {}).get(n, np.nan) for n in names], np.float64)
    x = np.arange(len(names))
    has_ref = bool(np.isfinite(ref).any())
    width = 0.4 if has_ref else 0.6
    fig = Figure(figsize=(max(4.5, 0.7 * len(names) + 1.5), 3.6))
    ax = fig.subplots()
    bars = ax.bar(x - (width / 2 if has_ref else 0), ours, width, label="ours")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    if has_ref:
        ax.bar(x + width / 2, np.nan_to_num(ref), width, color="tab:gray", label=reference_label)
    if chance is not None:
        ax.axhline(chance, color="k", linestyle="--", linewidth=0.8, label=f"chance ({chance:g})")
    ax.set_xticks(
        x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center"
    )
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title)
    if has_ref or chance is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


def mmeb_bars(
    result: Mapping,
    path: str | os.PathLike,
    *,
    reference: Mapping[str, float] | None = None,
    reference_label: str = "paper",
) -> str:
    """MMEB P@1 per meta-task, IND, OOD and both overall means, from
    :func:`unime_jax.eval.evaluators.evaluate_mmeb`'s result (plain dict). ``reference`` is
    keyed by the bar names (``"overall (36)"``, ``"overall (4 tasks)"``, meta-task names)."""
    scores = dict(result.get("meta_task", {}))
    scores |= {
        "IND": result.get("IND"),
        "OOD": result.get("OOD"),
        "overall (36)": result.get("overall_datasets"),
        "overall (4 tasks)": result.get("overall_meta"),
    }
    return score_bars(
        scores,
        path,
        reference=reference,
        reference_label=reference_label,
        title="MMEB Precision@1",
        ylabel="P@1 (%)",
    )
