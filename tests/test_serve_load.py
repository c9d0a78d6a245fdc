"""The load test of ``benchmarks/serve_load.py``, bounded, on a tiny model: 8 clients x 10
requests against ``cavmae serve`` on 127.0.0.1. Checks what does not depend on timing: every
answer is 200, the latency percentiles are reported, and the server's memory after the run is
within 20% of before (no growth per request). Throughput is measured by the script, never
asserted here."""

from __future__ import annotations

import importlib.util
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
