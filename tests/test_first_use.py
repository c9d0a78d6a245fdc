"""First use of a checkpoint: only the graphs the command runs are exported, each validated once
(one PyTorch and one ONNX Runtime run), the engine runs the session validation checked and a
later process the optimized copy it saved, and a log (stderr not a terminal) shows one line per step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cavmae.export.onnx_export as onnx_export
from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae.runtime import load
from conftest import AUDIOSET_CLIP

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(CAVMAEFT(TINY.replace(num_classes=527)).eval(),
                           tmp_path_factory.mktemp("first") / "tiny.pth")


def test_each_graph_is_validated_once_and_its_optimized_copy_is_opened(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    validated: list[str] = []
    real = onnx_export.validate_graph

    def counting(stage, *args, **kwargs):
        validated.append(stage.decl.name)
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "validate_graph", counting)
    pipe = load(ckpt, engine="ort", device="cpu", num_frames=2)
    assert validated == []  # nothing is exported before a graph runs
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((TINY.audio_length, TINY.num_mel_bins), dtype=np.float32)
    frames = rng.standard_normal((2, 3, TINY.image_size, TINY.image_size), dtype=np.float32)
    pipe.classify(audio, frames)
    assert sorted(validated) == ["audio_encoder", "joint_classifier", "visual_encoder"]
    # the engine runs the very sessions validation checked (loaded and optimized once)...
    assert {pipe.engine.session(g).source for g in validated} == {"validation"}
    # ...which saved the optimized copies: a later load opens those, not optimizing again
    again = load(ckpt, engine="ort", device="cpu", num_frames=2)
    assert {again.engine.session(g).source for g in validated} == {"cache"}


def test_a_log_gets_one_line_per_step(ckpt, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CAVMAE_NO_PROGRESS"}
    env["CAVMAE_HOME"] = str(tmp_path / "home")

    def classify() -> str:
        out = subprocess.run([CAVMAE_EXE, "classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--engine", "ort"],
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stderr

    log = classify()
    lines = [line for line in log.splitlines() if line.startswith("export: ")]
    assert any(line.startswith("export: first use of tiny.pth") for line in lines), log
    for graph in ("audio_encoder", "visual_encoder", "joint_classifier"):
        (line,) = [line for line in lines if line.startswith(f"export: {graph}: traced and validated in ")]
        assert "trace " in line and "validation " in line
    assert not any("embed" in line for line in lines)  # classify does not run the embeddings
    assert not [line for line in classify().splitlines() if line.startswith("export: ")]  # warm


def test_the_trace_run_is_the_validation_reference(ckpt, tmp_path, monkeypatch):
    """The tracer's PyTorch run gives validation its reference: the same numbers as running the
    stage again, so the stage runs once per graph (at batch 2, on the validation inputs)."""
    import cavmae.export.validate as validate
    from cavmae import load_checkpoint
    from cavmae.stages import build_stages, run_stage

    net = load_checkpoint(ckpt)
    for name, stage in build_stages(net, num_frames=2, max_batch=2).items():
        inputs = validate.validation_inputs(stage, 0)
        traced = onnx_export.export_stage(stage, tmp_path / f"{name}.onnx", inputs=inputs)
        again = run_stage(stage, inputs)
        assert traced.keys() == again.keys()
        for out in traced:
            np.testing.assert_allclose(traced[out], again[out], rtol=0, atol=1e-6, err_msg=f"{name}.{out}")
    reruns: list[str] = []
    monkeypatch.setattr(validate, "run_stage", lambda stage, inputs, *a, **k: reruns.append(stage.decl.name))
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((TINY.audio_length, TINY.num_mel_bins), dtype=np.float32)
    load(ckpt, engine="ort", device="cpu", num_frames=2).embed_audio(audio[None])
    assert reruns == []  # audio_encoder and audio_embed validated without a second PyTorch run
