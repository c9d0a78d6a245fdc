"""``cavmae.runtime.load``: from a model reference to a ready pipeline.

A model reference is an export directory, a checkpoint file, or a registry name (downloaded on
first use). Checkpoints are exported once into the cache, keyed by the checkpoint's sha256 and
the export settings, and reused; the PyTorch engine runs a checkpoint directly.

What a model is (pre-training model or classifier, and how many classes) is read first, from
the registry entry, the manifest or the checkpoint's keys, so that a model that cannot do the
task asked of it is refused before anything is downloaded, hashed or exported.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cavmae import fsio
from cavmae.checkpoint_keys import TrainedHead, embedded_head, peek_checkpoint, peek_metadata
from cavmae.config import BASE, DEFAULT_PREPROCESS, ModelConfig, check_max_batch, check_num_frames
from cavmae.errors import CavmaeError, ModelKindError
from cavmae.hub import registry
from cavmae.hub.cache import cavmae_home
from cavmae.hub.inventory import mark_used
from cavmae.labels import LabelSet, read_label_csv
from cavmae.manifest import EXPORT_PRECISIONS, TORCH_PRECISIONS, Manifest, is_export_dir
from cavmae.masking import DEFAULT_MASK_RATIO, kept_tokens
from cavmae.modes import finetune_mode_of

from .engines import check_engine, check_engine_options, create_engine
from .pipeline import Pipeline

log = logging.getLogger(__name__)

#: task -> (the model kind it needs, a released model of that kind to suggest)
TASKS: dict[str, tuple[str, str]] = {
    "classify": ("classifier", registry.DEFAULT_MODEL),
    "bench": ("classifier", registry.DEFAULT_MODEL),  # it times classification
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

    @functools.cached_property
    def head(self) -> TrainedHead:
        """What a checkpoint ``cavmae finetune`` wrote keeps about its head (class names, mode,
        task); all None for other files, exports and registry models (their entries say it)."""
        if self.kind != "checkpoint" or self.info is not None or self.model_kind not in (None, "classifier"):
            return TrainedHead()
        return embedded_head(self.path)

    @property
    def finetune_mode(self) -> str:
        """What the checkpoint was fine-tuned for: from its registry entry, else from the file's
        metadata, else ``multimodal``."""
        if self.info is None and self.head.finetune_mode is not None:
            return self.head.finetune_mode
        return finetune_mode_of(self.info.modes if self.info else ())

    def load_model(self) -> Any:
        """The PyTorch model of a checkpoint source (imports torch).

        Registry models load by name, so the registry's facts (``norm_pix_loss``) apply.
        """
        if self.kind != "checkpoint":
            raise CavmaeError(
                f"{self.path} is an export; its PyTorch model needs the checkpoint it was made"
                " from (give the checkpoint or the model name instead)"
            )
        from cavmae.checkpoint import load_checkpoint
        from cavmae.errors import CheckpointError

        try:  # mapped, not read: its pages come from the page cache the hash just filled
            return load_checkpoint(self.info.name if self.info else self.path, mmap=True)
        except CheckpointError as e:
            if self.info is None:
                raise
            raise CheckpointError(f"{e} (the cached copy of {self.info.name}: `cavmae download"
                                  f" {self.info.name}` replaces a damaged one)") from None


def resolve_model(
    model: str | Path, *, mirror: str | None = None, progress: bool = True, task: str | None = None,
    mask_ratios: tuple[float, float] | None = None,
) -> ModelSource:
    """Classify a model reference; registry names are downloaded when not cached.

    With ``task`` (a key of ``TASKS``), a model of the wrong kind raises ``ModelKindError``
    before any download, hash or export: the kind comes from the registry entry, the manifest,
    or the checkpoint's keys (read from a memory map, in well under a second). With
    ``mask_ratios`` (audio, visual), a pre-training model's ratios that keep no token raise
    ``MaskRatioError`` as early (see :func:`_check_mask_ratios`).
    """
    path = Path(model)
    if path.is_dir():
        if not is_export_dir(path):
            raise CavmaeError(f"{path} is a directory but not a cavmae export (no manifest.json)")
        manifest = Manifest.load(path)
        source = ModelSource("export", path, model_kind=manifest.model_kind,
                             num_classes=manifest.model_config.num_classes)
        check_kind(source, model, task)
        _check_mask_ratios(source, mask_ratios)
        return source
    info = None if path.is_file() else registry.MODELS.get(str(model))
    if info is not None:  # checked before the download
        known = ModelSource("checkpoint", path, info, info.kind, info.num_classes)
        check_kind(known, model, task)
        _check_mask_ratios(known, mask_ratios)
    file, info = registry.checkpoint_file(model, mirror=mirror, progress=progress)
    kind, classes = (info.kind, info.num_classes) if info is not None else _peek_checkpoint(file)
    source = ModelSource("checkpoint", file, info, kind, classes, mirror)
    check_kind(source, model, task)
    _check_mask_ratios(source, mask_ratios)
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
    if task is not None and task not in TASKS:
        raise CavmaeError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
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
    elif source.head.task is not None:
        out.setdefault("task", source.head.task)
    return out


def cached_export(
    source: ModelSource,
    *,
    progress: bool = True,
    labels: Callable[[], LabelSet | None] | None = None,
    **settings: Any,
) -> Path:
    """The export directory of a checkpoint in the cache, made the first time (see
    :class:`CacheExport`; its graphs are written when an engine with ``provide`` opens them)."""
    return CacheExport(source, progress=progress, labels=labels, **settings).ensure()


class CacheExport:
    """One checkpoint's export in the cache, for one set of export settings.

    The directory ``exports/{sha256[:16]}-{settings digest}`` is made on first use holding the
    manifest, every graph declared and pending (int8 exports, whose gate runs every graph, are
    written whole). :meth:`provide` writes a pending graph when an engine first opens it, under
    the export's lock: a graph another export of the same checkpoint already validated with the
    same identity is hard-linked from there, any other is traced and validated once (the
    checkpoint is loaded then, once per process). So a command traces only the graphs its mode
    runs, and a later command or other settings (frames, mask ratios, batch limit) trace only the
    graphs whose shapes or fixed arguments differ.

    ``labels`` gives the class names the export carries; it is called only when the export is
    made (default: the registry model's, see :func:`model_labels`). The cache is shared by
    every later load, so a user's own label CSV never goes into it.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        progress: bool = True,
        labels: Callable[[], LabelSet | None] | None = None,
        **settings: Any,
    ) -> None:
        self.source, self.progress, self.labels = source, progress, labels
        self.settings = export_settings(source, **settings)
        self._net: Any = None
        self.sha = self._hash()
        digest = fsio.json_sha256(self.settings)
        self.path = cavmae_home() / "exports" / f"{self.sha[:16]}-{digest[:12]}"
        self.lock = self.path.with_name(self.path.name + ".lock")
        #: graph name -> where in the export ONNX Runtime's optimized copy goes (set by the loader)
        self.optimized: Callable[[str], str | None] | None = None
        #: opens validation's ONNX Runtime session of a new graph for the engine that runs it
        #: next (set by the loader; see ``OrtEngine.validation_session``)
        self.open_session: Callable[[str, Path, Path | None], Any] | None = None

    def _note(self, message: str) -> None:
        log.info("%s", message)
        from cavmae.progress import progress_note

        progress_note(message, enabled=self.progress)

    def _hash(self) -> str:
        """The checkpoint's sha256: remembered (milliseconds), else read in a thread while this
        one loads the model, which a first use needs next (the two overlap on two cores, and the
        mapped weights come from the pages the hash reads)."""
        started = time.monotonic()
        pool = ThreadPoolExecutor(1, thread_name_prefix="cavmae-hash")
        try:
            future = pool.submit(checkpoint_sha256, self.source.path)
            try:
                return future.result(timeout=0.25)
            except FutureTimeout:  # being read: not remembered, most likely a first use
                pass
            with contextlib.suppress(Exception):  # a failure shows again where the model is needed
                self.model()
            sha = future.result()
        finally:
            pool.shutdown(wait=False)
        self._note(f"export: hashed {self.source.path.name} in {time.monotonic() - started:.1f} s"
                   + (", loading the model meanwhile" if self._net is not None else ""))
        return sha

    def model(self) -> Any:
        """The checkpoint's PyTorch model, loaded on first call."""
        if self._net is None:
            started = time.monotonic()
            self._net = self.source.load_model()
            self._note(f"export: loaded {self.source.path.name} in {time.monotonic() - started:.1f} s")
        return self._net

    def ensure(self) -> Path:
        """The export directory, made (manifest and validation record) when missing."""
        out = self.path
        if is_export_dir(out):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with fsio.exclusive_lock(self.lock):  # concurrent shards make it once
            if is_export_dir(out):
                return out
            export_model = _exporter().export_model
            log.info("exporting %s into the cache %s", self.source.path, out)
            int8 = self.settings.get("precision") == "int8"
            self._note(f"export: first use of {self.source.path.name}: "
                       + ("exporting every graph (int8)" if int8 else "each graph is exported when first run")
                       + f", into {out}")
            label_set = self.labels() if self.labels is not None else model_labels(self.source, progress=self.progress)
            export_model(
                self.model(), out, labels=label_set, progress=self.progress, overwrite=True,
                source={"checkpoint": str(self.source.path.resolve()), "sha256": self.sha,
                        "name": self.source.info.name if self.source.info else None},
                write=None if int8 else (), reuse=self.reuse_dirs(), **self.settings,
            )
        return out

    def reuse_dirs(self) -> list[Path]:
        """The other exports in the cache (their validated graphs can be linked)."""
        from cavmae.export.graph_store import export_dirs

        return [d for d in export_dirs(self.path.parent) if d.name != self.path.name]

    def provide(self, graph: str) -> None:
        """Write the pending graph ``graph`` into the export (an engine's ``provide`` hook)."""
        add_graphs = _exporter().add_graphs
        with fsio.exclusive_lock(self.lock):
            add_graphs(self.path, [graph], self.model, reuse=self.reuse_dirs(),
                       optimized=self.optimized, progress=self.progress, open_session=self.open_session)


