"""Building a serialized TensorRT engine from an exported ONNX graph.

Networks are explicit-batch (the only kind since 10.0; TensorRT 11 removed the
``EXPLICIT_BATCH`` flag) and strongly typed, so precision follows the ONNX types: an fp16
export runs in fp16, an fp32 export in fp32. TensorRT 11 removed ``BuilderFlag.FP16`` and
always builds strongly typed (its ``STRONGLY_TYPED`` flag is deprecated and ignored), so the
flag is passed on 10.x only and neither of the removed flags is referenced. One optimization
profile covers the batch axis: min 1, opt ``opt_batch``, max the graph's ``max_batch``. A
timing cache file, per TensorRT version and GPU model, speeds up rebuilds.

The ``tensorrt`` module is passed in, never imported here, so the build sequence is checked
against a stand-in module without a GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cavmae import fsio
from cavmae.errors import CavmaeError
from cavmae.manifest import BATCH, GraphSpec, Manifest

from .cache import ProfileShapes
from .cuda import trt_major

log = logging.getLogger(__name__)


def network_flags(trt: Any) -> int:
    """Flags for ``builder.create_network``: strongly typed, and nothing else.

    TensorRT 10.x: ``1 << STRONGLY_TYPED`` (explicit batch is implied since 10.0).
    TensorRT 11+: 0, networks are always strongly typed and the flag is deprecated.
    """
    if trt_major(getattr(trt, "__version__", "0")) >= 11:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


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


def _parse(trt: Any, logger: Any, builder: Any, onnx_path: Path) -> tuple[Any, Any]:
    """``(network, parser)`` of ``onnx_path``, or an error listing what the parser refused.

    The parser owns the weights the network points to: the caller keeps it until the build
    is done.
    """
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
    return network, parser


def _attach_timing_cache(config: Any, timing_cache: Path) -> Any:
    """Load ``timing_cache`` (or start an empty one) into ``config``; the cache object or None."""
    blob = b""
    try:
        blob = timing_cache.read_bytes()
    except OSError:
        pass
    cache_obj = config.create_timing_cache(blob)
    if cache_obj is None and blob:  # unreadable file: start from an empty cache
        cache_obj = config.create_timing_cache(b"")
    if cache_obj is not None and not config.set_timing_cache(cache_obj, False):
        # The file is per TensorRT version and GPU model, yet devices of one name can differ
        # (MIG slices): TensorRT refuses a cache from another; build with a fresh one.
        log.debug("timing cache %s is from another device; starting a new one", timing_cache)
        cache_obj = config.create_timing_cache(b"")
        if cache_obj is not None and not config.set_timing_cache(cache_obj, False):
            cache_obj = None
    return cache_obj


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
    network, parser = _parse(trt, logger, builder, onnx_path)
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
    cache_obj = _attach_timing_cache(config, timing_cache) if timing_cache is not None else None

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CavmaeError(
            f"TensorRT failed to build an engine for {onnx_path.name}; see the TensorRT log"
            " above, or use engine 'ort'"
        )
    if timing_cache is not None and cache_obj is not None:
        try:  # the cache only speeds up later builds: failing to save it loses no engine
            fsio.write_bytes(timing_cache, bytes(cache_obj.serialize()))
        except Exception as e:
            log.debug("cannot save the timing cache %s: %s", timing_cache, e)
    del parser  # only now: the build read the weights it owns
    return bytes(serialized)
