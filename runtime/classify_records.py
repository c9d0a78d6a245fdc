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

:func:`classify_files` is the folder loop of ``cavmae classify``: it plans each file's clips
(mode, windows, the ones already done), decodes the next clips on
:func:`cavmae.prefetch.prefetch` threads while the model runs on the current one in the
caller's thread, and yields one :class:`ClipOutcome` per clip in input order. At most
``workers + 1`` clips are in flight (decoding, decoded and waiting, or held by the model).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.errors import CavmaeError, MediaError, MissingStreamError
from cavmae.modes import AUTO, best_mode, needs
from cavmae.prefetch import prefetch

from .pipeline import Prediction, best_first

if TYPE_CHECKING:
    from cavmae.media import Clip

    from .pipeline import Pipeline

__all__ = [
    "HEADER",
    "ClipJob",
    "ClipOutcome",
    "classification_record",
    "classification_rows",
    "classify_files",
    "clip_end",
    "clip_starts",
    "decode_job",
    "file_mode",
    "label_names",
    "min_window",
    "plan_clips",
    "predict_clip",
    "record_shows",
    "rows_per_record",
    "shown_settings",
]

#: columns of the CSV rows (``cavmae classify --csv`` and ``-o results.csv``)
HEADER = ["path", "mode", "start", "end", "rank", "index", "label", "score"]


def label_names(pipe: Any) -> tuple[str, ...]:
    """The pipeline's class names (those of ``--labels`` when given), else ``class i``."""
    num_classes = pipe.manifest.model_config.num_classes
    return pipe.labels or tuple(f"class {i}" for i in range(num_classes))


def min_window(preprocess: PreprocessConfig = DEFAULT_PREPROCESS) -> float:
    """The shortest window (seconds) the model can classify: one frame of the audio
    spectrogram (25 ms). A shorter one holds no audio frame, so every window would fail."""
    return preprocess.frame_length_ms / 1000.0


def min_hop(preprocess: PreprocessConfig = DEFAULT_PREPROCESS) -> float:
    """The shortest hop (seconds) between windows: one shift of the audio spectrogram (10 ms).
    Closer windows repeat each other, and a hop near 0 would plan windows without end."""
    return preprocess.frame_shift_ms / 1000.0


