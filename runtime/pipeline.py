"""Pipelines over an engine: classification, retrieval embeddings, localization, reconstruction.

A pipeline speaks only the ``Engine`` interface (numpy in, numpy out), so it runs the same on
ONNX Runtime, TensorRT and PyTorch. The audio graph runs once per clip and all frames of a clip
go through the visual graph as one batch; the joint graph then reproduces the reference's
per-frame loop and averages the frames' probabilities (docs/model.md §4).

Shapes: audio ``[T, F] = [1024, 128]``; frames ``[F, 3, 224, 224]``; ``N`` clips in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cavmae.errors import CavmaeError, ModelKindError
from cavmae.graphs import (
    AUDIO_EMBED,
    AUDIO_ENCODER,
    AUDIO_TOKENS,
    DECODER,
    FRAME_TOKENS,
    MASKED_ENCODER,
    PROBS,
    VISUAL_EMBED,
    VISUAL_ENCODER,
    GraphDecl,
    declaration,
)
from cavmae.manifest import Manifest
from cavmae.masking import MASK_MODES, draw_noise, indices_from_noise, num_kept
from cavmae.modes import CLI_MODES, graph_for, needs
from cavmae.patches import (
    audio_to_image,
    image_to_audio,
    masked_mse,
    patchify,
    standardize_patches,
    unpatchify,
    unstandardize_patches,
)
from cavmae.run_sizes import rows_per_run
from cavmae.vectors import l2_normalize

from .engines.base import Engine, check_inputs

if TYPE_CHECKING:
    from cavmae.media import Clip  # decoding needs PyAV: imported where a clip is loaded

#: classification modes on the command line -> graph that serves them (from :mod:`cavmae.modes`)
CLASSIFY_GRAPHS = {mode: graph_for(mode) for mode in CLI_MODES}


@dataclass
class Prediction:
    """Class probabilities of one clip (or window) with the label names."""

    probs: np.ndarray  # [C]
    labels: tuple[str, ...] | None
    path: str | None = None
    offset: float = 0.0
    end: float | None = None  # where the window ends: offset + window, or the file's end
    mode: str | None = None  # the classification mode (``av``, ``audio``, ``visual``)

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """``k`` best classes as (index, name, probability), best first."""
        names = self.labels or tuple(str(i) for i in range(len(self.probs)))
        return [(int(i), names[i], float(self.probs[i])) for i in best_first(self.probs, k)]

    def to_record(self, top_k: int = 5, all_scores: bool = False) -> dict[str, Any]:
        """The JSON-ready record ``cavmae classify --json`` prints (and ``cavmae serve``
        returns) for this prediction: path, mode, start, end, the ``top_k`` classes, and every
        score with ``all_scores``."""
        from .classify_records import classification_record

        names = self.labels or tuple(str(i) for i in range(len(self.probs)))
        end = self.offset if self.end is None else self.end
        return classification_record(self.path or "", self.mode or "", self.offset, end, self.probs,
                                     names, top_k, all_scores)


def best_first(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of ``probs [C]``, largest first; ties keep class order.
    The one ranking of classes (predictions, records, the service)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise CavmaeError(f"k must be a whole number >= 0, not {k!r}")
    return np.argsort(-np.asarray(probs), kind="stable")[:k]


@dataclass
class Reconstruction:
    """Masked reconstruction of one clip (docs/model.md §6).

    ``*_masked`` have removed patches zeroed; ``*_pasted`` are the input with the predicted
    patches pasted into the removed places; ``*_pred`` the raw prediction for every patch.
    Spectrograms are ``[T, F]``, images ``[3, H, W]``, in normalized input units.
    """

    audio: np.ndarray
    audio_masked: np.ndarray
    audio_pred: np.ndarray
    audio_pasted: np.ndarray
    image: np.ndarray
    image_masked: np.ndarray
    image_pred: np.ndarray
    image_pasted: np.ndarray
    mask_a: np.ndarray  # [La] 1 = removed
    mask_v: np.ndarray  # [Lv]
    mse_a: float
    mse_v: float


class Pipeline:
    """Everything a deployment does with a model, over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.manifest: Manifest = engine.manifest

    # -- properties -----------------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.manifest.labels

    @property
    def num_frames(self) -> int:
        return self.manifest.num_frames

    @property
    def classify_modes(self) -> tuple[str, ...]:
        """Command-line modes (``av``, ``audio``, ``visual``) this model can classify in."""
        return tuple(m for m, g in CLASSIFY_GRAPHS.items() if g in self.manifest.graphs)

    def describe(self) -> str:
        return self.engine.describe()

    def close(self) -> None:
        """Release the engine's sessions (memory, device buffers). The pipeline stays usable:
        a later call opens the graphs it needs again."""
        self.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- media ------------------------------------------------------------------------------
    def load_clip(
        self,
        path: str | Path,
        *,
        offset: float = 0.0,
        duration: float | None = None,
        need_audio: bool = True,
        need_video: bool = True,
    ) -> Clip:
        """Decode and preprocess the window at ``offset`` of a media file as this model takes
        it: its preprocessing, input sizes and frames per clip (see :func:`cavmae.media.load_clip`;
        ``duration`` takes a shorter window)."""
        from cavmae.media import load_clip

        # the manifest's preprocessing holds the export's input sizes and frames per clip
        return load_clip(path, offset=offset, config=self.manifest.preprocess,
                         need_audio=need_audio, need_video=need_video, duration=duration)

    # -- batched graph calls ----------------------------------------------------------------
    def run_graph(
        self, graph: GraphDecl | str, *inputs: np.ndarray, chunk: int | None = None
    ) -> tuple[np.ndarray, ...]:
        """Run ``graph`` over any batch size, in chunks of its max batch (or of ``chunk``).

        ``inputs`` and the returned outputs are in the graph's declaration order
        (:mod:`cavmae.graphs`), as the model's ``forward_<graph>`` takes and returns them.
        """
        session = self.engine.session(graph if isinstance(graph, str) else graph.name)
        spec = session.spec
        if len(inputs) != len(spec.inputs):
            raise CavmaeError(
                f"graph {spec.name!r} takes {len(spec.inputs)} input(s)"
                f" ({', '.join(t.name for t in spec.inputs)}), not {len(inputs)}"
            )
        # the whole batch is checked first, so an error names the arrays the caller passed
        check_inputs(spec, dict(zip((t.name for t in spec.inputs), inputs, strict=True)), whole=True)
        n = inputs[0].shape[0]
        if n == 0:  # nothing to run: empty outputs of the declared shapes
            return tuple(np.zeros(t.concrete_shape(0), t.dtype) for t in spec.outputs)
        step = min(chunk or spec.max_batch, spec.max_batch)
        parts: list[dict[str, np.ndarray]] = []
        for i in range(0, n, step):
            parts.append(session.run({t.name: x[i : i + step] for t, x in zip(spec.inputs, inputs, strict=True)}))
        return tuple(np.concatenate([p[t.name] for p in parts]) for t in spec.outputs)

    def _encoder_rows(self, tokens_per_row: int, rows_per_clip: int) -> int | None:
        """Rows per encoder run: cache-sized runs that never span two clips on an engine that
        asks for them (a CPU, :mod:`cavmae.run_sizes`); None (the graph's max batch) elsewhere."""
        if isinstance(rows_per_clip, bool) or not isinstance(rows_per_clip, int) or rows_per_clip < 1:
            raise CavmaeError(f"frames_per_clip must be a whole number >= 1, not {rows_per_clip!r}")
        return rows_per_run(tokens_per_row, rows_per_clip) if self.engine.cpu_sized_runs else None

    def run_audio_encoder(self, audio: np.ndarray) -> np.ndarray:
        """``[N, T, F] -> audio tokens [N, La, D]``."""
        rows = self._encoder_rows(self.manifest.model_config.num_audio_tokens, 1)
        (tokens,) = self.run_graph(AUDIO_ENCODER, _f32(audio), chunk=rows)
        return tokens

    def run_visual_encoder(self, frames: np.ndarray, frames_per_clip: int = 1) -> np.ndarray:
        """``[M, 3, H, W] -> visual tokens [M, Lv, D]`` (every frame is one row; consecutive
        groups of ``frames_per_clip`` rows are one clip's, which a run keeps together)."""
        rows = self._encoder_rows(self.manifest.model_config.num_visual_tokens, frames_per_clip)
        (tokens,) = self.run_graph(VISUAL_ENCODER, _f32(frames), chunk=rows)
        return tokens

    # -- classification ---------------------------------------------------------------------
    def _classify_graph(self, mode: str) -> str:
        if self.manifest.model_kind != "classifier":
            raise ModelKindError(
                "this is a pre-training model without a classification head; use a fine-tuned"
                " model (e.g. as-full-51.2) to classify"
            )
        graph = CLASSIFY_GRAPHS.get(mode)
        if graph is None:
            raise CavmaeError(f"mode must be one of {', '.join(CLASSIFY_GRAPHS)}, not {mode!r}")
        if graph not in self.manifest.graphs:
            have = ", ".join(self.classify_modes) or "none"
            raise ModelKindError(f"this model cannot classify in mode {mode!r}; it supports: {have}")
        return graph

    def classify_batch(
        self, audio: np.ndarray | None, frames: np.ndarray | None, mode: str = "av"
    ) -> np.ndarray:
        """``audio [N, T, F]``, ``frames [N, F, 3, H, W]`` -> probabilities ``[N, C]``.

        ``mode="av"`` is the reference's 10-frame aggregation: each frame paired with the same
        audio, probabilities averaged. ``audio``/``visual`` use one modality (``None`` the other).
        """
        graph = self._classify_graph(mode)
        feeds: dict[str, np.ndarray] = {}
        use_audio, use_video = needs(mode)
        if use_audio and use_video and audio is not None and frames is not None \
                and len(audio) != len(frames):
            raise CavmaeError(
                f"audio holds {len(audio)} clip(s) and frames {len(frames)}: mode {mode!r} pairs"
                " them clip by clip, so both need the same first axis"
            )
        if use_audio:
            if audio is None:
                raise CavmaeError(f"mode {mode!r} needs audio")
            feeds[AUDIO_TOKENS.name] = self.run_audio_encoder(audio)
        if use_video:
            if frames is None:
                raise CavmaeError(f"mode {mode!r} needs frames")
            frames = _f32(frames)
            if frames.ndim != 5 or frames.shape[1] != self.num_frames:
                raise CavmaeError(
                    f"expected frames [N, {self.num_frames}, 3, H, W], got {list(frames.shape)};"
                    f" this export aggregates {self.num_frames} frames per clip"
                )
            n, f = frames.shape[:2]
            tokens = self.run_visual_encoder(frames.reshape(n * f, *frames.shape[2:]), f)
            feeds[FRAME_TOKENS.name] = tokens.reshape(n, f, *tokens.shape[1:])
        # One clip per call: a clip is already F sequences of 708 tokens (large matrix products),
        # while 8 clips at once would hold 80 attention maps of 708 x 708 per head (~2 GB).
        head = declaration(graph)
        outputs = self.run_graph(head, *(feeds[t.name] for t in head.inputs), chunk=1)
        return outputs[head.outputs.index(PROBS)]

    def classify(self, audio: np.ndarray | None, frames: np.ndarray | None, mode: str = "av") -> np.ndarray:
        """One clip: ``audio [T, F]``, ``frames [F, 3, H, W]`` -> probabilities ``[C]``."""
        return self.classify_batch(
            None if audio is None else audio[None], None if frames is None else frames[None], mode
        )[0]

    def classify_file(
        self, path: str | Path, mode: str = "av", offset: float = 0.0, duration: float | None = None
    ) -> Prediction:
        """Decode, preprocess and classify the window at ``offset`` of a media file.

        The window is the model's span (10 s), or ``duration`` seconds for sliding windows;
        ``mode`` decides which streams are decoded (``audio`` reads no frames, so a ``.wav``
        works). Raises ``MissingStreamError`` when the file lacks a stream the mode needs.
        """
        self._classify_graph(mode)
        need_audio, need_video = needs(mode)
        clip = self.load_clip(path, offset=offset, duration=duration, need_audio=need_audio,
                              need_video=need_video)
        probs = self.classify(clip.audio, clip.frames, mode)
        window = self.manifest.preprocess.clip_seconds if duration is None else duration
        return Prediction(probs=probs, labels=self.labels, path=str(path), offset=offset,
                          end=min(offset + window, clip.duration), mode=mode)

    # -- embeddings and localization --------------------------------------------------------
    def embed_audio(self, audio: np.ndarray) -> np.ndarray:
        """``[N, T, F] -> L2-normalized audio embeddings [N, D]``."""
        rows = self._encoder_rows(self.manifest.model_config.num_audio_tokens, 1)
        (embedding,) = self.run_graph(AUDIO_EMBED, self.run_audio_encoder(audio), chunk=rows)
        return embedding

    def embed_images(self, images: np.ndarray, frames_per_clip: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``[M, 3, H, W] -> (embeddings [M, D], patch tokens [M, Lv, D])``; ``frames_per_clip``
        as in :meth:`run_visual_encoder`."""
        tokens = self.run_visual_encoder(images, frames_per_clip)
        # the embedding graphs hold weight products too (int8 in an int8 export): same runs
        rows = self._encoder_rows(self.manifest.model_config.num_visual_tokens, frames_per_clip)
        embedding, patches = self.run_graph(VISUAL_EMBED, tokens, chunk=rows)
        return embedding, patches

    def embed_frames(self, frames: np.ndarray, frame: int | str = "middle") -> np.ndarray:
        """``frames [N, F, 3, H, W]`` -> visual embeddings ``[N, D]`` of one frame per clip
        (``"middle"`` = the reference's frame 5, or an index) or the normalized mean over frames
        (``"mean"``)."""
        frames = _f32(frames)
        if frames.ndim != 5:
            raise CavmaeError(f"expected frames [N, F, 3, H, W] (5 axes), got {list(frames.shape)}"
                              " (one clip's frames [F, 3, H, W] go in as frames[None])")
        n, f = frames.shape[:2]
        if frame == "mean":
            emb, _ = self.embed_images(frames.reshape(n * f, *frames.shape[2:]), f)
            return l2_normalize(emb.reshape(n, f, -1).mean(1))
        index = self._frame_index(frame, f)
        return self.embed_images(frames[:, index])[0]

    def _frame_index(self, frame: int | str, count: int) -> int:
        index = min(self.manifest.preprocess.middle_frame, count - 1) if frame == "middle" else frame
        if not isinstance(index, int) or not 0 <= index < count:
            raise CavmaeError(f"frame must be 'middle', 'mean' or an index in 0..{count - 1}, not {frame!r}")
        return index

    def embed(
        self, audio: np.ndarray | None, frames: np.ndarray | None, frame: int | str = "middle"
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """One clip -> (audio embedding ``[D]``, visual embedding ``[D]``), L2-normalized."""
        ea = self.embed_audio(audio[None])[0] if audio is not None else None
        ev = self.embed_frames(frames[None], frame)[0] if frames is not None else None
        return ea, ev

    def localize(self, audio: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Sound-source map: cosine between the audio embedding and each visual patch token of
        ``image [3, H, W]`` -> ``[gh, gw]`` (14 x 14)."""
        ea = self.embed_audio(audio[None])[0]
        _, patches = self.embed_images(_f32(image)[None])
        gh, gw = self.manifest.model_config.visual_grid
        return (l2_normalize(patches[0]) @ ea).reshape(gh, gw)

    # -- reconstruction ---------------------------------------------------------------------
    def reconstruct(
        self,
        audio: np.ndarray,
        image: np.ndarray,
        seed: int = 0,
        mask_ratio_a: float | None = None,
        mask_ratio_v: float | None = None,
        mask_mode: str = "unstructured",
    ) -> Reconstruction:
        """Mask ``audio [T, F]`` and ``image [3, H, W]``, predict the removed patches, paste them.

        The mask ratios are fixed when the model is exported (the graphs have a fixed number of
        kept tokens); asking for other ratios is an error that says how to re-export.
        """
        m = self.manifest
        if m.model_kind != "pretrain":
            raise ModelKindError(
                "reconstruction needs a pre-training model with its decoder (e.g."
                " cav-mae-base-nonorm); this is a classifier"
            )
        if mask_mode not in MASK_MODES:
            raise CavmaeError(f"mask mode must be one of {', '.join(MASK_MODES)}, not {mask_mode!r}")
        if m.mask_ratio_a is None or m.mask_ratio_v is None:  # every pre-training export has them
            raise CavmaeError("this export's manifest has no mask ratios; export the model again")
        ra = m.mask_ratio_a if mask_ratio_a is None else mask_ratio_a
        rv = m.mask_ratio_v if mask_ratio_v is None else mask_ratio_v
        cfg = m.model_config
        la, lv = cfg.num_audio_tokens, cfg.num_visual_tokens
        ka, kv = num_kept(la, ra), num_kept(lv, rv)
        if (ka, kv) != (num_kept(la, m.mask_ratio_a), num_kept(lv, m.mask_ratio_v)):
            raise CavmaeError(
                f"this export keeps the tokens of mask ratios {m.mask_ratio_a}/{m.mask_ratio_v};"
                f" for {ra}/{rv} export again with those ratios (cavmae export --mask-ratio)"
            )
        if ka == la or kv == lv:
            raise CavmaeError(f"mask ratios {ra}/{rv} remove no {'audio patch' if ka == la else 'image patch'}:"
                              " there is nothing to reconstruct (export with --mask-ratio above 0)")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise CavmaeError(f"seed must be a whole number >= 0, not {seed!r}")
        rng = np.random.default_rng(seed)
        idx_a = indices_from_noise(draw_noise(rng, 1, la, cfg.audio_grid, ra, mask_mode), ka)
        idx_v = indices_from_noise(draw_noise(rng, 1, lv), kv)
        audio, image = _f32(audio)[None], _f32(image)[None]
        (joint,) = self.run_graph(
            MASKED_ENCODER, audio, image, idx_a.ids_keep.astype(np.int64), idx_v.ids_keep.astype(np.int64)
        )
        pred_a, pred_v = self.run_graph(
            DECODER, joint, idx_a.ids_restore.astype(np.int64), idx_v.ids_restore.astype(np.int64)
        )
        p = cfg.patch_size
        target_a, target_v = patchify(audio_to_image(audio), p), patchify(image, p)
        if cfg.norm_pix_loss:
            # predictions are per-patch standardized; show them in input units using each
            # original patch's statistics (as MAE's visualization does), and score them
            # against the standardized targets the model was trained on
            mse_a = float(masked_mse(pred_a, standardize_patches(target_a), idx_a.mask))
            mse_v = float(masked_mse(pred_v, standardize_patches(target_v), idx_v.mask))
            pred_a = unstandardize_patches(pred_a, target_a)
            pred_v = unstandardize_patches(pred_v, target_v)
        else:
            mse_a = float(masked_mse(pred_a, target_a, idx_a.mask))
            mse_v = float(masked_mse(pred_v, target_v, idx_v.mask))

        def rebuild_audio(patches: np.ndarray) -> np.ndarray:
            return image_to_audio(unpatchify(patches, p, cfg.audio_grid, 1))[0]

        def rebuild_image(patches: np.ndarray) -> np.ndarray:
            return unpatchify(patches, p, cfg.visual_grid, 3)[0]

        ma, mv = idx_a.mask[..., None], idx_v.mask[..., None]
        return Reconstruction(
            audio=audio[0],
            audio_masked=rebuild_audio(target_a * (1 - ma)),
            audio_pred=rebuild_audio(pred_a),
            audio_pasted=rebuild_audio(target_a * (1 - ma) + pred_a * ma),
            image=image[0],
            image_masked=rebuild_image(target_v * (1 - mv)),
            image_pred=rebuild_image(pred_v),
            image_pasted=rebuild_image(target_v * (1 - mv) + pred_v * mv),
            mask_a=idx_a.mask[0],
            mask_v=idx_v.mask[0],
            mse_a=mse_a,
            mse_v=mse_v,
        )


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