def _exporter() -> Any:
    """``cavmae.export.onnx_export``, or a one-line error where PyTorch or onnx is missing."""
    try:
        from cavmae.export import onnx_export
    except ImportError as e:
        raise CavmaeError(f"exporting a checkpoint needs PyTorch and onnx ({e}); pass an export directory instead") from None
    return onnx_export


def model_labels(
    source: ModelSource, labels: str | Path | None = None, *, progress: bool = False
) -> LabelSet | None:
    """The class names for ``source``: the label CSV ``labels`` (checked against the model's
    class count before any export; nothing is downloaded then), else the registry model's label
    set (shipped, cached, or downloaded from the source's mirror), else the names a checkpoint
    fine-tuned here carries, else ``None`` (an export's own names, or the bundled ones of its
    class count, apply)."""
    if labels is not None:
        if source.model_kind not in (None, "classifier"):
            raise CavmaeError(f"{labels}: class names apply to a classifier; this is a"
                              f" {source.model_kind} model, which has no classes")
        label_set = read_label_csv(labels)
        if source.num_classes is not None and len(label_set) != source.num_classes:
            raise CavmaeError(
                f"{labels} has {len(label_set)} labels but the model has {source.num_classes} classes"
            )
        return label_set
    if source.info is None:
        return _checkpoint_labels(source)
    if source.info.label_set is None:
        return None
    file = registry.ensure_labels(source.info.name, mirror=source.mirror, progress=progress)
    return read_label_csv(file) if file is not None else None


