"""Write a Triton Inference Server model repository from a cavmae export directory.

Layout (one Triton model per exported graph, plus what the classification ensemble needs)::

    repo/
      audio_encoder/config.pbtxt          platform onnxruntime_onnx, dynamic batching
      audio_encoder/1/model.onnx          hard link (or copy / symlink) of the export's file
      visual_encoder/...                  batch axis counts frames (max_batch * F)
      joint_classifier/labels.txt         when the manifest carries class names
      ...                                 every other graph of the export
      frames_to_batch/1/model.onnx        tiny Reshape graph written here (classifiers only)
      batch_to_frames/1/model.onnx        tiny Reshape graph written here (classifiers only)
      cavmae_classify/config.pbtxt        platform ensemble; no version files needed
      cavmae_classify/1/                  (empty: Triton wants a version directory)

Every graph model keeps the export's contract: ``max_batch_size`` is ``GraphSpec.max_batch``,
``dims`` are the graph's I/O shape without the leading batch axis, data types are the manifest's
(float32 even for fp16 exports, which keep float32 I/O), and ``dynamic_batching`` is on with
``max_queue_delay_microseconds``. No ``preferred_batch_size`` is written: Triton's batcher guide
advises leaving it unset except for TensorRT plans with per-batch-size optimization profiles, and
ONNX Runtime runs any batch size equally well.

The classification ensemble (``cavmae_classify``)
-------------------------------------------------
Per request (one clip; a request may carry a batch of B clips) it takes ``audio [1024, 128]``
and ``frames [F, 3, 224, 224]`` and returns ``probs [C]`` and ``logits [F, C]``. The
difficulty is the frame axis: ``visual_encoder`` takes single frames (``image [N, 3, H, W]``
with N = clips * F), ``joint_classifier`` takes ``visual_tokens [B, F, Lv, D]``, so between
them the frame axis must be folded into the batch axis and unfolded again.

Triton cannot do that by configuration alone:

- ``reshape`` on a ModelInput/ModelOutput never touches the batch axis of a batching model, and
  for variable dims Triton copies each ``-1`` value one for one from ``dims`` into ``reshape``,
  so ``[B, F, 3, H, W]`` can never become ``[B*F, 3, H, W]``.
- The ensemble scheduler does no arithmetic on shapes either; it only adds or strips a batch
  axis of size 1 when a tensor passes between a batching and a non-batching model.

What the scheduler does allow (core ``ensemble_utils.cc`` / ``ensemble_scheduler.cc``) is a
batching ensemble containing non-batching models (``max_batch_size: 0``) "as long as the
expanded shapes are consistent": a batching model's ``dims [3, H, W]`` expand to
``[-1, 3, H, W]``, which matches a non-batching model's ``dims [-1, 3, H, W]``. At run time a
tensor coming out of a non-batching model whose shape does not match the batching consumer's
``dims`` is passed on unchanged, so its first axis becomes that consumer's batch size. Hence two
tiny ONNX graphs (a single Reshape each) written next to the exported ones do the folding:

    audio  [B, 1024, 128] ─► audio_encoder ────────────────────────────► audio_tokens [B, La, D]
    frames [B, F, 3, H, W] ─► frames_to_batch (max_batch_size 0) ─► [B*F, 3, H, W]
                           ─► visual_encoder (batching, B*F <= max_batch * F) ─► [B*F, Lv, D]
                           ─► batch_to_frames (max_batch_size 0) ─► frame_tokens [B, F, Lv, D]
    audio_tokens + frame_tokens ─► joint_classifier ─► logits [B, F, C], probs [B, C]

The per-graph models keep dynamic batching, so concurrent ensemble requests share batches in
the encoders (the visual encoder batches frames of several clips together). The ensemble's own
``max_batch_size`` is the largest B every step accepts: ``min(audio_encoder, classifier,
visual_encoder // F)``. Exports fine-tuned audio-only (video-only) get an ensemble with only
the ``audio`` (``frames``) input, built the same way around their single classifier head.
Pre-training exports get no ensemble.

``labels.txt`` (one class name per line, line i = class i, Triton's ``label_filename``
convention) is written into every classifier model and the ensemble when the manifest has
labels, and referenced from the ``probs`` output, so Triton's classification extension
(``class_count``) can return names.

The config text is written by hand (no protobuf needed at run time); the tests parse every file
with Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from cavmae import fsio
from cavmae.errors import ExportError
from cavmae.graphs import (
    AUDIO,
    AUDIO_CLASSIFIER,
    AUDIO_ENCODER,
    AUDIO_TOKENS,
    FRAME_TOKENS,
    JOINT_CLASSIFIER,
    PROBS,
    VISUAL_CLASSIFIER,
    VISUAL_ENCODER,
)
from cavmae.manifest import BATCH, GraphSpec, Manifest, TensorSpec

log = logging.getLogger(__name__)

ENSEMBLE_NAME = "cavmae_classify"
#: the ensemble's frames input ``[F, 3, H, W]`` per clip (its audio input is the graphs' ``audio``)
ENSEMBLE_FRAMES = "frames"
# tensors between the ensemble's steps (Triton's names, not graph tensors)
_AUDIO_TOKENS_WIRE = AUDIO_TOKENS.name
_IMAGES_WIRE = "images"
_IMAGE_TOKENS_WIRE = "image_tokens"
_FRAME_TOKENS_WIRE = "frame_tokens"
FRAMES_TO_BATCH = "frames_to_batch"
BATCH_TO_FRAMES = "batch_to_frames"
#: the models a repository gets beside one per graph (their names are the graphs')
HELPER_MODELS = (ENSEMBLE_NAME, FRAMES_TO_BATCH, BATCH_TO_FRAMES)
#: where `cavmae export --triton` writes the repository, inside the export
REPOSITORY_DIRNAME = "triton"
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU")
#: opset for the helper Reshape graphs when a manifest predates recording it
DEFAULT_OPSET = 17

#: manifest dtype -> (Triton DataType, ONNX TensorProto element type)
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("TYPE_FP32", TensorProto.FLOAT),
    "float16": ("TYPE_FP16", TensorProto.FLOAT16),
    "int64": ("TYPE_INT64", TensorProto.INT64),
    "int32": ("TYPE_INT32", TensorProto.INT32),
    "bool": ("TYPE_BOOL", TensorProto.BOOL),
}


# --------------------------------------------------------------------------- protobuf text
class _Enum(str):
    """A protobuf enum value: written bare (``KIND_GPU``), where a plain str is quoted."""


def _scalar(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, _Enum):
        return str(value)
    if isinstance(value, str):
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ExportError(f"cannot write {value!r} into a Triton config: control characters")
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"no protobuf text form for {type(value).__name__}")


def _render(message: dict[str, Any], indent: int = 0) -> list[str]:
    """Protobuf text format for a message given as a dict.

    A dict is a sub-message, a list of dicts a repeated message (also how map fields are
    written: entries with ``key`` and ``value``), a list of scalars a repeated scalar.
    """
    pad = "  " * indent
    lines: list[str] = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", *_render(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                comma = "," if i < len(value) - 1 else ""
                lines += [f"{pad}  {{", *_render(item, indent + 2), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines


def to_pbtxt(config: dict[str, Any]) -> str:
    """``config`` (nested dicts/lists, enums as ``_Enum``) as a ``config.pbtxt`` text."""
    return "\n".join(_render(config)) + "\n"


# --------------------------------------------------------------------------- model plans
@dataclass(frozen=True)
class _IO:
    """One Triton tensor: ``dims`` as Triton sees them (no batch axis for batching models)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    label_filename: str | None = None

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "data_type": _Enum(_triton_type(self.dtype)),
            "dims": list(self.dims),
            "label_filename": self.label_filename,
        }


