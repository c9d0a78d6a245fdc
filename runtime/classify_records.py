"""The result records of classification, shared by ``cavmae classify --json`` and ``cavmae serve``.

One record per clip or sliding window::

    {"path": str, "start": s, "end": s, "top": [{"rank", "index", "label", "score"}, ...],
     "scores": [C floats]}        # "scores" only when every class's score is asked for

Scores are rounded to 6 decimals; ``end`` to milliseconds. Keeping the builder here means the
command line and the HTTP service cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cavmae.config import DEFAULT_PREPROCESS


def window_offsets(duration: float, window: float, hop: float) -> list[float]:
    """Start times of sliding windows over ``duration`` seconds; the last one ends at the end."""
    if duration <= window:
        return [0.0]
    offsets = []
    t = 0.0
    while t + window < duration - 1e-6:
        offsets.append(round(t, 6))
        t += hop
    offsets.append(round(duration - window, 6))
    return sorted(set(offsets))


def window_end(start: float, span: float | None, duration: float,
               clip_seconds: float = DEFAULT_PREPROCESS.clip_seconds) -> float:
    """Where the window starting at ``start`` ends: ``span`` (or one clip) later, or at the end."""
    return min(start + (clip_seconds if span is None else span), duration)


def classification_record(
    path: str,
    start: float,
    end: float,
    probs: np.ndarray,
    names: Sequence[str],
    top_k: int,
    all_scores: bool = False,
) -> dict[str, Any]:
    """The record of one clip/window: ``probs [C]`` -> the ``top_k`` classes (and every score)."""
    idx = probs.argsort()[::-1][:top_k]
    top = [{"rank": r + 1, "index": int(i), "label": names[i], "score": round(float(probs[i]), 6)}
           for r, i in enumerate(idx)]
    record: dict[str, Any] = {"path": path, "start": start, "end": round(end, 3), "top": top}
    if all_scores:
        record["scores"] = [round(float(p), 6) for p in probs]
    return record


def classification_rows(record: dict[str, Any], names: Sequence[str]) -> list[list[Any]]:
    """CSV rows ``path, start, end, rank, index, label, score`` of a record: its top classes, or
    every class (rank left empty) when the record holds all scores."""
    head = [record["path"], record["start"], record["end"]]
    if "scores" in record:
        return [[*head, "", i, names[i], s] for i, s in enumerate(record["scores"])]
    return [[*head, t["rank"], t["index"], t["label"], t["score"]] for t in record["top"]]
