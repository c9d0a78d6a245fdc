"""The model split into deployable stages, each a small ``nn.Module`` with fixed token shapes.

One definition serves both the exporter (each stage becomes one ONNX graph) and the runtime's
PyTorch engine (which runs the same modules eagerly), so the two cannot drift apart. Each stage
calls the model's own stage methods; nothing here re-implements model math.

The per-clip flow of a classifier: ``audio_encoder`` once per clip, ``visual_encoder`` on all
frames as one batch, then ``joint_classifier`` on the audio tokens and the F frames' visual
tokens, which returns per-frame logits and the frame-aggregated probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PreprocessConfig
from .labels import LabelSet
from .manifest import BATCH, GraphSpec, Manifest, TensorSpec
from .masking import indices_from_noise, num_kept
from .model import CAVMAE, CAVMAEFT, CAVMAEEncoder
from .modes import FINETUNE_MODES, lookup, reference_modes


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Sigmoid for multi-label, softmax for single-label, over the last axis."""
    if task == "multi-label":
        return torch.sigmoid(logits)
    if task == "single-label":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"task must be 'multi-label' or 'single-label', not {task!r}")


class AudioEncoder(nn.Module):
    """``audio [B, T, F] -> audio_tokens [B, La, D]`` (embedding + blocks_a)."""

    def __init__(self, model: CAVMAEEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.model.forward_audio_branch(audio)


class VisualEncoder(nn.Module):
    """``image [B, 3, H, W] -> visual_tokens [B, Lv, D]`` (embedding + blocks_v)."""

    def __init__(self, model: CAVMAEEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_visual_branch(image)


class JointClassifier(nn.Module):
    """``audio_tokens [B, La, D]``, ``visual_tokens [B, F, Lv, D]`` -> ``logits [B, F, C]``,
    ``probs [B, C]``: the reference's per-frame loop (same audio with each frame), as one batch.
    """

    def __init__(self, model: CAVMAEFT, task: str, num_frames: int) -> None:
        super().__init__()
        self.model, self.task, self.num_frames = model, task, num_frames

    def forward(self, audio_tokens: torch.Tensor, visual_tokens: torch.Tensor):
        # sizes as Python ints so only the batch axis is symbolic in the exported graph
        cfg, f = self.model.config, self.num_frames
        la, lv, d = cfg.num_audio_tokens, cfg.num_visual_tokens, cfg.embed_dim
        a = audio_tokens.unsqueeze(1).expand(-1, f, la, d).reshape(-1, la, d)
        v = visual_tokens.reshape(-1, lv, d)
        logits = self.model.head(self.model.pooled_features(a, v, "multimodal"))
        logits = logits.reshape(-1, f, cfg.num_classes)
        return logits, probabilities(logits, self.task).mean(1)


class AudioClassifier(nn.Module):
    """``audio_tokens [B, La, D] -> logits [B, C], probs [B, C]`` in an audio-only mode."""

    def __init__(self, model: CAVMAEFT, task: str, mode: str) -> None:
        super().__init__()
        self.model, self.task, self.mode = model, task, mode

    def forward(self, audio_tokens: torch.Tensor):
        logits = self.model.head(self.model.pooled_features(audio_tokens, None, self.mode))
        return logits, probabilities(logits, self.task)


class VisualClassifier(nn.Module):
    """``visual_tokens [B, F, Lv, D] -> logits [B, F, C], probs [B, C]`` (frame-averaged)."""

    def __init__(self, model: CAVMAEFT, task: str, mode: str, num_frames: int) -> None:
        super().__init__()
        self.model, self.task, self.mode, self.num_frames = model, task, mode, num_frames

    def forward(self, visual_tokens: torch.Tensor):
        cfg = self.model.config
        v = visual_tokens.reshape(-1, cfg.num_visual_tokens, cfg.embed_dim)
        logits = self.model.head(self.model.pooled_features(None, v, self.mode))
        logits = logits.reshape(-1, self.num_frames, cfg.num_classes)
        return logits, probabilities(logits, self.task).mean(1)


class AudioEmbed(nn.Module):
    """``audio_tokens [B, La, D] -> audio_embedding [B, D]`` (audio stream, mean, L2)."""

    def __init__(self, model: CAVMAEEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio_tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.forward_audio_stream(audio_tokens).mean(1), dim=-1)


class VisualEmbed(nn.Module):
    """``visual_tokens [B, Lv, D] -> visual_embedding [B, D], visual_patches [B, Lv, D]``.

    The patches are the visual stream's tokens (not normalized), for sound-source localization.
    """

    def __init__(self, model: CAVMAEEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, visual_tokens: torch.Tensor):
        patches = self.model.forward_visual_stream(visual_tokens)
        return F.normalize(patches.mean(1), dim=-1), patches


class MaskedEncoder(nn.Module):
    """``audio``, ``image``, ``ids_keep_a [B, Ka]``, ``ids_keep_v [B, Kv]`` (int64) ->
    ``joint_tokens [B, Ka+Kv, D]``: the pre-training encoder on kept tokens only."""

    def __init__(self, model: CAVMAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio, image, ids_keep_a, ids_keep_v) -> torch.Tensor:
        a, v = self.model.forward_masked_branches(audio, image, ids_keep_a, ids_keep_v)
        return self.model.forward_joint(a, v)


class Decoder(nn.Module):
    """``joint_tokens [B, Ka+Kv, D]``, ``ids_restore_a [B, La]``, ``ids_restore_v [B, Lv]`` ->
    ``pred_a [B, La, p*p]``, ``pred_v [B, Lv, p*p*3]``. ``Ka`` is fixed at construction."""

    def __init__(self, model: CAVMAE, keep_a: int) -> None:
        super().__init__()
        self.model, self.keep_a = model, keep_a

    def forward(self, joint_tokens, ids_restore_a, ids_restore_v):
        return self.model.forward_decoder(joint_tokens, ids_restore_a, ids_restore_v, self.keep_a)


@dataclass
class Stage:
    """One deployable stage: its module and the graph contract it is exported with."""

    spec: GraphSpec
    module: nn.Module
    #: how to draw valid random inputs for validation: (rng, batch) -> {name: array}
    sample: Callable[[np.random.Generator, int], dict[str, np.ndarray]]


def _t(name: str, *shape: int | str, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, tuple(shape), dtype)


def _normal(specs: tuple[TensorSpec, ...]) -> Callable[[np.random.Generator, int], dict[str, np.ndarray]]:
    def sample(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        return {s.name: rng.standard_normal(s.concrete_shape(batch)).astype(np.float32) for s in specs}

    return sample


def build_stages(
    model: CAVMAEEncoder,
    *,
    num_frames: int = 10,
    max_batch: int = 8,
    task: str = "multi-label",
    finetune_mode: str = "multimodal",
    mask_ratio_a: float = 0.75,
    mask_ratio_v: float = 0.75,
) -> dict[str, Stage]:
    """The stages a model deploys as, keyed by graph name.

    ``max_batch`` counts clips; graphs that see every frame of a clip (``visual_encoder``,
    ``visual_embed``) take ``max_batch * num_frames``. ``finetune_mode`` says what a classifier
    was fine-tuned for: an audio-visual model also gets its missing-modality heads, an audio-only
    (visual-only) model only its own head. Pre-training models get the masked encoder and the
    decoder for a fixed number of kept tokens, from the mask ratios.
    """
    cfg = model.config
    d, la, lv = cfg.embed_dim, cfg.num_audio_tokens, cfg.num_visual_tokens
    img = (3, cfg.image_size, cfg.image_size)
    frames_max = max_batch * num_frames
    stages: dict[str, Stage] = {}

    def add(name: str, module: nn.Module, inputs, outputs, mb: int, description: str, sample=None) -> None:
        inputs, outputs = tuple(inputs), tuple(outputs)
        spec = GraphSpec(name, f"{name}.onnx", inputs, outputs, mb, "fp32", description)
        stages[name] = Stage(spec, module.eval(), sample or _normal(inputs))

    audio_tokens = _t("audio_tokens", BATCH, la, d)
    visual_tokens = _t("visual_tokens", BATCH, lv, d)
    frame_tokens = _t("visual_tokens", BATCH, num_frames, lv, d)
    add("audio_encoder", AudioEncoder(model), [_t("audio", BATCH, cfg.audio_length, cfg.num_mel_bins)],
        [audio_tokens], max_batch, "audio branch: spectrogram -> audio tokens (once per clip)")
    add("visual_encoder", VisualEncoder(model), [_t("image", BATCH, *img)], [visual_tokens],
        frames_max, "visual branch: frame -> visual tokens (all frames as one batch)")
    add("audio_embed", AudioEmbed(model), [audio_tokens], [_t("audio_embedding", BATCH, d)],
        max_batch, "audio-only stream, mean-pooled, L2-normalized")
    add("visual_embed", VisualEmbed(model), [visual_tokens],
        [_t("visual_embedding", BATCH, d), _t("visual_patches", BATCH, lv, d)],
        frames_max, "visual-only stream: pooled L2-normalized embedding and patch tokens")

    if isinstance(model, CAVMAEFT):
        if finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, not {finetune_mode!r}")
        c = cfg.num_classes
        # one graph per mode the model serves: the table says which graph computes which mode
        for mode in reference_modes(finetune_mode):
            graph = lookup(mode).graph
            if graph == "joint_classifier":
                add(graph, JointClassifier(model, task, num_frames), [audio_tokens, frame_tokens],
                    [_t("logits", BATCH, num_frames, c), _t("probs", BATCH, c)], max_batch,
                    "joint stream + head per frame; probabilities averaged over frames")
            elif graph == "audio_classifier":
                add(graph, AudioClassifier(model, task, mode), [audio_tokens],
                    [_t("logits", BATCH, c), _t("probs", BATCH, c)], max_batch,
                    f"audio-only prediction (reference mode {mode})")
            elif graph == "visual_classifier":
                add(graph, VisualClassifier(model, task, mode, num_frames), [frame_tokens],
                    [_t("logits", BATCH, num_frames, c), _t("probs", BATCH, c)], max_batch,
                    f"visual-only prediction per frame, averaged (reference mode {mode})")
    elif isinstance(model, CAVMAE):
        ka, kv = num_kept(la, mask_ratio_a), num_kept(lv, mask_ratio_v)
        p = cfg.patch_size

        def masked_sample(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
            out = _normal(stages["masked_encoder"].spec.inputs[:2])(rng, batch)
            out["ids_keep_a"] = indices_from_noise(rng.random((batch, la)), ka).ids_keep.astype(np.int64)
            out["ids_keep_v"] = indices_from_noise(rng.random((batch, lv)), kv).ids_keep.astype(np.int64)
            return out

        def decoder_sample(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
            out = _normal(stages["decoder"].spec.inputs[:1])(rng, batch)
            out["ids_restore_a"] = indices_from_noise(rng.random((batch, la)), ka).ids_restore.astype(np.int64)
            out["ids_restore_v"] = indices_from_noise(rng.random((batch, lv)), kv).ids_restore.astype(np.int64)
            return out

        add("masked_encoder", MaskedEncoder(model),
            [_t("audio", BATCH, cfg.audio_length, cfg.num_mel_bins), _t("image", BATCH, *img),
             _t("ids_keep_a", BATCH, ka, dtype="int64"), _t("ids_keep_v", BATCH, kv, dtype="int64")],
            [_t("joint_tokens", BATCH, ka + kv, d)], max_batch,
            f"pre-training encoder on {ka} audio + {kv} visual kept tokens", masked_sample)
        add("decoder", Decoder(model, ka),
            [_t("joint_tokens", BATCH, ka + kv, d), _t("ids_restore_a", BATCH, la, dtype="int64"),
             _t("ids_restore_v", BATCH, lv, dtype="int64")],
            [_t("pred_a", BATCH, la, p * p), _t("pred_v", BATCH, lv, p * p * 3)], max_batch,
            "MAE decoder: joint tokens + restore indices -> patch predictions", decoder_sample)
    return stages


def run_stage(stage: Stage, inputs: dict[str, np.ndarray], device: str = "cpu") -> dict[str, np.ndarray]:
    """Run a stage's module on numpy inputs; returns its outputs by name (float32 numpy)."""
    args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])).to(device) for s in stage.spec.inputs]
    with torch.inference_mode():
        out = stage.module(*args)
    out = out if isinstance(out, tuple) else (out,)
    return {s.name: o.float().cpu().numpy() for s, o in zip(stage.spec.outputs, out, strict=True)}


def modes_for(kind: str, finetune_mode: str) -> tuple[str, ...]:
    """Reference classifier modes that a deployment of this model serves."""
    return reference_modes(finetune_mode) if kind == "classifier" else ()


def make_manifest(
    model: CAVMAEEncoder,
    specs: dict[str, GraphSpec],
    *,
    precision: str,
    num_frames: int,
    max_batch: int,
    task: str | None,
    finetune_mode: str,
    labels: LabelSet | None,
    mask_ratio_a: float,
    mask_ratio_v: float,
    preprocess: PreprocessConfig,
    source: dict[str, Any],
    versions: dict[str, Any],
) -> Manifest:
    """The manifest describing ``model`` deployed as the graphs ``specs``."""
    kind = "pretrain" if isinstance(model, CAVMAE) else "classifier"
    classifier = kind == "classifier"
    return Manifest(
        model_kind=kind,
        model_config=model.config,
        preprocess=preprocess,
        graphs=specs,
        precision=precision,
        num_frames=num_frames,
        max_batch=max_batch,
        task=task if classifier else None,
        modes=modes_for(kind, finetune_mode),
        labels=labels.names if labels else None,
        label_ids=labels.ids if labels else None,
        mask_ratio_a=None if classifier else mask_ratio_a,
        mask_ratio_v=None if classifier else mask_ratio_v,
        source={**source, "finetune_mode": finetune_mode if classifier else None},
        versions=versions,
    )
