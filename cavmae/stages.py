"""The model split into deployable stages: one ``nn.Module`` per graph of :mod:`cavmae.graphs`.

One definition serves both the exporter (each stage becomes one ONNX graph) and the runtime's
PyTorch engine (which runs the same modules eagerly), so the two cannot drift apart. A stage is
the model's own ``forward_<graph>`` method with the deployment's fixed arguments (task, frames
per clip, mode, kept tokens); nothing here re-implements model math, and the graphs' names,
inputs and outputs come from their declarations.

The per-clip flow of a classifier: ``audio_encoder`` once per clip, ``visual_encoder`` on all
frames as one batch, then ``joint_classifier`` on the audio tokens and the F frames' visual
tokens, which returns per-frame logits and the frame-aggregated probabilities.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ModelConfig, PreprocessConfig
from .graphs import (
    ENCODER_GRAPHS,
    PRETRAIN_GRAPHS,
    GraphDecl,
    declaration,
    graph_sizes,
)
from .labels import LabelSet
from .manifest import GraphSpec, Manifest
from .masking import DEFAULT_MASK_RATIO, indices_from_noise
from .model import CAVMAE, CAVMAEFT, CAVMAEEncoder, probabilities
from .modes import FINETUNE_MODES, lookup, reference_modes

__all__ = [
    "PlannedGraph",
    "Stage",
    "StageModule",
    "build_stages",
    "graph_specs",
    "make_manifest",
    "model_kind",
    "modes_for",
    "plan_graphs",
    "probabilities",
    "run_stage",
    "stage_of",
]


class StageModule(nn.Module):
    """The model's ``forward_<graph>`` stage with its non-tensor arguments fixed.

    ``forward(*tensors)`` takes the graph's inputs in declaration order and returns its outputs
    in declaration order, so the traced ONNX graph and the eager module are the same call.
    """

    def __init__(self, model: CAVMAEEncoder, decl: GraphDecl, **params: Any) -> None:
        super().__init__()
        self.model, self.decl, self.params = model, decl, params

    def forward(self, *tensors: torch.Tensor) -> Any:
        return getattr(self.model, self.decl.method)(*tensors, **self.params)


@dataclass
class Stage:
    """One deployable stage: its declaration, the graph contract it is exported with, its
    module, and the sizes behind the declaration's shape symbols."""

    decl: GraphDecl
    spec: GraphSpec
    module: nn.Module
    sizes: dict[str, int]

    def sample(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        """Valid random inputs for validation and tracing, drawn in declaration order:
        standard normal, except masking indices, which are a real draw of kept tokens."""
        out: dict[str, np.ndarray] = {}
        for decl, spec in zip(self.decl.inputs, self.spec.inputs, strict=True):
            if decl.indices is None:
                out[spec.name] = rng.standard_normal(spec.concrete_shape(batch)).astype(np.float32)
                continue
            which, total, kept = decl.indices
            idx = indices_from_noise(rng.random((batch, self.sizes[total])), self.sizes[kept])
            out[spec.name] = (idx.ids_keep if which == "keep" else idx.ids_restore).astype(np.int64)
        return out


@dataclass(frozen=True)
class PlannedGraph:
    """One graph of a deployment before any module exists: its declaration, the manifest entry
    it is exported with, the fixed non-tensor arguments of its stage, and the sizes behind the
    declaration's shape symbols. What the graph's file depends on is all here (with the
    weights), so the exporter can tell two deployments' identical graphs apart from torch-free
    facts (``cavmae.export``'s graph reuse)."""

    decl: GraphDecl
    spec: GraphSpec
    params: dict[str, Any]
    sizes: dict[str, int]


def model_kind(model: CAVMAEEncoder) -> str:
    """``"classifier"``, ``"pretrain"`` or ``"encoder"`` (a bare encoder: the encoder graphs only)."""
    if isinstance(model, CAVMAEFT):
        return "classifier"
    return "pretrain" if isinstance(model, CAVMAE) else "encoder"


def plan_graphs(
    kind: str,
    config: ModelConfig,
    *,
    num_frames: int = 10,
    max_batch: int = 8,
    task: str = "multi-label",
    finetune_mode: str = "multimodal",
    mask_ratio_a: float = DEFAULT_MASK_RATIO,
    mask_ratio_v: float = DEFAULT_MASK_RATIO,
) -> dict[str, PlannedGraph]:
    """The graphs a model of ``kind`` (:func:`model_kind`) and ``config`` deploys as, keyed by
    graph name, each with the reference mode it serves fixed into its parameters."""
    plan: list[tuple[GraphDecl, str | None]] = [(g, None) for g in ENCODER_GRAPHS]
    if kind == "classifier":
        if finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, not {finetune_mode!r}")
        # one graph per mode the model serves: the table says which graph computes which mode
        plan += [(declaration(lookup(mode).graph), mode) for mode in reference_modes(finetune_mode)]
        sizes = graph_sizes(config, num_frames=num_frames)
    elif kind == "pretrain":
        plan += [(g, None) for g in PRETRAIN_GRAPHS]
        sizes = graph_sizes(config, num_frames=num_frames, mask_ratio_a=mask_ratio_a,
                            mask_ratio_v=mask_ratio_v)
    else:
        sizes = graph_sizes(config, num_frames=num_frames)
    fixed: dict[str, Any] = {"task": task, "num_frames": num_frames, "keep_a": sizes.get("Ka")}
    return {
        decl.name: PlannedGraph(
            decl, decl.spec(sizes, max_batch=max_batch, mode=mode),
            {p: mode if p == "mode" else fixed[p] for p in decl.params}, sizes,
        )
        for decl, mode in plan
    }


def graph_specs(
    model: CAVMAEEncoder,
    *,
    num_frames: int = 10,
    max_batch: int = 8,
    finetune_mode: str = "multimodal",
    mask_ratio_a: float = DEFAULT_MASK_RATIO,
    mask_ratio_v: float = DEFAULT_MASK_RATIO,
) -> dict[str, GraphSpec]:
    """The manifest entries of the graphs ``model`` deploys as, keyed by graph name: what
    :func:`build_stages` would export, without building any module."""
    plan = plan_graphs(model_kind(model), model.config, num_frames=num_frames, max_batch=max_batch,
                       finetune_mode=finetune_mode, mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v)
    return {name: p.spec for name, p in plan.items()}


def build_stages(
    model: CAVMAEEncoder,
    *,
    num_frames: int = 10,
    max_batch: int = 8,
    task: str = "multi-label",
    finetune_mode: str = "multimodal",
    mask_ratio_a: float = DEFAULT_MASK_RATIO,
    mask_ratio_v: float = DEFAULT_MASK_RATIO,
    graphs: Collection[str] | None = None,
) -> dict[str, Stage]:
    """The stages a model deploys as, keyed by graph name (``graphs``: only these).

    ``max_batch`` counts clips; graphs that see every frame of a clip (``visual_encoder``,
    ``visual_embed``) take ``max_batch * num_frames``. ``finetune_mode`` says what a classifier
    was fine-tuned for: an audio-visual model also gets its missing-modality heads, an audio-only
    (visual-only) model only its own head. Pre-training models get the masked encoder and the
    decoder for a fixed number of kept tokens, from the mask ratios.
    """
    plan = plan_graphs(model_kind(model), model.config, num_frames=num_frames, max_batch=max_batch,
                       task=task, finetune_mode=finetune_mode, mask_ratio_a=mask_ratio_a,
                       mask_ratio_v=mask_ratio_v)
    return {
        name: stage_of(model, p) for name, p in plan.items() if graphs is None or name in graphs
    }


def stage_of(model: CAVMAEEncoder, planned: PlannedGraph) -> Stage:
    """The stage of one planned graph of ``model``: its module in eval mode."""
    module = StageModule(model, planned.decl, **planned.params).eval()
    return Stage(planned.decl, planned.spec, module, planned.sizes)


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
        preprocess=preprocess.replace(num_frames=num_frames),  # the frames this export aggregates
        graphs=specs,
        precision=precision,
        max_batch=max_batch,
        task=task if classifier else None,
        finetune_mode=finetune_mode if classifier else None,
        labels=labels.names if labels else None,
        label_ids=labels.ids if labels else None,
        mask_ratio_a=None if classifier else mask_ratio_a,
        mask_ratio_v=None if classifier else mask_ratio_v,
        source=dict(source),
        versions=versions,
    )
