"""``cavmae bench`` refuses a model no run can use before its slow baseline: a pre-training
model (the benchmark classifies), an export of another precision or frame count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cavmae import CAVMAE, CAVMAEFT, TINY, save_checkpoint
from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import CavmaeError, ModelKindError
from cavmae.runtime import benchmark
from cavmae.runtime.benchmark import BenchConfig, run_benchmark
from cavmae.stages import graph_specs, make_manifest

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


@pytest.fixture
def no_baseline(monkeypatch):
    """The baseline (minutes at full size) must not start: the checks come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the baseline ran before the model was checked")

    monkeypatch.setattr(benchmark, "_baseline", refuse)


def _manifest_only_export(directory: Path, precision: str) -> Path:
    """An export's manifest without graphs: the checks read nothing else."""
    torch.manual_seed(0)
    net = CAVMAEFT(TINY)
    make_manifest(net, graph_specs(net), precision=precision, num_frames=10, max_batch=8,
                  task="multi-label", finetune_mode="multimodal", labels=None, mask_ratio_a=0.75,
                  mask_ratio_v=0.75, preprocess=DEFAULT_PREPROCESS, source={}, versions={}).save(directory)
    return directory


def test_pretraining_model_is_refused_before_the_baseline(tmp_path, no_baseline):
    ckpt = save_checkpoint(CAVMAE(TINY), tmp_path / "pt.pth")
    with pytest.raises(ModelKindError, match="pre-training model without a classification head"):
        run_benchmark(BenchConfig(model=ckpt, batches=(1,), repeat=1, work_dir=tmp_path))


@pytest.mark.parametrize(
    ("precision", "bench", "message"),
    [
        ("int8", {}, "is an export in int8, not fp32"),
        ("fp32", {"precision": "int8"}, "is an export in fp32, not int8"),
        ("fp32", {"num_frames": 4}, "is an export for 10 frames per clip, not 4"),
    ],
)
def test_export_the_runs_cannot_use_is_refused_before_the_baseline(tmp_path, no_baseline, precision, bench, message):
    export = _manifest_only_export(tmp_path / "export", precision)
    with pytest.raises(CavmaeError, match=message):
        run_benchmark(BenchConfig(model=export, batches=(1,), repeat=1, work_dir=tmp_path, **bench))


def test_cli_pretraining_model_is_one_line(tmp_path):
    ckpt = save_checkpoint(CAVMAE(TINY), tmp_path / "pt.pth")
    env = {**os.environ, "CAVMAE_HOME": str(tmp_path / "home"), "CAVMAE_NO_PROGRESS": "1",
           "TMPDIR": str(tmp_path)}
    r = subprocess.run([CAVMAE_EXE, "bench", "-m", str(ckpt), "--batch", "1", "--repeat", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {ckpt} is a pre-training model"), r.stderr
