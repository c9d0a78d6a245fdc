"""Evaluation metrics: average precision (mAP), ROC AUC, accuracy and retrieval recall.

Numpy only, so that training, the runtime's dataset evaluation and the tests share one
implementation. :func:`classification_metrics` and :func:`retrieval_report` are the summaries
``cavmae evaluate`` reports; retrieval ranks are computed in blocks so memory stays bounded for
any dataset size.

Conventions:
- AP, AUC and accuracy are fractions in [0, 1] (the reference ``stats.py`` convention; the
  paper prints mAP 0.512 as "51.2"). Retrieval recalls are percentages, as the paper reports them.
- AP follows scikit-learn's ``average_precision_score``: ``AP = sum_n (R_n - R_{n-1}) P_n`` over
  the distinct score thresholds in decreasing order, with ``R_0 = 0``. All samples sharing a score
  form one threshold, so the order of tied samples never matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cavmae.vectors import l2_normalize

__all__ = [
    "MAPResult",
    "AUCResult",
    "average_precision",
    "mean_average_precision",
    "mean_auc",
    "accuracy",
    "classification_metrics",
    "finite_or_none",
    "retrieval_metrics",
    "retrieval_ranks",
    "retrieval_report",
    "summarize_ranks",
]


@dataclass(frozen=True)
class MAPResult:
    """Mean average precision over the classes that have at least one positive.

    ``per_class_ap`` [C] holds NaN for invalid classes; ``valid`` [C] is True where a class has a
    positive. ``map`` is NaN when no class is valid.
    """

    map: float
    per_class_ap: np.ndarray
    valid: np.ndarray

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())


@dataclass(frozen=True)
class AUCResult:
    """Mean ROC AUC over the classes with at least one positive and one negative.

    ``per_class_auc`` [C] holds NaN for invalid classes. ``auc`` is NaN when no class is valid.
    """

    auc: float
    per_class_auc: np.ndarray
    valid: np.ndarray


def _as_2d(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate scores/targets of shape [N, C] (or [N]) and return float64 scores, 0/1 targets."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must have the same shape")
    if s.ndim == 1:
        s, t = s[:, None], t[:, None]
    if s.ndim != 2:
        raise ValueError(f"expected [N, C] or [N] arrays, got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a ranking of NaN is undefined")
    # Soft targets (mixup, label smoothing) are a training device: evaluation needs hard labels.
    if not np.isin(t, (0, 1)).all():
        raise ValueError("targets must be 0/1 (or bool)")
    return s, t.astype(np.float64)


def _sorted_with_groups(
    s: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort each column by decreasing score and locate the tie group of every position.

    Args: s, t [N, C]. Returns (sorted targets [N, C], tp cumsum [N, C], group end index [N, C],
    group start index [N, C]), indices into the sorted order, both ends inclusive.
    """
    n = s.shape[0]
    order = np.argsort(-s, axis=0, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=0)
    t_sorted = np.take_along_axis(t, order, axis=0)
    tp = np.cumsum(t_sorted, axis=0)
    idx = np.arange(n)[:, None]
    # A position ends its tie group when the next score differs (or it is the last one).
    is_end = np.ones_like(s_sorted, dtype=bool)
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    is_start = np.ones_like(is_end)
    is_start[1:] = is_end[:-1]
    # The group end of position i is the first end at or after i: a reversed running minimum.
    end = np.where(is_end, idx, n)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    # The group start is the last start at or before i: a running maximum.
    start = np.maximum.accumulate(np.where(is_start, idx, -1), axis=0)
    return t_sorted, tp, end, start