@dataclass
class _ModelPlan:
    """Everything one model directory will hold."""

    name: str
    config: dict[str, Any]
    #: file under the version directory -> where it comes from (an export file or a built graph)
    model_source: Path | onnx.ModelProto | None = None
    extra_files: dict[str, str] = field(default_factory=dict)


def _triton_type(dtype: str) -> str:
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise ExportError(
            f"dtype {dtype!r} has no Triton mapping here (known: {', '.join(DTYPES)})"
        ) from None


def _batched_dims(spec: TensorSpec, graph: str) -> tuple[int, ...]:
    """The shape without its leading batch axis; the manifest promises every other axis is fixed."""
    if not spec.shape or spec.shape[0] != BATCH:
        raise ExportError(f"{graph}: {spec.name} has shape {spec.shape}; expected a leading batch axis")
    rest = spec.shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ExportError(f"{graph}: {spec.name} has non-static axes {spec.shape}; re-export the model")
    return tuple(int(d) for d in rest)


def _instance_kind(kind: str) -> str:
    normalized = kind.upper()
    if not normalized.startswith("KIND_"):
        normalized = f"KIND_{normalized}"
    if normalized not in INSTANCE_KINDS:
        raise ExportError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, not {kind!r}")
    return normalized


def _onnx_model_config(
    name: str,
    max_batch: int,
    inputs: Sequence[_IO],
    outputs: Sequence[_IO],
    *,
    max_queue_delay_us: int,
    instance_kind: str,
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        # both spellings: older servers key on platform, newer ones on backend; they agree
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": max_batch,
        "input": [t.to_config() for t in inputs],
        "output": [t.to_config() for t in outputs],
        "instance_group": [{"count": 1, "kind": _Enum(instance_kind)}],
    }
    if max_batch > 0:
        # the dynamic batcher only exists for batching models; the reshape helpers have none
        config["dynamic_batching"] = {"max_queue_delay_microseconds": max_queue_delay_us}
    return config


