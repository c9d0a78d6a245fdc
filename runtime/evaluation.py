"""Dataset evaluation: classification mAP / accuracy and audio-visual retrieval.

The driver only: datasets are read by :mod:`cavmae.clip_lists` (a reference dataset JSON, or
video files with a labels file; the formats and the path, label and missing-frame rules are
there) and scored by :mod:`cavmae.metrics`. Here it is decided which parts run, what each clip
needs loaded, and the clips are decoded ahead on threads (:func:`cavmae.prefetch.prefetch`)
while the pipeline runs them in mini-batches.

Classification runs :meth:`Pipeline.classify_batch` in mini-batches, which is the reference's
10-frame aggregation (per-frame probabilities averaged). Multi-label models are scored with
mAP and mean ROC AUC, single-label ones with top-1 and top-5 accuracy. Retrieval embeds the
audio-only and visual-only streams (middle frame, or the mean over frames), and ranks by cosine
similarity in both directions, block-wise so that memory stays bounded for any dataset size.

Units follow :mod:`cavmae.metrics`: mAP, AUC and accuracies are fractions in [0, 1]; retrieval
recalls are percentages.

A bad clip (missing wav or frame, corrupt video, unknown label) is skipped and reported in
:attr:`EvaluationResult.failures`; evaluation goes on with the others. A missing frame fails its
clip: evaluation never substitutes another frame. Mistakes in the dataset description itself
(unreadable JSON, a malformed labels file, a label set that does not match the model) raise
:class:`~cavmae.errors.CavmaeError`.

This module is numpy-only besides the pipeline; it never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cavmae import fsio
from cavmae.clip_lists import (
    ClipInputs,
    ClipList,
    ClipRecord,
    encode_targets,
    load_inputs,
    stack_inputs,
)
from cavmae.config import PreprocessConfig
from cavmae.errors import CavmaeError, DatasetError, MissingStreamError, ModelKindError
from cavmae.graphs import AUDIO_EMBED, VISUAL_EMBED
from cavmae.labels import LabelSet, read_label_csv
from cavmae.metrics import classification_metrics, finite_or_none, retrieval_report
from cavmae.modes import CLI_MODES, needs
from cavmae.prefetch import Fetched, prefetch

from .pipeline import CLASSIFY_GRAPHS, Pipeline

__all__ = [
    "EvaluationResult",
    "ItemFailure",
    "evaluate",
    "model_label_set",
]

#: graphs retrieval needs
_EMBED_GRAPHS = (AUDIO_EMBED.name, VISUAL_EMBED.name)

ProgressWrapper = Callable[[Iterable[Any], int], Iterable[Any]]


# -- labels ------------------------------------------------------------------------------------
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


def _labelled(clip: ClipRecord) -> bool:
    """Whether ``clip`` carries a label: an entry without ``labels``, or with ``"labels": ""``
    (or only separators), has none."""
    return clip.labels is not None and bool(clip.label_tokens())


def _targets(
    pipeline: Pipeline, clips: Sequence[ClipRecord], label_set: LabelSet | None
) -> tuple[np.ndarray, dict[int, str], LabelSet]:
    """Targets ``[N, C]`` of ``clips`` and the clips that cannot be scored, checked before
    anything is decoded; a label set that cannot work raises."""
    m = pipeline.manifest
    if label_set is None:
        label_set = model_label_set(pipeline)
    if label_set is None:
        raise CavmaeError("the model carries no label set; pass the label CSV with --labels")
    if len(label_set) != m.model_config.num_classes:
        raise CavmaeError(
            f"the label set has {len(label_set)} classes but the model has"
            f" {m.model_config.num_classes}; pass the matching label CSV (--labels)"
        )
    targets, problems = encode_targets(clips, label_set, m.task or "multi-label")
    for n, clip in enumerate(clips):  # an empty label string names no class: unlabelled
        if n not in problems and not _labelled(clip):
            problems[n] = "the dataset entry's 'labels' is empty"
    unknown = [r for r in problems.values() if r.startswith("unknown label")]
    if clips and len(unknown) == len(clips):
        raise DatasetError(
            f"none of the {len(clips)} clips' labels are in the label set ({unknown[0]});"
            " pass the label CSV the dataset uses (--labels)"
        )
    return targets, problems, label_set


# -- results -------------------------------------------------------------------------------------
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
    per-query retrieval ``ranks``. A clip that classification can use but retrieval cannot (it
    lacks the other stream) is classified and left out of retrieval: it is then in
    ``classified_only`` (id, reason), and ``retrieval_ids [M]`` names the rows of the
    embeddings and ranks (None: they are ``ids``).
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
    classified_only: list[tuple[str, str]] = field(default_factory=list)
    retrieval_ids: list[str] | None = None

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
                direction: {
                    k: (int(x) if k == "num_queries" else finite_or_none(x)) for k, x in m.items()
                }
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
            "classified_only": [{"id": i, "reason": why} for i, why in self.classified_only],
            "notes": list(self.notes),
            "units": {"classification": "fraction", "recall": "percent"},
        }

    def save_predictions(self, path: str | Path) -> Path:
        """Write the arrays to an ``.npz``: ``ids``, ``failed_ids``, and where present ``scores``,
        ``targets``, ``label_names``, ``audio_embeddings``, ``visual_embeddings``,
        ``ranks_audio_to_visual``, ``ranks_visual_to_audio`` and ``retrieval_ids`` (the rows of
        the embeddings and ranks, where some clips were classified only)."""
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
        if self.retrieval_ids is not None:
            arrays["retrieval_ids"] = np.asarray(self.retrieval_ids, dtype=str)
        if self.label_names is not None:
            arrays["label_names"] = np.asarray(self.label_names, dtype=str)
        arrays.update({f"ranks_{k}": v for k, v in self.ranks.items()})
        try:
            with fsio.atomic_open(path, "wb") as f:  # a new file: never half-written, links kept
                np.savez(f, allow_pickle=True, **arrays)  # numpy's default, named for mypy
        except OSError as e:
            raise CavmaeError(f"cannot write predictions to {path}: {e.strerror}") from None
        return path


# -- what runs -------------------------------------------------------------------------------------
def _check_arguments(batch_size: int, block: int, retrieval_frame: str) -> None:
    if batch_size < 1:
        raise CavmaeError("--batch-size must be at least 1")
    if block < 1:
        raise CavmaeError("--block must be at least 1")
    if retrieval_frame not in ("middle", "mean"):
        raise CavmaeError(f"retrieval frame must be 'middle' or 'mean', not {retrieval_frame!r}")


def _decide(
    pipeline: Pipeline,
    dataset: ClipList,
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
    elif not any(_labelled(clip) for clip in dataset.clips):
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
            mode = modes[0] if modes else CLI_MODES[0]  # the model's default: both when it can
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


@dataclass(frozen=True)
class _Plan:
    """Which parts run, what each clip needs loaded and which frame retrieval embeds."""

    classify: bool
    retrieve: bool
    mode: str | None
    cls_audio: bool
    cls_frames: bool
    frame_indices: list[int] | None  # frames to load per clip; None: no frames
    embed_frame: int | str  # index into the loaded frames, or "mean"
    num_frames: int
    config: PreprocessConfig

    @property
    def need_audio(self) -> bool:
        return self.cls_audio or self.retrieve

    def load(self, clip: ClipRecord) -> _Loaded:
        """The clip's inputs for both parts; a clip without a stream only retrieval needs is
        loaded for classification alone (``skip_retrieval`` says why)."""
        try:
            return _Loaded(self._load(clip, self.need_audio, self.frame_indices))
        except MissingStreamError as e:
            cls_needs = self.cls_audio if e.stream == "audio" else self.cls_frames
            if not (self.classify and self.retrieve) or cls_needs:
                raise
            frames = self.frame_indices if self.cls_frames else None
            return _Loaded(self._load(clip, self.cls_audio, frames), skip_retrieval=str(e.with_hint("")))

    def _load(self, clip: ClipRecord, need_audio: bool, frame_indices: list[int] | None) -> ClipInputs:
        return load_inputs(clip, need_audio=need_audio, frame_indices=frame_indices,
                           num_frames=self.num_frames, config=self.config)


@dataclass(frozen=True)
class _Loaded:
    """A clip's inputs, and why retrieval cannot use them (None: it can)."""

    inputs: ClipInputs
    skip_retrieval: str | None = None


