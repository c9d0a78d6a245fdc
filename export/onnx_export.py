"""Export a CAV-MAE model to one fixed-shape ONNX graph per stage plus ``manifest.json``.

Every graph has static shapes except the batch axis, no data-dependent shapes and no randomness
(mask indices are inputs). Weights live inside each file. Each graph is validated against its
PyTorch stage in ONNX Runtime right after export; a failed validation fails the export.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import cavmae
from cavmae import fsio
from cavmae.checkpoint import load_checkpoint
from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.errors import ExportError
from cavmae.labels import LabelSet, default_labels, default_task, read_label_csv
from cavmae.manifest import Manifest, is_export_dir
from cavmae.masking import DEFAULT_MASK_RATIO
from cavmae.model import CAVMAEFT, CAVMAEEncoder
from cavmae.modes import FINETUNE_MODES
from cavmae.progress import progress_bar
from cavmae.stages import Stage, build_stages, make_manifest

from .fp16 import convert_to_fp16
from .int8 import Int8Options, quantize_export
from .validate import DEFAULT_SEED, ValidationReport, validate_graph

log = logging.getLogger(__name__)

#: the validation report written next to the manifest (seed, tolerances met, per output)
VALIDATION_NAME = "validation.json"

#: ONNX opset: LayerNormalization needs 17; TensorRT 10 and 11 parse up to 20.
OPSET = 17
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ExportResult:
    """What ``export_model`` wrote and how each graph validated."""

    out_dir: Path
    manifest: Manifest
    reports: dict[str, ValidationReport] = field(default_factory=dict)


def _resolve_model(model: CAVMAEEncoder | str | Path) -> tuple[CAVMAEEncoder, dict[str, Any]]:
    if isinstance(model, CAVMAEEncoder):
        return model.eval(), {"checkpoint": None, "sha256": None}
    path = Path(model)
    return load_checkpoint(path), {"checkpoint": str(path.resolve()), "sha256": fsio.sha256_file(path)}


def _labels(labels: LabelSet | str | Path | Sequence[str] | None, num_classes: int) -> LabelSet | None:
    if labels is None:
        return default_labels(num_classes)
    if isinstance(labels, LabelSet):
        result = labels
    elif isinstance(labels, (str, Path)):
        result = read_label_csv(labels)
    else:
        names = tuple(labels)
        result = LabelSet(names=names, ids=names)
    if len(result) != num_classes:
        raise ExportError(f"the label set has {len(result)} classes but the model has {num_classes}")
    return result


def export_stage(stage: Stage, path: Path, opset: int = OPSET) -> None:
    """Trace one stage to ONNX at ``path`` with a dynamic batch axis (TorchScript exporter).

    The TorchScript-based exporter is used because it needs no extra packages and writes plain
    MatMul/Softmax attention at opset 17, which every TensorRT 10/11 parser takes.
    """
    spec = stage.spec
    example = stage.sample(np.random.default_rng(0), 2)
    args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
        torch.onnx.export(
            stage.module,
            args,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=stage.decl.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def finalize_graph(path: Path, stage: Stage) -> None:
    """Declare the static I/O shapes in the file, then check it.

    The tracer leaves some output axes symbolic; the stage's contract says they are static, so
    the file is stamped with them and strict shape inference must agree. ``onnx.checker`` runs
    with full checking.
    """
    model = onnx.load(str(path))
    specs = {t.name: t for t in (*stage.spec.inputs, *stage.spec.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        for d, want in zip(dims, specs[vi.name].shape, strict=True):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{path.name} failed the ONNX checks: {e}") from None
    for vi in (*inferred.graph.input, *inferred.graph.output):
        got = tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)
        if got != specs[vi.name].shape:
            raise ExportError(f"{path.name}: {vi.name} has shape {got}, expected {specs[vi.name].shape}")


def export_model(
    model: CAVMAEEncoder | str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    *,
    num_frames: int = 10,
    max_batch: int = 8,
    task: str | None = None,
    finetune_mode: str = "multimodal",
    labels: LabelSet | str | Path | Sequence[str] | None = None,
    mask_ratio_a: float = DEFAULT_MASK_RATIO,
    mask_ratio_v: float = DEFAULT_MASK_RATIO,
    preprocess: PreprocessConfig = DEFAULT_PREPROCESS,
    graphs: Sequence[str] | None = None,
    validate: bool = True,
    validation_seed: int | None = DEFAULT_SEED,
    source: dict[str, Any] | None = None,
    progress: bool = False,
    overwrite: bool = False,
    int8: Int8Options | None = None,
) -> ExportResult:
    """Export ``model`` (a model or a checkpoint path) to ``out_dir``.

    ``precision="fp16"`` writes fp16 graphs (LayerNorm, softmax and normalization kept in fp32,
    float32 inputs and outputs). ``precision="int8"`` exports and validates fp32 graphs, then
    quantizes them (``int8``: how, on which clips, the gate's thresholds; see
    :mod:`cavmae.export.int8`) and refuses the export when int8 disagrees with fp32 on those
    clips; the gate's report is the manifest's ``quantization``. ``graphs`` limits the export to some graph names. The directory
    is written into a temporary sibling and renamed into place, so a failed export never leaves
    a half-written directory behind.

    Validation draws its random inputs from ``validation_seed`` (None: a fresh random seed), so
    an export validates the same way every time; the seed is in each report and in
    ``validation.json``.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        what = "an export" if is_export_dir(out_dir) else "not empty"
        raise ExportError(f"{out_dir} is {what}; choose another directory or pass overwrite")
    net, src = _resolve_model(model)
    cfg = net.config
    label_set = _labels(labels, cfg.num_classes) if isinstance(net, CAVMAEFT) else None
    task = (task or default_task(cfg.num_classes)) if isinstance(net, CAVMAEFT) else None
    if finetune_mode not in FINETUNE_MODES:
        raise ExportError(f"finetune_mode must be one of {', '.join(FINETUNE_MODES)}")
    stages = build_stages(
        net, num_frames=num_frames, max_batch=max_batch, task=task or "multi-label",
        finetune_mode=finetune_mode, mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v,
    )
    if graphs is not None:
        unknown = sorted(set(graphs) - set(stages))
        if unknown:
            raise ExportError(f"unknown graph(s) {unknown}; this model has {sorted(stages)}")
        stages = {k: v for k, v in stages.items() if k in graphs}

    reports: dict[str, ValidationReport] = {}
    specs = {}
    if validation_seed is None:
        validation_seed = int(np.random.SeedSequence().generate_state(1)[0])
    with fsio.staged_dir(out_dir) as work:  # a failed export leaves nothing behind
        # log_interval=0: in a log, one line per graph (each takes seconds)
        bar = progress_bar(stages.items(), enabled=progress, desc="export", unit="graph", log_interval=0)
        for name, stage in bar:
            bar.set_postfix_str(name)
            path = work / stage.spec.file
            export_stage(stage, path)
            if precision == "fp16":
                convert_to_fp16(path)
            finalize_graph(path, stage)
            traced = "fp32" if precision == "int8" else precision  # int8: quantized after the gate
            spec = stage.spec if traced == "fp32" else _with_precision(stage, traced)
            specs[name] = spec
            if validate:
                reports[name] = validate_graph(stage, path, traced, task=task, seed=validation_seed)
                if not reports[name].passed:
                    raise ExportError(f"validation failed for {name}: {reports[name].summary()}")
                bar.set_postfix_str(f"{name} validated")
        if validate:
            _write_validation(work / VALIDATION_NAME, validation_seed, reports)
        manifest = make_manifest(
            net, specs, precision=precision, num_frames=num_frames, max_batch=max_batch,
            task=task, finetune_mode=finetune_mode, labels=label_set, mask_ratio_a=mask_ratio_a,
            mask_ratio_v=mask_ratio_v, preprocess=preprocess, source={**src, **(source or {})},
            versions=_versions(),
        )
        if precision == "int8":
            specs, gate = quantize_export(work, specs, num_frames=manifest.num_frames,
                                          preprocess=manifest.preprocess, options=int8)
            manifest = manifest.replace(graphs=specs, quantization=gate.to_dict())
        manifest.save(work)
    return ExportResult(out_dir=out_dir, manifest=manifest, reports=reports)


def _write_validation(path: Path, seed: int, reports: dict[str, ValidationReport]) -> None:
    """The validation record of an export: its seed and every graph's checks."""
    data = {"seed": seed, "graphs": {k: r.to_dict() for k, r in reports.items()}}
    path.write_text(json.dumps(data, indent=2) + "\n")


def _with_precision(stage: Stage, precision: str):
    from dataclasses import replace

    return replace(stage.spec, precision=precision)


def _versions() -> dict[str, Any]:
    import onnxruntime

    return {
        "cavmae": cavmae.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": OPSET,
    }