def _graph_plan(
    spec: GraphSpec,
    export_dir: Path,
    labels: Sequence[str] | None,
    *,
    max_queue_delay_us: int,
    instance_kind: str,
) -> _ModelPlan:
    if spec.max_batch < 1:
        raise ExportError(f"{spec.name}: max_batch is {spec.max_batch}; re-export the model")
    source = export_dir / spec.file
    if not source.is_file():
        raise ExportError(f"{source} is missing from the export; re-export the model")
    label_file = LABELS_FILE if labels is not None and _has_probs(spec) else None
    inputs = [_IO(t.name, t.dtype, _batched_dims(t, spec.name)) for t in spec.inputs]
    outputs = [
        _IO(t.name, t.dtype, _batched_dims(t, spec.name), label_file if t.name == PROBS.name else None)
        for t in spec.outputs
    ]
    if labels is not None and label_file is not None:
        _check_label_count(labels, outputs, spec.name)
    config = _onnx_model_config(
        spec.name, spec.max_batch, inputs, outputs,
        max_queue_delay_us=max_queue_delay_us, instance_kind=instance_kind,
    )
    extra = {LABELS_FILE: _labels_text(labels)} if label_file else {}
    return _ModelPlan(spec.name, config, source, extra)


def _has_probs(spec: GraphSpec) -> bool:
    return any(t.name == PROBS.name for t in spec.outputs)


def _check_label_count(labels: Sequence[str], outputs: Sequence[_IO], where: str) -> None:
    probs = next(t for t in outputs if t.name == PROBS.name)
    if len(labels) != probs.dims[-1]:
        raise ExportError(
            f"{where}: the manifest has {len(labels)} labels but probs has {probs.dims[-1]} classes;"
            " re-export the model with a matching label set"
        )


def _labels_text(labels: Sequence[str] | None) -> str:
    assert labels is not None
    bad = [n for n in labels if "\n" in n or "\r" in n]
    if bad:
        raise ExportError(f"label names cannot contain line breaks (Triton reads one per line): {bad[:3]}")
    return "".join(f"{n}\n" for n in labels)


