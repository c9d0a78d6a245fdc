"""Dataset evaluation: classification mAP / accuracy and audio-visual retrieval (SPEC section 6).

Two kinds of dataset are read here (the training datasets of :mod:`cavmae.data` are separate):

1. The reference dataset JSON (SPEC section 8): ``{"data": [{"video_id", "wav", "video_path",
   "labels"}]}``. Audio comes from the ``wav`` file, frame ``i`` from
   ``{video_path}/frame_{i}/{video_id}.jpg``, ``labels`` are comma-separated label ids (mids).
   A relative path is taken as given when it exists, else relative to the JSON file's folder.
2. Video files (a folder, files or globs) with an optional **labels file**, a CSV whose rows are
   ``file,labels``::

       # lines starting with '#' are comments; the header row is optional
       file,labels
       dog_park.mp4,Dog;Bark
       cat_01,"/m/01yrx,/m/07qrkrw"
       clips/street.mkv,Vehicle
       sofa.mp4,"Male speech, man speaking"

   The first column names a video by file name (``dog_park.mp4``), by id = file name without its
   ending (``cat_01``), or by a path relative to the labels file's folder (``clips/street.mkv``,
   any key holding a ``/``). The other columns hold labels: display names or ids of the label
   set. Several labels go in one field separated by ``;``, or by ``,`` inside a quoted field, or
   in further columns. A field that is itself a label name (names may contain commas) is one
   label; otherwise it is split on ``;`` when it has one, else on ``,``.

Classification runs :meth:`Pipeline.classify_batch` in mini-batches, which is the reference's
10-frame aggregation (per-frame probabilities averaged). Multi-label models are scored with
mAP and mean ROC AUC, single-label ones with top-1 and top-5 accuracy. Retrieval embeds the
audio-only and visual-only streams (middle frame, or the mean over frames), and ranks by cosine
similarity in both directions; the ranks are computed in blocks so that memory stays bounded
for any dataset size.

Units follow :mod:`cavmae.metrics`: mAP, AUC and accuracies are fractions in [0, 1]; retrieval
recalls are percentages.

A bad item (missing wav or frame, corrupt video, unknown label) is skipped and reported in
:attr:`EvaluationResult.failures`; evaluation goes on with the others. Mistakes in the dataset
description itself (unreadable JSON, a malformed labels file, a label set that does not match
the model) raise :class:`~cavmae.errors.CavmaeError`.

This module is numpy-only besides the pipeline; it never imports torch.
"""

from __future__ import annotations

import csv
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cavmae.config import PreprocessConfig
from cavmae.errors import CavmaeError, DatasetError, ModelKindError
from cavmae.labels import LabelSet, read_label_csv
from cavmae.metrics import accuracy, mean_auc, mean_average_precision, retrieval_metrics

from .pipeline import CLASSIFY_GRAPHS, Pipeline

__all__ = [
    "EvalDataset",
    "EvalItem",
    "EvaluationResult",
    "ItemFailure",
    "classification_metrics",
    "encode_targets",
    "evaluate",
    "load_item",
    "model_label_set",
    "read_dataset_json",
    "read_labels_file",
    "read_video_files",
    "retrieval_ranks",
    "retrieval_report",
    "split_labels",
    "summarize_ranks",
]

T = TypeVar("T")

#: first-row cells that mark a labels-file header
_HEADER_KEYS = frozenset({"file", "path", "id", "video_id", "video", "name"})
#: graphs retrieval needs
_EMBED_GRAPHS = ("audio_embed", "visual_embed")