def clip_starts(offset: float, window: float | None, hop: float | None,
                duration: float | None = None) -> list[float]:
    """Start times of the clips to classify: ``[offset]``, or with ``window`` the sliding
    windows over ``duration`` seconds every ``hop`` (default ``window / 2``) seconds.

    Raises:
        CavmaeError: ``window`` or ``hop`` is not a finite number of seconds > 0 (NaN passes
            every range check, and an infinite hop makes NaN starts), or ``window`` is shorter
            than :func:`min_window`.
    """
    if window is None:
        return [offset]
    for name, value in (("window", window), ("hop", hop)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise CavmaeError(f"{name} must be a finite number of seconds > 0, got {value}")
    if window < min_window():
        raise CavmaeError(f"a window of {window:g} s is shorter than one audio frame ({min_window():g} s)")
    if hop is not None and hop < min_hop():
        raise CavmaeError(f"a hop of {hop:g} s is shorter than the audio frame shift ({min_hop():g} s)")
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
    idx = best_first(probs, top_k)
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


def rows_per_record(num_classes: int, top_k: int, all_scores: bool) -> int:
    """How many CSV rows :func:`classification_rows` gives each record."""
    return num_classes if all_scores else min(top_k, num_classes)


def record_shows(record: dict[str, Any]) -> dict[str, Any]:
    """What a result read back shows of the settings that wrote it: a JSON record (of
    :func:`classification_record`) its ``top_k`` (how many top classes) and ``all_scores``;
    a CSV row (:data:`HEADER`, as text) ``all_scores`` (every class's row, rank left empty),
    else its rank (a file's largest is its ``top_k``). See :func:`shown_settings`."""
    if isinstance(record.get("top"), list):
        return {"top_k": len(record["top"]), "all_scores": "scores" in record}
    rank = str(record.get("rank") or "")
    if not rank:
        return {"all_scores": True}
    return {"top_k": int(rank), "all_scores": False} if rank.isdigit() else {}


def shown_settings(num_classes: int, top_k: int, all_scores: bool, fmt: str | None) -> dict[str, Any]:
    """What the results of these settings show (:func:`record_shows`, the largest value of a
    file): ``fmt`` ``"csv"`` has no rank with every score, the JSON formats always list the top."""
    if fmt == "csv" and all_scores:
        return {"all_scores": True}
    return {"top_k": min(top_k, num_classes), "all_scores": all_scores}


# -- the folder loop of ``cavmae classify`` ------------------------------------------------------
@dataclass(frozen=True)
class ClipJob:
    """One clip to classify: input number ``index`` (``path``) from ``start`` in ``mode``.

    Every input gives at least one job, its last one with ``last``: ``start`` None means there
    is nothing to decode (every clip already done, or ``error``: the file could not be planned).
    ``note`` (what ``--mode auto`` left out) is on the file's first job only.
    """

    index: int
    path: Path
    mode: str | None  # None when the file's mode could not be decided (``error``)
    start: float | None
    span: float | None  # the window's seconds; None: the model's clip
    note: str | None = None
    last: bool = True
    error: Exception | None = None


@dataclass(frozen=True)
class ClipOutcome:
    """What became of one job: its ``prediction``, or the ``error`` that ends its file, or
    neither (nothing was left to do). ``last``: no more outcomes for this file follow."""

    job: ClipJob
    prediction: Prediction | None = None
    error: MediaError | None = None
    last: bool = True


def plan_clips(
    pipe: Pipeline,
    files: Iterable[str | Path],
    *,
    mode: str,
    offset: float = 0.0,
    window: float | None = None,
    hop: float | None = None,
    is_done: Callable[[dict[str, Any]], bool] = lambda key: False,
) -> Iterator[ClipJob]:
    """The jobs of each file, lazily: its mode (:func:`file_mode`), its clip starts
    (:func:`clip_starts`; with ``window`` the file is probed for its duration), less those
    ``is_done({"path", "mode", "start"})`` says an earlier run wrote. A file that cannot be
    planned gives one job carrying the exception, delivered at its turn."""
    for index, raw in enumerate(files):
        path = Path(raw)
        chosen: str | None = None
        note: str | None = None
        try:
            chosen, note = file_mode(path, mode, pipe.classify_modes)
            duration = None
            if window is not None:
                from cavmae.media import probe

                duration = probe(path).duration
            starts = clip_starts(offset, window, hop, duration)
        except Exception as e:  # reported in input order, by the consumer
            yield ClipJob(index, path, chosen, None, window, note=note, error=e)
            continue
        todo = [s for s in starts if not is_done({"path": path, "mode": chosen, "start": s})]
        if not todo:
            yield ClipJob(index, path, chosen, None, window, note=note)
        for k, start in enumerate(todo):
            yield ClipJob(index, path, chosen, start, window, note=None if k else note,
                          last=k == len(todo) - 1)


def decode_job(pipe: Pipeline, job: ClipJob) -> Clip | None:
    """Decode a job's clip as :meth:`Pipeline.classify_file` does before the model (the
    streams its mode reads, the window at ``start``); None when there is nothing to decode.
    Raises the job's planning error, if it has one."""
    if job.error is not None:
        raise job.error
    if job.start is None or job.mode is None:
        return None
    need_audio, need_video = needs(job.mode)
    return pipe.load_clip(job.path, offset=job.start, duration=job.span, need_audio=need_audio,
                          need_video=need_video)


def predict_clip(pipe: Pipeline, job: ClipJob, clip: Clip) -> Prediction:
    """The model on a decoded clip: the :class:`Prediction` :meth:`Pipeline.classify_file`
    gives for the same file, mode and window."""
    assert job.mode is not None and job.start is not None
    probs = pipe.classify(clip.audio, clip.frames, job.mode)
    end = clip_end(job.start, job.span, clip.duration, pipe.manifest.preprocess.clip_seconds)
    return Prediction(probs=probs, labels=pipe.labels, path=str(job.path), offset=job.start,
                      end=end, mode=job.mode)


def classify_files(
    pipe: Pipeline,
    files: Iterable[str | Path],
    *,
    mode: str,
    offset: float = 0.0,
    window: float | None = None,
    hop: float | None = None,
    is_done: Callable[[dict[str, Any]], bool] = lambda key: False,
    workers: int = 2,
) -> Generator[ClipOutcome, None, None]:  # a generator: close() stops the decoding threads
    """Classify every clip of ``files`` (see :func:`plan_clips`), one outcome per job, in order.

    ``workers`` threads decode the next clips while the model runs in the caller's thread
    (0: decode inline, one clip at a time); at most ``workers + 1`` clips are in flight. A
    ``MediaError`` (missing, corrupt, a stream the mode needs) ends its file with an outcome
    carrying it, and the job goes on; any other exception propagates at its turn.
    Probabilities equal those of :meth:`Pipeline.classify_file` clip by clip.
    """
    jobs = plan_clips(pipe, files, mode=mode, offset=offset, window=window, hop=hop, is_done=is_done)
    decoded = prefetch(lambda job: decode_job(pipe, job), jobs, workers=workers, ahead=workers + 1,
                       thread_name="cavmae-classify")
    failed = -1  # the input whose remaining clips are dropped
    with contextlib.closing(decoded):
        for got in decoded:
            job = got.item
            if job.index == failed:
                continue
            try:
                clip = got.unwrap()
                pred = None if clip is None else predict_clip(pipe, job, clip)
            except MediaError as e:
                failed = job.index
                yield ClipOutcome(job, error=e, last=True)
                continue
            yield ClipOutcome(job, prediction=pred, last=job.last)
