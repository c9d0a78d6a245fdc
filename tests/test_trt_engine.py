"""TensorRT engine: pure logic without TensorRT, the build call sequence against a minimal
stand-in module, and (marked ``tensorrt``) a real build + run on a GPU compared with ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from cavmae.config import DEFAULT_PREPROCESS, TINY
from cavmae.errors import CavmaeError, EngineUnavailableError
from cavmae.manifest import GraphSpec, Manifest, TensorSpec
from cavmae.runtime import hardware
from cavmae.runtime.engines import create_engine, engine_class
from cavmae.runtime.engines import trt as trt_mod
from tiny_graphs import proj_graph, proj_spec

MAX_BATCH = 4
RNG = np.random.default_rng(1)
W = RNG.standard_normal((8, 6)).astype(np.float32)
B = RNG.standard_normal(6).astype(np.float32)
TABLE = RNG.standard_normal((10, 5)).astype(np.float32)


def write_export(directory: Path, *, external_data: bool = False) -> Manifest:
    """One tiny graph ``proj`` (x [B,4,8] f32, idx [B,3] i64 -> y [B,4,6], z [B,3,5])."""
    directory.mkdir(parents=True, exist_ok=True)
    graph = proj_graph(W, B, TABLE)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save_model(
        model,
        str(directory / "proj.onnx"),
        save_as_external_data=external_data,
        location="proj.onnx.data",
        size_threshold=0,
    )
    spec = proj_spec(MAX_BATCH)
    manifest = Manifest(
        model_kind="classifier",
        model_config=TINY,
        preprocess=DEFAULT_PREPROCESS,
        graphs={"proj": spec},
        max_batch=MAX_BATCH,
    )
    manifest.save(directory)
    return manifest


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, Manifest]:
    d = tmp_path / "export"
    return d, write_export(d)


# --------------------------------------------------------------------------------------------
# Without TensorRT
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(hardware.tensorrt_importable(), reason="TensorRT is installed")
def test_trt_without_tensorrt_says_what_is_needed(export: tuple[Path, Manifest]) -> None:
    d, m = export
    with pytest.raises(EngineUnavailableError) as err:
        create_engine("trt", d, m, device="cuda")
    msg = str(err.value)
    assert "TensorRT 10+" in msg and "NVIDIA GPU" in msg and "pip install 'cavmae[trt]'" in msg


def test_trt_refuses_the_cpu(export: tuple[Path, Manifest]) -> None:
    d, m = export
    with pytest.raises(CavmaeError, match="CUDA GPUs only"):
        create_engine("trt", d, m, device="cpu")


def test_profile_shapes_cover_the_batch_axis(export: tuple[Path, Manifest]) -> None:
    _, m = export
    spec = m.graph("proj")
    shapes = trt_mod.profile_shapes(spec, 2)
    assert shapes == {
        "x": ((1, 4, 8), (2, 4, 8), (4, 4, 8)),
        "idx": ((1, 3), (2, 3), (4, 3)),
    }
    static = GraphSpec(
        name="s",
        file="s.onnx",
        inputs=(TensorSpec("a", (3, 2)), TensorSpec("b", ("batch", 2))),
        outputs=(TensorSpec("o", ("batch", 2)),),
        max_batch=8,
    )
    assert set(trt_mod.profile_shapes(static, 8)) == {"b"}  # static inputs need no profile
    for bad in (0, MAX_BATCH + 1):
        with pytest.raises(CavmaeError, match="opt_batch"):
            trt_mod.profile_shapes(spec, bad)


def test_default_opt_batch_targets_frame_batches(export: tuple[Path, Manifest]) -> None:
    _, m = export
    spec = m.graph("proj")
    assert trt_mod.default_opt_batch(spec, m) == MAX_BATCH  # 10 frames, capped at max 4
    wide = GraphSpec(**{**spec.__dict__, "max_batch": 32})
    assert trt_mod.default_opt_batch(wide, m) == 10
    assert trt_mod.default_opt_batch(wide, m.replace(num_frames=1)) == 1


def test_engine_cache_key_depends_on_everything_that_matters(export: tuple[Path, Manifest]) -> None:
    _, m = export
    shapes = trt_mod.profile_shapes(m.graph("proj"), 2)
    args = ("a" * 64, "10.13.0", "NVIDIA H100", "9.0", shapes, "fp32")
    key = trt_mod.engine_cache_key(*args)
    assert key == trt_mod.engine_cache_key(*args) and len(key) == 64
    variants = [
        ("b" * 64, *args[1:]),
        (args[0], "11.0.0", *args[2:]),
        (*args[:2], "NVIDIA A100", *args[3:]),
        (*args[:3], "8.0", *args[4:]),
        (*args[:4], trt_mod.profile_shapes(m.graph("proj"), 4), "fp32"),
        (*args[:5], "fp16"),
    ]
    assert len({trt_mod.engine_cache_key(*v) for v in variants} | {key}) == len(variants) + 1
    path = trt_mod.engine_cache_path(Path("/c"), "proj", key)
    assert path == Path(f"/c/proj-{key[:16]}.engine")
    tc = trt_mod.timing_cache_path(Path("/c"), "10.13.0", "NVIDIA H100")
    assert tc.parent == Path("/c") and tc.name.startswith("timing-10.13.0-")
    assert tc != trt_mod.timing_cache_path(Path("/c"), "10.13.0", "NVIDIA A100")


def test_dtype_mapping() -> None:
    for np_name, trt_name in [
        ("float32", "FLOAT"),
        ("float16", "HALF"),
        ("int64", "INT64"),
        ("int32", "INT32"),
        ("bool", "BOOL"),
    ]:
        assert trt_mod.numpy_to_trt_name(np.dtype(np_name)) == trt_name
        assert trt_mod.trt_name_to_numpy(trt_name) == np.dtype(np_name)
    with pytest.raises(CavmaeError, match="BF16 has no numpy equivalent"):
        trt_mod.trt_name_to_numpy("BF16")
    with pytest.raises(CavmaeError, match="complex64"):
        trt_mod.numpy_to_trt_name(np.complex64)


def test_engines_of_a_read_only_export_go_to_the_cache_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The fallback is the one cache root of cavmae.hub.cache ($CAVMAE_HOME/trt)."""
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    export = tmp_path / "export"
    export.mkdir()
    assert trt_mod.choose_cache_dir(export) == export / trt_mod.CACHE_DIRNAME
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / trt_mod.CACHE_DIRNAME).write_text("a file squatting on the name")
    assert trt_mod.choose_cache_dir(blocked) == tmp_path / "home" / "trt"


