"""The TensorRT engine (``trt``): serialized engines built from the exported ONNX graphs.

Written against the TensorRT 10.x and 11.x Python API:

* Networks are explicit-batch (the only kind since 10.0; TensorRT 11 removed the
  ``EXPLICIT_BATCH`` flag) and strongly typed, so precision follows the ONNX types: an fp16
  export runs in fp16, an fp32 export in fp32. TensorRT 11 removed ``BuilderFlag.FP16`` and
  always builds strongly typed (its ``STRONGLY_TYPED`` flag is deprecated and ignored), so the
  flag is passed on 10.x only and neither of the removed flags is referenced.
* One optimization profile covers the batch axis: min 1, opt ``opt_batch``, max the graph's
  ``max_batch``.
* A timing cache file speeds up rebuilds; serialized engines are cached under a key of
  (ONNX content hash, TensorRT version, GPU name + compute capability, profile, precision) in
  ``{export_dir}/.trt`` or, when that is read-only, ``$CAVMAE_HOME/trt``. A cached engine that
  TensorRT refuses (stale, foreign, corrupt) is deleted and rebuilt, never a crash.
* Inference: ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on a private
  CUDA stream, device buffers allocated once per session at the max-batch shapes, copies
  with cuda-python (``cuda.bindings.runtime`` from cuda-python 12.6, ``cuda.cudart`` before).

``tensorrt`` and ``cuda`` are imported lazily inside functions: importing this module, and
every pure helper below, works where they are absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cavmae.errors import CavmaeError, EngineUnavailableError
from cavmae.manifest import BATCH, GraphSpec, Manifest

from .base import Engine, GraphSession, check_inputs
from .ort import parse_device, writable_dir

log = logging.getLogger(__name__)

MIN_TRT_MAJOR = 10
CACHE_DIRNAME = ".trt"
INSTALL_HINT = (
    "the TensorRT engine needs TensorRT 10+ and an NVIDIA GPU: pip install 'cavmae[trt]'"
    " (tensorrt and cuda-python) on a machine with an NVIDIA driver, or use engine 'ort'"
)

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

ProfileShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
E = TypeVar("E")


# --------------------------------------------------------------------------------------------
# Pure logic (unit-tested without TensorRT)
# --------------------------------------------------------------------------------------------


def trt_major(version: str) -> int:
    """Major version of a TensorRT version string (``"10.13.0.35"`` -> 10)."""
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def network_flags(trt: Any) -> int:
    """Flags for ``builder.create_network``: strongly typed, and nothing else.

    TensorRT 10.x: ``1 << STRONGLY_TYPED`` (explicit batch is implied since 10.0).
    TensorRT 11+: 0, networks are always strongly typed and the flag is deprecated.
    """
    if trt_major(getattr(trt, "__version__", "0")) >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


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


def default_opt_batch(spec: GraphSpec, manifest: Manifest) -> int:
    """The batch size TensorRT tunes kernels for.

    The per-frame stages (visual graph, joint graph + head) do most of a clip's work and run
    at ``num_frames`` rows per clip, split into chunks of at most ``max_batch``; tuning for
    that size makes the common request fastest, while batch 1 .. max_batch still run.
    """
    return max(1, min(spec.max_batch, manifest.num_frames))


def profile_shapes(spec: GraphSpec, opt_batch: int) -> ProfileShapes:
    """(min, opt, max) shape per input with a batch axis: batch 1, ``opt_batch``, ``max_batch``.

    Inputs without a batch axis are static and need no profile entry.
    """
    if not 1 <= opt_batch <= spec.max_batch:
        raise CavmaeError(
            f"graph {spec.name!r}: opt_batch {opt_batch} must lie in 1..{spec.max_batch}"
        )
    shapes: ProfileShapes = {}
    for t in spec.inputs:
        if BATCH in t.shape:
            shapes[t.name] = (
                t.concrete_shape(1),
                t.concrete_shape(opt_batch),
                t.concrete_shape(spec.max_batch),
            )
    return shapes


def engine_cache_key(
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    profiles: ProfileShapes,
    precision: str,
) -> str:
    """sha256 (hex) over everything a serialized engine depends on.

    An engine is only valid for the TensorRT version and GPU model it was built with, and it
    bakes in the ONNX weights and the optimization profile.
    """
    payload = {
        "onnx": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "sm": compute_capability,
        "profiles": {k: [list(s) for s in v] for k, v in sorted(profiles.items())},
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_cache_path(cache_dir: Path, graph: str, key: str) -> Path:
    """``{cache_dir}/{graph}-{key[:16]}.engine``."""
    return cache_dir / f"{graph}-{key[:16]}.engine"


def timing_cache_path(cache_dir: Path, trt_version: str, gpu_name: str) -> Path:
    """One timing cache per TensorRT version and GPU model (entries are only valid there)."""
    gpu = hashlib.sha256(gpu_name.encode()).hexdigest()[:8]
    return cache_dir / f"timing-{trt_version}-{gpu}.cache"


def cavmae_home() -> Path:
    """``$CAVMAE_HOME``, else ``$XDG_CACHE_HOME/cavmae``, else ``~/.cache/cavmae``.

    The same rule as the model registry uses for its downloads.
    """
    home = os.environ.get("CAVMAE_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "cavmae"
    return Path.home() / ".cache" / "cavmae"


def choose_cache_dir(export_dir: Path) -> Path | None:
    """``{export_dir}/.trt`` when writable, else ``$CAVMAE_HOME/trt``, else None (no cache).

    Keys carry the ONNX hash, so engines of different exports never collide in the shared
    directory.
    """
    for candidate in (Path(export_dir) / CACHE_DIRNAME, cavmae_home() / "trt"):
        if writable_dir(candidate):
            return candidate
    log.warning("no writable directory for TensorRT engines; they will be rebuilt every time")
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a private temporary file and ``os.replace``.

    Readers (another process loading the same engine) never see a half-written file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256_file(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def onnx_fingerprint(path: Path) -> str:
    """sha256 over an ONNX file and the external-data files it references, if any."""
    h = hashlib.sha256()
    _sha256_file(path, h)
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
        locations = sorted(
            {
                entry.value
                for init in model.graph.initializer
                if init.data_location == onnx.TensorProto.EXTERNAL
                for entry in init.external_data
                if entry.key == "location"
            }
        )
    except Exception as e:  # onnx missing or the file unreadable by it: hash the file alone
        log.debug("cannot list external data of %s: %s", path, e)
        locations = []
    for loc in locations:
        data = path.parent / loc
        if data.is_file():
            h.update(loc.encode())
            _sha256_file(data, h)
    return h.hexdigest()


def load_or_build(
    path: Path | None,
    deserialize: Callable[[bytes], E | None],
    build: Callable[[], bytes],
    *,
    what: str = "engine",
) -> tuple[E, str]:
    """Load the engine cached at ``path``, or build, cache and load a new one.

    ``deserialize`` returns None (or raises) for bytes it cannot use: an engine from another
    TensorRT version or GPU, a truncated or corrupt file, one that does not match the graph.
    Such a file is logged, deleted and rebuilt. Returns the engine and ``"cache"`` or
    ``"built"``. Raises ``CavmaeError`` only when a freshly built engine cannot be loaded.
    """
    if path is not None and path.is_file():
        engine: E | None = None
        try:
            engine = deserialize(path.read_bytes())
        except Exception as e:
            log.debug("deserializing %s raised %s", path, e)
        if engine is not None:
            log.debug("%s: loaded cached engine %s", what, path)
            return engine, "cache"
        log.warning(
            "%s: cached TensorRT engine %s is stale, foreign or corrupt; rebuilding it",
            what,
            path,
        )
        try:
            path.unlink()
        except OSError as e:
            log.debug("cannot remove %s: %s", path, e)

    data = build()
    if path is not None:
        try:
            write_atomic(path, data)
        except OSError as e:
            log.warning("%s: cannot cache the TensorRT engine at %s: %s", what, path, e)
    try:
        engine = deserialize(data)
    except Exception as e:
        raise CavmaeError(f"{what}: TensorRT cannot load the engine it just built: {e}") from e
    if engine is None:
        raise CavmaeError(
            f"{what}: TensorRT cannot load the engine it just built; see the TensorRT log above"
        )
    return engine, "built"


def build_serialized_engine(
    trt: Any,
    logger: Any,
    onnx_path: Path,
    shapes: ProfileShapes,
    timing_cache: Path | None = None,
    workspace_bytes: int | None = None,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine with one batch profile.

    ``trt`` is the imported ``tensorrt`` module (passed in so the import stays lazy and the
    call sequence can be checked without a GPU).
    """
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so weights stored as ONNX external data are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CavmaeError(
            f"TensorRT cannot parse {onnx_path.name}: "
            + ("; ".join(errors) or "no error reported")
            + ". Re-export the model, or use engine 'ort'"
        )

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise CavmaeError(
            f"TensorRT rejected the optimization profile {shapes} for {onnx_path.name}"
        )

    cache_obj = None
    if timing_cache is not None:
        blob = b""
        try:
            blob = timing_cache.read_bytes()
        except OSError:
            pass
        cache_obj = config.create_timing_cache(blob)
        if cache_obj is None and blob:  # unreadable file: start from an empty cache
            cache_obj = config.create_timing_cache(b"")
        if cache_obj is not None:
            # ignore_mismatch=False: the file is per TensorRT version and GPU model already.
            config.set_timing_cache(cache_obj, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CavmaeError(
            f"TensorRT failed to build an engine for {onnx_path.name}; see the TensorRT log"
            " above, or use engine 'ort'"
        )

    if timing_cache is not None and cache_obj is not None:
        try:
            write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
        except OSError as e:
            log.debug("cannot save the timing cache %s: %s", timing_cache, e)
    return bytes(serialized)


# --------------------------------------------------------------------------------------------
# Lazy imports and CUDA helpers
# --------------------------------------------------------------------------------------------


def import_tensorrt() -> Any:
    """``import tensorrt``, or EngineUnavailableError saying what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the wheel is there, its libraries are not
        raise EngineUnavailableError(f"{INSTALL_HINT} ({e})") from None
    version = getattr(trt, "__version__", "0")
    if trt_major(version) < MIN_TRT_MAJOR:
        raise EngineUnavailableError(f"{INSTALL_HINT}; found TensorRT {version}")
    return trt


def import_cudart() -> Any:
    """The CUDA runtime bindings of cuda-python (new layout first, then the old one)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as e:
            raise EngineUnavailableError(f"{INSTALL_HINT} (cuda-python: {e})") from None
    return cudart


def cuda_check(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap a cuda-python result ``(err, *values)``; raise with the error name on failure.

    Returns None, the single value, or the tuple of values.
    """
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    code = int(getattr(err, "value", err))
    if code != 0:
        try:
            name = cudart.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            name = str(err)
        raise CavmaeError(f"CUDA call {what} failed: {name} (code {code})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _stream_handle(stream: Any) -> int:
    """The integer handle TensorRT's ``execute_async_v3`` takes."""
    get_ptr = getattr(stream, "getPtr", None)
    return int(get_ptr()) if get_ptr is not None else int(stream)


def gpu_identity(cudart: Any, device: int) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device ``device``."""
    attr = cudart.cudaDeviceAttr
    major = cuda_check(
        cudart,
        cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device),
        "cudaDeviceGetAttribute",
    )
    minor = cuda_check(
        cudart,
        cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device),
        "cudaDeviceGetAttribute",
    )
    prop = cuda_check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\x00", 1)[0].decode(errors="replace")
    return str(name).strip(), f"{major}.{minor}"


# --------------------------------------------------------------------------------------------
# Session and engine
# --------------------------------------------------------------------------------------------


class TrtSession(GraphSession):
    """One deserialized engine, its execution context, stream and device buffers."""

    def __init__(self, spec: GraphSpec, engine: Any, trt: Any, cudart: Any, origin: str) -> None:
        super().__init__(spec)
        self._cudart = cudart
        self._engine = engine
        #: "cache" when the engine came from the cache directory, "built" otherwise
        self.origin = origin
        self._buffers: dict[str, int] = {}
        self._stream: Any = None
        self._context = engine.create_execution_context()
        if self._context is None:
            raise CavmaeError(f"graph {spec.name!r}: TensorRT cannot create an execution context")

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._dtypes: dict[str, np.dtype] = {}
        for n in names:
            self._dtypes[n] = trt_name_to_numpy(engine.get_tensor_dtype(n).name)
        for t in spec.inputs:
            if not is_input.get(t.name, False):
                raise CavmaeError(f"graph {spec.name!r}: the engine has no input {t.name!r}")
        for t in (*spec.inputs, *spec.outputs):
            if t.name in self._dtypes and self._dtypes[t.name] != np.dtype(t.dtype):
                raise CavmaeError(
                    f"graph {spec.name!r}, tensor {t.name!r}: the engine uses"
                    f" {self._dtypes[t.name].name}, the manifest says {t.dtype}; re-export"
                    " the model"
                )
        self._outputs = [n for n in names if not is_input[n]]
        missing = [t.name for t in spec.outputs if t.name not in self._outputs]
        if missing:
            raise CavmaeError(f"graph {spec.name!r}: the engine lacks outputs {missing}")

        try:
            self._stream = cuda_check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            # Size every buffer once, at the largest shapes the profile allows; the output
            # shapes come from TensorRT's own shape inference at max batch.
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
                self._context.set_tensor_address(n, ptr)
        except BaseException:
            self.close()
            raise

    def _alloc(self, name: str, shape: tuple[int, ...]) -> None:
        nbytes = max(1, math.prod(shape) * self._dtypes[name].itemsize)
        self._buffers[name] = int(
            cuda_check(self._cudart, self._cudart.cudaMalloc(nbytes), "cudaMalloc")
        )

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: copy inputs in, execute, copy the batch's outputs back."""
        if self._context is None:
            raise CavmaeError(f"graph {self.spec.name!r}: the session is closed")
        cudart = self._cudart
        arrays, _ = check_inputs(self.spec, inputs)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in arrays.items():
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
        if not self._context.execute_async_v3(_stream_handle(self._stream)):
            raise CavmaeError(
                f"graph {self.spec.name!r}: TensorRT execution failed; see the TensorRT log"
            )
        out: dict[str, np.ndarray] = {}
        for t in self.spec.outputs:
            # Only the rows of this batch come back, not the whole max-batch buffer.
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
        # The input arrays stay referenced until here, so the async copies read live memory.
        cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
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
        super().__init__(export_dir, manifest, device)
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
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
        self.device_index = index
        cuda_check(self._cudart, self._cudart.cudaSetDevice(index), "cudaSetDevice")
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

    def _open(self, spec: GraphSpec) -> GraphSession:
        source = self.export_dir / spec.file
        if not source.is_file():
            raise CavmaeError(
                f"graph {spec.name!r}: {source} is missing; the export directory is"
                " incomplete, re-export the model"
            )
        self._cuda_set_device()
        shapes = profile_shapes(spec, self._opt_batch_for(spec))
        path = self.engine_path(spec)
        io_names = {t.name for t in (*spec.inputs, *spec.outputs)}

        def deserialize(data: bytes) -> Any:
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                return None
            have = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
            if not io_names <= have:  # a foreign engine that happens to sit at this name
                log.debug("engine tensors %s do not cover %s", sorted(have), sorted(io_names))
                return None
            return engine

        def build() -> bytes:
            log.info("graph %s: building a TensorRT engine (this can take minutes)", spec.name)
            tc = (
                timing_cache_path(self.cache_dir, self._trt.__version__, self.gpu_name)
                if self.cache_dir is not None
                else None
            )
            return build_serialized_engine(
                self._trt, self._logger, source, shapes, tc, self.workspace_bytes
            )

        engine, origin = load_or_build(path, deserialize, build, what=f"graph {spec.name!r}")
        return TrtSession(spec, engine, self._trt, self._cudart, origin)

    def _cuda_set_device(self) -> None:
        cuda_check(self._cudart, self._cudart.cudaSetDevice(self.device_index), "cudaSetDevice")

    def describe(self) -> str:
        return (
            f"trt on {self.device} (TensorRT {self._trt.__version__}, {self.gpu_name},"
            f" sm {self.compute_capability})"
        )
