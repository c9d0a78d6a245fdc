"""``cavmae.runtime.load``: from a model reference to a ready pipeline.

A model reference is an export directory, a checkpoint file, or a registry name (downloaded on
first use). Checkpoints are exported once into the cache, keyed by the checkpoint's sha256 and
the export settings, and reused; the PyTorch engine runs a checkpoint directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import CavmaeError
from cavmae.manifest import Manifest, is_export_dir
from cavmae.modes import finetune_mode_of

from . import registry
from .download import exclusive_lock, sha256_file
from .engines import create_engine, resolve_engine
from .pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a model reference points: an export directory or a checkpoint file."""

    kind: str  # "export" or "checkpoint"
    path: Path
    info: registry.ModelInfo | None = None  # set for registry names

    @property
    def finetune_mode(self) -> str:
        """What the checkpoint was fine-tuned for: from its registry entry, else ``multimodal``."""
        return finetune_mode_of(self.info.modes if self.info else ())


def resolve_model(model: str | Path, *, mirror: str | None = None, progress: bool = True) -> ModelSource:
    """Classify a model reference; registry names are downloaded when not cached."""
    path = Path(model)
    if path.is_dir():
        if not is_export_dir(path):
            raise CavmaeError(f"{path} is a directory but not a cavmae export (no manifest.json)")
        return ModelSource("export", path)
    if path.is_file():
        return ModelSource("checkpoint", path)
    name = str(model)
    if name in registry.MODELS:
        return ModelSource("checkpoint", registry.ensure_model(name, mirror=mirror, progress=progress),
                           registry.get_model_info(name))
    if path.suffix in (".pth", ".pt", ".safetensors") or "/" in name:
        raise CavmaeError(f"model file not found: {path}")
    registry.get_model_info(name)  # raises with close matches
    raise AssertionError("unreachable")


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint, memoized by (path, size, mtime) so large files are hashed once."""
    st = path.stat()
    index = registry.cavmae_home() / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp = index.with_suffix(".tmp")
            tmp.write_text(json.dumps(known, indent=0))
            tmp.replace(index)
        except OSError:
            log.debug("cannot write %s", index)
    return known[key]


def export_settings(source: ModelSource, **settings: Any) -> dict[str, Any]:
    """The settings an export depends on, registry facts included."""
    info = source.info
    out = {"finetune_mode": source.finetune_mode, **settings}
    if info is not None:
        out.setdefault("task", info.task)
    return out


def cached_export(source: ModelSource, *, progress: bool = True, **settings: Any) -> Path:
    """The export directory of a checkpoint in the cache, exporting it the first time."""
    sha = checkpoint_sha256(source.path)
    settings = export_settings(source, **settings)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    out = registry.cavmae_home() / "exports" / f"{sha[:16]}-{digest[:12]}"
    if is_export_dir(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(out.name + ".lock")
    with exclusive_lock(lock, None, str(source.path)):  # concurrent shards export it once
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
        labels = registry.ensure_labels(source.info.name, progress=progress) if source.info and source.info.label_url else None
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

    overrides = {}
    if source.info is not None and source.info.kind == "pretrain":
        overrides["norm_pix_loss"] = source.info.norm_pix_loss
    return load_checkpoint(source.path, **overrides)


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
    **engine_options: Any,
) -> Pipeline:
    """Open ``model`` (export directory, checkpoint file or registry name) as a pipeline.

    ``engine``: "auto" (TensorRT with a GPU, else ONNX Runtime CUDA, else CPU), "ort", "trt"
    or "torch". For "torch", ``precision`` fp16/bf16 means CUDA autocast; for the others it
    selects the fp32 or fp16 export of a checkpoint.
    """
    name, dev = resolve_engine(engine, device)
    source = resolve_model(model, mirror=mirror, progress=progress)
    export_opts = dict(num_frames=num_frames, max_batch=max_batch, mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v)
    if name == "torch":
        from .engines.torch_engine import TorchEngine

        if source.kind == "export":
            manifest = Manifest.load(source.path)
            return Pipeline(TorchEngine(source.path, manifest, dev, precision=precision, **engine_options))
        net = _load_source_model(source)
        manifest = _in_memory_manifest(net, source, **export_opts)
        return Pipeline(TorchEngine(None, manifest, dev, model=net, precision=precision, **engine_options))
    if source.kind == "checkpoint":
        path = cached_export(source, progress=progress, precision=precision, **export_opts)
    else:
        path = source.path
    return Pipeline(create_engine(name, path, Manifest.load(path), dev, **engine_options))


def _in_memory_manifest(net: Any, source: ModelSource, **opts: Any) -> Manifest:
    """A manifest for running a checkpoint directly on the torch engine (no ONNX files)."""
    from cavmae.labels import default_labels, default_task, read_label_csv
    from cavmae.stages import build_stages, make_manifest

    settings = export_settings(source)
    cfg = net.config
    classifier = hasattr(net, "mlp_head")
    task = settings.get("task") or (default_task(cfg.num_classes) if classifier else None)
    label_file = registry.ensure_labels(source.info.name) if source.info and source.info.label_url else None
    labels = read_label_csv(label_file) if label_file else (default_labels(cfg.num_classes) if classifier else None)
    stages = build_stages(net, task=task or "multi-label", finetune_mode=settings["finetune_mode"], **opts)
    return make_manifest(
        net, {k: s.spec for k, s in stages.items()}, precision="fp32", task=task,
        finetune_mode=settings["finetune_mode"], labels=labels,
        preprocess=DEFAULT_PREPROCESS,
        source={"checkpoint": str(source.path.resolve())}, versions={}, **opts,
    )
