"""Validation of an exported graph against its PyTorch stage, in ONNX Runtime.

Each check draws fresh random inputs (the seed is reported), runs the stage's module in PyTorch
and the ONNX file in ONNX Runtime (CPU), and compares every output:
- fp32: max relative error ``max|onnx - torch| / max|torch|`` per output <= 1e-4;
- fp16: cosine similarity per sample >= 0.999 for every output, and equal top-5 classes for
  probability outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cavmae.stages import Stage, run_stage

FP32_MAX_REL_ERROR = 1e-4
FP16_MIN_COSINE = 0.999
TOP_K = 5


@dataclass
class OutputCheck:
    name: str
    max_rel_error: float
    min_cosine: float
    top5_equal: bool | None = None


@dataclass
class ValidationReport:
    graph: str
    precision: str
    seed: int
    batch: int
    outputs: list[OutputCheck] = field(default_factory=list)
    passed: bool = True

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            s = f"{o.name}: rel err {o.max_rel_error:.2e}, cosine {o.min_cosine:.6f}"
            if o.top5_equal is not None:
                s += f", top-5 {'equal' if o.top5_equal else 'DIFFERENT'}"
            parts.append(s)
        return f"seed {self.seed}, batch {self.batch}: " + "; ".join(parts)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def _top5_equal(got: np.ndarray, want: np.ndarray) -> bool:
    k = min(TOP_K, want.shape[-1])
    top = lambda x: np.argsort(-x, axis=-1, kind="stable")[..., :k]  # noqa: E731
    return bool(np.array_equal(top(got), top(want)))


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def validate_graph(
    stage: Stage, path: Path, precision: str, task: str | None = None, batch: int = 2, seed: int | None = None
) -> ValidationReport:
    """Compare the ONNX file at ``path`` with ``stage`` on fresh random inputs."""
    seed = int(np.random.SeedSequence().entropy % (2**32)) if seed is None else seed
    inputs = stage.sample(np.random.default_rng(seed), batch)
    want = run_stage(stage, inputs)
    session = ort_session(path)
    got_list = session.run(None, inputs)
    names = [o.name for o in session.get_outputs()]
    report = ValidationReport(stage.spec.name, precision, seed, batch)
    for name, got in zip(names, got_list, strict=True):
        ref = want[name]
        got = got.astype(np.float32)
        scale = float(np.abs(ref).max()) or 1.0
        check = OutputCheck(
            name=name,
            max_rel_error=float(np.abs(got - ref).max()) / scale,
            min_cosine=_min_cosine(got, ref),
        )
        if precision == "fp32":
            ok = check.max_rel_error <= FP32_MAX_REL_ERROR
        else:
            ok = check.min_cosine >= FP16_MIN_COSINE
            if name == "probs":
                check.top5_equal = _top5_equal(got, ref)
                ok = ok and check.top5_equal
        report.outputs.append(check)
        report.passed = report.passed and ok
    return report