# --------------------------------------------------------------------------- reshape helpers
def _reshape_graph(
    name: str,
    source: tuple[str, tuple[int | str, ...]],
    target: tuple[str, tuple[int | str, ...]],
    opset: int,
) -> onnx.ModelProto:
    """A one-node ONNX graph: Reshape ``source`` to ``target`` (first axis symbolic, -1)."""
    (in_name, in_shape), (out_name, out_shape) = source, target
    shape = helper.make_tensor("target_shape", TensorProto.INT64, [len(out_shape)],
                               [-1, *(int(d) for d in out_shape[1:])])
    graph = helper.make_graph(
        [helper.make_node("Reshape", [in_name, "target_shape"], [out_name], name="fold")],
        name,
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(out_shape))],
        initializer=[shape],
    )
    opsets = [helper.make_opsetid("", opset)]
    # the lowest IR version that carries this opset, so any ONNX Runtime that runs the
    # exported graphs also loads these (a newer onnx package would stamp its own latest IR)
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="cavmae.export.triton")
    onnx.checker.check_model(model, full_check=True)
    return model


def _helper_plan(
    name: str,
    source: tuple[str, tuple[int, ...]],
    target: tuple[str, tuple[int, ...]],
    opset: int,
    *,
    instance_kind: str,
) -> _ModelPlan:
    """A non-batching model (``max_batch_size: 0``) reshaping ``[-1, *source]`` to ``[-1, *target]``.

    Non-batching so that its dims may include the leading axis that it changes; see the module
    docstring for why Triton then passes the result on as the next model's batch.
    """
    (in_name, in_dims), (out_name, out_dims) = source, target
    model = _reshape_graph(name, (in_name, ("batch", *in_dims)), (out_name, ("rows", *out_dims)), opset)
    config = _onnx_model_config(
        name, 0, [_IO(in_name, "float32", (-1, *in_dims))], [_IO(out_name, "float32", (-1, *out_dims))],
        max_queue_delay_us=0, instance_kind=instance_kind,
    )
    return _ModelPlan(name, config, model)


