"""One interface for every inference engine (ONNX Runtime, TensorRT, PyTorch).

An ``Engine`` opens the graphs of an export directory; each open graph is a ``GraphSession``
that maps named numpy inputs to named numpy outputs. Pipelines speak only this interface, so
they do not care which engine runs underneath (the Polygraphy "runner" idea).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cavmae.errors import CavmaeError
from cavmae.manifest import BATCH, GraphSpec, Manifest


class GraphSession(ABC):
    """One loaded graph. ``run`` takes and returns host numpy arrays.

    ``run`` is final: it checks the inputs against ``spec`` (:func:`check_inputs`) and only
    then calls the subclass's ``_run``, so no engine can skip the check (Polygraphy's
    ``BaseRunner.infer`` -> ``infer_impl`` split). A subclass implements ``_run``.
    """

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides GraphSession.run, which checks the inputs;"
                " implement _run instead"
            )

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the graph on one batch (batch size <= ``spec.max_batch``).

        ``inputs`` must hold every input of ``spec`` with its declared dtype and the declared
        shape with the batch axis set to the batch size; anything else raises ``CavmaeError``
        before the engine sees it. Returns every output of ``spec``.
        """
        arrays, batch = check_inputs(self.spec, inputs)
        return self._run(arrays, batch)

    @abstractmethod
    def _run(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Run checked inputs: C-contiguous arrays of the declared dtypes and shapes, all with
        batch size ``batch``. Returns every output of ``spec`` by name."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the session holds (device memory, ...)."""


class Engine(ABC):
    """Opens the graphs of one export directory on one device."""

    #: short name used on the command line: "ort", "trt", "torch"
    name: str = ""
    #: whether the pipeline splits encoder batches into cache-sized runs that never span two
    #: clips (:mod:`cavmae.run_sizes`): measured faster on a CPU; a GPU wants whole batches
    cpu_sized_runs: bool = False

    def __init__(self, export_dir: str | Path, manifest: Manifest, device: str = "cpu") -> None:
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.device = device
        self._sessions: dict[str, GraphSession] = {}
        #: called with a graph name before a graph whose file is missing is opened, to write
        #: it (the loader sets it for a cache export made from a checkpoint: its graphs are
        #: exported the first time each is run)
        self.provide: Callable[[str], None] | None = None

    def session(self, graph: str) -> GraphSession:
        """The open session of ``graph``, opened on first use."""
        if graph not in self._sessions:
            spec = self.manifest.graph(graph)
            if self.provide is not None and not (self.export_dir / spec.file).is_file():
                self.provide(graph)
            self._sessions[graph] = self._open(spec)
        return self._sessions[graph]

    @abstractmethod
    def _open(self, spec: GraphSpec) -> GraphSession:
        """Open one graph of the export."""

    def describe(self) -> str:
        """A short human-readable description (engine, device, providers...)."""
        return f"{self.name} on {self.device}"

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()


def _shape_str(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_inputs(
    spec: GraphSpec, inputs: Mapping[str, Any], *, whole: bool = False
) -> tuple[dict[str, np.ndarray], int]:
    """Validate ``inputs`` against ``spec`` and return C-contiguous arrays plus the batch size.

    Every input of ``spec`` must be present (no others), with the declared dtype (no silent
    casts: a float64 array fed to a float32 graph is a bug upstream) and the declared shape,
    the ``"batch"`` axis being the same ``1 <= B <= spec.max_batch`` for all inputs (any
    ``B >= 0`` with ``whole``: a caller's whole batch, before it is split into runs). Raises
    ``CavmaeError`` naming the graph, the input, what was expected and what was given.
    Arrays are made C-contiguous (a copy only when needed), since both runtimes read raw
    row-major buffers.
    """
    where = f"graph {spec.name!r}"
    expected_names = [t.name for t in spec.inputs]
    missing = [n for n in expected_names if n not in inputs]
    if missing:
        raise CavmaeError(
            f"{where}: missing input(s) {', '.join(map(repr, missing))}; it takes"
            f" {', '.join(map(repr, expected_names))}"
        )
    extra = [n for n in inputs if n not in expected_names]
    if extra:
        raise CavmaeError(
            f"{where}: unknown input(s) {', '.join(map(repr, extra))}; it takes"
            f" {', '.join(map(repr, expected_names))}"
        )

    arrays: dict[str, np.ndarray] = {}
    batch: int | None = None
    batch_from = ""
    for t in spec.inputs:
        arr = np.asarray(inputs[t.name])
        want_dtype = np.dtype(t.dtype)
        if arr.dtype != want_dtype:
            raise CavmaeError(
                f"{where}, input {t.name!r}: expected dtype {want_dtype.name}, got"
                f" {arr.dtype.name} (convert with .astype(np.{want_dtype.name}))"
            )
        if arr.ndim != len(t.shape):
            raise CavmaeError(
                f"{where}, input {t.name!r}: expected shape {_shape_str(t.shape)}"
                f" ({len(t.shape)} axes), got {list(arr.shape)} ({arr.ndim} axes)"
            )
        for axis, (want, got) in enumerate(zip(t.shape, arr.shape, strict=True)):
            if want == BATCH:
                if not whole and not 1 <= got <= spec.max_batch:
                    raise CavmaeError(
                        f"{where}, input {t.name!r}: batch size {got} (axis {axis}) is outside"
                        f" 1..{spec.max_batch}, the range this export supports; split the"
                        f" batch or re-export with a larger max batch"
                    )
                if batch is None:
                    batch, batch_from = int(got), t.name
                elif got != batch:
                    raise CavmaeError(
                        f"{where}, input {t.name!r}: batch size {got} differs from {batch}"
                        f" of input {batch_from!r}; all inputs must share the batch size"
                    )
            elif int(want) != got:
                raise CavmaeError(
                    f"{where}, input {t.name!r}: expected shape {_shape_str(t.shape)}, got"
                    f" {list(arr.shape)} (axis {axis} should be {want})"
                )
        arrays[t.name] = arr if whole else np.ascontiguousarray(arr)
    return arrays, (batch if batch is not None else 1)
