"""Validation of an exported graph against its PyTorch stage, in ONNX Runtime.

Each check draws random inputs from a given seed (reported, so a failure can be replayed), runs
the stage's module in PyTorch and the ONNX file in ONNX Runtime (CPU), and compares every output
with the tolerance its graph declaration gives it (:class:`cavmae.graphs.Tolerance`):

- fp32: max relative error ``max|onnx - torch| / max|torch|`` per output <= 1e-4;
- fp16, probability outputs (declared ``PROBABILITIES``): what a user sees, the scores and the ranking:
  max absolute difference of the probabilities <= 5e-3, and top-5 agreement up to near-ties:
  the class fp16 ranks i-th has a reference probability within 1e-3 of the true i-th highest
  one. Two classes closer than that swap places under fp16 rounding without anybody being
  able to tell which order is right, so demanding the identical order made validation fail
  on some random draws and pass on others;
- fp16, every other output (tokens, embeddings, logits): cosine similarity per sample >= 0.999.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cavmae.errors import ExportError
from cavmae.graphs import FEATURES, PROBABILITIES, Tolerance, output_tolerance
from cavmae.stages import Stage, run_stage

# The tolerances are declared with the graphs (cavmae.graphs); these names are for reports.
FP32_MAX_REL_ERROR = FEATURES.fp32_max_rel_error
FP16_MIN_COSINE = FEATURES.fp16_min_cosine
#: fp16 probability outputs: largest allowed absolute difference of any probability
FP16_PROBS_MAX_ABS = PROBABILITIES.fp16_max_abs
#: reference probabilities closer than this are ties: their order is not judged
NEAR_TIE = PROBABILITIES.near_tie
TOP_K = PROBABILITIES.top_k
#: the seed of the random validation inputs when none is given (exports are reproducible)
DEFAULT_SEED = 0
#: samples of a validation's PyTorch run (the exporter traces the stage on them)
VALIDATION_BATCH = 2
#: samples of its ONNX Runtime run: the first of those. The runtime's usual batch, and not the
#: traced one, so a batch size the tracer baked into the graph fails validation; and the ONNX
#: Runtime run is a large part of a first use (seconds per full-size graph on 2 cores).
ONNX_BATCH = 1


@dataclass
class OutputCheck:
    """How one output of the ONNX graph compares with PyTorch."""

    name: str
    max_rel_error: float
    min_cosine: float
    max_abs_error: float
    #: probability outputs only: largest |p_ref[class fp16 ranks i] - i-th largest p_ref|
    topk_max_dev: float | None = None
    topk_agree: bool | None = None
    passed: bool = True


@dataclass
class ValidationReport:
    """The checks of one graph; ``seed`` replays the same inputs."""

    graph: str
    precision: str
    seed: int
    batch: int
    outputs: list[OutputCheck] = field(default_factory=list)
    #: samples ONNX Runtime ran (the first ``onnx_batch`` of the ``batch`` PyTorch ran)
    onnx_batch: int = ONNX_BATCH
    passed: bool = True
    #: what the graph's file depends on (:func:`cavmae.export.graph_store.graph_identity`);
    #: None where the export cannot name it (a model without a checkpoint hash, int8 files)
    identity: str | None = None
    #: the export directory this graph and this report were taken from, when reused
    reused_from: str | None = None
    #: the shipped template the graph was filled from (:mod:`cavmae.export.graph_templates`);
    #: None when it was traced
    template: str | None = None

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            s = f"{o.name}: rel err {o.max_rel_error:.2e}, cosine {o.min_cosine:.6f}"
            if o.topk_agree is not None:
                s += f", max abs {o.max_abs_error:.2e}, top-{TOP_K} " + (
                    "agree" if o.topk_agree else f"DIFFERENT (beyond near-ties of {NEAR_TIE:g})"
                )
            parts.append(s)
        reused = f"reused from {self.reused_from}, " if self.reused_from else ""
        return f"{reused}seed {self.seed}, batch {self.onnx_batch} of {self.batch}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidationReport:
        """The report of a ``validation.json`` entry (:meth:`to_dict`'s inverse)."""
        outputs = [OutputCheck(**o) for o in d.get("outputs", [])]
        return cls(graph=d["graph"], precision=d["precision"], seed=int(d["seed"]),
                   batch=int(d["batch"]), outputs=outputs, passed=bool(d.get("passed", False)),
                   onnx_batch=int(d.get("onnx_batch", d["batch"])),
                   identity=d.get("identity"), reused_from=d.get("reused_from"),
                   template=d.get("template"))


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def topk_deviation(got: np.ndarray, want: np.ndarray, k: int = TOP_K) -> float:
    """How far the ranking of ``got`` strays from that of ``want`` (``[B, C]`` scores).

    For every rank i < k: the reference score of the class ``got`` puts at rank i, against the
    i-th highest reference score. 0 when the rankings agree; a swap of two classes costs the gap
    between their reference scores, so swaps among near-ties cost little and a wrong class in
    the top-k costs a lot.
    """
    k = min(k, want.shape[-1])
    ranked = np.argsort(-got, axis=-1, kind="stable")[..., :k]
    best = -np.sort(-want, axis=-1)[..., :k]
    return float(np.abs(np.take_along_axis(want, ranked, axis=-1) - best).max())


def ort_session(path: Path, optimized: Path | None = None) -> Any:
    """A CPU session of the ONNX file ``path``, every graph optimization on; with ``optimized``
    ONNX Runtime also saves the optimized graph there (what the runtime's ONNX Runtime engine
    loads later instead of optimizing again), so validation checks the graph that will run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_output(
    name: str, got: np.ndarray, ref: np.ndarray, precision: str, tolerance: Tolerance | None = None
) -> OutputCheck:
    """Compare one output with ``tolerance`` at ``precision``; by default the tolerance the
    graph declarations give outputs called ``name``."""
    tol = tolerance if tolerance is not None else output_tolerance(name)
    got = got.astype(np.float32)
    diff = float(np.abs(got - ref).max())
    scale = float(np.abs(ref).max()) or 1.0
    check = OutputCheck(name=name, max_rel_error=diff / scale, min_cosine=_min_cosine(got, ref),
                        max_abs_error=diff)
    if precision == "fp32":
        check.passed = check.max_rel_error <= tol.fp32_max_rel_error
    elif tol.ranked:
        check.topk_max_dev = topk_deviation(got, ref, tol.top_k)
        check.topk_agree = check.topk_max_dev <= tol.near_tie
        check.passed = diff <= tol.fp16_max_abs and check.topk_agree
    else:
        check.passed = check.min_cosine >= tol.fp16_min_cosine
    return check


def validate_graph(
    stage: Stage, path: Path, precision: str, task: str | None = None, batch: int = VALIDATION_BATCH,
    seed: int = DEFAULT_SEED, optimized: Path | None = None,
    reference: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]] | None = None,
    onnx_batch: int = ONNX_BATCH,
    open_session: Callable[[Path, Path | None], Any] | None = None,
) -> ValidationReport:
    """Compare the ONNX file at ``path`` with ``stage`` on random inputs drawn from ``seed``:
    one PyTorch run of ``batch`` samples and one ONNX Runtime run of the first ``onnx_batch``
    of them (:data:`ONNX_BATCH`: a batch other than the traced one). ``reference``: the stage's
    outputs on exactly those inputs when the caller has them already (the exporter's trace
    ran the stage on them), so the stage is not run again; or a function giving them, called
    after the ONNX Runtime run (a PyTorch run in another thread meanwhile). ``optimized``: where ONNX Runtime
    saves the optimized graph it validates (see :func:`ort_session`). ``open_session(path,
    optimized)``: opens the session instead of :func:`ort_session` (an engine that then runs
    the very session validation checked; it must optimize fully and save to ``optimized``)."""
    if not 1 <= onnx_batch <= batch:
        raise ValueError(f"onnx_batch must be 1..{batch}, not {onnx_batch}")
    inputs = validation_inputs(stage, seed, batch)
    want = run_stage(stage, inputs) if reference is None else reference
    session = (open_session or ort_session)(path, optimized)
    try:
        got_list = session.run(None, {k: v[:onnx_batch] for k, v in inputs.items()})
    except Exception as e:  # onnxruntime's own exception types: a graph that cannot run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{stage.spec.name}: ONNX Runtime cannot run the graph at batch "
                          f"{onnx_batch}: {first}") from None
    if callable(want):
        want = want()
    names = [o.name for o in session.get_outputs()]
    report = ValidationReport(stage.spec.name, precision, int(seed), batch, onnx_batch=onnx_batch)
    for name, got in zip(names, got_list, strict=True):
        check = check_output(name, got, want[name][:onnx_batch], precision, stage.decl.output(name).tolerance)
        report.outputs.append(check)
        report.passed = report.passed and check.passed
    return report


def validation_inputs(stage: Stage, seed: int = DEFAULT_SEED, batch: int = VALIDATION_BATCH) -> dict[str, np.ndarray]:
    """The random inputs validation feeds ``stage`` for ``seed``: ``batch`` samples."""
    return stage.sample(np.random.default_rng(seed), batch)