def test_cache_dir_falls_back_when_export_is_not_writable(
    export: tuple[Path, Manifest], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    d, _ = export
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    assert trt_mod.choose_cache_dir(d) == d / ".trt"
    other = tmp_path / "other"
    write_export(other)
    (other / ".trt").write_text("a file in the way")  # unwritable even for root
    assert trt_mod.choose_cache_dir(other) == tmp_path / "home" / "trt"
    assert (tmp_path / "home" / "trt").is_dir()


def test_onnx_fingerprint_follows_weights(tmp_path: Path) -> None:
    inline = tmp_path / "inline"
    write_export(inline)
    f1 = trt_mod.onnx_fingerprint(inline / "proj.onnx")
    assert f1 == trt_mod.onnx_fingerprint(inline / "proj.onnx")

    ext = tmp_path / "ext"
    write_export(ext, external_data=True)
    data = ext / "proj.onnx.data"
    assert data.is_file()
    f2 = trt_mod.onnx_fingerprint(ext / "proj.onnx")
    blob = bytearray(data.read_bytes())
    blob[0] ^= 0xFF  # change one weight byte; the .onnx file itself is untouched
    data.write_bytes(bytes(blob))
    assert trt_mod.onnx_fingerprint(ext / "proj.onnx") != f2


# ---- load or rebuild -----------------------------------------------------------------------


class _Builds:
    """Counts builds; produces b"engine-<n>"."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> bytes:
        self.count += 1
        return f"engine-{self.count}".encode()


def _deserialize(data: bytes) -> str | None:
    # Stands in for Runtime.deserialize_cuda_engine: only our own builds load.
    return data.decode() if data.startswith(b"engine-") else None


def test_load_or_build_builds_caches_and_reuses(tmp_path: Path) -> None:
    path = tmp_path / "g.engine"
    build = _Builds()
    engine, origin = trt_mod.load_or_build(path, _deserialize, build)
    assert (engine, origin, build.count) == ("engine-1", "built", 1)
    assert path.read_bytes() == b"engine-1"
    engine, origin = trt_mod.load_or_build(path, _deserialize, build)
    assert (engine, origin, build.count) == ("engine-1", "cache", 1)


@pytest.mark.parametrize("stale", [b"engine from TensorRT 9", b"", b"\x00" * 10])
def test_stale_engine_is_deleted_and_rebuilt(
    tmp_path: Path, stale: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "g.engine"
    path.write_bytes(stale)
    build = _Builds()
    with caplog.at_level(logging.WARNING, logger="cavmae.runtime.engines.trt"):
        engine, origin = trt_mod.load_or_build(path, _deserialize, build, what="graph 'g'")
    assert (engine, origin, build.count) == ("engine-1", "built", 1)
    assert path.read_bytes() == b"engine-1"  # overwritten with the fresh engine
    assert "stale, foreign or corrupt" in caplog.text and "graph 'g'" in caplog.text


def test_deserializer_that_raises_counts_as_stale(tmp_path: Path) -> None:
    path = tmp_path / "g.engine"
    path.write_bytes(b"whatever")

    def explode(data: bytes) -> str | None:
        if data == b"whatever":
            raise RuntimeError("bad magic")
        return data.decode()

    engine, origin = trt_mod.load_or_build(path, explode, _Builds())
    assert (engine, origin) == ("engine-1", "built")


def test_unloadable_fresh_engine_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CavmaeError, match="cannot load the engine it just built"):
        trt_mod.load_or_build(tmp_path / "g.engine", lambda data: None, _Builds())


def test_no_cache_dir_builds_every_time(tmp_path: Path) -> None:
    build = _Builds()
    assert trt_mod.load_or_build(None, _deserialize, build)[1] == "built"
    assert trt_mod.load_or_build(None, _deserialize, build)[1] == "built"
    assert build.count == 2 and list(tmp_path.iterdir()) == []


# ---- CUDA result checking ------------------------------------------------------------------


class _Err(int):
    """Like cuda-python's cudaError_t: an int enum with ``value``."""

    @property
    def value(self) -> int:
        return int(self)


_fake_cudart = types.SimpleNamespace(
    cudaGetErrorName=lambda err: (_Err(0), b"cudaErrorMemoryAllocation" if err == 2 else b"?")
)


def test_cuda_check_unwraps_and_names_errors() -> None:
    assert trt_mod.cuda_check(_fake_cudart, (_Err(0),), "cudaStreamSynchronize") is None
    assert trt_mod.cuda_check(_fake_cudart, (_Err(0), 1234), "cudaMalloc") == 1234
    assert trt_mod.cuda_check(_fake_cudart, (_Err(0), 1, 2), "x") == (1, 2)
    with pytest.raises(
        CavmaeError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation \(code 2\)"
    ):
        trt_mod.cuda_check(_fake_cudart, (_Err(2), 0), "cudaMalloc")


# ---- build sequence against a minimal stand-in for the tensorrt module ----------------------


def _fake_tensorrt(version: str, *, parse_ok: bool = True, build_ok: bool = True,
                   foreign_cache: bytes | None = None, serialize_ok: bool = True) -> Any:
    """The few names ``build_serialized_engine`` may touch, recording how they are called.

    Deliberately absent: ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` and ``BuilderFlag``
    (TensorRT 11 removed EXPLICIT_BATCH and BuilderFlag.FP16); touching them raises.
    ``foreign_cache``: a timing cache blob set_timing_cache refuses (another device's);
    ``serialize_ok=False``: serializing the timing cache fails.
    """
    calls: dict[str, Any] = {"set_shape": [], "timing_loaded": None, "pool": None}

    class Flags:
        STRONGLY_TYPED = 1

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            calls["set_shape"].append((name, lo, opt, hi))

    class TimingCache:
        def __init__(self, blob: bytes) -> None:
            self.blob = blob

        def serialize(self) -> bytes:
            if not serialize_ok:
                raise RuntimeError("serialization failed")
            return self.blob + b"+new"

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls["pool"] = (pool, size)

        def add_optimization_profile(self, profile: Profile) -> int:
            return 0

        def create_timing_cache(self, blob: bytes) -> TimingCache:
            calls["timing_loaded"] = blob
            return TimingCache(blob)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            calls["ignore_mismatch"] = ignore_mismatch
            if cache.blob == foreign_cache and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> str:
            calls["network_flags"] = flags
            return "network"

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: str, config: Config) -> bytes | None:
            return b"PLAN" if build_ok else None

    class Parser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network: str, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i: int) -> str:
            return f"node {i}: unsupported op"

    trt = types.SimpleNamespace(
        __version__=version,
        NetworkDefinitionCreationFlag=Flags,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        Builder=Builder,
        OnnxParser=Parser,
    )
    return trt, calls