# --------------------------------------------------------------------------- the ensemble
def _ensemble_plans(
    manifest: Manifest, labels: Sequence[str] | None, *, instance_kind: str
) -> list[_ModelPlan]:
    """The helper models and the ``cavmae_classify`` ensemble, or ``[]`` when not applicable."""
    graphs = manifest.graphs
    if manifest.model_kind != "classifier":
        return []
    joint, audio_head, visual_head = JOINT_CLASSIFIER.name, AUDIO_CLASSIFIER.name, VISUAL_CLASSIFIER.name
    if joint in graphs:
        head, use_audio, use_visual = graphs[joint], True, True
    elif audio_head in graphs and visual_head not in graphs:
        head, use_audio, use_visual = graphs[audio_head], True, False
    elif visual_head in graphs and audio_head not in graphs:
        head, use_audio, use_visual = graphs[visual_head], False, True
    else:
        log.info("no joint classifier or single-modality head in this export: no %s ensemble", ENSEMBLE_NAME)
        return []
    needed = [g.name for g, used in ((AUDIO_ENCODER, use_audio), (VISUAL_ENCODER, use_visual)) if used]
    missing = [n for n in needed if n not in graphs]
    if missing:
        log.warning("export lacks %s: the Triton repository gets no %s ensemble", missing, ENSEMBLE_NAME)
        return []

    plans: list[_ModelPlan] = []
    inputs: list[_IO] = []
    steps: list[dict[str, Any]] = []
    head_inputs: dict[str, str] = {}
    limits = [head.max_batch]
    if use_audio:
        enc = graphs[AUDIO_ENCODER.name]
        audio, tokens = enc.input(AUDIO.name), enc.outputs[0]
        inputs.append(_IO(AUDIO.name, audio.dtype, _batched_dims(audio, enc.name)))
        steps.append(_step(enc.name, {audio.name: AUDIO.name}, {tokens.name: _AUDIO_TOKENS_WIRE}))
        head_inputs[AUDIO_TOKENS.name] = _AUDIO_TOKENS_WIRE
        limits.append(enc.max_batch)
    if use_visual:
        enc = graphs[VISUAL_ENCODER.name]
        image, tokens = enc.inputs[0], enc.outputs[0]
        frame_tokens = head.input(FRAME_TOKENS.name)
        # F comes from the head, the graph that fixes it; the manifest records the same number
        num_frames, *token_dims = _batched_dims(frame_tokens, head.name)
        image_dims, token_out = _batched_dims(image, enc.name), _batched_dims(tokens, enc.name)
        if tuple(token_dims) != token_out:
            raise ExportError(f"{enc.name} writes tokens {token_out}, {head.name} reads {token_dims} per frame")
        opset = int(manifest.versions.get("opset") or DEFAULT_OPSET)
        plans.append(_helper_plan(FRAMES_TO_BATCH, (ENSEMBLE_FRAMES, (num_frames, *image_dims)),
                                  (image.name, image_dims), opset, instance_kind=instance_kind))
        plans.append(_helper_plan(BATCH_TO_FRAMES, (tokens.name, token_out),
                                  (_FRAME_TOKENS_WIRE, (num_frames, *token_out)), opset,
                                  instance_kind=instance_kind))
        inputs.append(_IO(ENSEMBLE_FRAMES, image.dtype, (num_frames, *image_dims)))
        steps += [
            _step(FRAMES_TO_BATCH, {ENSEMBLE_FRAMES: ENSEMBLE_FRAMES}, {image.name: _IMAGES_WIRE}),
            _step(enc.name, {image.name: _IMAGES_WIRE}, {tokens.name: _IMAGE_TOKENS_WIRE}),
            _step(BATCH_TO_FRAMES, {tokens.name: _IMAGE_TOKENS_WIRE},
                  {_FRAME_TOKENS_WIRE: _FRAME_TOKENS_WIRE}),
        ]
        head_inputs[FRAME_TOKENS.name] = _FRAME_TOKENS_WIRE
        # the visual encoder sees B*F frames for B clips, so B is bounded by its limit / F
        limits.append(enc.max_batch // num_frames)
    steps.append(_step(head.name, {t.name: head_inputs[t.name] for t in head.inputs},
                       {t.name: t.name for t in head.outputs}))

    label_file = LABELS_FILE if labels is not None else None
    outputs = [_IO(t.name, t.dtype, _batched_dims(t, head.name), label_file if t.name == PROBS.name else None)
               for t in head.outputs]
    max_batch = min(limits)
    if max_batch < 1:
        raise ExportError(f"the graphs' batch limits {limits} leave no room for one clip in {ENSEMBLE_NAME}")
    config = {
        "name": ENSEMBLE_NAME,
        "platform": "ensemble",
        "max_batch_size": max_batch,
        "input": [t.to_config() for t in inputs],
        "output": [t.to_config() for t in outputs],
        "ensemble_scheduling": {"step": steps},
    }
    extra = {LABELS_FILE: _labels_text(labels)} if label_file else {}
    plans.append(_ModelPlan(ENSEMBLE_NAME, config, None, extra))
    return plans


def _step(model: str, input_map: dict[str, str], output_map: dict[str, str]) -> dict[str, Any]:
    """One ensemble step; maps are model tensor name -> ensemble tensor name."""
    return {
        "model_name": model,
        "model_version": -1,
        "input_map": [{"key": k, "value": v} for k, v in input_map.items()],
        "output_map": [{"key": k, "value": v} for k, v in output_map.items()],
    }


# --------------------------------------------------------------------------- writing
def _link_or_copy(source: Path, target: Path) -> None:
    """Hard link when possible (the same bytes, no extra disk), else copy."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.EACCES):
            raise
        shutil.copyfile(source, target)  # another filesystem, or one without hard links


def _write_plan(plan: _ModelPlan, stage: Path, final: Path, copy: bool) -> None:
    version_dir = stage / VERSION
    version_dir.mkdir(parents=True)
    if isinstance(plan.model_source, Path):
        # a symlink is computed against where the directory will end up, not the staging copy
        target = version_dir / MODEL_FILE
        if copy:
            _link_or_copy(plan.model_source, target)
        else:
            # relative, so a repository that moves together with its export keeps working
            # (e.g. both mounted into a container from a common parent directory)
            os.symlink(os.path.relpath(plan.model_source.resolve(), (final / VERSION).resolve()), target)
    elif isinstance(plan.model_source, onnx.ModelProto):
        onnx.save(plan.model_source, str(version_dir / MODEL_FILE))
    for name, text in plan.extra_files.items():
        (stage / name).write_text(text, encoding="utf-8")
    (stage / CONFIG_FILE).write_text(to_pbtxt(plan.config), encoding="utf-8")


def _plans(manifest: Manifest, export_dir: Path, max_queue_delay_us: int, instance_kind: str) -> list[_ModelPlan]:
    if max_queue_delay_us < 0:
        raise ExportError(f"max_queue_delay_us must be >= 0, not {max_queue_delay_us}")
    kind = _instance_kind(instance_kind)
    labels = manifest.labels if manifest.model_kind == "classifier" else None
    plans = [
        _graph_plan(spec, export_dir, labels, max_queue_delay_us=max_queue_delay_us, instance_kind=kind)
        for spec in manifest.graphs.values()
    ]
    plans += _ensemble_plans(manifest, labels, instance_kind=kind)
    names = [p.name for p in plans]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ExportError(f"model names used twice in the Triton repository: {clash}")
    return plans


def _staging_dir(repo_dir: Path) -> Path:
    """A scratch directory beside the repository; inside it only where the parent is read-only.

    Beside, because a server polling the repository would try to load a half-written model.
    """
    try:
        return fsio.make_temp_dir(repo_dir.resolve())
    except OSError:
        return fsio.make_temp_dir(repo_dir / "staging")


def write_triton_repository(
    export_dir: str | Path,
    repo_dir: str | Path,
    *,
    max_queue_delay_us: int = 1000,
    instance_kind: str = "KIND_AUTO",
    copy: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write a Triton model repository for the export in ``export_dir`` into ``repo_dir``.

    One model directory per exported graph (``<graph>/config.pbtxt`` + ``<graph>/1/model.onnx``)
    and, for classifiers, the ``cavmae_classify`` ensemble with its two Reshape helper models
    (see the module docstring). ``instance_kind`` is ``KIND_AUTO``, ``KIND_GPU`` or ``KIND_CPU``
    (``auto``/``gpu``/``cpu`` are accepted too). ``copy=True`` hard-links each ONNX file when the
    repository is on the export's filesystem and copies it otherwise; ``copy=False`` writes
    relative symlinks instead (the export must then stay reachable from the server).

    Other entries of ``repo_dir`` are left alone, so one repository can hold several models;
    a model directory that already exists is an error unless ``overwrite``. Each model directory
    is assembled next to ``repo_dir`` and moved in whole, so a failure leaves no half-written
    model for a polling server to pick up. Returns the written model directories.
    """
    export_dir, repo_dir = Path(export_dir), Path(repo_dir)
    manifest = Manifest.load(export_dir)
    plans = _plans(manifest, export_dir, max_queue_delay_us, instance_kind)
    existing = [p.name for p in plans if (repo_dir / p.name).exists() or (repo_dir / p.name).is_symlink()]
    if existing and not overwrite:
        raise ExportError(
            f"{repo_dir} already has model(s) {existing}; choose another repository or pass --overwrite"
        )
    repo_dir.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(repo_dir)
    written: list[Path] = []
    try:
        for plan in plans:
            _write_plan(plan, staging / plan.name, repo_dir / plan.name, copy)
        # ensemble last: its composing models are in place before it appears
        for plan in plans:
            fsio.publish_dir(staging / plan.name, repo_dir / plan.name)  # replaces an older one
            written.append(repo_dir / plan.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d Triton models into %s", len(written), repo_dir)
    return written

