"""Benchmark scripts run on the tiny model so they cannot rot. No timing is asserted, only that
the runs happened and were measured: benchmarks/first_use.py (a cold and a warm `cavmae classify`
per round, each in its own process and cache), benchmarks/ort_spin.py (sleeping vs spinning
ONNX Runtime threads, taking turns), benchmarks/quantize_speed.py (ONNX Runtime's dynamic
quantizer against cavmae's, with the check that both write the same graph) and
benchmarks/int8_engines.py (ONNX Runtime int8 against torch int8, and the attention alone) and
benchmarks/encoder_runs.py (encoder runs sized for the cache against whole batches)."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_use_benchmark_runs_tiny(tmp_path):
    module = _script("first_use")
    out = tmp_path / "first-use.json"
    module.main(["--tiny", "--rounds", "1", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--env", "CAVMAE_THREADS=1"])
    result = json.loads(out.read_text())
    assert result["env"] == {"CAVMAE_THREADS": "1"}
    (run,) = result["runs"]
    for kind in ("cold", "warm"):
        assert run[kind]["returncode"] == 0, run[kind].get("stderr_tail")
        assert run[kind]["seconds"] > 0 and run[kind]["minor_faults"] > 0
    # the cold run exported (work the warm run finds cached); the round's cache is gone
    assert run["cold"]["user_s"] > run["warm"]["user_s"]
    assert not list((tmp_path / "work").glob("home-*"))
    assert set(result["median"]) == {"cold", "warm"}


def test_spin_benchmark_runs_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    out = tmp_path / "spin.json"
    _script("ort_spin").main(["--tiny", "--rounds", "2", "--folder", "2", "--work", str(tmp_path / "work"),
                              "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["folder_clips"] == 2
    for what in ("classify", "folder"):
        assert {k: len(v) for k, v in result["seconds"][what].items()} == {"sleep": 2, "spin": 2}
        assert result[f"{what}_sleep_vs_spin"] > 0


def test_quantize_speed_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "q.json"
    result = _script("quantize_speed").main(["--tiny", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text())["check"] == result["check"]
    assert result["check"]["same_weights"] and result["check"]["same_outputs"]
    assert result["check"]["quantized_tensors"] > 0 and result["rounds"][0]["cavmae_s"] > 0


def test_int8_engines_benchmark_runs_tiny(tmp_path):
    out = tmp_path / "e.json"
    assert _script("int8_engines").main(["--tiny", "--repeat", "1", "--work", str(tmp_path / "w"),
                                         "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tiny"] and set(result["graphs"]) == {"audio_encoder", "visual_encoder", "joint_classifier"}
    joint = result["graphs"]["joint_classifier"]["attention"]
    assert joint["tokens"] == 512 + 196 and joint["layers"] == 1
    assert all(v > 0 for v in result["clip"].values())


def test_encoder_runs_benchmark_runs(tmp_path):
    from test_run_sizes import tiny_export

    out = tmp_path / "runs.json"
    export = tiny_export(tmp_path)
    assert _script("encoder_runs").main(["--export", str(export), "--batch", "1,2", "--repeat", "1",
                                         "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["batches"]) == {"1", "2"}
    for entry in result["batches"].values():
        assert {k: len(v) for k, v in entry["times_s"].items()} == {"sized": 1, "whole": 1}
        assert entry["whole_over_sized"] > 0
