"""ONNX Runtime engine, input checking, optimized-model cache, hardware probes, engine factory.

Tiny hand-built ONNX graphs (no torch) stand in for exported model stages:
``proj``: y = x @ W + b  ([B,4,8] -> [B,4,6]) and z = table[idx] ([B,3] int64 -> [B,3,5]);
``half``: o = h @ W16 in float16 ([B,8] -> [B,6]).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cavmae.config import DEFAULT_PREPROCESS, TINY
from cavmae.errors import CavmaeError, EngineUnavailableError
from cavmae.manifest import GraphSpec, Manifest, TensorSpec
from cavmae.runtime import hardware
from cavmae.runtime.engines import ENGINES, create_engine, resolve_engine
from cavmae.runtime.engines.base import check_inputs
from cavmae.runtime.engines.ort import SPIN_CONFIG_KEY, OrtEngine
from tiny_graphs import proj_graph, proj_spec

MAX_BATCH = 4
RNG = np.random.default_rng(0)
W = RNG.standard_normal((8, 6)).astype(np.float32)
B = RNG.standard_normal(6).astype(np.float32)
TABLE = RNG.standard_normal((10, 5)).astype(np.float32)
W16 = RNG.standard_normal((8, 6)).astype(np.float16)


def _save(graph: onnx.GraphProto, path: Path) -> None:
    # IR 9 / opset 17: old enough for every ONNX Runtime >= 1.16 and TensorRT 10.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_tiny_export(directory: Path) -> Manifest:
    """Write two tiny graphs and their manifest into ``directory``; return the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    proj = proj_graph(W, B, TABLE)
    _save(proj, directory / "proj.onnx")
    half = helper.make_graph(
        [helper.make_node("MatMul", ["h", "W16"], ["o"])],
        "half",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 8])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT16, ["batch", 6])],
        [numpy_helper.from_array(W16, "W16")],
    )
    _save(half, directory / "half.onnx")

    graphs = {
        "proj": proj_spec(MAX_BATCH),
        "half": GraphSpec(
            name="half",
            file="half.onnx",
            inputs=(TensorSpec("h", ("batch", 8), "float16"),),
            outputs=(TensorSpec("o", ("batch", 6), "float16"),),
            max_batch=MAX_BATCH,
            precision="fp16",
        ),
    }
    manifest = Manifest(
        model_kind="classifier",
        model_config=TINY,
        preprocess=DEFAULT_PREPROCESS,
        graphs=graphs,
        max_batch=MAX_BATCH,
    )
    manifest.save(directory)
    return manifest


def proj_inputs(batch: int) -> dict[str, np.ndarray]:
    return {
        "x": RNG.standard_normal((batch, 4, 8)).astype(np.float32),
        "idx": RNG.integers(0, 10, size=(batch, 3)).astype(np.int64),
    }


def proj_reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": inputs["x"] @ W + B, "z": TABLE[inputs["idx"]]}


@pytest.fixture
def export(tmp_path: Path) -> tuple[Path, Manifest]:
    d = tmp_path / "export"
    return d, write_tiny_export(d)


def _cache_files(export_dir: Path) -> list[Path]:
    cache = export_dir / ".ort"
    return sorted(p for p in cache.iterdir() if p.suffix == ".onnx") if cache.is_dir() else []


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
def test_outputs_match_numpy(export: tuple[Path, Manifest], batch: int) -> None:
    d, m = export
    engine = OrtEngine(d, m, "cpu")
    inputs = proj_inputs(batch)
    out = engine.session("proj").run(inputs)
    ref = proj_reference(inputs)
    assert set(out) == {"y", "z"}
    assert out["y"].shape == (batch, 4, 6) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["z"], ref["z"])
    engine.close()


def test_fp16_graph_keeps_fp16_io(export: tuple[Path, Manifest]) -> None:
    d, m = export
    engine = OrtEngine(d, m, "cpu")
    h = RNG.standard_normal((3, 8)).astype(np.float16)
    out = engine.session("half").run({"h": h})
    assert out["o"].dtype == np.float16 and out["o"].shape == (3, 6)
    ref = h.astype(np.float32) @ W16.astype(np.float32)
    np.testing.assert_allclose(out["o"].astype(np.float32), ref, rtol=1e-2, atol=2e-2)
    with pytest.raises(CavmaeError, match="expected dtype float16, got float32"):
        engine.session("half").run({"h": h.astype(np.float32)})