# -- dataset description ----------------------------------------------------------------------
@dataclass(frozen=True)
class EvalItem:
    """One clip of an evaluation dataset.

    Exactly one source is set: ``wav`` + ``frames_dir`` (reference layout, frame ``i`` at
    ``frames_dir/frame_{i}/{id}.jpg``) or ``video`` (a media file). ``labels`` holds the raw
    label fields (split by :func:`split_labels` against the label set); ``None`` when the
    dataset gives no labels for the item.
    """

    id: str
    labels: tuple[str, ...] | None
    wav: Path | None = None
    frames_dir: Path | None = None
    video: Path | None = None
    problem: str | None = None  # a description error confined to this item (reported, skipped)

    @property
    def source(self) -> str:
        """What to name in a report: the video file, or the wav of a reference item."""
        if self.video is not None:
            return str(self.video)
        if self.wav is not None:
            return str(self.wav)
        return self.id

    def frame_path(self, index: int) -> Path:
        """``{video_path}/frame_{index}/{video_id}.jpg`` of a reference-layout item."""
        if self.frames_dir is None:
            raise DatasetError(f"item {self.id!r} has no video_path")
        return self.frames_dir / f"frame_{index}" / f"{self.id}.jpg"


@dataclass(frozen=True)
class EvalDataset:
    """Items in order plus where they came from (``kind``: ``"reference-json"`` or ``"videos"``)."""

    items: tuple[EvalItem, ...]
    source: str
    kind: str

    @property
    def has_labels(self) -> bool:
        """True when any item carries labels (classification is possible)."""
        return any(item.labels is not None for item in self.items)

    def __len__(self) -> int:
        return len(self.items)


def _resolve(value: str, base: Path, want_dir: bool) -> Path:
    """A path as given when it exists, else relative to ``base`` (also when neither exists, so
    that a report names the place the documented rule looked last)."""
    path = Path(value).expanduser()
    exists = Path.is_dir if want_dir else Path.is_file
    if exists(path) or path.is_absolute():
        return path
    return base / path


