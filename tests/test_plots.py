"""Report plots: hand-checked statistics, recall curves equal to the exact metric, and PNGs
written non-empty."""

import numpy as np
import pytest

from unime_jax.eval import metrics, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC


def test_positive_and_hardest_negative():
    scores = np.array([[0.9, 0.5, 0.7], [0.2, 0.1, 0.8], [0.3, 0.4, 0.6]])
    pos, neg = plots.positive_and_hardest_negative(scores, [[0], [1, 2], [0, 1, 2]])
    np.testing.assert_allclose(pos, [0.9, 0.8, 0.6])
    np.testing.assert_allclose(neg, [0.7, 0.2, np.nan])
    with pytest.raises(ValueError, match="no positive"):
        plots.positive_and_hardest_negative(scores, [[0], [], [1]])


def test_recall_curve_matches_the_metric():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((30, 12)).round(1)  # rounding makes ties
    positives = [sorted(rng.choice(12, size=1 + i % 3, replace=False).tolist()) for i in range(30)]
    curve = plots.recall_curve(scores, positives, max_k=50)
    assert curve.shape == (12,) and curve[-1] == 100 and np.all(np.diff(curve) >= 0)
    exact = metrics.recall_at_k(scores, positives, ks=(1, 5, 10))
    assert [curve[k - 1] for k in (1, 5, 10)] == [exact[1], exact[5], exact[10]]


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.uniform(-0.2, 0.6, (40, 10))
    positives = [[i % 10] for i in range(40)]
    paths = [
        plots.similarity_histogram(scores, positives, tmp_path / "sim.png", title="t2i"),
        plots.recall_curves(
            {
                "text→image": plots.recall_curve(scores, positives, 10),
                "image→text": plots.recall_curve(
                    scores.T, [[j for j in range(40) if j % 10 == i] for i in range(10)], 10
                ),
            },
            tmp_path / "sub" / "recall.png",
        ),
        plots.score_bars(
            {"replace": 55.0, "swap": 48.0, "add": None},
            tmp_path / "sc.png",
            reference={"replace": 80.5, "swap": 65.5},
            chance=50,
        ),
        plots.mmeb_bars(
            {
                "meta_task": {"classification": 20.0, "vqa": 10.0},
                "IND": 18.0,
                "OOD": None,
                "overall_datasets": 15.0,
                "overall_meta": 15.0,
            },
            tmp_path / "mmeb.png",
            reference={"overall (36)": 70.7},
        ),
    ]
    for path in paths:
        assert is_png(path) and (tmp_path / path).stat().st_size > 5000
    with pytest.raises(ValueError, match="no scores"):
        plots.score_bars({"a": None}, tmp_path / "none.png")