def _per_class_ap(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of every column of s, t [N, C]; returns (ap [C] with NaN where no positive, valid [C])."""
    num_pos = t.sum(axis=0)
    valid = num_pos > 0
    if s.shape[0] == 0:
        return np.full(s.shape[1], np.nan), valid
    t_sorted, tp, end, _ = _sorted_with_groups(s, t)
    # Precision at the threshold of each position's tie group: tp and count at the group's end.
    precision = np.take_along_axis(tp, end, axis=0) / (end + 1)
    # sum_n (R_n - R_{n-1}) P_n == sum over positives of the precision of their group, / P:
    # a group contributes (its positives / P) x (its precision).
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (t_sorted * precision).sum(axis=0) / num_pos
    return np.where(valid, ap, np.nan), valid


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class (scikit-learn's definition, ties grouped).

    Args:
        scores: [N] real scores, higher = more likely positive.
        targets: [N] 0/1 labels.
    Returns NaN when there is no positive (AP is undefined).
    """
    s, t = np.asarray(scores), np.asarray(targets)
    if s.ndim != 1:
        raise ValueError(
            f"average_precision takes [N] arrays, got {s.shape}; see mean_average_precision"
        )
    ap, _ = _per_class_ap(*_as_2d(s, t))
    return float(ap[0])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> MAPResult:
    """mAP over classes: AP of each column, averaged over classes that have a positive.

    Args:
        scores: [N, C] scores (probabilities or logits: AP only uses their order per class).
        targets: [N, C] multi-hot 0/1 labels.

    Classes without any positive in ``targets`` have no defined AP: they are marked invalid,
    get NaN in ``per_class_ap`` and are **excluded** from the mean (evaluation subsets often
    miss rare classes; counting them as 0 would depress mAP for no reason).
    """
    s, t = _as_2d(scores, targets)
    ap, valid = _per_class_ap(s, t)
    mean = float(ap[valid].mean()) if valid.any() else float("nan")
    return MAPResult(map=mean, per_class_ap=ap, valid=valid)


def mean_auc(scores: np.ndarray, targets: np.ndarray) -> AUCResult:
    """Mean ROC AUC over classes (ties count one half, as in scikit-learn's ``roc_auc_score``).

    Args: scores, targets [N, C] as in ``mean_average_precision``. Classes lacking a positive or
    a negative are invalid (NaN) and excluded from the mean.

    Uses the Mann-Whitney statistic: AUC = (sum of positive ranks - P(P+1)/2) / (P * Q) with
    ascending ranks, tied scores sharing their average rank.
    """
    s, t = _as_2d(scores, targets)
    n = s.shape[0]
    num_pos = t.sum(axis=0)
    num_neg = n - num_pos
    valid = (num_pos > 0) & (num_neg > 0)
    if n == 0:
        return AUCResult(float("nan"), np.full(s.shape[1], np.nan), valid)
    t_sorted, _, end, start = _sorted_with_groups(s, t)
    # Positions are in decreasing order; the ascending 1-based rank of position i is n - i.
    # The average over the tie group [start, end] is n - (start + end) / 2.
    avg_rank = n - (start + end) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((t_sorted * avg_rank).sum(axis=0) - num_pos * (num_pos + 1) / 2) / (
            num_pos * num_neg
        )
    auc = np.where(valid, auc, np.nan)
    mean = float(auc[valid].mean()) if valid.any() else float("nan")
    return AUCResult(auc=mean, per_class_auc=auc, valid=valid)


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy as a fraction in [0, 1].

    Args:
        scores: [N, C] scores; the prediction is the argmax (the first one on a tie).
        targets: [N] integer class indices, or [N, C] one-hot / multi-hot / smoothed labels whose
            argmax is taken as the class (the reference evaluation does the same).
    """
    s = np.asarray(scores)
    t = np.asarray(targets)
    if s.ndim != 2:
        raise ValueError(f"scores must be [N, C], got {s.shape}")
    if t.ndim == 2:
        if t.shape != s.shape:
            raise ValueError(f"targets {t.shape} must match scores {s.shape}")
        t = t.argmax(axis=1)
    elif t.ndim != 1 or t.shape[0] != s.shape[0]:
        raise ValueError(
            f"targets must be [N] indices or [N, C], got {t.shape} for scores {s.shape}"
        )
    elif not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"class-index targets must be integers, got dtype {t.dtype}")
    if s.shape[0] == 0:
        return float("nan")
    return float((s.argmax(axis=1) == t).mean())


def retrieval_metrics(similarity: np.ndarray) -> dict[str, float]:
    """Recall@1/5/10 (percent), median and mean rank of query->item retrieval.

    Args:
        similarity: [N, N]; row i is query i, column j item j; the correct item of query i is
            item i. Pass ``similarity.T`` for the other direction.

    The 1-based rank of query i is 1 + the number of items scoring **strictly** higher than the
    correct one. Items tied with the correct one do not push it down (the optimistic tie rule;
    exact ties essentially never happen with float embeddings).

    Returns keys ``"R@1"``, ``"R@5"``, ``"R@10"`` (percent of queries ranked within k),
    ``"median_rank"``, ``"mean_rank"`` and ``"num_queries"``.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square [N, N] matrix, got {sim.shape}")
    if np.isnan(sim).any():
        raise ValueError("similarity contains NaN")
    correct = np.diagonal(sim)[:, None]  # [N, 1]
    return summarize_ranks((sim > correct).sum(axis=1) + 1)


def summarize_ranks(ranks: np.ndarray) -> dict[str, float]:
    """1-based ranks ``[N]`` -> R@1/5/10 (percent), median and mean rank, ``num_queries``."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float((ranks <= k).mean() * 100.0) for k in (1, 5, 10)}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(ranks.mean())
    out["num_queries"] = float(ranks.shape[0])
    return out


def retrieval_ranks(queries: np.ndarray, items: np.ndarray, block: int = 4096) -> np.ndarray:
    """1-based rank of item ``i`` for query ``i`` by similarity ``queries @ items.T``.

    Args:
        queries, items: ``[N, D]`` (L2-normalize them first for cosine similarity).
        block: rows and columns per block: peak memory is ``block x block`` float64, whatever N.

    The rank rule is :func:`retrieval_metrics`': 1 + the number of items scoring strictly
    higher than the correct one. Returns ``[N]`` int64.
    """
    q = np.asarray(queries, dtype=np.float64)
    v = np.asarray(items, dtype=np.float64)
    if q.ndim != 2 or q.shape != v.shape:
        raise ValueError(f"queries {q.shape} and items {v.shape} must both be [N, D]")
    if block < 1:
        raise ValueError("block must be >= 1")
    n = q.shape[0]
    ranks = np.ones(n, dtype=np.int64)
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        rows = q[r0:r1]
        diag_block = rows @ v[r0:r1].T
        # the correct scores come from the same product as the block they sit in
        correct = np.diagonal(diag_block).copy()[:, None]
        for c0 in range(0, n, block):
            c1 = min(c0 + block, n)
            sim = diag_block if c0 == r0 else rows @ v[c0:c1].T
            higher = sim > correct
            if c0 == r0:
                np.fill_diagonal(higher, False)
            ranks[r0:r1] += higher.sum(axis=1)
    return ranks


def retrieval_report(
    audio_embeddings: np.ndarray, visual_embeddings: np.ndarray, block: int = 4096
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Cosine-similarity retrieval both ways.

    Args:
        audio_embeddings, visual_embeddings: ``[N, D]``; clip ``i``'s audio matches clip ``i``'s
            visual embedding. They are L2-normalized here (in float64).
        block: up to this N the full ``[N, N]`` similarity goes through
            :func:`retrieval_metrics`; above it ranks are computed block-wise.

    Returns ``(metrics, ranks)``: ``{"audio_to_visual": ..., "visual_to_audio": ...}`` each with
    :func:`retrieval_metrics`' keys, and the per-query ranks ``[N]`` of each direction.
    """
    a = l2_normalize(np.asarray(audio_embeddings, dtype=np.float64))
    v = l2_normalize(np.asarray(visual_embeddings, dtype=np.float64))
    ranks = {
        "audio_to_visual": retrieval_ranks(a, v, block),
        "visual_to_audio": retrieval_ranks(v, a, block),
    }
    if a.shape[0] <= block:
        sim = a @ v.T  # rows: audio queries, columns: visual items
        metrics = {
            "audio_to_visual": retrieval_metrics(sim),
            "visual_to_audio": retrieval_metrics(sim.T),
        }
    else:
        metrics = {k: summarize_ranks(r) for k, r in ranks.items()}
    return metrics, ranks


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, or ``None`` for NaN / infinity / None (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)


def classification_metrics(scores: np.ndarray, targets: np.ndarray, task: str) -> dict[str, Any]:
    """Metrics of ``scores [N, C]`` against multi-hot ``targets [N, C]``.

    Multi-label: ``mAP`` and ``mAUC`` (means over the classes with a positive, resp. with a
    positive and a negative) and ``num_classes_with_positives``. Single-label: ``accuracy``
    (top-1, first class on a tie) and ``top5_accuracy``. All fractions in [0, 1]; NaN becomes
    ``None``. Also ``num_clips`` and ``num_classes``.
    """
    n, c = scores.shape
    out: dict[str, Any] = {"num_clips": int(n), "num_classes": int(c)}
    if task == "single-label":
        truth = targets.argmax(axis=1)
        out["accuracy"] = finite_or_none(accuracy(scores, truth))
        k = min(5, c)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out["top5_accuracy"] = finite_or_none(
            float((top == truth[:, None]).any(axis=1).mean()) if n else math.nan
        )
    else:
        ap = mean_average_precision(scores, targets)
        out["mAP"] = finite_or_none(ap.map)
        out["mAUC"] = finite_or_none(mean_auc(scores, targets).auc)
        out["num_classes_with_positives"] = ap.num_valid
    return out
