"""The TensorRT engine (``trt``): serialized engines built from the exported ONNX graphs.

Written against the TensorRT 10.x and 11.x Python API. Building and caching engines are kept
apart from running them, as Polygraphy keeps its loaders apart from its runner:

- :mod:`.cuda`: lazy ``tensorrt`` / cuda-python imports and the CUDA runtime calls;
- :mod:`.build`: ONNX -> serialized engine (strongly typed network, one batch profile,
  timing cache);
- :mod:`.cache`: cache key (ONNX content hash, TensorRT version, GPU name + compute
  capability, profile, precision), cache directory (``{export_dir}/.trt`` or
  ``$CAVMAE_HOME/trt``), load-or-build with stale engines deleted and rebuilt, never a crash;
- :mod:`.runner`: :class:`TrtSession`, one engine with its context, stream and buffers;
- :mod:`.engine`: :class:`TrtEngine`, the :class:`~cavmae.runtime.engines.base.Engine`.

``tensorrt`` and ``cuda`` are imported lazily inside functions: importing this package, and
every pure helper in it, works where they are absent.
"""

from __future__ import annotations

from .build import build_serialized_engine, default_opt_batch, network_flags, profile_shapes
from .cache import (
    CACHE_DIRNAME,
    ProfileShapes,
    cavmae_home,
    choose_cache_dir,
    engine_cache_key,
    engine_cache_path,
    load_or_build,
    onnx_fingerprint,
    timing_cache_path,
    write_atomic,
)
from .cuda import (
    INSTALL_HINT,
    MIN_TRT_MAJOR,
    cuda_check,
    gpu_identity,
    import_cudart,
    import_tensorrt,
    trt_major,
)
from .engine import TrtEngine
from .runner import (
    NUMPY_TO_TRT,
    TRT_TO_NUMPY,
    TrtSession,
    numpy_to_trt_name,
    trt_name_to_numpy,
)

__all__ = [
    "CACHE_DIRNAME",
    "INSTALL_HINT",
    "MIN_TRT_MAJOR",
    "NUMPY_TO_TRT",
    "TRT_TO_NUMPY",
    "ProfileShapes",
    "TrtEngine",
    "TrtSession",
    "build_serialized_engine",
    "cavmae_home",
    "choose_cache_dir",
    "cuda_check",
    "default_opt_batch",
    "engine_cache_key",
    "engine_cache_path",
    "gpu_identity",
    "import_cudart",
    "import_tensorrt",
    "load_or_build",
    "network_flags",
    "numpy_to_trt_name",
    "onnx_fingerprint",
    "profile_shapes",
    "timing_cache_path",
    "trt_major",
    "trt_name_to_numpy",
    "write_atomic",
]