@pytest.mark.parametrize(("version", "flags"), [("10.13.0.35", 1 << 1), ("11.0.0", 0)])
def test_build_uses_strong_typing_and_the_batch_profile(
    export: tuple[Path, Manifest], tmp_path: Path, version: str, flags: int
) -> None:
    d, m = export
    trt, calls = _fake_tensorrt(version)
    shapes = trt_mod.profile_shapes(m.graph("proj"), 2)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old")
    plan = trt_mod.build_serialized_engine(
        trt, None, d / "proj.onnx", shapes, timing, workspace_bytes=1 << 30
    )
    assert plan == b"PLAN"
    # 10.x: 1 << STRONGLY_TYPED; 11.x: 0 (always strongly typed); never EXPLICIT_BATCH.
    assert calls["network_flags"] == flags
    assert calls["parsed"] == str(d / "proj.onnx")
    assert calls["set_shape"] == [(n, *s) for n, s in shapes.items()]
    assert calls["pool"] == ("WORKSPACE", 1 << 30)
    assert calls["timing_loaded"] == b"old" and calls["ignore_mismatch"] is False
    assert timing.read_bytes() == b"old+new"  # the grown timing cache is written back


def test_a_timing_cache_from_another_device_or_unsaved_loses_no_engine(
    export: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """TensorRT refuses a timing cache from another device of the same name (MIG slices); the
    build goes on with a fresh cache. A cache that cannot be saved costs only the cache."""
    d, m = export
    shapes = trt_mod.profile_shapes(m.graph("proj"), 1)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"other device")
    trt, calls = _fake_tensorrt("10.13.0", foreign_cache=b"other device")
    assert trt_mod.build_serialized_engine(trt, None, d / "proj.onnx", shapes, timing) == b"PLAN"
    assert calls["timing_loaded"] == b"" and timing.read_bytes() == b"+new"
    trt, _ = _fake_tensorrt("10.13.0", serialize_ok=False)
    assert trt_mod.build_serialized_engine(trt, None, d / "proj.onnx", shapes, timing) == b"PLAN"
    assert timing.read_bytes() == b"+new"  # left as it was


