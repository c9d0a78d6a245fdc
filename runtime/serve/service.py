"""The one place where the HTTP service calls the runtime: decoding, model calls, records.

Everything the endpoints need from the pipeline, the media decoder, the embedding index and
the figure helpers goes through :class:`Service`, so a change of those APIs touches this module
only. Its methods come in three kinds, by the thread they run on:

- ``plan_classify``, ``decode_*`` and ``search``: a worker thread of the decoding pool (file
  I/O and numpy);
- ``run_batch``: the batcher's model thread, on a batch of decoded payloads;
- the rest (``model_info``, ``*_response``): anywhere; they only format results.

Batch keys: ``("classify", mode)`` with a :class:`ClassifyInput` of ``n`` windows (at most
one batch of them: a long file's windows are decoded and run a batch at a time, so a request
holds a bounded amount of decoded media) -> probabilities ``[n, C]``; ``("embed", frame)`` with ``(audio [T, F] | None,
frames [F, 3, H, W] | None)`` -> ``(audio embedding [D] | None, visual embedding [D] | None)``;
``("localize",)`` with ``(audio [T, F], image [3, H, W])`` -> heat map ``[gh, gw]``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cavmae.clip_lists import stack_inputs
from cavmae.errors import CavmaeError, MediaError, MissingStreamError, ModelKindError
from cavmae.modes import AUTO, needs

from ..classify_records import classification_record, clip_end, clip_starts, file_mode, label_names

log = logging.getLogger(__name__)

QUERY_MODALITIES = ("audio", "visual", "both")
SEARCH_TARGETS = ("audio", "visual", "both")


class MediaTooLong(CavmaeError):
    """The media is longer than the server accepts for one request."""


@dataclass(frozen=True)
class ClassifyRequest:
    """A validated classify request: which windows of the file, with which mode (``auto``:
    decided per file, from its streams)."""

    mode: str
    top_k: int = 5
    offset: float = 0.0
    window: float | None = None
    hop: float | None = None
    all_scores: bool = False


@dataclass(frozen=True)
class ClassifyPlan:
    """Which windows of one file a classify request covers, in which mode (``auto`` resolved);
    made before any window is decoded, so the windows can be decoded a few at a time."""

    mode: str
    starts: list[float]
    span: float | None
    duration: float


@dataclass
class ClassifyInput:
    """Decoded windows of one file (some of its plan's), ready for one ``("classify", mode)`` job."""

    mode: str  # the plan's
    audio: np.ndarray | None  # [n, T, F]
    frames: np.ndarray | None  # [n, F, 3, H, W]
    size: int


@dataclass
class EmbedInput:
    audio: np.ndarray | None  # [T, F]
    frames: np.ndarray | None  # [F, 3, H, W]
    duration: float


@dataclass
class LocalizeInput:
    audio: np.ndarray  # [T, F]
    image: np.ndarray  # [3, H, W]
    frame: int
    frame_time: float


def _too_many_windows(window: float, hop: float, duration: float, max_windows: int) -> CavmaeError:
    return CavmaeError(
        f"windows of {window:g} s every {hop:g} s over {duration:.1f} s of media: this server computes at"
        f" most {max_windows} per request (use a larger hop, or start the server with a larger --max-windows)"
    )


class Service:
    """A loaded pipeline (and optionally an embedding index) as the HTTP API uses it."""

    def __init__(self, pipeline: Any, index: Any | None = None, index_path: str | None = None,
                 model_ref: str | None = None) -> None:
        self.pipe = pipeline
        self.index = index
        self.index_path = index_path
        self.model_ref = model_ref
        m = pipeline.manifest
        self.preprocess = m.preprocess
        self.num_frames: int = pipeline.num_frames
        self.names: tuple[str, ...] = label_names(pipeline)

    @classmethod
    def open(cls, model: str, *, engine: str = "auto", device: str = "auto", index: str | None = None,
             mirror: str | None = None, num_frames: int | None = None, precision: str | None = None,
             labels: str | None = None, progress: bool = False) -> Service:
        """Load ``model`` (registry name, checkpoint or export) and, if given, the index;
        ``labels``: a label CSV naming the classes instead of the model's own names."""
        from cavmae.runtime import index as ix
        from cavmae.runtime import load

        opened = None
        if index is not None:
            opened = ix.EmbeddingIndex.open(index)  # before the model: a typo fails fast
            if len(opened) == 0:
                raise CavmaeError(f"{index} is empty; add clips with cavmae embed")
            if ix.find_shards(index):
                log.warning("%s has shard directories not merged yet; searches miss their rows"
                            " until `cavmae index merge %s`", index, index)
        pipe = load(model, engine=engine, device=device, mirror=mirror, num_frames=num_frames, precision=precision,
                    labels=labels, progress=progress)
        try:
            if opened is not None and index is not None:
                ix.check_compatible(opened.meta, ix.model_identity(pipe.manifest),
                                    dim=pipe.manifest.model_config.embed_dim, where=index)
        except BaseException:
            pipe.close()
            raise
        return cls(pipe, opened, index, model_ref=str(model))

    def close(self) -> None:
        self.pipe.close()

    # -- facts ------------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        return self.pipe.manifest.model_kind == "classifier"

    @property
    def can_localize(self) -> bool:
        graphs = self.pipe.manifest.graphs
        return "audio_embed" in graphs and "visual_embed" in graphs

    @property
    def default_frame(self) -> str | int:
        """The visual embedding's frame: the index's choice (so queries match it), else middle."""
        return self.index.frame if self.index is not None else "middle"

    def model_info(self) -> dict[str, Any]:
        """What is loaded, for ``GET /v1/model`` and the web page."""
        m = self.pipe.manifest
        cfg = m.model_config
        info: dict[str, Any] = {
            "model": self.model_ref,
            "kind": m.model_kind,
            "task": m.task,
            "precision": m.precision,
            "engine": self.pipe.describe(),
            "modes": list(self.pipe.classify_modes) if self.is_classifier else [],
            "num_classes": cfg.num_classes if self.is_classifier else 0,
            "classes": list(self.names) if self.is_classifier else [],
            "num_frames": self.num_frames,
            "embed_dim": cfg.embed_dim,
            "localize": self.can_localize,
            "index": None,
        }
        if self.index is not None:
            info["index"] = {"path": self.index_path, "count": len(self.index), "dim": self.index.dim,
                             "frame": self.index.frame}
        return info

    def choose_mode(self, mode: str) -> str:
        """``mode`` checked against the model: one it supports, or ``auto`` (decided per file)."""
        if not self.is_classifier:
            raise ModelKindError(
                "this server runs a pre-training model without a classification head; start it with"
                " a fine-tuned model such as as-full-51.2 to classify"
            )
        supported = self.pipe.classify_modes
        if mode != AUTO and mode not in supported:
            raise ModelKindError(f"this model cannot classify with mode {mode!r}; it supports:"
                                 f" {', '.join(supported)} (or {AUTO})")
        return mode

    def check_frames(self, frames: int | None) -> None:
        if frames is not None and frames != self.num_frames:
            raise CavmaeError(
                f"this server's model aggregates {self.num_frames} frames per clip; ask for frames="
                f"{self.num_frames} or start the server with --frames {frames}"
            )

    def parse_frame(self, frame: str | None) -> str | int:
        from cavmae.runtime.index import parse_frame

        choice = parse_frame(frame) if frame else self.default_frame
        if isinstance(choice, int) and not 0 <= choice < self.num_frames:
            raise CavmaeError(f"frame must be 'middle', 'mean' or an index in 0..{self.num_frames - 1}, not {choice}")
        return choice

    # -- decoding (pool threads) ------------------------------------------------------------
    def probe(self, path: Path, max_duration: float) -> Any:
        """The file's streams and duration; refuses media longer than ``max_duration``."""
        from cavmae.media import probe

        info = probe(path)
        if info.duration > max_duration:
            raise MediaTooLong(
                f"{path}: the media is {info.duration:.1f} s long; this server takes at most"
                f" {max_duration:g} s per request"
            )
        return info

    def plan_classify(self, path: Path, req: ClassifyRequest, max_duration: float,
                      max_windows: int) -> ClassifyPlan:
        """The window at ``req.offset``, or every sliding window, of ``path``, and the request's
        mode (for ``auto``, the one the file's streams allow, as on the command line)."""
        info = self.probe(path, max_duration)
        try:
            mode, _ = file_mode(path, req.mode, self.pipe.classify_modes)
        except MissingStreamError as e:
            raise e.with_hint(self._missing_hint(e.stream or "")) from None
        if req.window is not None:  # no window: one clip
            # checked before the list of starts is made: a tiny hop must not make a huge list
            hop = req.hop or req.window / 2
            if max(0.0, info.duration - req.window) >= hop * max_windows:  # > max_windows windows
                raise _too_many_windows(req.window, hop, info.duration, max_windows)
        starts = clip_starts(req.offset, req.window, req.hop, info.duration)
        if req.window is not None and len(starts) > max_windows:  # the tail window can add one
            raise _too_many_windows(req.window, req.hop or req.window / 2, info.duration, max_windows)
        return ClassifyPlan(mode=mode, starts=starts, span=req.window, duration=info.duration)

    def decode_windows(self, path: Path, plan: ClassifyPlan, starts: Sequence[float],
                       check: Callable[[], None] = lambda: None) -> ClassifyInput:
        """Decode the windows of ``plan`` that start at ``starts`` (a few of them: the caller
        bounds how many are held at once); ``check`` runs before each window and raises to stop
        (the request timed out, or the server is stopping)."""
        from cavmae.media import load_clip

        need_audio, need_video = needs(plan.mode)
        audio, frames = [], []
        try:
            for s in starts:
                check()
                clip = load_clip(path, num_frames=self.num_frames, offset=s, config=self.preprocess,
                                 need_audio=need_audio, need_video=need_video, duration=plan.span)
                audio.append(clip.audio)
                frames.append(clip.frames)
        except MissingStreamError as e:
            raise e.with_hint(self._missing_hint(e.stream or "")) from None
        return ClassifyInput(mode=plan.mode, audio=stack_inputs(audio) if need_audio else None,
                             frames=stack_inputs(frames) if need_video else None, size=len(starts))

    def decode_classify(self, path: Path, req: ClassifyRequest, max_duration: float,
                        max_windows: int) -> ClassifyInput:
        """Every window of the request at once (its plan's): for one clip or a few windows, as
        the benchmark measures a request's decode; the HTTP service decodes a batch at a time."""
        plan = self.plan_classify(path, req, max_duration, max_windows)
        return self.decode_windows(path, plan, plan.starts)

    def _missing_hint(self, stream: str) -> str:
        """What to do about a file without ``stream``, in this API's parameters."""
        from cavmae.modes import modes_without

        others = modes_without(self.pipe.classify_modes, stream)
        if others:
            return f"classify it with mode={others[0]} (or mode={AUTO})"
        track = "a sound track" if stream == "audio" else "a video track"
        return f"this server's model classifies with {'/'.join(self.pipe.classify_modes)} only: send a file with {track}"

    def decode_embed(self, path: Path, modality: str, max_duration: float) -> EmbedInput:
        """The streams of ``path`` that ``modality`` asks for and the file has."""
        from cavmae.media import load_clip

        info = self.probe(path, max_duration)
        need_audio = modality in ("audio", "both") and info.has_audio
        need_video = modality in ("visual", "both") and info.has_video
        if not (need_audio or need_video):
            want = "audio or video" if modality == "both" else ("audio" if modality == "audio" else "video")
            raise MediaError(f"{path}: no {want} stream to embed")
        clip = load_clip(path, num_frames=self.num_frames, config=self.preprocess,
                         need_audio=need_audio, need_video=need_video)
        return EmbedInput(audio=clip.audio, frames=clip.frames, duration=info.duration)

    def decode_localize(self, path: Path, frame: int | None, max_duration: float) -> LocalizeInput:
        """Audio and one frame (default the middle one) of ``path``; both streams are needed."""
        from cavmae.media import load_clip

        self.probe(path, max_duration)
        index = min(self.preprocess.middle_frame, self.num_frames - 1) if frame is None else frame
        if not 0 <= index < self.num_frames:
            raise CavmaeError(f"frame must be in 0..{self.num_frames - 1}, not {index}")
        clip = load_clip(path, num_frames=self.num_frames, config=self.preprocess)
        assert clip.audio is not None and clip.frames is not None  # load_clip loads both here
        return LocalizeInput(audio=clip.audio, image=clip.frames[index], frame=index,
                             frame_time=float(clip.frame_times[index]))

    # -- the model (batcher thread) ---------------------------------------------------------
    def run_batch(self, key: Hashable, payloads: Sequence[Any]) -> list[Any]:
        """Run one batch of same-key payloads; one result per payload (see the module doc)."""
        task = key[0]  # type: ignore[index]
        if task == "classify":
            return self._classify_batch(key[1], payloads)  # type: ignore[index]
        if task == "embed":
            return self._embed_batch(key[1], payloads)  # type: ignore[index]
        if task == "localize":
            return [np.asarray(self.pipe.localize(a, img), dtype=np.float32) for a, img in payloads]
        raise ValueError(f"unknown batch key {key!r}")

    def _classify_batch(self, mode: str, payloads: Sequence[ClassifyInput]) -> list[np.ndarray]:
        audio = np.concatenate([p.audio for p in payloads]) if payloads[0].audio is not None else None
        frames = np.concatenate([p.frames for p in payloads]) if payloads[0].frames is not None else None
        probs = self.pipe.classify_batch(audio, frames, mode)
        out, at = [], 0
        for p in payloads:
            out.append(probs[at : at + p.size])
            at += p.size
        return out

    def _embed_batch(self, frame: str | int, payloads: Sequence[EmbedInput]) -> list[tuple[Any, Any]]:
        results: list[list[Any]] = [[None, None] for _ in payloads]
        with_audio = [i for i, p in enumerate(payloads) if p.audio is not None]
        with_video = [i for i, p in enumerate(payloads) if p.frames is not None]
        if with_audio:
            emb = self.pipe.embed_audio(stack_inputs([payloads[i].audio for i in with_audio]))
            for i, e in zip(with_audio, emb, strict=True):
                results[i][0] = e
        if with_video:
            emb = self.pipe.embed_frames(stack_inputs([payloads[i].frames for i in with_video]), frame)
            for i, e in zip(with_video, emb, strict=True):
                results[i][1] = e
        return [(a, v) for a, v in results]

    def warmup(self) -> None:
        """One call through every graph the API uses, so the first request is not the slow one
        (ONNX Runtime plans memory, TensorRT builds contexts, on the first run)."""
        cfg = self.preprocess
        audio = np.zeros((1, cfg.target_length, cfg.num_mel_bins), dtype=np.float32)
        frames = np.zeros((1, self.num_frames, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
        if self.is_classifier:
            for mode in self.pipe.classify_modes:
                a_need, v_need = needs(mode)
                self.pipe.classify_batch(audio if a_need else None, frames if v_need else None, mode)
        if self.can_localize:
            self.pipe.embed(audio[0], frames[0])

    # -- results ----------------------------------------------------------------------------
    def classify_records(self, name: str, req: ClassifyRequest, plan: ClassifyPlan,
                         probs: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """The ``cavmae classify --json`` record of each window of ``plan``; ``probs``: the
        probabilities of its windows, in order, a batch of windows per array."""
        return [
            classification_record(
                name, plan.mode, start,
                clip_end(start, plan.span, plan.duration, self.preprocess.clip_seconds),
                p, self.names, req.top_k, req.all_scores,
            )
            for start, p in zip(plan.starts, np.concatenate(probs), strict=True)
        ]

    def localize_response(self, name: str, inp: LocalizeInput, heat: np.ndarray) -> dict[str, Any]:
        """The heat map, its statistics and the overlay over the frame as a PNG data URL."""
        import cv2

        from cavmae.runtime.figures import frame_to_image, heatmap_overlay, upsample_heatmap

        base = frame_to_image(inp.image, self.preprocess.image_mean, self.preprocess.image_std)
        overlay = heatmap_overlay(base, upsample_heatmap(heat, base.shape[:2]), 0.5)
        ok, png = cv2.imencode(".png", overlay)
        if not ok:
            raise RuntimeError("cannot encode the heat map overlay as PNG")
        gh, gw = heat.shape
        row, col = (int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
        return {
            "path": name, "frame": inp.frame, "frame_time": round(inp.frame_time, 4),
            "grid": [gh, gw], "min": float(heat.min()), "max": float(heat.max()), "peak": [row, col],
            "map": [[round(float(v), 6) for v in r] for r in heat],
            "image": "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii"),
        }

    # -- search (pool threads) --------------------------------------------------------------
    def search(self, queries: dict[str, np.ndarray], kind: str, target: str | None, k: int) -> list[dict[str, Any]]:
        """Nearest index rows of each query embedding, as ``cavmae search --json`` lists them.

        Default targets, as on the command line: an audio query finds clips that look like it
        (visual rows), a visual one clips that sound like it; a video's streams each search
        their own modality ("clips like this one").
        """
        if self.index is None:
            raise CavmaeError("this server has no index loaded; start it with --index INDEX to search")
        results = []
        for q, emb in queries.items():
            if target is None:
                targets: tuple[str, ...] = (q,) if kind == "video" else ("visual" if q == "audio" else "audio",)
            else:
                targets = ("audio", "visual") if target == "both" else (target,)
            for t in targets:
                hits = self.index.search(emb, t, k)
                results.append({"query": q, "target": t, "hits": [h.to_dict() for h in hits]})
        return results

    def check_embedding(self, values: Sequence[float]) -> np.ndarray:
        emb = np.asarray(values, dtype=np.float32)
        dim = self.pipe.manifest.model_config.embed_dim
        if emb.ndim != 1 or emb.shape[0] != dim:
            raise CavmaeError(f"the embedding must be a list of {dim} numbers, got shape {list(emb.shape)}")
        if not np.all(np.isfinite(emb)) or not np.any(emb):
            raise CavmaeError("the embedding must be finite and not all zero")
        return emb
