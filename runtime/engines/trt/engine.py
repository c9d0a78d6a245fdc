"""The ``trt`` engine: opens each graph of an export as a TensorRT session on a CUDA device.

It ties the parts together: the cache (:mod:`.cache`) says where a graph's engine lives, the
builder (:mod:`.build`) makes one when none is cached, the runner (:mod:`.runner`) runs it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cavmae.errors import CavmaeError, EngineUnavailableError
from cavmae.manifest import GraphSpec, Manifest

from ..base import Engine, GraphSession
from ..devices import parse_device
from .build import build_serialized_engine, default_opt_batch, profile_shapes
from .cache import (
    choose_cache_dir,
    engine_cache_key,
    engine_cache_path,
    load_or_build,
    onnx_fingerprint,
    timing_cache_path,
)
from .cuda import INSTALL_HINT, cuda_check, gpu_identity, import_cudart, import_tensorrt
from .runner import TrtSession

log = logging.getLogger(__name__)


class TrtEngine(Engine):
    """TensorRT on a CUDA device.

    Options: ``opt_batch`` (int, or mapping graph name -> int; default
    ``default_opt_batch``), ``workspace_bytes`` (builder workspace limit; default TensorRT's,
    i.e. the device memory), ``cache_dir`` (engine + timing cache directory; default
    ``choose_cache_dir``).
    """

    name = "trt"

    def __init__(
        self,
        export_dir: str | Path,
        manifest: Manifest,
        device: str = "cuda",
        *,
        opt_batch: int | Mapping[str, int] | None = None,
        workspace_bytes: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        kind, index = parse_device(device)
        if kind != "cuda":
            raise CavmaeError(
                f"the TensorRT engine runs on CUDA GPUs only (device {device!r}); use device"
                " 'cuda' or engine 'ort' for the CPU"
            )
        if manifest.precision == "int8":
            # Its graphs are ONNX Runtime's dynamic int8 (DynamicQuantizeLinear + MatMulInteger),
            # which TensorRT's ONNX parser does not take.
            raise CavmaeError(
                "this export is int8 for ONNX Runtime, which TensorRT cannot run; use engine"
                " 'ort' for it, or give TensorRT an fp32 or fp16 export"
            )
        super().__init__(export_dir, manifest, device)
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        self.device_index = index
        self._select_device(index)
        self.gpu_name, self.compute_capability = gpu_identity(self._cudart, index)
        self.opt_batch = opt_batch
        self.workspace_bytes = workspace_bytes
        self.cache_dir = (
            Path(cache_dir) if cache_dir is not None else choose_cache_dir(self.export_dir)
        )
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)

    def _select_device(self, index: int) -> None:
        """Make CUDA device ``index`` current, or say why there is no such usable GPU."""
        try:
            count = cuda_check(
                self._cudart, self._cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"
            )
        except CavmaeError as e:
            raise EngineUnavailableError(f"{INSTALL_HINT}; no usable CUDA GPU ({e})") from None
        if not count or index >= count:
            raise EngineUnavailableError(
                f"{INSTALL_HINT}; CUDA device {index} not found ({count or 0} visible)"
            )
        cuda_check(self._cudart, self._cudart.cudaSetDevice(index), "cudaSetDevice")

    def _opt_batch_for(self, spec: GraphSpec) -> int:
        if isinstance(self.opt_batch, Mapping):
            value = self.opt_batch.get(spec.name)
        else:
            value = self.opt_batch
        return int(value) if value is not None else default_opt_batch(spec, self.manifest)

    def engine_path(self, spec: GraphSpec) -> Path | None:
        """Where the serialized engine of ``spec`` is cached on this GPU (None: no cache)."""
        if self.cache_dir is None:
            return None
        shapes = profile_shapes(spec, self._opt_batch_for(spec))
        key = engine_cache_key(
            onnx_fingerprint(self.export_dir / spec.file),
            self._trt.__version__,
            self.gpu_name,
            self.compute_capability,
            shapes,
            spec.precision,
        )
        return engine_cache_path(self.cache_dir, spec.name, key)

    def _deserialize(self, spec: GraphSpec, data: bytes) -> Any:
        """The engine in ``data``, or None when TensorRT refuses it or it is another graph's."""
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            return None
        io_names = {t.name for t in (*spec.inputs, *spec.outputs)}
        have = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if not io_names <= have:  # a foreign engine that happens to sit at this name
            log.debug("engine tensors %s do not cover %s", sorted(have), sorted(io_names))
            return None
        return engine

    def _build(self, spec: GraphSpec, source: Path) -> bytes:
        log.info("graph %s: building a TensorRT engine (this can take minutes)", spec.name)
        tc = (
            timing_cache_path(self.cache_dir, self._trt.__version__, self.gpu_name)
            if self.cache_dir is not None
            else None
        )
        shapes = profile_shapes(spec, self._opt_batch_for(spec))
        return build_serialized_engine(
            self._trt, self._logger, source, shapes, tc, self.workspace_bytes
        )

    def _open(self, spec: GraphSpec) -> GraphSession:
        source = self.export_dir / spec.file
        if not source.is_file():
            raise CavmaeError(
                f"graph {spec.name!r}: {source} is missing; the export directory is"
                " incomplete, re-export the model"
            )
        self._cuda_set_device()
        profile_shapes(spec, self._opt_batch_for(spec))  # a bad opt_batch fails before hashing
        engine, origin = load_or_build(
            self.engine_path(spec),
            lambda data: self._deserialize(spec, data),
            lambda: self._build(spec, source),
            what=f"graph {spec.name!r}",
        )
        return TrtSession(spec, engine, self._trt, self._cudart, origin, self.device_index)

    def _cuda_set_device(self) -> None:
        cuda_check(self._cudart, self._cudart.cudaSetDevice(self.device_index), "cudaSetDevice")

    def describe(self) -> str:
        return (
            f"trt on {self.device} (TensorRT {self._trt.__version__}, {self.gpu_name},"
            f" sm {self.compute_capability})"
        )