def test_trt_refuses_an_int8_export_before_loading_tensorrt(tmp_path: Path) -> None:
    d = tmp_path / "export"
    m = dataclasses.replace(write_export(d), precision="int8")
    with pytest.raises(CavmaeError, match="int8 for ONNX Runtime, which TensorRT cannot run; use engine 'ort'"):
        engine_class("trt")(d, m, "cuda")


def test_network_flags_without_strong_typing_flag() -> None:
    trt = types.SimpleNamespace(__version__="10.0.1", NetworkDefinitionCreationFlag=object())
    assert trt_mod.network_flags(trt) == 0


def test_build_reports_parser_errors_and_failed_builds(
    export: tuple[Path, Manifest], tmp_path: Path
) -> None:
    d, m = export
    shapes = trt_mod.profile_shapes(m.graph("proj"), 1)
    trt, _ = _fake_tensorrt("10.13.0", parse_ok=False)
    with pytest.raises(CavmaeError, match="cannot parse proj.onnx: node 0: unsupported op; node 1"):
        trt_mod.build_serialized_engine(trt, None, d / "proj.onnx", shapes)
    trt, _ = _fake_tensorrt("10.13.0", build_ok=False)
    timing = tmp_path / "t.cache"
    with pytest.raises(CavmaeError, match="failed to build an engine for proj.onnx"):
        trt_mod.build_serialized_engine(trt, None, d / "proj.onnx", shapes, timing)
    assert not timing.exists()


