"""Exact retrieval / compositional metrics, including ties."""

import numpy as np
import pytest

from unime_jax.eval.metrics import (
    compositional_accuracy,
    image_text_retrieval,
    recall_at_k,
    sugarcrepe_summary,
)


def test_recall_ties():
    # Two positives tied at the top: correct at k=1.
    assert recall_at_k(np.array([[0.9, 0.9, 0.1]]), [[0, 1]], ks=(1,)) == {1: 100.0}
    # A negative tied with the best positive counts against the query.
    assert recall_at_k(np.array([[0.9, 0.9, 0.1]]), [[0]], ks=(1, 2)) == {1: 0.0, 2: 100.0}
    # A constant model is at chance, not perfect.
    assert recall_at_k(np.zeros((4, 4)), [[i] for i in range(4)], ks=(1,)) == {1: 0.0}
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k(np.zeros((1, 2)), [[]])


def test_image_text_retrieval_any_caption_counts():
    images = np.eye(3)
    texts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0.6, 0.8, 0]])  # caption 1 and 3 mismatch
    out = image_text_retrieval(texts, images, [0, 1, 2, 1], ks=(1,))
    assert out["t2i_R@1"] == 50.0  # captions 0 and 2 find their image
    # image 0 finds caption 0; image 1 prefers caption 2 (not its own 1 or 3); image 2 caption 1
    assert out["i2t_R@1"] == pytest.approx(100 / 3)


def test_compositional():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert (
        compositional_accuracy(img, np.array([[1.0, 0], [1.0, 0]]), np.array([[0, 1.0], [0, 1.0]]))
        == 50.0
    )
    summary = sugarcrepe_summary({"replace_obj": 50.0, "replace_att": 70.0, "swap_obj": 10.0})
    assert summary["replace"] == 60.0 and summary["swap"] == 10.0 and "add" not in summary
