"""Running a deserialized TensorRT engine: one session per graph.

``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on a private CUDA stream,
device buffers allocated once per session at the max-batch shapes, copies with cuda-python
(``cuda.bindings.runtime`` from cuda-python 12.6, ``cuda.cudart`` before).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from cavmae.errors import CavmaeError
from cavmae.manifest import GraphSpec

from ..base import GraphSession
from .cuda import cuda_check, stream_handle

log = logging.getLogger(__name__)

#: numpy dtype name -> TensorRT ``DataType`` member name
NUMPY_TO_TRT: dict[str, str] = {
    "float32": "FLOAT",
    "float16": "HALF",
    "int8": "INT8",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "uint8": "UINT8",
}
#: TensorRT ``DataType`` member name -> numpy dtype name (BF16, FP8, INT4, FP4 have none)
TRT_TO_NUMPY: dict[str, str] = {v: k for k, v in NUMPY_TO_TRT.items()}


def numpy_to_trt_name(dtype: Any) -> str:
    """TensorRT ``DataType`` member name for a numpy dtype (``float16`` -> ``"HALF"``)."""
    name = np.dtype(dtype).name
    try:
        return NUMPY_TO_TRT[name]
    except KeyError:
        raise CavmaeError(f"TensorRT engine: no TensorRT type for numpy dtype {name}") from None


def trt_name_to_numpy(name: str) -> np.dtype:
    """numpy dtype for a TensorRT ``DataType`` member name (``"HALF"`` -> float16)."""
    try:
        return np.dtype(TRT_TO_NUMPY[name])
    except KeyError:
        raise CavmaeError(
            f"TensorRT engine: graph I/O of type {name} has no numpy equivalent; export the"
            " graph with float32/float16/int64 inputs and outputs"
        ) from None


class TrtSession(GraphSession):
    """One deserialized engine, its execution context, stream and device buffers."""

    def __init__(
        self, spec: GraphSpec, engine: Any, trt: Any, cudart: Any, origin: str, device_index: int
    ) -> None:
        super().__init__(spec)
        self._cudart = cudart
        self._device_index = device_index
        self._engine = engine
        #: "cache" when the engine came from the cache directory, "built" otherwise
        self.origin = origin
        self._buffers: dict[str, int] = {}
        self._stream: Any = None
        self._context = engine.create_execution_context()
        if self._context is None:
            raise CavmaeError(f"graph {spec.name!r}: TensorRT cannot create an execution context")
        self._dtypes, self._outputs = self._check_io(engine, trt)
        try:
            self._stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _check_io(self, engine: Any, trt: Any) -> tuple[dict[str, np.dtype], list[str]]:
        """The engine's tensor dtypes and output names, checked against the manifest's spec."""
        spec = self.spec
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        dtypes = {n: trt_name_to_numpy(engine.get_tensor_dtype(n).name) for n in names}
        for t in spec.inputs:
            if not is_input.get(t.name, False):
                raise CavmaeError(f"graph {spec.name!r}: the engine has no input {t.name!r}")
        unfed = sorted(n for n in names if is_input[n] and n not in {t.name for t in spec.inputs})
        if unfed:  # nothing would give them a shape or an address
            raise CavmaeError(f"graph {spec.name!r}: the engine takes inputs the manifest does not"
                              f" name: {unfed}; re-export the model")
        for t in (*spec.inputs, *spec.outputs):
            if t.name in dtypes and dtypes[t.name] != np.dtype(t.dtype):
                raise CavmaeError(
                    f"graph {spec.name!r}, tensor {t.name!r}: the engine uses"
                    f" {dtypes[t.name].name}, the manifest says {t.dtype}; re-export"
                    " the model"
                )
        outputs = [n for n in names if not is_input[n]]
        missing = [t.name for t in spec.outputs if t.name not in outputs]
        if missing:
            raise CavmaeError(f"graph {spec.name!r}: the engine lacks outputs {missing}")
        return dtypes, outputs

    def _allocate(self) -> None:
        """Size every buffer once, at the largest shapes the profile allows; the output shapes
        come from TensorRT's own shape inference at max batch."""
        spec = self.spec
        for t in spec.inputs:
            shape = t.concrete_shape(spec.max_batch)
            if not self._context.set_input_shape(t.name, shape):
                raise CavmaeError(
                    f"graph {spec.name!r}: TensorRT rejects input {t.name!r} shape {shape}"
                )
            self._alloc(t.name, shape)
        for n in self._outputs:
            shape = tuple(self._context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise CavmaeError(
                    f"graph {spec.name!r}: output {n!r} has a data-dependent shape {shape},"
                    " which this engine does not support"
                )
            self._alloc(n, shape)
        for n, ptr in self._buffers.items():
            if not self._context.set_tensor_address(n, ptr):
                raise CavmaeError(f"graph {spec.name!r}: TensorRT rejects the buffer of {n!r}")

    def _alloc(self, name: str, shape: tuple[int, ...]) -> None:
        nbytes = max(1, math.prod(shape) * self._dtypes[name].itemsize)
        self._buffers[name] = int(
            cuda_check(self._cudart, self._cudart.cudaMalloc(nbytes), "cudaMalloc")
        )

    def _run(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Run one checked batch: copy inputs in, execute, copy the batch's outputs back."""
        if self._context is None:
            raise CavmaeError(f"graph {self.spec.name!r}: the session is closed")
        cudart = self._cudart
        # The current device is per thread: a session opened on one thread may run on another.
        cuda_check(cudart, cudart.cudaSetDevice(self._device_index), "cudaSetDevice")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, arr in inputs.items():
            if not self._context.set_input_shape(name, arr.shape):
                raise CavmaeError(
                    f"graph {self.spec.name!r}: TensorRT rejects input {name!r} shape {arr.shape}"
                )
            cuda_check(
                cudart,
                cudart.cudaMemcpyAsync(
                    self._buffers[name], arr.ctypes.data, arr.nbytes, h2d, self._stream
                ),
                "cudaMemcpyAsync(host to device)",
            )
        if not self._context.execute_async_v3(stream_handle(self._stream)):
            raise CavmaeError(
                f"graph {self.spec.name!r}: TensorRT execution failed; see the TensorRT log"
            )
        out = self._copy_outputs()
        # The input arrays stay referenced until here, so the async copies read live memory.
        cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return out

    def _copy_outputs(self) -> dict[str, np.ndarray]:
        """Queue the copies of this batch's output rows (not the whole max-batch buffers)."""
        cudart = self._cudart
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        out: dict[str, np.ndarray] = {}
        for t in self.spec.outputs:
            shape = tuple(self._context.get_tensor_shape(t.name))
            host = np.empty(shape, dtype=self._dtypes[t.name])
            cuda_check(
                cudart,
                cudart.cudaMemcpyAsync(
                    host.ctypes.data, self._buffers[t.name], host.nbytes, d2h, self._stream
                ),
                "cudaMemcpyAsync(device to host)",
            )
            out[t.name] = host
        return out

    def close(self) -> None:
        cudart = self._cudart
        for ptr in self._buffers.values():
            try:
                cudart.cudaFree(ptr)
            except Exception as e:  # best effort while tearing down
                log.debug("cudaFree failed: %s", e)
        self._buffers = {}
        if self._stream is not None:
            try:
                cudart.cudaStreamDestroy(self._stream)
            except Exception as e:
                log.debug("cudaStreamDestroy failed: %s", e)
            self._stream = None
        self._context = None
        self._engine = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