def test_non_contiguous_inputs_are_accepted(export: tuple[Path, Manifest]) -> None:
    d, m = export
    inputs = proj_inputs(2)
    # Same values, Fortran order and a strided view: the engine must make them C-contiguous.
    fortran = np.asfortranarray(inputs["x"])
    strided = np.repeat(inputs["idx"], 2, axis=1)[:, ::2]
    assert not fortran.flags.c_contiguous and not strided.flags.c_contiguous
    out = OrtEngine(d, m).session("proj").run({"x": fortran, "idx": strided})
    np.testing.assert_allclose(out["y"], proj_reference(inputs)["y"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------


def test_batch_above_max_is_a_clear_error(export: tuple[Path, Manifest]) -> None:
    d, m = export
    session = OrtEngine(d, m).session("proj")
    with pytest.raises(CavmaeError, match=r"graph 'proj', input 'x': batch size 5 .* 1\.\.4"):
        session.run(proj_inputs(MAX_BATCH + 1))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"x": np.zeros((2, 4, 7), np.float32)}, r"input 'x': expected shape \[batch, 4, 8\]"),
        ({"x": np.zeros((2, 32), np.float32)}, r"input 'x': expected shape .*2 axes"),
        ({"x": np.zeros((2, 4, 8), np.float64)}, r"input 'x': expected dtype float32, got float64"),
        ({"idx": np.zeros((2, 3), np.int32)}, r"input 'idx': expected dtype int64, got int32"),
        ({"idx": np.zeros((3, 3), np.int64)}, r"input 'idx': batch size 3 differs from 2"),
        ({"x": np.zeros((0, 4, 8), np.float32)}, r"batch size 0"),
    ],
)
def test_wrong_inputs_are_clear_errors(
    export: tuple[Path, Manifest], change: dict[str, np.ndarray], pattern: str
) -> None:
    d, m = export
    session = OrtEngine(d, m).session("proj")
    inputs = {**proj_inputs(2), **change}
    with pytest.raises(CavmaeError, match=pattern) as err:
        session.run(inputs)
    assert "graph 'proj'" in str(err.value)


def test_missing_and_unknown_inputs(export: tuple[Path, Manifest]) -> None:
    d, m = export
    session = OrtEngine(d, m).session("proj")
    inputs = proj_inputs(1)
    with pytest.raises(CavmaeError, match=r"graph 'proj': missing input\(s\) 'idx'"):
        session.run({"x": inputs["x"]})
    with pytest.raises(CavmaeError, match=r"unknown input\(s\) 'extra'"):
        session.run({**inputs, "extra": inputs["x"]})


def test_check_inputs_returns_batch(export: tuple[Path, Manifest]) -> None:
    _, m = export
    arrays, batch = check_inputs(m.graph("proj"), proj_inputs(3))
    assert batch == 3 and all(a.flags.c_contiguous for a in arrays.values())


def test_manifest_disagreeing_with_onnx_fails_at_open(export: tuple[Path, Manifest]) -> None:
    d, m = export
    spec = m.graph("proj")
    bad = spec.__class__(
        **{**spec.__dict__, "inputs": (TensorSpec("x", ("batch", 4, 8), "float16"), spec.inputs[1])}
    )
    m2 = m.replace(graphs={**m.graphs, "proj": bad})
    with pytest.raises(CavmaeError, match="the ONNX file takes float32, the manifest says float16"):
        OrtEngine(d, m2).session("proj")
    with pytest.raises(CavmaeError, match="no graph 'nope'"):
        OrtEngine(d, m).session("nope")


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
@pytest.mark.parametrize("cache", [True, False])
def test_damaged_graph_file_is_one_line_naming_it(
    export: tuple[Path, Manifest], damage: str, cache: bool
) -> None:
    d, m = export
    source = d / "proj.onnx"
    data = source.read_bytes()
    source.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"hello\n"}[damage])
    with pytest.raises(CavmaeError) as info:
        OrtEngine(d, m, cache=cache).session("proj")
    message = str(info.value)
    assert str(source) in message and "re-export" in message and "\n" not in message
    assert not list((d / ".ort").glob("*"))  # no optimized copy, no temporary file left


# --------------------------------------------------------------------------------------------
# Optimized-model cache
# --------------------------------------------------------------------------------------------


def test_optimized_model_is_cached_and_reused(export: tuple[Path, Manifest]) -> None:
    d, m = export
    first = OrtEngine(d, m)
    s1 = first.session("proj")
    assert s1.source == "source+cached"
    files = _cache_files(d)
    assert len(files) == 1
    name = files[0].name
    import onnxruntime

    assert name.startswith(f"proj.cpu.{onnxruntime.__version__}.cpu") and name.endswith(".onnx")
    assert files[0] == first.cache_path(m.graph("proj"))
    # No temporary files left behind.
    assert [p.name for p in (d / ".ort").iterdir() if p.name.endswith(".tmp")] == []

    inputs = proj_inputs(2)
    second = OrtEngine(d, m)
    s2 = second.session("proj")
    assert s2.source == "cache"
    np.testing.assert_allclose(s2.run(inputs)["y"], s1.run(inputs)["y"], rtol=1e-6, atol=1e-6)
    assert _cache_files(d) == files


