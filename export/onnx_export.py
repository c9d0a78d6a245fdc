"""Export a CAV-MAE model to one fixed-shape ONNX graph per stage plus ``manifest.json``.

Every graph has static shapes except the batch axis, no data-dependent shapes and no randomness
(mask indices are inputs). Weights live inside each file. Each graph is validated against its
PyTorch stage in ONNX Runtime right after export; a failed validation fails the export.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import cavmae
from cavmae import fsio
from cavmae.checkpoint import load_checkpoint
from cavmae.checkpoint_keys import embedded_head
from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.errors import ExportError
from cavmae.labels import LabelSet, default_labels, default_task, read_label_csv
from cavmae.manifest import EXPORT_PRECISIONS, GraphSpec, Manifest
from cavmae.masking import DEFAULT_MASK_RATIO
from cavmae.model import CAVMAEFT, CAVMAEEncoder
from cavmae.progress import progress_bar, progress_note, progress_style
from cavmae.stages import (
    PlannedGraph,
    Stage,
    make_manifest,
    model_kind,
    plan_graphs,
    run_stage,
    stage_of,
)

from .export_checks import check_arguments, check_destination, check_mask_ratios
from .fp16 import convert_to_fp16
from .graph_store import (
    find_reusable,
    graph_identity,
    read_validation,
    reuse_graph,
    write_validation,
)
from .graph_templates import TEMPLATE_DIR, Template, fill_template, find_template
from .int8 import Int8Options, load_gate_clips, quantize_export
from .onnx_wire import write_edited_model
from .validate import (
    DEFAULT_SEED,
    ONNX_BATCH,
    VALIDATION_BATCH,
    ValidationReport,
    validate_graph,
    validation_inputs,
)

log = logging.getLogger(__name__)

#: ONNX opset: LayerNormalization needs 17; TensorRT 10 and 11 parse up to 20.
OPSET = 17
PRECISIONS = EXPORT_PRECISIONS


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


def _labels(
    labels: LabelSet | str | Path | Sequence[str] | None, model: CAVMAEEncoder | str | Path, num_classes: int
) -> LabelSet | None:
    """The export's class names: ``labels``, else those a checkpoint file carries (a fine-tuning
    run's), else the bundled ones of the class count."""
    if labels is None and isinstance(model, (str, Path)):
        labels = embedded_head(model).labels
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


def _head_settings(
    model: CAVMAEEncoder | str | Path, net: CAVMAEEncoder, finetune_mode: str | None, task: str | None,
    labels: LabelSet | str | Path | Sequence[str] | None,
) -> tuple[str, str | None, LabelSet | None]:
    """A classifier's fine-tune mode, task and class names: as given, else what a checkpoint
    ``cavmae finetune`` wrote says of its head, else the defaults (multimodal, the class count's
    task, the bundled names); no task or names for other models."""
    trained = embedded_head(model) if isinstance(model, (str, Path)) else None
    finetune_mode = finetune_mode or (trained and trained.finetune_mode) or "multimodal"
    if not isinstance(net, CAVMAEFT):
        return finetune_mode, None, None
    task = task or (trained.task if trained else None) or default_task(net.config.num_classes)
    return finetune_mode, task, _labels(labels, model, net.config.num_classes)


#: one trace at a time in a process (see export_stage)
_TRACE_LOCK = threading.Lock()


