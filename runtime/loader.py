"""``cavmae.runtime.load``: from a model reference to a ready pipeline.

A model reference is an export directory, a checkpoint file, or a registry name (downloaded on
first use). Checkpoints are exported once into the cache, keyed by the checkpoint's sha256 and
the export settings, and reused; the PyTorch engine runs a checkpoint directly.

What a model is (pre-training model or classifier, and how many classes) is read first, from
the registry entry, the manifest or the checkpoint's keys, so that a model that cannot do the
task asked of it is refused before anything is downloaded, hashed or exported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cavmae import fsio
from cavmae.checkpoint_keys import peek_checkpoint
from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import CavmaeError, ModelKindError
from cavmae.hub import registry
from cavmae.hub.cache import cavmae_home
from cavmae.hub.inventory import mark_used
from cavmae.labels import LabelSet, read_label_csv
from cavmae.manifest import Manifest, is_export_dir
from cavmae.modes import finetune_mode_of

from .engines import check_engine, create_engine
from .pipeline import Pipeline

log = logging.getLogger(__name__)

#: task -> (the model kind it needs, a released model of that kind to suggest)
TASKS: dict[str, tuple[str, str]] = {
    "classify": ("classifier", registry.DEFAULT_MODEL),
    "reconstruct": ("pretrain", "cav-mae-base-nonorm"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: an export directory or a checkpoint file."""

    kind: str  # "export" or "checkpoint"
    path: Path
    info: registry.ModelInfo | None = None  # set for registry names
    model_kind: str | None = None  # "classifier" or "pretrain", when known
    num_classes: int | None = None  # of a classifier, when known
    mirror: str | None = None  # where the registry's files come from, label CSVs included

    @property
    def finetune_mode(self) -> str:
        """What the checkpoint was fine-tuned for: from its registry entry, else ``multimodal``."""
        return finetune_mode_of(self.info.modes if self.info else ())


def resolve_model(
    model: str | Path, *, mirror: str | None = None, progress: bool = True, task: str | None = None
) -> ModelSource:
    """Classify a model reference; registry names are downloaded when not cached.

    With ``task`` (a key of ``TASKS``), a model of the wrong kind raises ``ModelKindError``
    before any download, hash or export: the kind comes from the registry entry, the manifest,
    or the checkpoint's keys (read from a memory map, in well under a second).
    """
    path = Path(model)
    if path.is_dir():
        if not is_export_dir(path):
            raise CavmaeError(f"{path} is a directory but not a cavmae export (no manifest.json)")
        manifest = Manifest.load(path)
        source = ModelSource("export", path, model_kind=manifest.model_kind,
                             num_classes=manifest.model_config.num_classes)
        check_kind(source, model, task)
        return source
    info = None if path.is_file() else registry.MODELS.get(str(model))
    if info is not None:  # checked before the download
        check_kind(ModelSource("checkpoint", path, info, info.kind, info.num_classes), model, task)
    file, info = registry.checkpoint_file(model, mirror=mirror, progress=progress)
    kind, classes = (info.kind, info.num_classes) if info is not None else _peek_checkpoint(file)
    source = ModelSource("checkpoint", file, info, kind, classes, mirror)
    check_kind(source, model, task)
    return source


def _peek_checkpoint(path: Path) -> tuple[str | None, int | None]:
    """Kind and class count from a checkpoint's keys, read without torch (milliseconds); a
    format only torch reads falls back to it, and to (None, None) where torch is missing (then
    nothing can be exported or run from the checkpoint, and that step says so)."""
    summary = peek_checkpoint(path)  # a file that is no checkpoint fails here, in one line
    if summary is not None:
        return summary.kind, summary.num_classes
    try:
        from cavmae.checkpoint import inspect_checkpoint
    except ImportError:
        return None, None
    info = inspect_checkpoint(path)
    return info.kind, info.config.num_classes if info.kind == "classifier" else None


