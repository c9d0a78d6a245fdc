"""The load test of ``benchmarks/serve_load.py``, bounded, on a tiny model: 8 clients x 10
requests against ``cavmae serve`` on 127.0.0.1. Checks what does not depend on timing: every
answer is 200, the latency percentiles are reported, and the server's memory after the run is
within 20% of before (no growth per request). Throughput is measured by the script, never
asserted here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from conftest import AUDIOSET_CLIP, REPO  # noqa: E402
from serve_support import tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RSS from Linux /proc")


def load_script():
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module
    spec.loader.exec_module(module)
    return module


def test_eight_clients_ten_requests_all_200_memory_flat(tmp_path, tmp_path_factory):
    serve_load = load_script()
    model = tiny_model(tmp_path_factory.getbasetemp())
    result = serve_load.measure(str(model["export"]), 8, clip=AUDIOSET_CLIP, clients=8, requests=10,
                                timeout=600, deadline=1200, workdir=tmp_path)
    assert result["statuses"] == {"200": 80}, result
    assert result["warmup_statuses"] == {"200": 8}
    assert result["n"] == 80 and math.isfinite(result["p50_s"]) and result["p99_s"] >= result["p50_s"] > 0
    assert result["rss_after_mb"] <= 1.2 * result["rss_before_mb"], result
    assert result["mean_batch"] >= 1.0


def test_the_script_builds_its_tiny_export_and_keeps_to_its_time_limit(tmp_path, tmp_path_factory, monkeypatch):
    """``--tiny`` goes the way ``--full-size`` does (the benchmark's random checkpoint, exported
    through ``cavmae.runtime.load``; here into a throw-away cache), serves it and measures; with
    no time left, no server is started and each run says why."""
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))  # restored after the test
    serve_load = load_script()
    out = tmp_path / "tiny.json"
    serve_load.main(["--tiny", "--clients", "2", "--requests", "2", "--max-batch", "2", "--stage-repeat", "1",
                     "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["model"] == "tiny random weights (seed 0)" and result["export"]
    assert set(result["stage_costs"]["model_ms_per_clip"]) == {"1", "2"}
    [run] = result["runs"]
    assert run["max_batch"] == 2 and run["statuses"] == {"200": 4} and run["warmup_statuses"] == {"200": 2}

    model = tiny_model(tmp_path_factory.getbasetemp())
    out = tmp_path / "none.json"
    serve_load.main(["-m", str(model["export"]), "--max-batch", "8,1", "--time-limit", "0", "--stage-repeat", "1",
                     "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["max_batch"] for r in runs] == [8, 1]
    assert all("--time-limit 0 s reached" in r["skipped"] for r in runs), runs