def read_dataset_json(path: str | Path) -> EvalDataset:
    """Read a reference dataset JSON (SPEC section 8) into evaluation items.

    Raises :class:`DatasetError` when the file is unreadable or not ``{"data": [...]}``. An
    entry lacking ``video_id`` (or not an object) becomes an item with a ``problem``, reported
    as a failure at evaluation time; missing ``wav`` / ``video_path`` / ``labels`` only matter
    when the evaluation needs them.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"cannot read dataset {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DatasetError(
            f'{path} is not a reference dataset: expected {{"data": [{{"video_id", "wav",'
            ' "video_path", "labels"}, ...]}'
        )
    base = path.resolve().parent
    items: list[EvalItem] = []
    for n, entry in enumerate(data["data"]):
        if not isinstance(entry, dict) or not entry.get("video_id"):
            items.append(EvalItem(id=f"#{n}", labels=None, problem=f"entry {n} has no video_id"))
            continue
        labels = entry.get("labels")
        wav, video_path = entry.get("wav"), entry.get("video_path")
        items.append(
            EvalItem(
                id=str(entry["video_id"]),
                labels=None if labels is None else (str(labels),),
                wav=_resolve(str(wav), base, want_dir=False) if wav else None,
                frames_dir=_resolve(str(video_path), base, want_dir=True) if video_path else None,
            )
        )
    if not items:
        raise DatasetError(f"{path} lists no clips")
    return EvalDataset(items=tuple(items), source=str(path), kind="reference-json")


def read_labels_file(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Read a labels file (see the module docstring): key -> raw label fields.

    Keys holding a ``/`` (or the platform separator) are resolved against the labels file's
    folder and stored as absolute paths; other keys are stored as written (a file name or id).
    Raises :class:`DatasetError` on an unreadable file, a row without labels, or a key given twice.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DatasetError(f"cannot read labels file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a UTF-8 text CSV") from None
    base = path.resolve().parent
    out: dict[str, tuple[str, ...]] = {}
    first = True
    for line, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if cells[0].lower() in _HEADER_KEYS and len(cells) > 1 and cells[1].lower() == "labels":
                continue
        fields = tuple(c for c in cells[1:] if c)
        if not cells[0] or not fields:
            raise DatasetError(
                f"{path}, line {line}: expected 'file_or_id,labels' (e.g. dog.mp4,Dog;Bark)"
            )
        key = cells[0]
        if "/" in key or "\\" in key:
            key = str((base / Path(key).expanduser()).resolve())
        if key in out:
            raise DatasetError(f"{path}, line {line}: {cells[0]!r} is listed twice")
        out[key] = fields
    if not out:
        raise DatasetError(f"{path} has no label rows (expected 'file_or_id,labels')")
    return out


def read_video_files(
    paths: Sequence[str | Path], labels_file: str | Path | None = None
) -> EvalDataset:
    """Items for media files, labelled from ``labels_file`` when given.

    A video is looked up in the labels file by its path (keys with a ``/``), its file name, then
    its id (the file name without ending). A video missing from the labels file has no labels
    (reported and skipped when classifying); rows naming no given video are ignored.
    """
    if not paths:
        raise DatasetError("no video files to evaluate")
    table = read_labels_file(labels_file) if labels_file is not None else None
    items: list[EvalItem] = []
    for p in paths:
        video = Path(p)
        labels: tuple[str, ...] | None = None
        if table is not None:
            labels = (
                table.get(str(video.resolve())) or table.get(video.name) or table.get(video.stem)
            )
        items.append(EvalItem(id=video.stem, labels=labels, video=video))
    if table is not None and not any(item.labels is not None for item in items):
        raise DatasetError(
            f"none of the {len(items)} videos is listed in {labels_file} (name a video by file"
            " name, by id = file name without ending, or by a path relative to the labels file)"
        )
    return EvalDataset(
        items=tuple(items),
        source=", ".join(str(p) for p in paths[:3])
        + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""),
        kind="videos",
    )


# -- labels -> targets ----------------------------------------------------------------------
def model_label_set(pipeline: Pipeline, labels_csv: str | Path | None = None) -> LabelSet | None:
    """The label set to map dataset labels through: ``labels_csv`` when given, else the
    model's manifest (names, and ids when the manifest has them). ``None`` when neither has one.

    Raises :class:`CavmaeError` when the label set's size differs from the model's class count.
    """
    m = pipeline.manifest
    if labels_csv is not None:
        label_set = read_label_csv(labels_csv)
    elif m.labels is not None:
        label_set = LabelSet(names=tuple(m.labels), ids=tuple(m.label_ids or m.labels))
    else:
        return None
    classes = m.model_config.num_classes
    if m.model_kind == "classifier" and len(label_set) != classes:
        where = labels_csv if labels_csv is not None else "the model's manifest"
        raise CavmaeError(
            f"the label set of {where} has {len(label_set)} classes but the model has {classes};"
            " pass the label CSV the model was trained with (--labels)"
        )
    return label_set


def _label_index(label_set: LabelSet) -> dict[str, int]:
    """Token -> class index: ids first, then display names, then lower-cased names."""
    index: dict[str, int] = {}
    for i, name in enumerate(label_set.names):
        index.setdefault(name.lower(), i)
    for i, name in enumerate(label_set.names):
        index[name] = i
    for i, mid in enumerate(label_set.ids):
        index[mid] = i
    return index


def split_labels(fields: Iterable[str], index: dict[str, int]) -> list[str]:
    """Split raw label fields into label tokens (see the module docstring for the rule).

    ``index`` is the token -> class map of the label set (used to keep a name containing a
    comma whole).
    """
    tokens: list[str] = []
    for raw in fields:
        text = raw.strip()
        if not text:
            continue
        if text in index or text.lower() in index:
            tokens.append(text)
            continue
        sep = ";" if ";" in text else ","
        tokens.extend(t.strip() for t in text.split(sep) if t.strip())
    return tokens


def encode_targets(
    items: Sequence[EvalItem], label_set: LabelSet, task: str
) -> tuple[np.ndarray, dict[int, str]]:
    """Multi-hot targets ``[N, C]`` (uint8) of ``items`` and the items that cannot be scored.

    Returns ``(targets, problems)`` with ``problems`` mapping item position -> reason: unknown
    label, no labels in the dataset, or (single-label task) not exactly one label.
    """
    index = _label_index(label_set)
    targets = np.zeros((len(items), len(label_set)), dtype=np.uint8)
    problems: dict[int, str] = {}
    for n, item in enumerate(items):
        if item.problem is not None:
            problems[n] = item.problem
            continue
        if item.labels is None:
            problems[n] = (
                "no labels for this clip (add a row for it to the labels file)"
                if item.video is not None
                else "the dataset entry has no 'labels'"
            )
            continue
        tokens = split_labels(item.labels, index)
        unknown = [t for t in tokens if t not in index and t.lower() not in index]
        if unknown:
            problems[n] = f"unknown label {unknown[0]!r} (not in the label set)"
            continue
        classes = sorted({index[t] if t in index else index[t.lower()] for t in tokens})
        if task == "single-label" and len(classes) != 1:
            problems[n] = f"a single-label task needs exactly one label, got {len(classes)}"
            continue
        targets[n, classes] = 1
    return targets, problems


# -- loading ----------------------------------------------------------------------------------
@dataclass
class LoadedItem:
    """Model inputs of one item: ``audio [T, F]`` and ``frames [K, 3, H, W]`` (either may be None)."""

    audio: np.ndarray | None
    frames: np.ndarray | None


def load_item(
    item: EvalItem,
    *,
    need_audio: bool,
    frame_indices: Sequence[int] | None,
    num_frames: int,
    config: PreprocessConfig,
) -> LoadedItem:
    """Read and preprocess one item.

    Reference items: the wav's first channel at ``config.sample_rate`` (the ``audio_seconds``
    that fill the spectrogram) -> :func:`prepare_audio`; the JPEGs of ``frame_indices`` ->
    :func:`preprocess_frame`. Video items: :func:`load_clip` with ``num_frames`` frames, of which
    ``frame_indices`` are kept. ``frame_indices=None`` loads no frames.

    Raises :class:`CavmaeError` (usually a ``MediaError``) when something is missing or corrupt.
    """
    if item.problem is not None:
        raise DatasetError(item.problem)
    need_frames = frame_indices is not None
    if item.video is not None:
        from cavmae.media import load_clip

        clip = load_clip(
            item.video,
            num_frames=num_frames,
            config=config,
            need_audio=need_audio,
            need_video=need_frames,
        )
        frames = (
            clip.frames[list(frame_indices)] if need_frames and clip.frames is not None else None
        )
        return LoadedItem(audio=clip.audio, frames=frames)
    audio = frames = None
    if need_audio:
        from cavmae.audio import prepare_audio
        from cavmae.media import decode_audio

        if item.wav is None:
            raise DatasetError(f"{item.id}: the dataset entry has no 'wav'")
        if not item.wav.is_file():
            raise DatasetError(f"{item.wav}: no such file")
        waveform = decode_audio(
            item.wav, sample_rate=config.sample_rate, duration=config.audio_seconds
        )
        audio = prepare_audio(waveform, config)
    if need_frames:
        from cavmae.visual import load_image, preprocess_frame

        if item.frames_dir is None:
            raise DatasetError(f"{item.id}: the dataset entry has no 'video_path'")
        frames = np.stack(
            [preprocess_frame(load_image(item.frame_path(i)), config) for i in frame_indices]
        )
    return LoadedItem(audio=audio, frames=frames)


def _attempt(fn: Callable[[], T]) -> T | BaseException:
    """Call ``fn``; return its exception instead of raising it (bad items are reported)."""
    try:
        return fn()
    except Exception as e:  # a bad item must not stop the batch; it is reported with its reason
        return e


def _loaded_stream(
    jobs: Sequence[T], load: Callable[[T], Any], workers: int, window: int
) -> Iterator[tuple[T, Any]]:
    """``(job, load(job) or its exception)`` in order, loading up to ``window`` ahead on
    ``workers`` threads (decoding releases the GIL)."""
    if workers <= 1:
        for job in jobs:
            yield job, _attempt(lambda j=job: load(j))
        return
    it = iter(jobs)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cavmae-eval") as pool:
        pending = deque(
            (job, pool.submit(_attempt, lambda j=job: load(j)))
            for job in islice(it, max(window, 1))
        )
        while pending:
            job, future = pending.popleft()
            for nxt in islice(it, 1):
                pending.append((nxt, pool.submit(_attempt, lambda j=nxt: load(j))))
            yield job, future.result()


# -- metrics ------------------------------------------------------------------------------------
def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def classification_metrics(scores: np.ndarray, targets: np.ndarray, task: str) -> dict[str, Any]:
    """Metrics of ``scores [N, C]`` against multi-hot ``targets [N, C]``.

    Multi-label: ``mAP`` and ``mAUC`` (means over the classes with a positive, resp. with a
    positive and a negative) and ``num_classes_with_positives``. Single-label: ``accuracy``
    (top-1, first class on a tie) and ``top5_accuracy``. All fractions in [0, 1]; NaN becomes
    ``None``.
    """
    n, c = scores.shape
    out: dict[str, Any] = {"num_clips": int(n), "num_classes": int(c)}
    if task == "single-label":
        truth = targets.argmax(axis=1)
        out["accuracy"] = _finite(accuracy(scores, truth))
        k = min(5, c)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out["top5_accuracy"] = _finite(
            float((top == truth[:, None]).any(axis=1).mean()) if n else math.nan
        )
    else:
        ap = mean_average_precision(scores, targets)
        out["mAP"] = _finite(ap.map)
        out["mAUC"] = _finite(mean_auc(scores, targets).auc)
        out["num_classes_with_positives"] = ap.num_valid
    return out


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_ranks(queries: np.ndarray, items: np.ndarray, block: int = 4096) -> np.ndarray:
    """1-based rank of item ``i`` for query ``i`` by similarity ``queries @ items.T``.

    Args:
        queries, items: ``[N, D]`` (L2-normalize them first for cosine similarity).
        block: rows and columns per block: peak memory is ``block x block`` float64, whatever N.

    The rank rule is :func:`cavmae.metrics.retrieval_metrics`'s: 1 + the number of items scoring
    strictly higher than the correct one. Returns ``[N]`` int64.
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


