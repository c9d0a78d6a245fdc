"""Where serialized TensorRT engines are cached, under which key, and load-or-build.

A serialized engine is only valid for the TensorRT version and GPU model it was built with,
and it bakes in the ONNX weights and the optimization profile: the cache key covers all of
them. Engines live in ``{export_dir}/.trt`` or, when that is read-only, ``$CAVMAE_HOME/trt``.
A cached engine that TensorRT refuses (stale, foreign, corrupt) is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cavmae import fsio
from cavmae.errors import CavmaeError
from cavmae.hub.cache import cavmae_home

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".trt"

ProfileShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
E = TypeVar("E")


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
    return fsio.json_sha256(payload)


def engine_cache_path(cache_dir: Path, graph: str, key: str) -> Path:
    """``{cache_dir}/{graph}-{key[:16]}.engine``."""
    return cache_dir / f"{graph}-{key[:16]}.engine"


def timing_cache_path(cache_dir: Path, trt_version: str, gpu_name: str) -> Path:
    """One timing cache per TensorRT version and GPU model (entries are only valid there)."""
    gpu = hashlib.sha256(gpu_name.encode()).hexdigest()[:8]
    return cache_dir / f"timing-{trt_version}-{gpu}.cache"


def choose_cache_dir(export_dir: Path) -> Path | None:
    """``{export_dir}/.trt`` when writable, else ``$CAVMAE_HOME/trt``, else None (no cache).

    Keys carry the ONNX hash, so engines of different exports never collide in the shared
    directory.
    """
    for candidate in (Path(export_dir) / CACHE_DIRNAME, cavmae_home() / "trt"):
        if fsio.writable_dir(candidate):
            return candidate
    log.warning("no writable directory for TensorRT engines; they will be rebuilt every time")
    return None


def _external_data_files(path: Path) -> list[str]:
    """The external-data locations an ONNX file references, sorted (none if unreadable)."""
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
        return sorted(
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
        return []


def onnx_fingerprint(path: Path) -> str:
    """sha256 over an ONNX file and the external-data files it references, if any."""
    h = hashlib.sha256()
    fsio.hash_file_into(h, path)
    for loc in _external_data_files(path):
        data = path.parent / loc
        if data.is_file():
            h.update(loc.encode())
            fsio.hash_file_into(h, data)
    return h.hexdigest()


def _load_cached(path: Path, deserialize: Callable[[bytes], E | None], what: str) -> E | None:
    """The engine cached at ``path``; a file TensorRT refuses is logged and deleted."""
    engine: E | None = None
    try:
        engine = deserialize(path.read_bytes())
    except Exception as e:
        log.debug("deserializing %s raised %s", path, e)
    if engine is not None:
        log.debug("%s: loaded cached engine %s", what, path)
        return engine
    log.warning(
        "%s: cached TensorRT engine %s is stale, foreign or corrupt; rebuilding it", what, path
    )
    try:
        path.unlink()
    except OSError as e:
        log.debug("cannot remove %s: %s", path, e)
    return None


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
        cached = _load_cached(path, deserialize, what)
        if cached is not None:
            return cached, "cache"
    data = build()
    if path is not None:
        try:
            fsio.write_bytes(path, data)  # a reader never sees half an engine
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