# --------------------------------------------------------------------------------------------
# On a GPU with TensorRT
# --------------------------------------------------------------------------------------------


def _require_tensorrt_and_gpu() -> None:
    pytest.importorskip("tensorrt")
    try:
        trt_mod.import_cudart()
    except EngineUnavailableError:
        pytest.skip("cuda-python is not installed")
    if not hardware.cuda_available():
        pytest.skip("no CUDA GPU")


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime(export: tuple[Path, Manifest]) -> None:
    _require_tensorrt_and_gpu()
    d, m = export
    ort_engine = create_engine("ort", d, m, device="cpu")
    engine = create_engine("trt", d, m, device="cuda", opt_batch=2)
    session = engine.session("proj")
    assert session.origin == "built"
    for batch in (1, 3, MAX_BATCH):
        inputs = {
            "x": RNG.standard_normal((batch, 4, 8)).astype(np.float32),
            "idx": RNG.integers(0, 10, size=(batch, 3)).astype(np.int64),
        }
        got = session.run(inputs)
        want = ort_engine.session("proj").run(inputs)
        assert got["y"].shape == (batch, 4, 6) and got["z"].shape == (batch, 3, 5)
        # TF32 matmuls on Ampere+ are allowed in fp32 engines: loose tolerance.
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(got["z"], want["z"])
    with pytest.raises(CavmaeError, match="batch size 5"):
        session.run({"x": np.zeros((5, 4, 8), np.float32), "idx": np.zeros((5, 3), np.int64)})
    path = engine.engine_path(m.graph("proj"))
    engine.close()
    assert path is not None and path.is_file()

    # A second engine loads the cached plan; a corrupt plan is rebuilt, not a crash.
    again = create_engine("trt", d, m, device="cuda", opt_batch=2)
    assert again.session("proj").origin == "cache"
    again.close()
    path.write_bytes(b"garbage")
    rebuilt = create_engine("trt", d, m, device="cuda", opt_batch=2)
    assert rebuilt.session("proj").origin == "built"
    out = rebuilt.session("proj").run(
        {"x": np.ones((1, 4, 8), np.float32), "idx": np.zeros((1, 3), np.int64)}
    )
    np.testing.assert_allclose(
        out["y"], np.ones((1, 4, 8), np.float32) @ W + B, rtol=1e-2, atol=1e-2
    )
    rebuilt.close()
