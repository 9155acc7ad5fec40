from __future__ import annotations

import numpy as np

from service.outputs import softmax
from service.tasks.classify import top_k

LABELS = ["a", "b", "c", "d"]


def test_softmax_is_a_distribution_even_for_huge_logits() -> None:
    probs = softmax(np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(probs.sum(-1), 1.0)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[1], 1 / 3)


def test_top_k_orders_labels_by_score() -> None:
    results = top_k(np.array([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 0.0, 0.0]]), LABELS, 3)
    assert [p.label for p in results[0]] == ["b", "d", "a"]
    assert [p.label for p in results[1]][0] == "a"
    scores = [p.score for p in results[0]]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores[0], softmax(np.array([0.1, 3.0, -1.0, 2.0]))[1])


def test_top_k_is_capped_at_the_label_count() -> None:
    (only,) = top_k(np.zeros((1, 4)), LABELS, 100)
    assert sorted(p.label for p in only) == LABELS
    np.testing.assert_allclose(sum(p.score for p in only), 1.0)