def _checkpoint_labels(source: ModelSource) -> LabelSet | None:
    """The class names embedded in a checkpoint this project wrote (``cavmae finetune`` keeps
    its label CSV's there); None for other files, or names that do not fit the head."""
    if source.kind != "checkpoint":
        return None
    names = source.head.labels
    if names is None or (source.num_classes is not None and len(names) != source.num_classes):
        return None
    return names


def load(
    model: str | Path,
    engine: str = "auto",
    device: str = "auto",
    *,
    precision: str | None = None,
    num_frames: int | None = None,
    max_batch: int = 8,
    mask_ratio_a: float = DEFAULT_MASK_RATIO,
    mask_ratio_v: float = DEFAULT_MASK_RATIO,
    mirror: str | None = None,
    progress: bool = False,
    labels: str | Path | None = None,
    task: str | None = None,
    **engine_options: Any,
) -> Pipeline:
    """Open ``model`` (export directory, checkpoint file or registry name) as a pipeline.

    ``engine``: "auto" (TensorRT with a GPU, else ONNX Runtime CUDA, else CPU), "ort", "trt"
    or "torch". ``precision``: for "torch" the autocast precision (fp16 on CUDA, bf16 on CUDA
    or the CPU); for the others the export's precision (fp32, fp16 or int8): a checkpoint is
    exported in it on first use, and an export directory must have it. None: fp32 for a
    checkpoint, the export's own for an export directory. ``num_frames`` likewise: frames per
    clip of a checkpoint's export (None: 10); an export directory must have it (None: its own).

    ``labels``: a label CSV replacing the model's class names (nothing is downloaded for
    labels then). ``task`` (``"classify"``, ``"reconstruct"``): refuse a model
    of the wrong kind before any download or export (``ModelKindError``).
    """
    name, dev = check_engine(engine, device)  # before any download or export
    check_engine_options(name, engine_options)
    check_precision(name, precision)
    check_max_batch(max_batch)
    if task is not None and task not in TASKS:
        raise CavmaeError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    source = resolve_model(model, mirror=mirror, progress=progress, task=task,
                           mask_ratios=(mask_ratio_a, mask_ratio_v))
    mark_used(source.path)  # `cavmae cache` shows last use; prune goes by it
    user = model_labels(source, labels) if labels is not None else None  # checked before export
    registry_labels = _once(lambda: model_labels(source, progress=progress))  # asked at most once
    frames = DEFAULT_PREPROCESS.num_frames if num_frames is None else check_num_frames(num_frames)
    export_opts = dict(num_frames=frames, max_batch=max_batch, mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v)
    # a user's labels never go into a (shared, cached) export: the export gets none then
    if source.kind == "export" and num_frames is not None:
        check_export_frames(source.path, Manifest.load(source.path), num_frames)
    pipe = _open(source, name, dev, precision=precision, labels=(lambda: None) if user is not None else registry_labels,
                 progress=progress, export_opts=export_opts, engine_options=engine_options)
    names = user
    if names is None and pipe.manifest.labels is None and pipe.manifest.model_kind == "classifier":
        names = registry_labels()
    if names is not None:  # the user's, or the registry's where the export has none
        pipe.manifest = replace(pipe.manifest, labels=names.names)
    return pipe