def test_stale_or_corrupt_cache_is_rebuilt(
    export: tuple[Path, Manifest], caplog: pytest.LogCaptureFixture
) -> None:
    d, m = export
    OrtEngine(d, m).session("proj")
    cached = _cache_files(d)[0]
    source = d / "proj.onnx"

    # Source re-exported after the cache was written: the cache is stale.
    past = source.stat().st_mtime - 100
    os.utime(cached, (past, past))
    assert OrtEngine(d, m).session("proj").source == "source+cached"
    assert cached.stat().st_mtime >= source.stat().st_mtime

    # Garbage in the cache file (newer than the source): warn, rebuild, still correct.
    cached.write_bytes(b"not an onnx model")
    assert cached.stat().st_mtime >= source.stat().st_mtime
    with caplog.at_level(logging.WARNING, logger="cavmae.runtime.engines.ort"):
        session = OrtEngine(d, m).session("proj")
    assert session.source == "source+cached"
    assert "unusable" in caplog.text
    inputs = proj_inputs(1)
    np.testing.assert_allclose(
        session.run(inputs)["y"], proj_reference(inputs)["y"], rtol=1e-5, atol=1e-5
    )
    assert OrtEngine(d, m).session("proj").source == "cache"


def test_unwritable_cache_dir_still_runs(export: tuple[Path, Manifest]) -> None:
    d, m = export
    # A file squatting on ".ort" makes the cache directory impossible even for root.
    (d / ".ort").write_text("in the way")
    session = OrtEngine(d, m).session("proj")
    assert session.source == "source"
    inputs = proj_inputs(2)
    np.testing.assert_allclose(
        session.run(inputs)["y"], proj_reference(inputs)["y"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores modes")
def test_read_only_export_dir_still_runs(export: tuple[Path, Manifest]) -> None:
    d, m = export
    d.chmod(0o555)
    try:
        session = OrtEngine(d, m).session("proj")
        assert session.source == "source"
        assert not (d / ".ort").exists()
        session.run(proj_inputs(1))
    finally:
        d.chmod(0o755)


def test_cache_can_be_switched_off(export: tuple[Path, Manifest]) -> None:
    d, m = export
    assert OrtEngine(d, m, cache=False).session("proj").source == "source"
    assert _cache_files(d) == []


# --------------------------------------------------------------------------------------------
# Threads and hardware probes
# --------------------------------------------------------------------------------------------


def test_threads_default_env_and_argument(
    export: tuple[Path, Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, m = export
    monkeypatch.delenv(hardware.THREADS_ENV, raising=False)
    assert OrtEngine(d, m).threads == hardware.physical_cores()
    monkeypatch.setenv(hardware.THREADS_ENV, "1")
    engine = OrtEngine(d, m)
    assert engine.threads == 1 and "1 threads" in engine.describe()
    assert OrtEngine(d, m, threads=3).threads == 3
    monkeypatch.setenv(hardware.THREADS_ENV, "lots")
    with pytest.raises(CavmaeError, match="CAVMAE_THREADS must be a positive integer"):
        OrtEngine(d, m)
    with pytest.raises(CavmaeError, match="at least 1"):
        hardware.default_threads(0)


def test_cpu_session_settings(export: tuple[Path, Manifest]) -> None:
    """Intra-op threads do not busy-wait by default (they took cores from decoding and from
    the next operator), ``spin=True`` restores it; no memory pattern (its block was allocated
    on the second run, fresh pages at a cost of seconds): benchmarks/README.md."""
    d, m = export
    for kwargs, want in (({}, "0"), ({"spin": True}, "1")):
        session = OrtEngine(d, m, cache=False, **kwargs).session("proj")
        options = session._session.get_session_options()
        assert options.get_session_config_entry(SPIN_CONFIG_KEY) == want
        assert options.enable_mem_pattern is False
        x = proj_inputs(2)
        np.testing.assert_allclose(session.run(x)["y"], proj_reference(x)["y"], rtol=1e-5, atol=1e-5)


_HT_CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\n"
    for cpu in range(4)
)


def test_physical_core_count_ignores_hyperthreads() -> None:
    # 4 logical CPUs, 2 cores with 2 threads each.
    assert hardware.count_physical_cores(_HT_CPUINFO, range(4)) == 2
    # Affinity limited to one thread of each core -> still 2 cores; to CPU 0 only -> 1.
    assert hardware.count_physical_cores(_HT_CPUINFO, {0, 1}) == 2
    assert hardware.count_physical_cores(_HT_CPUINFO, {0}) == 1
    # No topology in the text: unknown, the caller falls back to logical CPUs.
    assert hardware.count_physical_cores("processor\t: 0\n\nprocessor\t: 1\n", {0, 1}) is None
    assert hardware.physical_cores() >= 1


def test_cgroup_cpu_max_parsing() -> None:
    assert hardware.parse_cgroup_cpu_max("max 100000\n") is None
    assert hardware.parse_cgroup_cpu_max("200000 100000\n") == 2.0
    assert hardware.parse_cgroup_cpu_max("50000 100000") == 0.5
    assert hardware.parse_cgroup_cpu_max("garbage") is None


def test_hidden_gpus_are_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    hardware.clear_caches()
    try:
        assert hardware.gpu_names() == () and not hardware.cuda_available()
        assert not hardware.tensorrt_available()
    finally:
        monkeypatch.undo()
        hardware.clear_caches()


# --------------------------------------------------------------------------------------------
# CUDA provider and factory
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    "CUDAExecutionProvider" in hardware.ort_providers(), reason="onnxruntime-gpu is installed"
)
def test_cuda_without_gpu_build_says_what_to_install(export: tuple[Path, Manifest]) -> None:
    d, m = export
    with pytest.raises(EngineUnavailableError, match=r"pip install 'cavmae\[gpu\]'"):
        OrtEngine(d, m, "cuda")
    # the factory checks first whether there is a GPU at all, then the ONNX Runtime build
    with pytest.raises(EngineUnavailableError, match="onnxruntime-gpu|no NVIDIA GPU"):
        create_engine("ort", d, m, device="cuda:0")


def test_unknown_engine_and_device(export: tuple[Path, Manifest]) -> None:
    d, m = export
    with pytest.raises(CavmaeError, match="choose one of: auto, ort, trt, torch"):
        create_engine("onnx", d, m)
    with pytest.raises(CavmaeError, match="unknown device 'tpu'"):
        create_engine("ort", d, m, device="tpu")
    with pytest.raises(CavmaeError, match="unknown device"):
        OrtEngine(d, m, "cpu:1")
    assert ENGINES == ("ort", "trt", "torch")


def test_resolve_engine_here(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_engine("auto", "cpu") == ("ort", "cpu")
    assert resolve_engine("ort", "cpu") == ("ort", "cpu")
    assert resolve_engine("trt", "auto") == ("trt", "cuda")
    assert resolve_engine("ORT", "cuda:1") == ("ort", "cuda:1")
    # With every GPU hidden, "auto" everywhere lands on ONNX Runtime on the CPU.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    hardware.clear_caches()
    try:
        assert resolve_engine("auto", "auto") == ("ort", "cpu")
        assert resolve_engine("auto", None) == ("ort", "cpu")
        assert resolve_engine("ort", "auto") == ("ort", "cpu")
        assert resolve_engine("torch", "auto") == ("torch", "cpu")
    finally:
        monkeypatch.undo()
        hardware.clear_caches()


def test_create_engine_loads_the_manifest(export: tuple[Path, Manifest]) -> None:
    d, _ = export
    engine = create_engine("auto", d, device="cpu")
    assert isinstance(engine, OrtEngine) and engine.device == "cpu"
    out = engine.session("proj").run(proj_inputs(1))
    assert out["y"].shape == (1, 4, 6)


_NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the torch blocker does not work")

    import numpy as np
    import cavmae.runtime
    from cavmae.runtime.engines import create_engine

    export_dir = sys.argv[1]
    engine = create_engine("ort", export_dir, device="cpu")
    x = np.ones((2, 4, 8), np.float32)
    idx = np.zeros((2, 3), np.int64)
    out = engine.session("proj").run({"x": x, "idx": idx})
    assert "torch" not in sys.modules
    print(json.dumps({"y": out["y"].tolist(), "z": out["z"].tolist()}))
    """
)


def test_runtime_and_ort_engine_work_without_torch(export: tuple[Path, Manifest]) -> None:
    d, _ = export
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(d)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    x = np.ones((2, 4, 8), np.float32)
    np.testing.assert_allclose(np.array(result["y"]), x @ W + B, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(result["z"]), TABLE[np.zeros((2, 3), np.int64)])