def _plan(
    pipeline: Pipeline, do_cls: bool, do_ret: bool, mode: str | None, retrieval_frame: str
) -> _Plan:
    """Retrieval with the middle frame loads that frame only, unless classification needs all."""
    cfg = pipeline.manifest.preprocess
    num_frames = pipeline.num_frames
    middle = min(cfg.middle_frame, num_frames - 1)
    cls_audio, cls_frames = needs(mode) if do_cls and mode is not None else (False, False)
    frame_indices: list[int] | None
    embed_frame: int | str
    if cls_frames or (do_ret and retrieval_frame == "mean"):
        frame_indices = list(range(num_frames))
        embed_frame = "mean" if retrieval_frame == "mean" else middle
    elif do_ret:
        frame_indices, embed_frame = [middle], 0
    else:
        frame_indices, embed_frame = None, 0
    return _Plan(
        classify=do_cls,
        retrieve=do_ret,
        mode=mode,
        cls_audio=cls_audio,
        cls_frames=cls_frames,
        frame_indices=frame_indices,
        embed_frame=embed_frame,
        num_frames=num_frames,
        config=cfg,
    )


# -- the loop ----------------------------------------------------------------------------------------
class _Outputs:
    """Model outputs gathered batch by batch; ``done`` holds the clip positions, in order."""

    def __init__(self, pipeline: Pipeline, plan: _Plan) -> None:
        self.pipeline, self.plan = pipeline, plan
        self.done: list[int] = []  # clip positions evaluated (by every part that could use them)
        self.retrieved: list[int] = []  # the positions of those in retrieval
        self.classified_only: list[tuple[int, str]] = []  # (position, why retrieval could not)
        self.scores: list[np.ndarray] = []
        self.emb_a: list[np.ndarray] = []
        self.emb_v: list[np.ndarray] = []

    def run(self, batch: Sequence[tuple[int, _Loaded]]) -> None:
        """Classify and / or embed one mini-batch of loaded clips."""
        if not batch:
            return
        plan, pipe = self.plan, self.pipeline
        if plan.classify:
            assert plan.mode is not None  # _plan classifies only in a given mode
            self.scores.append(
                pipe.classify_batch(
                    stack_inputs([x.inputs.audio for _, x in batch]) if plan.cls_audio else None,
                    stack_inputs([x.inputs.frames for _, x in batch]) if plan.cls_frames else None,
                    plan.mode,
                )
            )
        if plan.retrieve:
            self.classified_only.extend((n, x.skip_retrieval) for n, x in batch if x.skip_retrieval)
            usable = [(n, x.inputs) for n, x in batch if x.skip_retrieval is None]
            if usable:  # retrieval loads both streams (_plan)
                self.emb_a.append(pipe.embed_audio(stack_inputs([x.audio for _, x in usable])))
                frames = stack_inputs([x.frames for _, x in usable])
                self.emb_v.append(pipe.embed_frames(frames, plan.embed_frame))
                self.retrieved.extend(n for n, _ in usable)
        self.done.extend(n for n, _ in batch)


