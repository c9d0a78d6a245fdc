"""What ``cavmae classify`` and ``cavmae serve`` share: which clips of a file, in which mode, and
the result record of each.

One record per clip or sliding window::

    {"path": str, "mode": "av" | "audio" | "visual", "start": s, "end": s,
     "top": [{"rank", "index", "label", "score"}, ...],
     "scores": [C floats]}        # "scores" only when every class's score is asked for

and its CSV rows under :data:`HEADER`. Scores are rounded to 6 decimals, ``end`` to
milliseconds. The command line and the HTTP service both build their answers here, so they
cannot drift apart. Windows are tiled by :func:`cavmae.media.window_offsets`; the mode of a file
comes from the mode table (:mod:`cavmae.modes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cavmae.errors import MissingStreamError
from cavmae.modes import AUTO, best_mode, needs

__all__ = [
    "HEADER",
    "classification_record",
    "classification_rows",
    "clip_end",
    "clip_starts",
    "file_mode",
    "label_names",
]

#: columns of the CSV rows (``cavmae classify --csv`` and ``-o results.csv``)
HEADER = ["path", "mode", "start", "end", "rank", "index", "label", "score"]


def label_names(pipe: Any) -> tuple[str, ...]:
    """The pipeline's class names (those of ``--labels`` when given), else ``class i``."""
    num_classes = pipe.manifest.model_config.num_classes
    return pipe.labels or tuple(f"class {i}" for i in range(num_classes))


def clip_starts(offset: float, window: float | None, hop: float | None,
                duration: float | None = None) -> list[float]:
    """Start times of the clips to classify: ``[offset]``, or with ``window`` the sliding
    windows over ``duration`` seconds every ``hop`` (default ``window / 2``) seconds."""
    if window is None:
        return [offset]
    if duration is None:
        raise ValueError("sliding windows need the media's duration")
    from cavmae.media import window_offsets

    return window_offsets(duration, window, hop or window / 2)


def clip_end(start: float, span: float | None, duration: float, clip_seconds: float) -> float:
    """Where the clip starting at ``start`` ends: ``span`` (a window) or one clip of
    ``clip_seconds`` later, or at the end of the media."""
    return min(start + (clip_seconds if span is None else span), duration)


def file_mode(path: str | Path, mode: str, supported: Sequence[str]) -> tuple[str, str | None]:
    """The mode one file is classified in, and a note when a stream of the file is left out.

    ``mode`` itself unless it is ``auto``; then the best of the model's ``supported`` modes for
    the streams the file has (:func:`cavmae.modes.best_mode`), with the note ``PATH: no video
    stream; classified with audio only`` when that is not the model's first mode.

    Raises:
        MissingStreamError: every supported mode needs a stream the file lacks; its hint is
            neutral, the caller replaces it in its own terms (:meth:`~MissingStreamError.with_hint`).
    """
    if mode != AUTO:
        return mode, None
    from cavmae.media import probe

    info = probe(path)
    chosen = best_mode(supported, info.has_audio, info.has_video)
    if chosen is None:
        missing = "audio" if needs(supported[0])[0] and not info.has_audio else "video"
        raise MissingStreamError.of(str(path), missing)
    if chosen != supported[0]:
        lacks = "video" if info.has_audio else "audio"
        return chosen, f"{path}: no {lacks} stream; classified with {chosen} only"
    return chosen, None


def classification_record(
    path: str,
    mode: str,
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
    record: dict[str, Any] = {"path": path, "mode": mode, "start": start, "end": round(end, 3), "top": top}
    if all_scores:
        record["scores"] = [round(float(p), 6) for p in probs]
    return record


def classification_rows(record: dict[str, Any], names: Sequence[str]) -> list[list[Any]]:
    """CSV rows (:data:`HEADER`) of a record: its top classes, or every class (rank left empty)
    when the record holds all scores."""
    head = [record["path"], record["mode"], record["start"], record["end"]]
    if "scores" in record:
        return [[*head, "", i, names[i], s] for i, s in enumerate(record["scores"])]
    return [[*head, t["rank"], t["index"], t["label"], t["score"]] for t in record["top"]]
