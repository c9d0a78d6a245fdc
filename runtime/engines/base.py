"""One interface for every inference engine (ONNX Runtime, TensorRT, PyTorch).

An ``Engine`` opens the graphs of an export directory; each open graph is a ``GraphSession``
that maps named numpy inputs to named numpy outputs. Pipelines speak only this interface, so
they do not care which engine runs underneath (the Polygraphy "runner" idea).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cavmae.manifest import GraphSpec, Manifest


class GraphSession(ABC):
    """One loaded graph. ``run`` takes and returns host numpy arrays."""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on one batch (batch size <= ``spec.max_batch``).

        ``inputs`` must hold every input of ``spec`` with its declared dtype and the declared
        shape with the batch axis set to the batch size. Returns every output of ``spec``.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the session holds (device memory, ...)."""


class Engine(ABC):
    """Opens the graphs of one export directory on one device."""

    #: short name used on the command line: "ort", "trt", "torch"
    name: str = ""

    def __init__(self, export_dir: str | Path, manifest: Manifest, device: str = "cpu") -> None:
        self.export_dir = Path(export_dir)
        self.manifest = manifest
        self.device = device
        self._sessions: dict[str, GraphSession] = {}

    def session(self, graph: str) -> GraphSession:
        """The open session of ``graph``, opened on first use."""
        if graph not in self._sessions:
            self._sessions[graph] = self._open(self.manifest.graph(graph))
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
