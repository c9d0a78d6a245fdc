"""Fail fast and in one line: usage errors name the --help to read; a missing engine or GPU is
refused before any work (no baseline run, no export), by the one check in the engine factory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae.errors import CavmaeError, EngineUnavailableError
from cavmae.runtime import hardware
from cavmae.runtime.engines import check_engine
from conftest import AUDIOSET_CLIP

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


def run(*args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "CAVMAE_HOME": str(tmp / "home"), "CAVMAE_NO_PROGRESS": "1", "TMPDIR": str(tmp),
               **env}
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=environ, timeout=600)


def one_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


# --- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["classify", "--zzz", "x.mp4"], "Error: no such option: --zzz (see 'cavmae classify --help')"),
        (["clasify", "x.mp4"], "Error: no such command 'clasify'. Did you mean 'classify'? (see 'cavmae --help')"),
        (["--fo"], "Error: no such option: --fo (see 'cavmae --help')"),
        (["classify"], "Error: missing argument 'INPUTS...' (see 'cavmae classify --help')"),
        (["cache", "prune"], "Error: missing option '--older-than' (see 'cavmae cache prune --help')"),
        (["classify", "--debug", "x.mp4"], "Error: no such option: --debug; it goes before the command:"
                                          " cavmae --debug classify ... (see 'cavmae classify --help')"),
    ],
)
def test_usage_errors_are_one_line_naming_the_help(tmp_path, args, expected):
    out = run(*args, tmp=tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert one_line(out) == expected


def test_usage_error_keeps_clicks_suggestion_and_bad_values(tmp_path):
    out = run("classify", "--top", "3", "x.mp4", tmp=tmp_path)
    line = one_line(out)
    assert out.returncode == 2 and "Did you mean --top-k" in line and line.endswith("(see 'cavmae classify --help')")
    out = run("bench", "--engine", "onnx", tmp=tmp_path)
    line = one_line(out)
    assert out.returncode == 2 and line.startswith("Error: invalid value for '--engine'")
    assert line.endswith("(see 'cavmae bench --help')")


def test_help_still_works(tmp_path):
    out = run("--help", tmp=tmp_path)
    assert out.returncode == 0 and "cache" in out.stdout and "classify" in out.stdout


# --- engine and device, checked before any work ----------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(CAVMAEFT(TINY), tmp_path_factory.mktemp("ck") / "ft.pth")


@pytest.mark.skipif(hardware.tensorrt_importable(), reason="TensorRT is installed")
def test_bench_trt_without_tensorrt_refuses_before_the_baseline(tmp_path):
    out = run("bench", "--engine", "trt", tmp=tmp_path)
    assert out.returncode == 2
    line = one_line(out)
    assert "TensorRT is not installed" in line and "pip install 'cavmae[trt]'" in line and "--engine ort" in line
    # nothing ran: no random full-size checkpoint for the baseline, no export
    assert not (tmp_path / "cavmae-bench").exists() and not (tmp_path / "home").exists()


def test_cuda_without_a_gpu_is_one_line_for_every_command(tmp_path, ckpt):
    hidden = {"CUDA_VISIBLE_DEVICES": "-1"}
    commands = [
        ["bench", "--device", "cuda", "--engine", "ort"],
        ["bench", "--device", "cuda", "--engine", "torch"],
        ["classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--device", "cuda"],
        ["classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--device", "cuda:1", "--engine", "torch"],
        ["embed", str(AUDIOSET_CLIP), "-m", str(ckpt), "-o", str(tmp_path / "idx"), "--device", "cuda"],
    ]
    for args in commands:
        out = run(*args, tmp=tmp_path, **hidden)
        assert out.returncode == 2, (args, out.stderr)
        line = one_line(out)
        assert "no NVIDIA GPU is visible" in line and "--device cpu" in line, line
    assert not (tmp_path / "home" / "exports").exists()  # refused before the first-use export
    assert not (tmp_path / "cavmae-bench").exists()


def test_bench_torch_fp16_on_the_cpu_is_refused_first(tmp_path):
    out = run("bench", "--engine", "torch", "--device", "cpu", "--torch-precision", "fp16", tmp=tmp_path)
    assert out.returncode == 2 and "needs --device cuda" in one_line(out)
    assert not (tmp_path / "cavmae-bench").exists()


def _machine(monkeypatch, *, gpus=(), trt=False, providers=("CPUExecutionProvider",)) -> None:
    monkeypatch.setattr(hardware, "gpu_names", lambda: tuple(gpus))
    monkeypatch.setattr(hardware, "tensorrt_importable", lambda: trt)
    monkeypatch.setattr(hardware, "ort_providers", lambda: tuple(providers))


def test_check_engine_says_what_to_install_or_use(monkeypatch):
    _machine(monkeypatch)
    assert check_engine("auto", "auto") == ("ort", "cpu")
    assert check_engine("ort", "cpu") == ("ort", "cpu")
    with pytest.raises(EngineUnavailableError, match="TensorRT is not installed"):
        check_engine("trt", "auto")
    with pytest.raises(EngineUnavailableError, match="CUDA GPUs only.*--device cuda"):
        check_engine("trt", "cpu")
    with pytest.raises(EngineUnavailableError, match="no NVIDIA GPU is visible"):
        check_engine("ort", "cuda")
    with pytest.raises(CavmaeError, match="unknown device"):
        check_engine("ort", "gpu")
    _machine(monkeypatch, gpus=["NVIDIA H100"])
    with pytest.raises(EngineUnavailableError, match=r"pip install 'cavmae\[gpu\]'"):
        check_engine("ort", "cuda")
    with pytest.raises(EngineUnavailableError, match="there is no GPU 1"):
        check_engine("ort", "cuda:1")
    _machine(monkeypatch, gpus=["NVIDIA H100"], providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert check_engine("ort", "cuda:0") == ("ort", "cuda:0")
    assert check_engine("auto", "auto") == ("ort", "cuda")


# --- outputs checked before the work, file-system errors in one line ---------------------------


def test_unwritable_outputs_fail_first_in_one_line(tmp_path, ckpt):
    (tmp_path / "afile").write_text("a file, not a folder")
    commands = [
        ["bench", "-m", str(ckpt), "--no-baseline", "-o", str(tmp_path / "afile" / "b.json")],
        ["classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "-o", str(tmp_path / "afile" / "r.jsonl")],
        ["evaluate", str(AUDIOSET_CLIP), "-m", str(ckpt), "--predictions", str(tmp_path / "afile" / "p.npz")],
    ]
    for args in commands:
        out = run(*args, tmp=tmp_path)
        assert out.returncode == 2 and out.stdout == "", (args, out.stderr)
        line = one_line(out)
        assert line.startswith("Error: cannot use ") and line.endswith("afile: is a file, not a folder"), line
    assert not (tmp_path / "home" / "exports").exists()  # refused before the first-use export
    assert not (tmp_path / "cavmae-bench").exists()
    out = run("evaluate", str(AUDIOSET_CLIP), "-m", str(ckpt), "--predictions", str(AUDIOSET_CLIP), tmp=tmp_path)
    assert out.returncode == 2 and ".npz" in one_line(out)  # never written over an input


def test_an_export_directory_keeps_its_settings_and_its_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = tmp_path / "m.pth"
    save_checkpoint(CAVMAEFT(TINY), model)
    out = run("export", str(model), "-o", str(tmp_path / "exp"), tmp=tmp_path)
    assert out.returncode == 0, out.stderr
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(tmp_path / "exp"), "--frames", "5", tmp=tmp_path)
    assert out.returncode == 2 and "export for 10 frames per clip, not 5" in one_line(out)
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(tmp_path / "exp"), "--window", "5", "--offset", "3",
              tmp=tmp_path)
    assert out.returncode == 2 and "--offset" in one_line(out)
    torch.manual_seed(2)
    save_checkpoint(CAVMAEFT(TINY), model)  # another model where the export's checkpoint was
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(tmp_path / "exp"), "--engine", "torch", tmp=tmp_path)
    assert out.returncode == 2 and "has changed since" in one_line(out)


@pytest.mark.parametrize("command", [["classify", "x.mp4"], ["export", "x.pth", "-o", "out"], ["bench"], ["serve"]])
def test_frames_are_bounded_for_every_command(tmp_path, command):
    """A mistyped frame count is one line before any work, not an export that exhausts memory."""
    out = run(*command, "--frames", "100000", tmp=tmp_path)
    assert out.returncode == 2 and "--frames" in one_line(out) and "1<=x<=64" in one_line(out)


def test_frames_are_bounded_in_the_library(ckpt, tmp_path):
    from cavmae.export import export_model
    from cavmae.runtime import load

    for bad in (0, 65):
        with pytest.raises(CavmaeError, match="frames per clip must be 1 to 64"):
            load(ckpt, engine="ort", num_frames=bad)
        with pytest.raises(CavmaeError, match="frames per clip must be 1 to 64"):
            export_model(ckpt, tmp_path / "x", num_frames=bad)
    assert not (tmp_path / "x").exists()