def check_precision(engine: str, precision: str | None) -> None:
    """Refuse a precision the engine does not run, before any download or export."""
    if precision is None:
        return
    allowed = TORCH_PRECISIONS if engine == "torch" else EXPORT_PRECISIONS
    if precision not in allowed:
        also = "; bf16 runs on --engine torch" if precision == "bf16" else ""
        also = "; int8 runs on the ONNX Runtime engine (--engine ort)" if precision == "int8" else also
        raise CavmaeError(f"the {engine} engine runs precision {', '.join(allowed)}, not {precision}{also}")


def check_export_precision(path: Path, manifest: Manifest, precision: str | None) -> None:
    """An export directory runs at its own precision: refuse another one asked for."""
    if precision is not None and manifest.precision != precision:
        raise CavmaeError(
            f"{path} is an export in {manifest.precision}, not {precision}: give the checkpoint or"
            f" registry name to export it in {precision} on first use, or write one with"
            f" `cavmae export MODEL --precision {precision}`"
        )


def _check_mask_ratios(source: ModelSource, ratios: tuple[float, float] | None) -> None:
    """Refuse a pre-training model's mask ratios (audio, visual) that keep no token of a
    modality (``MaskRatioError``) where its token counts are known without loading it (see
    :func:`_known_config`); other checkpoints' are checked by the export, once the model is
    loaded, before any tracing. Classifiers have no masking: nothing to check."""
    if ratios is None or source.model_kind != "pretrain":
        return
    config = _known_config(source)
    if config is not None:
        kept_tokens(config.num_audio_tokens, config.num_visual_tokens, *ratios)


def _known_config(source: ModelSource) -> ModelConfig | None:
    """The ``ModelConfig`` of ``source`` from its manifest, its registry entry (every released
    checkpoint is full-size) or the config a checkpoint written here carries; else None."""
    if source.kind == "export":
        return Manifest.load(source.path).model_config
    if source.info is not None:
        return BASE
    meta = peek_metadata(source.path)
    raw = meta.get("config") if meta is not None else None
    try:
        return ModelConfig.from_dict(raw) if isinstance(raw, dict) else None
    except TypeError:  # metadata of another shape: the export checks the loaded model
        return None


def check_export_frames(path: Path, manifest: Manifest, num_frames: int) -> None:
    """An export directory aggregates the frames it was exported for: refuse another count."""
    if num_frames != manifest.num_frames:
        raise CavmaeError(
            f"{path} is an export for {manifest.num_frames} frames per clip, not {num_frames}:"
            " give the checkpoint or registry name to export it for other frame counts on first use,"
            f" or write one with `cavmae export MODEL --frames {num_frames}`"
        )


def _check_export_checkpoint(path: Path, manifest: Manifest) -> None:
    """The torch engine runs an export directory's source checkpoint, not its graphs: refuse a
    checkpoint that is no longer the one the export was made from."""
    checkpoint, sha = manifest.source.get("checkpoint"), manifest.source.get("sha256")
    if checkpoint and sha and Path(checkpoint).is_file() and checkpoint_sha256(Path(checkpoint)) != sha:
        raise CavmaeError(
            f"{checkpoint} has changed since {path} was exported from it (sha256 differs): give the"
            " checkpoint itself to run it with --engine torch, or re-export"
        )
    if manifest.precision != "fp32":
        log.warning("the torch engine runs %s's source checkpoint in PyTorch, not its %s graphs",
                    path, manifest.precision)