def check_kind(source: ModelSource, model: str | Path, task: str | None) -> None:
    """Raise ``ModelKindError`` when ``source`` is not the kind of model ``task`` needs."""
    if task is None or source.model_kind is None:
        return
    needed, example = TASKS[task]
    if source.model_kind == needed:
        return
    if needed == "classifier":
        raise ModelKindError(
            f"{model} is a pre-training model without a classification head; {task} needs a"
            f" fine-tuned classifier such as {example} (see `cavmae models`)"
        )
    raise ModelKindError(
        f"{model} is a fine-tuned classifier without the decoder; {task} needs a pre-training"
        f" model such as {example} (see `cavmae models`)"
    )


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint, memoized by (path, size, mtime) so large files are hashed once."""
    return fsio.memo_sha256(path, cavmae_home() / "hashes.json")


def export_settings(source: ModelSource, **settings: Any) -> dict[str, Any]:
    """The settings an export depends on, registry facts included."""
    info = source.info
    out = {"finetune_mode": source.finetune_mode, **settings}
    if info is not None:
        out.setdefault("task", info.task)
    return out


def cached_export(
    source: ModelSource, *, progress: bool = True, fetch_labels: bool = True, **settings: Any
) -> Path:
    """The export directory of a checkpoint in the cache, exporting it the first time.

    The export carries the registry model's label names; ``fetch_labels=False`` (the caller
    brings its own labels) takes them only when they are here without a download.
    """
    sha = checkpoint_sha256(source.path)
    settings = export_settings(source, **settings)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    out = cavmae_home() / "exports" / f"{sha[:16]}-{digest[:12]}"
    if is_export_dir(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(out.name + ".lock")
    with fsio.exclusive_lock(lock):  # concurrent shards export it once
        if is_export_dir(out):
            return out
        try:
            from cavmae.export import export_model
        except ImportError as e:
            raise CavmaeError(f"exporting a checkpoint needs PyTorch and onnx ({e}); pass an export directory instead") from None
        log.info("exporting %s into the cache %s", source.path, out)
        from cavmae.progress import progress_note

        started = time.monotonic()
        progress_note(f"export: first use of {source.path.name}: exporting it into the cache once"
                      " (30-50 s for a full-size model)", enabled=progress)
        labels = _registry_labels(source, fetch=fetch_labels, progress=progress)
        export_model(
            _load_source_model(source), out, labels=labels, progress=progress, overwrite=True,
            source={"checkpoint": str(source.path.resolve()), "sha256": sha,
                    "name": source.info.name if source.info else None},
            **settings,
        )
        progress_note(f"export: done in {time.monotonic() - started:.1f} s ({out})", enabled=progress)
    return out


def _load_source_model(source: ModelSource) -> Any:
    from cavmae.checkpoint import load_checkpoint

    # By name for registry models, so the registry's facts (norm_pix_loss) apply.
    return load_checkpoint(source.info.name if source.info else source.path)


def _registry_labels(source: ModelSource, *, fetch: bool, progress: bool = False) -> Path | None:
    """The label CSV of a registry model: shipped or cached, else downloaded when ``fetch``."""
    if source.info is None or source.info.label_set is None:
        return None
    if not fetch:
        return registry.local_labels(source.info.name)
    return registry.ensure_labels(source.info.name, mirror=source.mirror, progress=progress)


def _user_labels(labels: str | Path, source: ModelSource) -> LabelSet:
    """The user's label CSV, checked against the model's class count before any export."""
    label_set = read_label_csv(labels)
    if source.num_classes is not None and len(label_set) != source.num_classes:
        raise CavmaeError(
            f"{labels} has {len(label_set)} labels but the model has {source.num_classes} classes"
        )
    return label_set


def load(
    model: str | Path,
    engine: str = "auto",
    device: str = "auto",
    *,
    precision: str = "fp32",
    num_frames: int = 10,
    max_batch: int = 8,
    mask_ratio_a: float = 0.75,
    mask_ratio_v: float = 0.75,
    mirror: str | None = None,
    progress: bool = False,
    labels: str | Path | None = None,
    task: str | None = None,
    **engine_options: Any,
) -> Pipeline:
    """Open ``model`` (export directory, checkpoint file or registry name) as a pipeline.

    ``engine``: "auto" (TensorRT with a GPU, else ONNX Runtime CUDA, else CPU), "ort", "trt"
    or "torch". For "torch", ``precision`` fp16/bf16 means CUDA autocast; for the others it
    selects the fp32 or fp16 export of a checkpoint.

    ``labels``: a label CSV replacing the model's class names (nothing is downloaded for
    labels then). ``task`` (``"classify"``, ``"reconstruct"``): refuse a model
    of the wrong kind before any download or export (``ModelKindError``).
    """
    name, dev = check_engine(engine, device)  # before any download or export
    source = resolve_model(model, mirror=mirror, progress=progress, task=task)
    mark_used(source.path)  # `cavmae cache` shows last use; prune goes by it
    user_labels = _user_labels(labels, source) if labels is not None else None
    export_opts = dict(num_frames=num_frames, max_batch=max_batch, mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v)
    pipe = _open(source, name, dev, precision=precision, fetch_labels=user_labels is None,
                 progress=progress, export_opts=export_opts, engine_options=engine_options)
    return _with_labels(pipe, source, user_labels, progress)


def _with_labels(
    pipe: Pipeline, source: ModelSource, user: LabelSet | None, progress: bool
) -> Pipeline:
    """Give the pipeline the user's label names, or the registry's where its export has none
    (an export made while the user brought labels and the registry's were not here)."""
    names = user.names if user is not None else None
    if names is None and pipe.manifest.labels is None and pipe.manifest.model_kind == "classifier":
        file = _registry_labels(source, fetch=True, progress=progress)
        names = read_label_csv(file).names if file is not None else None
    if names is not None:
        pipe.manifest = replace(pipe.manifest, labels=tuple(names))
    return pipe


def _open(
    source: ModelSource,
    name: str,
    dev: str,
    *,
    precision: str,
    fetch_labels: bool,
    progress: bool,
    export_opts: dict[str, Any],
    engine_options: dict[str, Any],
) -> Pipeline:
    """The pipeline of a resolved model on engine ``name`` and device ``dev``."""
    if name == "torch":
        from .engines.torch_engine import TorchEngine

        if source.kind == "export":
            manifest = Manifest.load(source.path)
            return Pipeline(TorchEngine(source.path, manifest, dev, precision=precision, **engine_options))
        net = _load_source_model(source)
        label_file = _registry_labels(source, fetch=fetch_labels, progress=progress)
        manifest = _in_memory_manifest(net, source, label_file, **export_opts)
        return Pipeline(TorchEngine(None, manifest, dev, model=net, precision=precision, **engine_options))
    if source.kind == "checkpoint":
        path = cached_export(source, progress=progress, fetch_labels=fetch_labels,
                             precision=precision, **export_opts)
    else:
        path = source.path
    mark_used(path)
    return Pipeline(create_engine(name, path, Manifest.load(path), dev, **engine_options))


def _in_memory_manifest(net: Any, source: ModelSource, label_file: Path | None, **opts: Any) -> Manifest:
    """A manifest for running a checkpoint directly on the torch engine (no ONNX files)."""
    from cavmae.labels import default_labels, default_task
    from cavmae.stages import build_stages, make_manifest

    settings = export_settings(source)
    cfg = net.config
    classifier = hasattr(net, "mlp_head")
    task = settings.get("task") or (default_task(cfg.num_classes) if classifier else None)
    labels = read_label_csv(label_file) if label_file else (default_labels(cfg.num_classes) if classifier else None)
    stages = build_stages(net, task=task or "multi-label", finetune_mode=settings["finetune_mode"], **opts)
    return make_manifest(
        net, {k: s.spec for k, s in stages.items()}, precision="fp32", task=task,
        finetune_mode=settings["finetune_mode"], labels=labels,
        preprocess=DEFAULT_PREPROCESS,
        source={"checkpoint": str(source.path.resolve())}, versions={}, **opts,
    )