def export_stage(
    stage: Stage, path: Path, opset: int = OPSET, inputs: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Trace one stage to ONNX at ``path`` with a dynamic batch axis (TorchScript exporter),
    its static I/O shapes declared (:func:`stamp_shapes`); the file is written once.

    ``inputs`` (default: a random batch of 2 drawn from seed 0) are what the tracer runs the
    stage on; returns the stage's outputs on them, by name (float32). The trace is a real
    PyTorch run, so validation on the same inputs takes these as its reference instead of
    running the stage again.

    The TorchScript-based exporter is used because it needs no extra packages and writes plain
    MatMul/Softmax attention at opset 17, which every TensorRT 10/11 parser takes.
    """
    spec = stage.spec
    example = inputs if inputs is not None else stage.sample(np.random.default_rng(0), 2)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[t.name])) for t in spec.inputs)
    seen: list[Any] = []
    hook = stage.module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    buffer = io.BytesIO()
    try:
        # torch.onnx.export keeps its state in module globals: two threads tracing at once (two
        # exports in one process) break each other, so traces take turns
        with _TRACE_LOCK, warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
            torch.onnx.export(
                stage.module,
                args,
                buffer,  # type: ignore[arg-type]  # torch.onnx.export also writes to a file object
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=stage.decl.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        hook.remove()
    # stamped without parsing and re-serializing the weights (see cavmae.export.onnx_wire)
    with buffer.getbuffer() as data:
        write_edited_model(data, path, lambda model: stamp_shapes(model, stage, path.name))
    del buffer
    out = seen[0] if isinstance(seen[0], tuple) else (seen[0],)
    return {s.name: o.detach().float().cpu().numpy() for s, o in zip(spec.outputs, out, strict=True)}


def stamp_shapes(model: onnx.ModelProto, stage: Stage, what: str = "graph") -> None:
    """Declare the stage's static I/O shapes in ``model``: the tracer leaves some output axes
    symbolic, the stage's contract says they are static (only ``batch`` stays symbolic)."""
    specs = {t.name: t for t in (*stage.spec.inputs, *stage.spec.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(specs[vi.name].shape):
            raise ExportError(f"{what}: {vi.name} has {len(dims)} axes, expected {specs[vi.name].shape}")
        for d, want in zip(dims, specs[vi.name].shape, strict=True):
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def finalize_graph(path: Path, stage: Stage, *, stamp: bool = True) -> None:
    """Check the graph file at ``path``: ``onnx.checker.check_model(full_check=True)`` (the
    checker, then strict shape inference, which refuses an inferred shape that disagrees with a
    declared one), run on the file in C++. ``stamp``: first declare the static I/O shapes
    (:func:`stamp_shapes`; needed after a conversion rewrote the file, not after
    :func:`export_stage`, which stamps them)."""
    try:
        if stamp:
            model = onnx.load(str(path))
            stamp_shapes(model, stage, path.name)
            onnx.save(model, str(path))
            del model
        onnx.checker.check_model(str(path), full_check=True)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{path.name} failed the ONNX checks: {e}") from None


@dataclass
class GraphJob:
    """How the graphs of one export are made: the facts every graph shares.

    ``reuse``: export directories whose validated graphs of the same identity are hard-linked
    instead of traced (see :mod:`cavmae.export.graph_store`). ``optimized``: graph name -> the
    path inside the export where ONNX Runtime's optimized copy belongs (the CPU engine's
    name); validation then saves the graph it checked there. ``open_session(graph, path,
    optimized)``: opens validation's ONNX Runtime session (the engine that runs the graph
    next, keeping the session; see :func:`cavmae.export.validate.validate_graph`).
    ``sha256`` None: no identities, no reuse (a model given as an object). ``templates``: the
    directory of graph templates (:mod:`cavmae.export.graph_templates`) a graph is filled from
    instead of traced when one fits; None: always trace.
    """

    precision: str  # of the export: fp32, fp16 or int8
    task: str | None
    seed: int
    validate: bool
    sha256: str | None
    model_config: dict[str, Any]
    versions: dict[str, Any]
    reuse: Sequence[Path] = ()
    optimized: Callable[[str], str | None] | None = None
    progress: bool = False
    open_session: Callable[[str, Path, Path | None], Any] | None = None
    templates: Path | None = TEMPLATE_DIR

    @property
    def traced(self) -> str:
        """The precision graphs are traced and validated in (int8 quantizes fp32 after the gate)."""
        return "fp32" if self.precision == "int8" else self.precision

    def template(self, planned: PlannedGraph) -> Template | None:
        """The template the graph is filled from, or None (it is traced). Only validated
        exports use templates: validation is what catches a template the model outgrew."""
        if not self.validate:
            return None
        return find_template(planned, self.model_config, OPSET, self.templates)

    def identity(self, planned: PlannedGraph, template: Template | None = None) -> str | None:
        """The graph's identity, or None where it cannot be reused or offered for reuse; a
        graph filled from ``template`` is another file than a traced one (and validates on
        :data:`ONNX_BATCH` samples: no batch was traced)."""
        if self.sha256 is None or not self.validate:
            return None
        return graph_identity(sha256=self.sha256, spec=planned.spec, precision=self.traced,
                              params=planned.params, model_config=self.model_config,
                              versions=self.versions, seed=self.seed,
                              batch=VALIDATION_BATCH if template is None else ONNX_BATCH,
                              onnx_batch=ONNX_BATCH,
                              template=None if template is None else template.digest)

    def spec(self, planned: PlannedGraph) -> GraphSpec:
        return planned.spec if self.traced == "fp32" else replace(planned.spec, precision=self.traced)


def make_graph(
    job: GraphJob, planned: PlannedGraph, directory: Path, model: Callable[[], CAVMAEEncoder]
) -> ValidationReport | None:
    """Write the graph ``planned`` into ``directory`` as ``<name>.onnx``: hard-linked from an
    export that holds a validated graph of the same identity, else filled from a template
    or traced from ``model()`` (called only then), converted, checked and validated. Returns
    its validation report (None without validation). The file appears under its name only
    once validated."""
    template = job.template(planned)
    identity = job.identity(planned, template)
    found = find_reusable(identity, job.reuse, exclude=directory) if identity else None
    if found is not None:
        started = time.monotonic()
        try:
            how = reuse_graph(found, directory, with_optimized=job.precision != "int8")
        except OSError as e:  # the other export went away meanwhile: make it here
            log.debug("cannot reuse %s: %s", found.file, e)
        else:
            report = ValidationReport.from_dict({**found.report, "reused_from": str(found.export_dir)})
            if job.precision == "int8":  # quantized after the gate: not this identity's file then
                report.identity = None
            _note(job, f"{planned.decl.name}: reused from {found.export_dir.name} ({how}),"
                       f" {time.monotonic() - started:.1f} s")
            return report
    net = model()
    if template is not None:
        try:
            return _write_graph(job, planned, directory, net, identity, template)
        except ExportError as e:  # a template that does not fit, fails validation or cannot run
            log.warning("export: %s: the shipped template does not fit (%s); tracing instead",
                        planned.decl.name, e)
    return _write_graph(job, planned, directory, net, job.identity(planned))


def _write_graph(
    job: GraphJob, planned: PlannedGraph, directory: Path, net: CAVMAEEncoder, identity: str | None,
    template: Template | None = None,
) -> ValidationReport | None:
    """:func:`make_graph` for a graph no export holds: trace (or fill ``template``), convert,
    check, validate (one PyTorch and one ONNX Runtime run), then publish it (and the
    optimized copy validation saved) under its name. Raises ``ExportError`` when the graph
    fails (``graph_templates.TemplateMismatch`` when a template does not fit the model)."""
    name, stage = planned.decl.name, stage_of(net, planned)
    final = directory / planned.spec.file
    path = fsio.temp_sibling(final)
    opt_name = job.optimized(name) if job.optimized is not None and job.validate else None
    optimized = fsio.temp_sibling(directory / opt_name) if opt_name else None
    steps: list[str] = []
    clock = _Clock()
    reference: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]] | None = None
    batch = VALIDATION_BATCH
    pool: ThreadPoolExecutor | None = None
    try:
        if template is None:
            # the trace runs the stage on validation's inputs: they give the reference
            reference = export_stage(stage, path, inputs=validation_inputs(stage, job.seed))
        else:
            # Nothing traced at another batch: PyTorch runs on the one sample ONNX Runtime runs,
            # in a thread while the file is written and opened (both mostly one core's work).
            batch = ONNX_BATCH
            pool = ThreadPoolExecutor(1, thread_name_prefix="reference")
            reference = pool.submit(run_stage, stage, validation_inputs(stage, job.seed, batch)).result
            # the template was checked when it was made; validation checks the weights
            fill_template(template.data, stage.module, path)
        if job.traced == "fp16":
            convert_to_fp16(path)
        steps.append(clock.lap("trace" if template is None else "template"))
        if template is None or job.traced == "fp16":
            finalize_graph(path, stage, stamp=job.traced == "fp16")
            steps.append(clock.lap("checks"))
        report = None
        if job.validate:
            if optimized is not None:
                optimized.parent.mkdir(parents=True, exist_ok=True)
            opener = job.open_session
            report = validate_graph(stage, path, job.traced, task=job.task, batch=batch, seed=job.seed,
                                    optimized=optimized, reference=reference,
                                    open_session=None if opener is None else lambda p, o: opener(name, p, o))
            if not report.passed:
                raise ExportError(f"validation failed for {name}: {report.summary()}")
            report.identity = identity if job.precision != "int8" else None
            report.template = None if template is None else template.file.name
            steps.append(clock.lap("validation"))
        fsio.publish_file(path, final)
        if optimized is not None and opt_name is not None and optimized.is_file():
            fsio.publish_file(optimized, directory / opt_name)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        path.unlink(missing_ok=True)
        if optimized is not None:
            optimized.unlink(missing_ok=True)
    what = ("filled from a template" if template is not None else "traced") + (" and validated" if job.validate else "")
    _note(job, f"{name}: {what} in {clock.total():.1f} s ({', '.join(steps)})")
    return report


class _Clock:
    """Seconds per step of one graph, for its progress line."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def lap(self, step: str) -> str:
        now = time.monotonic()
        text, self.last = f"{step} {now - self.last:.1f} s", now
        return text

    def total(self) -> float:
        return time.monotonic() - self.start


def _note(job: GraphJob, message: str) -> None:
    log.info("export: %s", message)
    progress_note(f"export: {message}", enabled=job.progress)


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(1)[0])


def _int8_gate_inputs(
    precision: str, pending: Sequence[str], int8: Int8Options | None, num_frames: int, preprocess: PreprocessConfig
) -> tuple[Int8Options | None, Any]:
    """The int8 gate's options and clips, checked and loaded before minutes of tracing (the
    options as given and no clips for another precision)."""
    if precision != "int8":
        return int8, None
    if pending:
        raise ExportError("an int8 export writes every graph at once (its gate runs them all)")
    int8 = int8 or Int8Options()
    int8.check()
    return int8, load_gate_clips(int8.calibration, int8.max_clips, num_frames,
                                 preprocess.replace(num_frames=num_frames))


def _select(
    plan: dict[str, PlannedGraph], graphs: Sequence[str] | None, write: Sequence[str]
) -> dict[str, PlannedGraph]:
    """The planned graphs an export declares (``graphs``: only these), checked with the names
    of the ones written now."""
    unknown = sorted((set(graphs or ()) | set(write)) - set(plan))
    if unknown:
        raise ExportError(f"unknown graph(s) {unknown}; this model has {sorted(plan)}")
    return plan if graphs is None else {k: v for k, v in plan.items() if k in graphs}


def export_model(
    model: CAVMAEEncoder | str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    *,
    num_frames: int = 10,
    max_batch: int = 8,
    task: str | None = None,
    finetune_mode: str | None = None,
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
    write: Sequence[str] | None = None,
    reuse: Sequence[Path] = (),
    optimized: Callable[[str], str | None] | None = None,
    templates: Path | None = TEMPLATE_DIR,
) -> ExportResult:
    """Export ``model`` (a model or a checkpoint path) to ``out_dir``.

    ``precision="fp16"`` writes fp16 graphs (LayerNorm, softmax and normalization kept in fp32,
    float32 inputs and outputs). ``precision="int8"`` exports and validates fp32 graphs, then
    quantizes them (``int8``: how, on which clips, the gate's thresholds; see
    :mod:`cavmae.export.int8`) and refuses the export when int8 disagrees with fp32 on those
    clips; the gate's report is the manifest's ``quantization``. ``finetune_mode`` and ``task``
    (None: what a checkpoint ``cavmae finetune`` wrote says, else ``multimodal`` and the class
    count's default) decide a classifier's graphs and probabilities. ``graphs`` limits the export
    to some graph names. The directory is written into a temporary sibling and renamed into
    place, so a failed export never leaves a half-written directory behind.

    ``write``: the graphs written now (None: every graph); the others the manifest declares
    stay pending and :func:`add_graphs` writes them later (the cache does so the first time each
    is run; not with int8, whose gate needs every graph). ``reuse``: export directories whose validated graphs of the same
    identity are hard-linked instead of traced (needs the checkpoint's sha256, from ``model``
    given as a path or from ``source["sha256"]``). ``optimized`` and ``templates`` (where
    graph templates are looked up; None: trace every graph): see :class:`GraphJob`.

    Validation draws its random inputs from ``validation_seed`` (None: a fresh random seed), so
    an export validates the same way every time; the seed is in each report and in
    ``validation.json``, with each graph's identity and, for a reused graph, where it came from.
    """
    out_dir = Path(out_dir)
    check_arguments(precision, finetune_mode, out_dir, overwrite, num_frames, max_batch, task)
    net, src = _resolve_model(model)
    src = {**src, **(source or {})}
    check_destination(out_dir, src.get("checkpoint"))
    check_mask_ratios(net, mask_ratio_a, mask_ratio_v)
    finetune_mode, task, label_set = _head_settings(model, net, finetune_mode, task, labels)
    plan = _select(plan_graphs(model_kind(net), net.config, num_frames=num_frames, max_batch=max_batch,
                               task=task or "multi-label", finetune_mode=finetune_mode,
                               mask_ratio_a=mask_ratio_a, mask_ratio_v=mask_ratio_v), graphs, write or ())
    pending = () if write is None else tuple(n for n in plan if n not in write)
    validation_seed = _fresh_seed() if validation_seed is None else validation_seed
    int8, int8_clips = _int8_gate_inputs(precision, pending, int8, num_frames, preprocess)
    job = GraphJob(precision, task, validation_seed, validate, src.get("sha256"), net.config.to_dict(),
                   _versions(), reuse, optimized, progress, templates=templates)
    with fsio.staged_dir(out_dir) as work:  # a failed export leaves nothing behind
        reports = _make_graphs(job, {k: v for k, v in plan.items() if k not in pending}, work, lambda: net)
        if validate:
            write_validation(work, validation_seed, {k: r.to_dict() for k, r in reports.items()})
        specs = {name: job.spec(p) for name, p in plan.items()}
        manifest = make_manifest(
            net, specs, precision=precision, num_frames=num_frames, max_batch=max_batch,
            task=task, finetune_mode=finetune_mode, labels=label_set, mask_ratio_a=mask_ratio_a,
            mask_ratio_v=mask_ratio_v, preprocess=preprocess, source=src, versions=job.versions,
        ).replace(pending=pending)
        if precision == "int8":
            specs, gate = quantize_export(work, specs, num_frames=manifest.num_frames,
                                          preprocess=manifest.preprocess, options=int8, progress=progress,
                                          clips=int8_clips)
            manifest = manifest.replace(graphs=specs, quantization=gate.to_dict())
        manifest.save(work)
    return ExportResult(out_dir=out_dir, manifest=manifest, reports=reports)


def _make_graphs(
    job: GraphJob, plan: dict[str, PlannedGraph], directory: Path, model: Callable[[], CAVMAEEncoder]
) -> dict[str, ValidationReport]:
    """:func:`make_graph` for each planned graph, with one progress line per graph."""
    reports: dict[str, ValidationReport] = {}
    # log_interval=0: in a log, one line per graph (each takes seconds)
    bar = progress_bar(plan.items(), enabled=job.progress and progress_style() == "bar",
                       desc="export", unit="graph", log_interval=0)
    for name, planned in bar:
        bar.set_postfix_str(name)
        report = make_graph(job, planned, directory, model)
        if report is not None:
            reports[name] = report
    return reports


def add_graphs(
    out_dir: str | Path,
    names: Sequence[str],
    model: Callable[[], CAVMAEEncoder],
    *,
    reuse: Sequence[Path] = (),
    optimized: Callable[[str], str | None] | None = None,
    progress: bool = False,
    open_session: Callable[[str, Path, Path | None], Any] | None = None,
) -> Manifest:
    """Write the pending graphs ``names`` of the export ``out_dir`` (the ones ``export_model``
    did not ``write``), each reused or traced and validated as the export's own graphs were, then
    rewrite ``validation.json`` and the manifest (atomically, in that order). ``model`` is
    called only when a graph must be traced. The caller holds the export's lock; graphs no
    longer pending (another process added them) are skipped. ``optimized`` and
    ``open_session``: see :class:`GraphJob`. Returns the new manifest."""
    out_dir = Path(out_dir)
    manifest = Manifest.load(out_dir)
    unknown = sorted(set(names) - set(manifest.graphs))
    if unknown:
        raise ExportError(f"unknown graph(s) {unknown}; this export declares {sorted(manifest.graphs)}")
    # a graph file deleted since (a damaged cache) is written again, as a pending one would be;
    # not an int8 graph, which is only made with the others (the accuracy gate runs them all)
    lost = [n for n in names if n not in manifest.pending and not (out_dir / manifest.graphs[n].file).is_file()]
    if lost and manifest.precision == "int8":
        raise ExportError(f"{out_dir / manifest.graphs[lost[0]].file} is missing, and an int8 graph is made"
                          f" only with the rest of its export: delete {out_dir} and run again")
    todo = [n for n in names if n in manifest.pending or n in lost]
    if not todo:
        return manifest
    record = read_validation(out_dir)
    seed = int(record["seed"]) if record.get("seed") is not None else DEFAULT_SEED
    cfg = manifest.model_config
    plan = plan_graphs(manifest.model_kind, cfg, num_frames=manifest.num_frames,
                       max_batch=manifest.max_batch, task=manifest.task or "multi-label",
                       finetune_mode=manifest.finetune_mode or "multimodal",
                       mask_ratio_a=_or_default(manifest.mask_ratio_a),
                       mask_ratio_v=_or_default(manifest.mask_ratio_v))
    job = GraphJob(manifest.precision, manifest.task, seed, True, manifest.source.get("sha256"),
                   cfg.to_dict(), _versions(), reuse, optimized, progress, open_session)
    reports = _make_graphs(job, {n: plan[n] for n in todo}, out_dir, model)
    graphs = {**record["graphs"], **{k: r.to_dict() for k, r in reports.items()}}
    write_validation(out_dir, seed, {n: graphs[n] for n in manifest.graphs if n in graphs})
    manifest = manifest.replace(pending=tuple(n for n in manifest.pending if n not in todo))
    manifest.save(out_dir)
    return manifest


def _or_default(ratio: float | None) -> float:
    return DEFAULT_MASK_RATIO if ratio is None else ratio


def _versions() -> dict[str, Any]:
    import onnxruntime

    return {
        "cavmae": cavmae.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": OPSET,
    }