def _once(lookup: Callable[[], LabelSet | None]) -> Callable[[], LabelSet | None]:
    """``lookup``, called the first time it is needed and remembered."""
    done: list[LabelSet | None] = []

    def get() -> LabelSet | None:
        if not done:
            done.append(lookup())
        return done[0]

    return get


def _open(
    source: ModelSource,
    name: str,
    dev: str,
    *,
    precision: str | None,
    labels: Callable[[], LabelSet | None],
    progress: bool,
    export_opts: dict[str, Any],
    engine_options: dict[str, Any],
) -> Pipeline:
    """The pipeline of a resolved model on engine ``name`` and device ``dev``."""
    if name == "torch":
        from .engines.torch_engine import TorchEngine

        if source.kind == "export":
            manifest = Manifest.load(source.path)
            _check_export_checkpoint(source.path, manifest)
            return Pipeline(TorchEngine(source.path, manifest, dev, precision=precision or "fp32", **engine_options))
        net = source.load_model()
        manifest = _in_memory_manifest(net, source, labels(), **export_opts)
        return Pipeline(TorchEngine(None, manifest, dev, model=net, precision=precision or "fp32", **engine_options))
    if source.kind == "checkpoint":
        export = CacheExport(source, progress=progress, labels=labels, precision=precision or "fp32", **export_opts)
        path = export.ensure()
    else:
        export, path = None, source.path
    mark_used(path)
    manifest = Manifest.load(path)
    if export is None:
        check_export_precision(path, manifest, precision)
    engine = create_engine(name, path, manifest, dev, **engine_options)
    if export is not None:
        engine.provide = export.provide  # pending graphs are written when first opened
        export.optimized = _optimized_name(engine)
        export.open_session = _validation_sessions(engine)
    elif manifest.pending:
        engine.provide = _refuse_pending(path)
    return Pipeline(engine)


def _optimized_name(engine: Any) -> Callable[[str], str | None] | None:
    """Where an ONNX Runtime CPU engine looks for the optimized copy of a graph, relative to
    the export (the exporter's validation session saves it there: it is checked, and the
    engine does not optimize the graph a second time); None for other engines."""
    from .engines.ort import OrtEngine

    if not isinstance(engine, OrtEngine) or not engine.cache or engine.provider != "CPUExecutionProvider":
        return None

    def name(graph: str) -> str:
        return str(engine.cache_path(engine.manifest.graph(graph)).relative_to(engine.export_dir))

    return name


def _validation_sessions(engine: Any) -> Callable[[str, Path, Path | None], Any] | None:
    """An ONNX Runtime CPU engine's ``validation_session``: validation of a graph exported on
    first use then runs in the session the engine keeps, so the graph is loaded and initialized
    once (about a second per full-size graph on 2 cores); None for other engines and devices
    (validation runs on the CPU)."""
    from .engines.ort import OrtEngine

    if not isinstance(engine, OrtEngine) or engine.provider != "CPUExecutionProvider":
        return None
    return engine.validation_session


def _refuse_pending(path: Path) -> Callable[[str], None]:
    def refuse(graph: str) -> None:
        raise CavmaeError(
            f"graph {graph!r} of the cache export {path} is written the first time it runs from"
            " the checkpoint: give the checkpoint (or its registry name) instead of the export"
            " directory, or write a complete export with `cavmae export`"
        )

    return refuse


def _in_memory_manifest(net: Any, source: ModelSource, label_set: LabelSet | None, **opts: Any) -> Manifest:
    """A manifest for running a checkpoint directly on the torch engine (no ONNX files)."""
    from cavmae.labels import default_labels, default_task
    from cavmae.stages import graph_specs, make_manifest

    settings = export_settings(source)
    cfg = net.config
    classifier = hasattr(net, "mlp_head")
    task = settings.get("task") or (default_task(cfg.num_classes) if classifier else None)
    labels = label_set if label_set is not None else (default_labels(cfg.num_classes) if classifier else None)
    # the graphs' contracts only: the torch engine builds the stage modules, once
    specs = graph_specs(net, finetune_mode=settings["finetune_mode"], **opts)
    return make_manifest(
        net, specs, precision="fp32", task=task,
        finetune_mode=settings["finetune_mode"], labels=labels,
        preprocess=DEFAULT_PREPROCESS,
        source={"checkpoint": str(source.path.resolve())}, versions={}, **opts,
    )
