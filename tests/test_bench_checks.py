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


def _tiny_classifier(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(CAVMAEFT(TINY.replace(num_classes=527)), path)


def test_each_measurement_shows_its_runs_in_a_log_and_a_long_baseline_its_estimate(tmp_path, monkeypatch, capsys):
    """stderr not a terminal (captured here): a line after the first and the last run of every
    measurement, naming engine, precision, batch and run; after the baseline's first run an
    estimate of the whole baseline (the threshold lowered: a tiny model is never long)."""
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CAVMAE_NO_PROGRESS", raising=False)
    monkeypatch.setattr(benchmark, "LONG_BASELINE_S", 0.0)
    logged: list[str] = []
    ckpt = _tiny_classifier(tmp_path / "m.pth")
    run_benchmark(BenchConfig(model=ckpt, batches=(1, 2), num_frames=2, warmup=1, repeat=2, stages=False,
                              work_dir=tmp_path), log=logged.append, progress=True)
    err = capsys.readouterr().err
    for b in (1, 2):
        assert f"bench: baseline fp32, batch {b}: 1/3 runs, warm-up," in err, err
        assert f"bench: baseline fp32, batch {b}: 3/3 runs, timed 2/2," in err, err
        assert f"bench: ort fp32 classify, batch {b}: 1/3 runs, warm-up," in err, err
        assert f"bench: ort fp32 classify, batch {b}: 3/3 runs, timed 2/2," in err, err
    assert "\r" not in err
    (estimate,) = [line for line in logged if line.startswith("baseline: about")]
    assert "3 runs at batch 1, 2" in estimate and "--baseline-repeat 1, --batch 1 or --no-baseline" in estimate


def test_cli_bench_shows_progress_and_says_what_it_left_in_the_cache(tmp_path):
    """The export a run makes stays in the cache: the last stderr line says how much and how to
    remove it; a second run, adding nothing, says nothing of it."""
    ckpt = _tiny_classifier(tmp_path / "m.pth")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAVMAE_")}
    env.update(CAVMAE_HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path))
    args = [CAVMAE_EXE, "bench", "-m", str(ckpt), "--batch", "1", "--repeat", "1", "--frames", "2",
            "--no-baseline", "--no-stages"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "bench: ort fp32 classify, batch 1: 2/2 runs, timed 1/1," in r.stderr, r.stderr
    assert lines[-1].startswith("bench: this run added ") and " MB to the cache " in lines[-1], lines[-1]
    assert "(the model's export)" in lines[-1]
    assert "`cavmae cache clear`" in lines[-1] and "`cavmae cache prune --older-than AGE`" in lines[-1]
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "to the cache" not in again.stderr, again.stderr


def test_cache_note_names_the_random_weight_export_and_its_size():
    note = benchmark.cache_note({"cache": {"home": "/h", "added_bytes": int(1.2 * 2**30),
                                           "random_checkpoint": "/tmp/cavmae-bench/random-classifier-base.pth"}})
    assert note is not None and note.startswith("bench: this run added 1.2 GB to the cache /h")
    assert "(the export of the random-weight model)" in note and "`cavmae cache clear`" in note
    assert benchmark.cache_note({"cache": {"home": "/h", "added_bytes": 0, "random_checkpoint": None}}) is None
