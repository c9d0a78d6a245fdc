"""Lazy imports of ``tensorrt`` and cuda-python, and the few CUDA runtime calls the engine makes.

Nothing here imports TensorRT or CUDA at module import time, so the engine package (and the CLI)
loads where they are absent; :func:`import_tensorrt` says what to install.
"""

from __future__ import annotations

from typing import Any

from cavmae.errors import CavmaeError, EngineUnavailableError

MIN_TRT_MAJOR = 10
INSTALL_HINT = (
    "the TensorRT engine needs TensorRT 10+ and an NVIDIA GPU: pip install 'cavmae[trt]'"
    " (tensorrt and cuda-python) on a machine with an NVIDIA driver, or use engine 'ort'"
)


def trt_major(version: str) -> int:
    """Major version of a TensorRT version string (``"10.13.0.35"`` -> 10)."""
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


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


def stream_handle(stream: Any) -> int:
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
