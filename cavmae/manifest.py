"""The export manifest: what an export directory holds and how to feed it.

Written by ``cavmae.export`` next to the ONNX files and read by ``cavmae.runtime``, so a deployment
needs neither the checkpoint nor PyTorch. Plain Python (json + dataclasses): no torch, no numpy.

Shapes use the string ``"batch"`` for the one dynamic axis; every other axis is a fixed int.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fsio
from .config import ModelConfig, PreprocessConfig
from .errors import CavmaeError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
BATCH = "batch"
#: precisions an export's graphs can have (what a manifest's ``precision`` says); ONNX Runtime
#: runs them all, TensorRT the fp32 and fp16 ones (int8 graphs are ONNX Runtime's dynamic kind)
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
#: autocast precisions of the torch engine, which runs the checkpoint's model itself
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
#: what an export deploys (``cavmae.stages.model_kind``)
MODEL_KINDS = ("classifier", "pretrain", "encoder")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``shape`` like ``["batch", 512, 768]``."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape with the batch axis set to ``batch``."""
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=d["name"], shape=tuple(d["shape"]), dtype=d.get("dtype", "float32"))


@dataclass(frozen=True)
class GraphSpec:
    """One exported ONNX graph (a stage of the model)."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int
    precision: str = "fp32"
    description: str = ""

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name!r} has no input {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "max_batch": self.max_batch,
            "precision": self.precision,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphSpec:
        return cls(
            name=d["name"],
            file=d["file"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            max_batch=int(d["max_batch"]),
            precision=d.get("precision", "fp32"),
            description=d.get("description", ""),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to know about an export directory.

    Each fact is stored once: the input sizes in ``model_config`` (``preprocess`` is bound to
    them), the frames a clip contributes in ``preprocess.num_frames`` (read as ``num_frames``),
    what a classifier was fine-tuned for in ``finetune_mode`` (its reference modes derived).
    """

    model_kind: str  # "classifier" or "pretrain"
    model_config: ModelConfig
    preprocess: PreprocessConfig
    graphs: dict[str, GraphSpec]
    precision: str = "fp32"
    max_batch: int = 8
    task: str | None = None  # "multi-label" / "single-label" for classifiers
    finetune_mode: str | None = None  # of a classifier (cavmae.modes), None for pretrain
    labels: tuple[str, ...] | None = None
    label_ids: tuple[str, ...] | None = None
    mask_ratio_a: float | None = None
    mask_ratio_v: float | None = None
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    #: int8 exports: how the graphs were quantized and the accuracy gate's per-clip report
    quantization: dict[str, Any] | None = None
    #: graphs declared in ``graphs`` whose files are not written yet: a cache export made from
    #: a checkpoint adds each one the first time it is run (``cavmae.runtime.load``)
    pending: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # the preprocessing makes this model's inputs: its sizes are the model config's
        object.__setattr__(self, "preprocess", self.preprocess.for_model(self.model_config))

    @property
    def num_frames(self) -> int:
        """Frames per clip the export aggregates (``preprocess.num_frames``)."""
        return self.preprocess.num_frames

    @property
    def modes(self) -> tuple[str, ...]:
        """Reference modes the deployed classifier serves (its fine-tune mode's); () for pretrain."""
        from .modes import reference_modes  # modes -> graphs -> manifest: import when used

        return reference_modes(self.finetune_mode) if self.finetune_mode else ()

    def graph(self, name: str) -> GraphSpec:
        try:
            return self.graphs[name]
        except KeyError:
            have = ", ".join(sorted(self.graphs)) or "none"
            raise CavmaeError(
                f"this export has no graph {name!r} (it has: {have}); re-export the model"
                " with a version of cavmae that writes it"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "model_kind": self.model_kind,
            "task": self.task,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "finetune_mode": self.finetune_mode,
            "mask_ratio_a": self.mask_ratio_a,
            "mask_ratio_v": self.mask_ratio_v,
            "model_config": self.model_config.to_dict(),
            "preprocess": self.preprocess.to_dict(),
            "labels": list(self.labels) if self.labels is not None else None,
            "label_ids": list(self.label_ids) if self.label_ids is not None else None,
            "source": dict(self.source),
            "versions": dict(self.versions),
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
        }
        if self.quantization is not None:
            d["quantization"] = self.quantization
        if self.pending:
            d["pending"] = list(self.pending)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CavmaeError(
                f"export manifest has schema version {version!r}, this cavmae reads"
                f" {SCHEMA_VERSION}; re-export the model with this version"
            )
        model_config = ModelConfig.from_dict(d["model_config"])
        preprocess = dict(d["preprocess"])
        if "num_frames" in d:  # older manifests kept the export's frames beside preprocess
            preprocess["num_frames"] = int(d["num_frames"])
        return cls(
            schema_version=version,
            model_kind=d["model_kind"],
            task=d.get("task"),
            precision=d.get("precision", "fp32"),
            max_batch=int(d.get("max_batch", 8)),
            finetune_mode=_finetune_mode(d),
            mask_ratio_a=d.get("mask_ratio_a"),
            mask_ratio_v=d.get("mask_ratio_v"),
            model_config=model_config,
            preprocess=PreprocessConfig.from_dict(preprocess, model_config),
            labels=tuple(d["labels"]) if d.get("labels") is not None else None,
            label_ids=tuple(d["label_ids"]) if d.get("label_ids") is not None else None,
            source=dict(d.get("source", {})),
            versions=dict(d.get("versions", {})),
            graphs={k: GraphSpec.from_dict(g) for k, g in d["graphs"].items()},
            quantization=d.get("quantization"),
            pending=tuple(d.get("pending", ())),
        )

    def replace(self, **changes: Any) -> Manifest:
        """A copy with ``changes``; ``num_frames`` changes ``preprocess.num_frames``."""
        if "num_frames" in changes:
            preprocess = changes.get("preprocess", self.preprocess)
            changes["preprocess"] = preprocess.replace(num_frames=changes.pop("num_frames"))
        return dataclasses.replace(self, **changes)

    def save(self, directory: str | Path) -> Path:
        return fsio.write_json(Path(directory) / MANIFEST_NAME, self.to_dict(), indent=2)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise CavmaeError(
                f"{directory} is not a cavmae export (no {MANIFEST_NAME}); create one with"
                " `cavmae export MODEL -o DIR`"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CavmaeError(f"cannot read {path}: {e}") from None
        try:
            manifest = cls.from_dict(data)
            problem = manifest.problem()
        except CavmaeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a field missing or mistyped
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise CavmaeError(f"{path} is damaged ({problem}); export the model again")
        return manifest

    def problem(self) -> str | None:
        """What makes this manifest unusable (a hand edit, a damaged file), or None.

        The fields the runtime relies on without checking again: the kind and precision it
        dispatches on, a batch of at least one, and one label name per class.
        """
        if self.model_kind not in MODEL_KINDS:
            return f"model_kind {self.model_kind!r} is none of {', '.join(MODEL_KINDS)}"
        if self.precision not in {*EXPORT_PRECISIONS, *TORCH_PRECISIONS}:
            return f"precision {self.precision!r} is none of {', '.join(EXPORT_PRECISIONS)}"
        if self.max_batch < 1 or any(g.max_batch < 1 for g in self.graphs.values()):
            return "a max batch below 1"
        if not self.graphs:
            return "no graphs"
        if self.labels is not None:
            if not all(isinstance(x, str) for x in self.labels):
                return "labels that are not all text"
            if self.model_kind == "classifier" and len(self.labels) != self.model_config.num_classes:
                return f"{len(self.labels)} labels for {self.model_config.num_classes} classes"
        return None


def _finetune_mode(d: dict[str, Any]) -> str | None:
    """A classifier's fine-tune mode; older manifests listed its reference ``modes`` instead."""
    if d["model_kind"] != "classifier":
        return None
    if d.get("finetune_mode"):
        return str(d["finetune_mode"])
    from .modes import finetune_mode_of  # modes -> graphs -> manifest: import when used

    return finetune_mode_of(d.get("modes", ()))


def is_export_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding an export manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()
