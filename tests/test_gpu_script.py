"""benchmarks/gpu.sh --dry-run: every step of the prepared GPU run, on the CPU with tiny sizes,
so the script cannot rot while no GPU is at hand. No timing assertions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.sh"
STEPS = ("prepare", "reference-fp32", "reference-fp16", "engine-fp16", "engine-bf16", "decode", "train")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_script_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                       text=True, env=env, timeout=2400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    merged = json.loads(out.with_suffix(".json").read_text())
    assert merged["dry_run"] is True
    assert {k: v.split()[0] for k, v in merged["steps"].items()} == dict.fromkeys(STEPS, "ok")
    res = merged["results"]
    assert set(res) >= {"prepare", "reference-fp32", "reference-fp16", "engine-fp16", "engine-bf16",
                        "decode", "train"}
    for name in ("reference-fp32", "reference-fp16"):
        assert res[name]["runs"]["batch1"]["n"] == 1 and res[name]["runs"]["batch1"]["p50_s"] > 0
    for name in ("engine-fp16", "engine-bf16"):
        variants = res[name]["variants"]
        assert set(variants) == {"eager", "compile", "compile-cudagraphs"}
        assert variants["compile"]["compiled_blocks"] > 0
        assert variants["eager"]["batch1"]["clips_per_s"] > 0
    assert len(res["decode"]["clips"]) == 2
    assert res["train"]["runs"]["bf16"]["samples_per_s"] > 0
    # nothing outside --out and TMPDIR: the repository's results folder is untouched
    assert not list((REPO / "benchmarks" / "results").glob("gpu-*-dry*"))


def test_gpu_script_refuses_unknown_option(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "Error: unknown option --bogus (see --help)"


def test_gpu_step_without_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "reference",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("Error: no CUDA GPU here")


def test_compiled_variant_compiles_the_joint_block_the_classifier_runs(monkeypatch):
    """The classifier calls the first joint block's forward_shared_prefix, which a compiled
    module hands over uncompiled: the "compile" variant would time that block eagerly."""
    import torch

    from cavmae.config import TINY
    from cavmae.model import CAVMAEFT

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from gpu_bench import compile_blocks

    model = CAVMAEFT(TINY).eval()
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    compile_blocks(model, backend=counting_backend)
    cfg = model.config
    audio = torch.randn(1, cfg.num_audio_tokens, cfg.embed_dim)
    frames = torch.randn(1, 2, cfg.num_visual_tokens, cfg.embed_dim)
    try:
        with torch.no_grad():
            model.forward_joint_classifier(audio, frames, task="multi-label", num_frames=2)
    finally:
        torch._dynamo.reset()
    assert compiled, "the joint classifier ran no compiled code"
