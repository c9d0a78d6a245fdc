"""The console script with no network and with the wrong model: what works offline, and what is
refused in one line before anything is downloaded, hashed or exported."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cavmae import CAVMAE, CAVMAEFT, TINY
from conftest import AUDIOSET_CLIP
from reference_format import save_reference_checkpoint

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


def _dead_url() -> str:
    """An address where nothing listens: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    """``cavmae ARGS`` with the cache at ``home`` and no server reachable: the mirror and the
    proxies point at a closed port, so any download fails instead of reaching the internet."""
    dead = _dead_url()
    env = {**os.environ, "CAVMAE_HOME": str(home), "CAVMAE_NO_PROGRESS": "1", "CAVMAE_MIRROR": dead,
           "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    env.pop("CAVMAE_MODEL", None)
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=env, timeout=600)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    return lines[0]


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _tiny(cls: type, **changes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(TINY.replace(**changes)).eval()


@pytest.fixture(scope="module")
def offline_home(tmp_path_factory) -> Path:
    """A cache holding the default model and a VGGSound model, as ``cavmae download`` leaves
    them (reference format: a plain ``module.`` state dict), and no label CSV at all."""
    home = tmp_path_factory.mktemp("offline") / "home"
    ckpts = home / "checkpoints"
    ckpts.mkdir(parents=True)
    save_reference_checkpoint(_tiny(CAVMAEFT, num_classes=527), ckpts / "as-full-51.2.pth")
    save_reference_checkpoint(_tiny(CAVMAEFT, num_classes=309), ckpts / "vgg-65.5.pth")
    return home


def test_cached_default_model_classifies_with_no_network(offline_home: Path) -> None:
    """The AudioSet label CSV ships with the package: nothing is fetched, not even with --labels."""
    out = run("classify", str(AUDIOSET_CLIP), "--engine", "ort", "--json", home=offline_home)
    assert out.returncode == 0, out.stderr
    assert '"label": ' in out.stdout
    assert not (offline_home / "checkpoints" / "audioset_labels.csv").exists()


def test_labels_file_never_downloads(offline_home: Path, tmp_path: Path) -> None:
    """--labels FILE: a model whose label CSV is neither shipped nor cached runs offline."""
    names = tmp_path / "names.csv"
    names.write_text("index,mid,display_name\n" + "".join(f"{i},/m/{i},Sound {i}\n" for i in range(309)))
    out = run("classify", str(AUDIOSET_CLIP), "-m", "vgg-65.5", "--labels", str(names), "--engine", "ort",
              home=offline_home)
    assert out.returncode == 0, out.stderr
    assert "Sound " in out.stdout
    # without --labels the names must come from somewhere: the error says how to get them offline
    line = _one_error_line(run("classify", str(AUDIOSET_CLIP), "-m", "vgg-65.5", "--engine", "ort",
                               home=offline_home))
    assert "class_labels_indices_vgg.csv" in line and "--mirror" in line and "-m FILE.pth" in line


def test_uncached_model_offline_says_what_works(tmp_path: Path) -> None:
    line = _one_error_line(run("classify", str(AUDIOSET_CLIP), "-m", "as-20k-42.0", home=tmp_path / "h"))
    assert "as-20k-42.0.pth" in line and "-m FILE.pth" in line and "--mirror" in line
    assert "Traceback" not in line


@pytest.fixture(scope="module")
def wrong_kinds(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("kinds")
    return {
        "pretrain": save_reference_checkpoint(_tiny(CAVMAE), tmp / "pretrain.pth"),
        "classifier": save_reference_checkpoint(_tiny(CAVMAEFT), tmp / "classifier.pth"),
    }


@pytest.mark.parametrize(
    "command, model, message",
    [
        ("classify", "pretrain", "is a pre-training model without a classification head"),
        ("classify", "cav-mae-scale++", "is a pre-training model without a classification head"),
        ("reconstruct", "classifier", "is a fine-tuned classifier without the decoder"),
    ],
)
def test_wrong_model_kind_is_refused_before_any_work(
    wrong_kinds: dict[str, Path], tmp_path: Path, command: str, model: str, message: str
) -> None:
    """Read from the registry entry or the state dict's keys: no download, no hash, no export;
    the cache stays empty."""
    home = tmp_path / "home"
    ref = str(wrong_kinds.get(model, model))
    extra = ["-o", str(tmp_path / "r.png")] if command == "reconstruct" else []
    line = _one_error_line(run(command, str(AUDIOSET_CLIP), "-m", ref, "--engine", "ort", *extra, home=home))
    assert message in line and "see `cavmae models`" in line
    assert _files_under(home) == []


@pytest.mark.parametrize("content", ["cut", "text", "empty"])
def test_unreadable_checkpoint_is_one_line(wrong_kinds: dict[str, Path], tmp_path: Path, content: str) -> None:
    whole = wrong_kinds["classifier"].read_bytes()
    data = {"cut": whole[: len(whole) // 3], "text": b"not a checkpoint\n", "empty": b""}[content]
    bad = tmp_path / "model.pth"
    bad.write_bytes(data)
    home = tmp_path / "home"
    line = _one_error_line(run("classify", str(AUDIOSET_CLIP), "-m", str(bad), home=home))
    assert line == f"Error: not a PyTorch checkpoint, or truncated ({len(data)} bytes): {bad}"
    assert _files_under(home) == []


def test_readme_python_snippet_runs_as_written(offline_home: Path) -> None:
    """The README's Python block, executed verbatim from the repository root with the default
    model in the cache and no network."""
    import re

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Python API.*?```python\n(.+?)```", readme, re.S)
    assert block, "README.md has no Python API snippet"
    dead = _dead_url()
    env = {**os.environ, "CAVMAE_HOME": str(offline_home), "CAVMAE_NO_PROGRESS": "1",
           "CAVMAE_MIRROR": dead, "http_proxy": dead, "https_proxy": dead}
    code = block.group(1) + "\nassert logits.shape == (1, 527), logits.shape\nprint('snippet ok')\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "snippet ok" in out.stdout