def summarize_ranks(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), median and mean rank, as :func:`retrieval_metrics` reports them."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float((ranks <= k).mean() * 100.0) for k in (1, 5, 10)}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(ranks.mean())
    out["num_queries"] = float(ranks.shape[0])
    return out


def retrieval_report(
    audio_embeddings: np.ndarray, visual_embeddings: np.ndarray, block: int = 4096
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Cosine-similarity retrieval both ways (SPEC section 6).

    Args:
        audio_embeddings, visual_embeddings: ``[N, D]``; clip ``i``'s audio matches clip ``i``'s
            visual embedding. They are L2-normalized here.
        block: up to this N the full ``[N, N]`` similarity goes through
            :func:`retrieval_metrics`; above it ranks are computed block-wise.

    Returns ``(metrics, ranks)``: ``{"audio_to_visual": ..., "visual_to_audio": ...}`` each with
    :func:`retrieval_metrics`' keys, and the per-query ranks ``[N]`` of each direction.
    """
    a, v = _l2(audio_embeddings), _l2(visual_embeddings)
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


# -- the evaluation loop -------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemFailure:
    """An item that could not be evaluated, and why."""

    id: str
    source: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "path": self.source, "error": self.reason}


@dataclass
class EvaluationResult:
    """Metrics of one evaluation run plus the arrays behind them.

    ``classification`` and ``retrieval`` are None when that part was off. The arrays hold the
    evaluated items only, in dataset order: ``ids [N]``, ``scores [N, C]`` probabilities,
    ``targets [N, C]`` multi-hot, ``audio_embeddings`` / ``visual_embeddings [N, D]`` and the
    per-query retrieval ``ranks``.
    """

    dataset: str
    dataset_kind: str
    model: str
    engine: str
    num_items: int
    task: str | None = None
    mode: str | None = None
    retrieval_frame: str | None = None
    classification: dict[str, Any] | None = None
    retrieval: dict[str, dict[str, float]] | None = None
    failures: list[ItemFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    label_names: tuple[str, ...] | None = None
    scores: np.ndarray | None = None
    targets: np.ndarray | None = None
    audio_embeddings: np.ndarray | None = None
    visual_embeddings: np.ndarray | None = None
    ranks: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_evaluated(self) -> int:
        return len(self.ids)

    @property
    def num_failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        """True when every item was evaluated."""
        return not self.failures and self.num_evaluated > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays; NaN written as null)."""
        retrieval = None
        if self.retrieval is not None:
            retrieval = {
                direction: {k: (int(x) if k == "num_queries" else _finite(x)) for k, x in m.items()}
                for direction, m in self.retrieval.items()
            }
        return {
            "dataset": self.dataset,
            "dataset_kind": self.dataset_kind,
            "model": self.model,
            "engine": self.engine,
            "task": self.task,
            "mode": self.mode,
            "retrieval_frame": self.retrieval_frame,
            "num_items": self.num_items,
            "num_evaluated": self.num_evaluated,
            "num_failed": self.num_failed,
            "classification": self.classification,
            "retrieval": retrieval,
            "failed": [f.to_dict() for f in self.failures],
            "notes": list(self.notes),
            "units": {"classification": "fraction", "recall": "percent"},
        }

    def save_predictions(self, path: str | Path) -> Path:
        """Write the arrays to an ``.npz``: ``ids``, ``failed_ids``, and where present ``scores``,
        ``targets``, ``label_names``, ``audio_embeddings``, ``visual_embeddings``,
        ``ranks_audio_to_visual``, ``ranks_visual_to_audio``."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "ids": np.asarray(self.ids, dtype=str),
            "failed_ids": np.asarray([f.id for f in self.failures], dtype=str),
        }
        optional = {
            "scores": self.scores,
            "targets": self.targets,
            "audio_embeddings": self.audio_embeddings,
            "visual_embeddings": self.visual_embeddings,
        }
        arrays.update({k: v for k, v in optional.items() if v is not None})
        if self.label_names is not None:
            arrays["label_names"] = np.asarray(self.label_names, dtype=str)
        arrays.update({f"ranks_{k}": v for k, v in self.ranks.items()})
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                np.savez(f, **arrays)
        except OSError as e:
            raise CavmaeError(f"cannot write predictions to {path}: {e.strerror}") from None
        return path


ProgressWrapper = Callable[[Iterable[Any], int], Iterable[Any]]


def _decide(
    pipeline: Pipeline,
    dataset: EvalDataset,
    classification: bool | None,
    retrieval: bool | None,
    mode: str | None,
    notes: list[str],
) -> tuple[bool, bool, str | None]:
    """Which parts run and in which mode; explicit requests that cannot work raise."""
    m = pipeline.manifest
    do_cls = classification
    if m.model_kind != "classifier":
        if classification:
            raise ModelKindError(
                "this is a pre-training model without a classification head; evaluate a"
                " fine-tuned model for mAP / accuracy, or pass --no-classification"
            )
        if classification is None:
            notes.append("classification off: a pre-training model has no classification head")
        do_cls = False
    elif not dataset.has_labels:
        if classification:
            raise DatasetError("classification needs labels: pass a labels file (--labels-file)")
        if classification is None:
            notes.append("classification off: the dataset has no labels (pass --labels-file)")
        do_cls = False
    elif do_cls is None:
        do_cls = True
    if do_cls:
        modes = pipeline.classify_modes
        if mode is None:
            mode = "av" if "av" in modes else (modes[0] if modes else "av")
        if mode not in CLASSIFY_GRAPHS:
            raise CavmaeError(f"mode must be one of {', '.join(CLASSIFY_GRAPHS)}, not {mode!r}")
        if mode not in modes:
            raise ModelKindError(
                f"this model cannot classify in mode {mode!r}; it supports: {', '.join(modes) or 'none'}"
            )
    else:
        mode = None
    has_embed = all(g in m.graphs for g in _EMBED_GRAPHS)
    do_ret = has_embed if retrieval is None else retrieval
    if retrieval and not has_embed:
        raise ModelKindError(
            "this export has no embedding graphs; re-export the model for retrieval"
        )
    if retrieval is None and not has_embed:
        notes.append("retrieval off: the export has no embedding graphs")
    if not (do_cls or do_ret):
        raise CavmaeError("nothing to evaluate: both classification and retrieval are off")
    return bool(do_cls), bool(do_ret), mode


def evaluate(
    pipeline: Pipeline,
    dataset: EvalDataset,
    *,
    label_set: LabelSet | None = None,
    mode: str | None = None,
    classification: bool | None = None,
    retrieval: bool | None = None,
    retrieval_frame: str = "middle",
    batch_size: int = 8,
    block: int = 4096,
    workers: int = 2,
    progress: ProgressWrapper | None = None,
    on_failure: Callable[[ItemFailure], None] | None = None,
    model_name: str | None = None,
) -> EvaluationResult:
    """Evaluate ``pipeline`` on ``dataset``.

    Args:
        label_set: maps dataset labels to model outputs; default :func:`model_label_set`'s.
        mode: ``av``, ``audio`` or ``visual`` classification; default ``av`` when the model has it.
        classification, retrieval: True / False force a part on / off; None decides: classification
            runs for classifiers on labelled datasets, retrieval whenever the export can embed.
        retrieval_frame: ``middle`` (the reference protocol) or ``mean`` (mean over frames).
        batch_size: clips per model call.
        block: similarity block size for retrieval ranks (bounds memory, not results).
        workers: threads decoding items ahead of the model (1 = decode inline).
        progress: wraps the item iterator, e.g. a progress bar: ``progress(iterable, total)``.
        on_failure: called with each bad item as it is met.
        model_name: how to name the model in the result; default the manifest's source
            (registry name or checkpoint path).

    Raises :class:`CavmaeError` for requests that cannot work (a pre-training model asked to
    classify, unsupported mode, missing label set); bad items never raise.
    """
    if batch_size < 1:
        raise CavmaeError("--batch-size must be at least 1")
    if block < 1:
        raise CavmaeError("--block must be at least 1")
    if retrieval_frame not in ("middle", "mean"):
        raise CavmaeError(f"retrieval frame must be 'middle' or 'mean', not {retrieval_frame!r}")
    m = pipeline.manifest
    notes: list[str] = []
    do_cls, do_ret, mode = _decide(pipeline, dataset, classification, retrieval, mode, notes)
    items = dataset.items
    result = EvaluationResult(
        dataset=dataset.source,
        dataset_kind=dataset.kind,
        model=model_name or str(m.source.get("name") or m.source.get("checkpoint") or "?"),
        engine=pipeline.describe(),
        num_items=len(items),
        task=m.task if do_cls else None,
        mode=mode,
        retrieval_frame=retrieval_frame if do_ret else None,
        notes=notes,
    )

    position: dict[int, int] = {}

    def fail(n: int, reason: str) -> None:
        item = items[n]
        failure = ItemFailure(id=item.id, source=item.source, reason=reason)
        position[id(failure)] = n
        result.failures.append(failure)
        if on_failure is not None:
            on_failure(failure)

    # labels are checked before anything is decoded
    targets_all: np.ndarray | None = None
    label_problems: dict[int, str] = {}
    if do_cls:
        if label_set is None:
            label_set = model_label_set(pipeline)
        if label_set is None:
            raise CavmaeError("the model carries no label set; pass the label CSV with --labels")
        if len(label_set) != m.model_config.num_classes:
            raise CavmaeError(
                f"the label set has {len(label_set)} classes but the model has"
                f" {m.model_config.num_classes}; pass the matching label CSV (--labels)"
            )
        targets_all, label_problems = encode_targets(items, label_set, m.task or "multi-label")
        unknown = [r for r in label_problems.values() if r.startswith("unknown label")]
        if items and len(unknown) == len(items):
            raise DatasetError(
                f"none of the {len(items)} clips' labels are in the label set ({unknown[0]});"
                " pass the label CSV the dataset uses (--labels)"
            )
        result.label_names = label_set.names

    # what to load
    cfg = m.preprocess
    num_frames = pipeline.num_frames
    middle = min(cfg.middle_frame, num_frames - 1)
    cls_audio = do_cls and mode in ("av", "audio")
    cls_frames = do_cls and mode in ("av", "visual")
    need_audio = cls_audio or do_ret
    if cls_frames or (do_ret and retrieval_frame == "mean"):
        frame_indices: list[int] | None = list(range(num_frames))
        embed_frame: int | str = "mean" if retrieval_frame == "mean" else middle
    elif do_ret:
        frame_indices, embed_frame = [middle], 0
    else:
        frame_indices, embed_frame = None, 0

    jobs = [n for n in range(len(items)) if n not in label_problems]
    for n, reason in label_problems.items():
        fail(n, reason)

    def load(n: int) -> LoadedItem:
        return load_item(
            items[n],
            need_audio=need_audio,
            frame_indices=frame_indices,
            num_frames=num_frames,
            config=cfg,
        )

    done: list[int] = []
    scores: list[np.ndarray] = []
    emb_a: list[np.ndarray] = []
    emb_v: list[np.ndarray] = []
    batch: list[tuple[int, LoadedItem]] = []

    def flush() -> None:
        if not batch:
            return
        audio = np.stack([x.audio for _, x in batch]) if need_audio else None
        frames = np.stack([x.frames for _, x in batch]) if frame_indices is not None else None
        if do_cls:
            scores.append(
                pipeline.classify_batch(
                    audio if cls_audio else None, frames if cls_frames else None, mode
                )
            )
        if do_ret:
            emb_a.append(pipeline.embed_audio(audio))
            emb_v.append(pipeline.embed_frames(frames, embed_frame))
        done.extend(n for n, _ in batch)
        batch.clear()

    stream: Iterable[tuple[int, Any]] = _loaded_stream(jobs, load, workers, window=2 * batch_size)
    if progress is not None:
        stream = progress(stream, len(jobs))
    for n, loaded in stream:
        if isinstance(loaded, BaseException):
            reason = (
                str(loaded)
                if isinstance(loaded, CavmaeError)
                else f"{type(loaded).__name__}: {loaded}"
            )
            fail(n, reason.splitlines()[0] if reason else type(loaded).__name__)
            continue
        batch.append((n, loaded))
        if len(batch) >= batch_size:
            flush()
    flush()

    result.failures.sort(key=lambda f: position[id(f)])  # dataset order
    result.ids = [items[n].id for n in done]
    if not done:
        result.notes.append("no clip could be evaluated")
        return result
    if do_cls:
        assert targets_all is not None
        result.scores = np.concatenate(scores)
        result.targets = targets_all[done]
        result.classification = classification_metrics(
            result.scores, result.targets, m.task or "multi-label"
        )
    if do_ret:
        result.audio_embeddings = np.concatenate(emb_a)
        result.visual_embeddings = np.concatenate(emb_v)
        result.retrieval, result.ranks = retrieval_report(
            result.audio_embeddings, result.visual_embeddings, block
        )
    return result
