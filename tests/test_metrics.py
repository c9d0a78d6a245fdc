"""Metrics against hand-computed values and a plain-Python reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk_metrics  # a dev dependency: the cross-check must run, not skip

from cavmae.metrics import (
    accuracy,
    average_precision,
    mean_auc,
    mean_average_precision,
    retrieval_metrics,
)


def reference_ap(scores: list[float], targets: list[int]) -> float:
    """AP as written in the definition: sum over distinct thresholds of (R_n - R_{n-1}) P_n."""
    num_pos = sum(targets)
    if num_pos == 0:
        return math.nan
    ap, prev_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        picked = [t for s, t in zip(scores, targets, strict=True) if s >= threshold]
        tp = sum(picked)
        precision = tp / len(picked)
        recall = tp / num_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def reference_auc(scores: list[float], targets: list[int]) -> float:
    """AUC as the fraction of (positive, negative) pairs ordered right, ties counting 1/2."""
    pos = [s for s, t in zip(scores, targets, strict=True) if t]
    neg = [s for s, t in zip(scores, targets, strict=True) if not t]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# --- average precision -----------------------------------------------------------------------


def test_ap_hand_computed() -> None:
    # scores 0.9 0.8 0.7 0.6, labels 1 0 1 0, two positives:
    #   >=0.9: P=1/1 R=1/2 ; >=0.8: P=1/2 R=1/2 (no recall step) ; >=0.7: P=2/3 R=1
    #   AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert average_precision(
        np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    ) == pytest.approx(5 / 6)


def test_ap_ties_form_one_threshold() -> None:
    # scores 0.9 0.5 0.5 0.1, labels 0 1 0 1, two positives:
    #   >=0.9: P=0 R=0 ; >=0.5 (both tied samples at once): P=1/3 R=1/2 ; >=0.1: P=2/4 R=1
    #   AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12, whatever the order of the tied pair.
    expected = 5 / 12
    assert average_precision(
        np.array([0.9, 0.5, 0.5, 0.1]), np.array([0, 1, 0, 1])
    ) == pytest.approx(expected)
    assert average_precision(
        np.array([0.9, 0.5, 0.5, 0.1]), np.array([0, 0, 1, 1])
    ) == pytest.approx(expected)
    # All tied: one threshold with P = 2/4, R = 1 -> AP = 1/2.
    assert average_precision(np.full(4, 0.3), np.array([1, 0, 0, 1])) == pytest.approx(0.5)


def test_ap_perfect_and_no_positive() -> None:
    assert average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == pytest.approx(1.0)
    assert math.isnan(average_precision(np.array([3.0, 2.0, 1.0]), np.array([0, 0, 0])))


def test_map_excludes_classes_without_positive() -> None:
    scores = np.array([[0.9, 0.9, 0.1], [0.8, 0.5, 0.2], [0.7, 0.5, 0.3], [0.6, 0.1, 0.4]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    # column 0 is the 5/6 case, column 1 the 5/12 tie case, column 2 has no positive.
    result = mean_average_precision(scores, targets)
    np.testing.assert_allclose(result.per_class_ap[:2], [5 / 6, 5 / 12])
    assert math.isnan(result.per_class_ap[2])
    assert result.valid.tolist() == [True, True, False]
    assert result.num_valid == 2
    assert result.map == pytest.approx((5 / 6 + 5 / 12) / 2)  # 0.625


def test_map_no_valid_class_is_nan() -> None:
    assert math.isnan(mean_average_precision(np.ones((3, 2)), np.zeros((3, 2))).map)


def test_metric_input_validation() -> None:
    with pytest.raises(ValueError):
        mean_average_precision(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError):
        mean_average_precision(np.ones((2, 2)), np.full((2, 2), 0.5))
    with pytest.raises(ValueError):
        average_precision(np.array([np.nan, 1.0]), np.array([1, 0]))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.booleans()),  # few score levels -> many ties
        min_size=1,
        max_size=25,
    ),
    st.randoms(use_true_random=False),
)
def test_ap_matches_reference_loop(rows: list[tuple[int, bool]], rnd) -> None:
    scores = [s / 4 for s, _ in rows]
    targets = [int(t) for _, t in rows]
    expected_ap = reference_ap(scores, targets)
    got = average_precision(np.array(scores), np.array(targets))
    if math.isnan(expected_ap):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected_ap, abs=1e-12)
    auc = mean_auc(np.array(scores)[:, None], np.array(targets)[:, None]).per_class_auc[0]
    expected_auc = reference_auc(scores, targets)
    assert (math.isnan(auc) and math.isnan(expected_auc)) or auc == pytest.approx(expected_auc)
    # The vectorized path over classes equals the per-class one (shuffled columns).
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    s2 = np.stack([scores, [scores[i] for i in perm]], axis=1)
    t2 = np.stack([targets, [targets[i] for i in perm]], axis=1)
    res = mean_average_precision(s2, t2)
    second = reference_ap([scores[i] for i in perm], [targets[i] for i in perm])
    np.testing.assert_allclose(res.per_class_ap, [expected_ap, second], atol=1e-12)


def test_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((200, 6)), 1)  # rounded: ties
    targets = (rng.random((200, 6)) < 0.3).astype(int)
    result = mean_average_precision(scores, targets)
    for c in range(6):
        assert result.per_class_ap[c] == pytest.approx(
            sk_metrics.average_precision_score(targets[:, c], scores[:, c])
        )
        assert mean_auc(scores, targets).per_class_auc[c] == pytest.approx(
            sk_metrics.roc_auc_score(targets[:, c], scores[:, c])
        )


# --- AUC -------------------------------------------------------------------------------------


def test_auc_hand_computed() -> None:
    # positives 0.9, 0.7 vs negatives 0.8, 0.6: pairs ordered right 0.9>0.8, 0.9>0.6, 0.7>0.6
    # -> 3 of 4 = 0.75. Second column: positives 0.5, 0.1 vs negatives 0.9, 0.5: only the tie
    # 0.5 = 0.5 counts, half -> 0.5 / 4 = 0.125. Third column has no negative -> invalid.
    scores = np.array([[0.9, 0.9, 1.0], [0.8, 0.5, 2.0], [0.7, 0.5, 3.0], [0.6, 0.1, 4.0]])
    targets = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]])
    result = mean_auc(scores, targets)
    np.testing.assert_allclose(result.per_class_auc[:2], [0.75, 0.125])
    assert result.valid.tolist() == [True, True, False]
    assert result.auc == pytest.approx((0.75 + 0.125) / 2)


# --- accuracy --------------------------------------------------------------------------------


def test_accuracy_indices_and_one_hot() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    # predictions 1, 0, 1 against targets 1, 1, 1 -> 2 of 3 right
    assert accuracy(scores, np.array([1, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(scores, np.array([[0, 1], [0, 1], [0, 1]])) == pytest.approx(2 / 3)
    # smoothed labels: argmax still class 1
    assert accuracy(scores, np.array([[0.05, 0.95]] * 3)) == pytest.approx(2 / 3)
    # a tie in the scores predicts the first class
    assert accuracy(np.array([[0.5, 0.5]]), np.array([0])) == 1.0
    with pytest.raises(ValueError):
        accuracy(scores, np.array([1, 1]))


# --- retrieval -------------------------------------------------------------------------------


def test_retrieval_hand_computed() -> None:
    sim = np.array([[0.9, 0.1, 0.2], [0.8, 0.5, 0.3], [0.1, 0.2, 0.3]])
    # row 0: 0.9 is the largest -> rank 1; row 1: 0.8 > 0.5 -> rank 2; row 2: rank 1
    m = retrieval_metrics(sim)
    assert m["R@1"] == pytest.approx(200 / 3)
    assert m["R@5"] == m["R@10"] == 100.0
    assert m["median_rank"] == 1.0
    assert m["mean_rank"] == pytest.approx(4 / 3)
    # Other direction (columns as queries): column 0 has 0.9 top -> 1; column 1: 0.5 top -> 1;
    # column 2: 0.3 top -> 1
    assert retrieval_metrics(sim.T)["R@1"] == 100.0


def test_retrieval_ties_are_optimistic() -> None:
    # row 0: item 1 ties with the correct item 0 -> not strictly greater -> rank 1
    assert retrieval_metrics(np.array([[0.5, 0.5], [0.1, 0.2]]))["R@1"] == 100.0


def test_retrieval_designed_ranks() -> None:
    ranks = np.array([1, 2, 5, 6, 10, 11, 12, 3, 1, 7, 4, 9])
    n = len(ranks)
    sim = np.zeros((n, n))
    for i, r in enumerate(ranks):
        sim[i, i] = 0.5
        others = [j for j in range(n) if j != i][: r - 1]
        sim[i, others] = 1.0  # r - 1 items above the correct one
    m = retrieval_metrics(sim)
    assert m["R@1"] == pytest.approx(100 * 2 / n)
    assert m["R@5"] == pytest.approx(100 * 6 / n)  # 1 2 5 3 1 4
    assert m["R@10"] == pytest.approx(100 * 10 / n)
    assert m["median_rank"] == pytest.approx(float(np.median(ranks)))  # (5 + 6) / 2
    assert m["mean_rank"] == pytest.approx(ranks.mean())
    with pytest.raises(ValueError):
        retrieval_metrics(np.zeros((2, 3)))