def _reason(error: Exception) -> str:
    """One line for a failed clip: a CavmaeError's own message, else the exception type too."""
    reason = str(error) if isinstance(error, CavmaeError) else f"{type(error).__name__}: {error}"
    return reason.splitlines()[0] if reason else type(error).__name__


def _run(
    outputs: _Outputs,
    clips: Sequence[ClipRecord],
    jobs: Sequence[int],
    fail: Callable[[int, str], None],
    *,
    batch_size: int,
    workers: int,
    progress: ProgressWrapper | None,
) -> None:
    """Load the clips at positions ``jobs`` ahead on ``workers`` threads (decoding releases the
    GIL; 1 = inline) and run them in batches of ``batch_size``; a clip that fails to load is
    reported through ``fail`` and skipped."""
    stream: Iterable[Fetched[int, _Loaded]] = prefetch(
        lambda n: outputs.plan.load(clips[n]),
        jobs,
        workers=workers if workers > 1 else 0,
        ahead=2 * batch_size,
        thread_name="cavmae-eval",
    )
    if progress is not None:
        stream = progress(stream, len(jobs))
    batch: list[tuple[int, _Loaded]] = []
    for got in stream:
        if got.error is not None:
            fail(got.item, _reason(got.error))
            continue
        assert got.value is not None
        batch.append((got.item, got.value))
        if len(batch) >= batch_size:
            outputs.run(batch)
            batch.clear()
    outputs.run(batch)


def _score(
    result: EvaluationResult, outputs: _Outputs, targets: np.ndarray | None, task: str, block: int
) -> None:
    """Fill ``result``'s arrays and metrics from the gathered outputs."""
    if outputs.plan.classify:
        assert targets is not None
        result.scores = np.concatenate(outputs.scores)
        result.targets = targets[outputs.done]
        result.classification = classification_metrics(result.scores, result.targets, task)
    if outputs.plan.retrieve and outputs.classified_only:
        id_of = dict(zip(outputs.done, result.ids, strict=True))
        result.classified_only = [(id_of[n], why) for n, why in outputs.classified_only]
        result.retrieval_ids = [id_of[n] for n in outputs.retrieved]
        result.notes.append(
            f"{len(outputs.classified_only)} clip(s) lack a stream retrieval needs ({outputs.classified_only[0][1]}"
            f"{', ...' if len(outputs.classified_only) > 1 else ''}): classified, left out of retrieval"
        )
    if outputs.plan.retrieve and not outputs.retrieved:
        result.notes.append("retrieval: no clip has both streams")
    elif outputs.plan.retrieve:
        result.audio_embeddings = np.concatenate(outputs.emb_a)
        result.visual_embeddings = np.concatenate(outputs.emb_v)
        result.retrieval, result.ranks = retrieval_report(
            result.audio_embeddings, result.visual_embeddings, block
        )


def evaluate(
    pipeline: Pipeline,
    dataset: ClipList,
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
        workers: threads decoding clips ahead of the model (1 = decode inline).
        progress: wraps the clip iterator, e.g. a progress bar: ``progress(iterable, total)``.
        on_failure: called with each bad clip as it is met.
        model_name: how to name the model in the result; default the manifest's source
            (registry name or checkpoint path).

    Raises :class:`CavmaeError` for requests that cannot work (a pre-training model asked to
    classify, unsupported mode, missing label set); bad clips never raise.
    """
    _check_arguments(batch_size, block, retrieval_frame)
    m = pipeline.manifest
    notes: list[str] = []
    do_cls, do_ret, mode = _decide(pipeline, dataset, classification, retrieval, mode, notes)
    clips = dataset.clips
    task = m.task or "multi-label"
    result = EvaluationResult(
        dataset=dataset.source,
        dataset_kind=dataset.kind,
        model=model_name or str(m.source.get("name") or m.source.get("checkpoint") or "?"),
        engine=pipeline.describe(),
        num_items=len(clips),
        task=m.task if do_cls else None,
        mode=mode,
        retrieval_frame=retrieval_frame if do_ret else None,
        notes=notes,
    )
    failed: list[tuple[int, ItemFailure]] = []

    def fail(n: int, reason: str) -> None:
        failure = ItemFailure(id=clips[n].video_id, source=clips[n].source, reason=reason)
        failed.append((n, failure))
        if on_failure is not None:
            on_failure(failure)

    targets: np.ndarray | None = None
    label_problems: dict[int, str] = {}
    if do_cls:
        targets, label_problems, label_set = _targets(pipeline, clips, label_set)
        result.label_names = label_set.names
    for n, reason in label_problems.items():
        fail(n, reason)
    outputs = _Outputs(pipeline, _plan(pipeline, do_cls, do_ret, mode, retrieval_frame))
    jobs = [n for n in range(len(clips)) if n not in label_problems]
    _run(outputs, clips, jobs, fail, batch_size=batch_size, workers=workers, progress=progress)

    result.failures = [f for _, f in sorted(failed, key=lambda pair: pair[0])]  # dataset order
    result.ids = [clips[n].video_id for n in outputs.done]
    if not outputs.done:
        result.notes.append("no clip could be evaluated")
        return result
    _score(result, outputs, targets, task, block)
    return result
