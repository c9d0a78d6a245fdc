"""The real console script, end to end: classify, export, models, download, bench, errors."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cavmae import CAVMAE, CAVMAEFT, TINY, save_checkpoint
from conftest import AUDIOSET_CLIP, AUDIOSET_LABELS, VGGSOUND_CLIP
from media_factory import make_media, make_text_file, make_truncated

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


def run(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "CAVMAE_HOME": str(home), "CAVMAE_NO_PROGRESS": "1", **env}
    environ.pop("CAVMAE_MIRROR", None) if "CAVMAE_MIRROR" not in env else None
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=environ, timeout=600)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    ft = save_checkpoint(CAVMAEFT(TINY.replace(num_classes=527)), tmp / "as-full-51.2.pth")
    pt = save_checkpoint(CAVMAE(TINY), tmp / "pretrain.pth")
    return {"ft": ft, "pt": pt, "dir": tmp}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


def test_classify_default_json_csv(ckpts, home):
    out = run("classify", str(AUDIOSET_CLIP), str(VGGSOUND_CLIP), "-m", str(ckpts["ft"]), "--engine", "ort", home=home)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n  0.") == 10 and str(AUDIOSET_CLIP) in out.stdout
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpts["ft"]), "--json", "-k", "3", "--all-scores", home=home)
    rec = json.loads(out.stdout)
    assert len(rec["top"]) == 3 and len(rec["scores"]) == 527 and rec["start"] == 0.0
    assert rec["top"][0]["score"] == max(rec["scores"])
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpts["ft"]), "--csv", "--mode", "audio", home=home)
    rows = list(csv.DictReader(out.stdout.splitlines()))
    assert len(rows) == 5 and rows[0]["rank"] == "1"


def test_classify_windows(ckpts, home):
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpts["ft"]), "--window", "4", "--hop", "3", "--json", home=home)
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    # 10 s clip, 4 s windows every 3 s: 0, 3, then the last one ends at the end (6)
    assert [r["start"] for r in recs] == [0.0, 3.0, 6.0]
    assert recs[-1]["end"] == pytest.approx(10.0, abs=0.05)


def test_batch_skips_bad_files_keeps_results_and_resumes(ckpts, home, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(AUDIOSET_CLIP, folder / "a.mp4")
    make_truncated(AUDIOSET_CLIP, folder / "broken.mp4")
    make_text_file(folder / "notes.mp4")
    make_media(folder / "silent.mp4", duration=2.0, fps=5, size=(64, 48), with_audio=False)
    results = tmp_path / "results.jsonl"
    out = run("classify", str(folder), "-m", str(ckpts["ft"]), "-o", str(results), home=home)
    assert out.returncode == 2
    assert "broken.mp4" in out.stderr and "notes.mp4" in out.stderr
    # the silent video is classified from its frames (--mode auto), with a note
    assert "note: " in out.stderr and "silent.mp4: no audio stream" in out.stderr
    assert "2 of 4 inputs failed" in out.stderr
    assert "Traceback" not in out.stderr
    done = [json.loads(line)["path"] for line in results.read_text().splitlines()]
    assert done == [str(folder / "a.mp4"), str(folder / "silent.mp4")]
    # re-run: the done file is skipped (nothing new written), the others still reported
    out = run("classify", str(folder / "a.mp4"), "-m", str(ckpts["ft"]), "-o", str(results), "--json", home=home)
    assert out.returncode == 0 and out.stdout == ""
    assert len(results.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["classify", "/no/such/video.mp4"], "no such file or folder"),
        (["classify", str(AUDIOSET_CLIP), "-m", "as-ful-51.2"], "did you mean"),
        (["classify", str(AUDIOSET_CLIP), "-m", "PRETRAIN"], "pre-training model"),
        (["classify", str(AUDIOSET_CLIP), "--engine", "trt", "-m", "FT"], "TensorRT"),
        (["classify", str(AUDIOSET_CLIP), "--json", "--csv", "-m", "FT"], "choose one of --json and --csv"),
        (["export", "FT", "-o", "EXISTING"], "not empty"),
        (["export", "FT", "-o", "NEW", "--int8-min-top5", "3"], "only apply to --precision int8"),
        (["export", "FT", "-o", "NEW", "--mask-ratio", "0.5"], "only apply to pre-training models"),
        (["bench", "--batch", "0"], "positive integers"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(ckpts, home, tmp_path, args, message):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("x")
    subst = {"PRETRAIN": str(ckpts["pt"]), "FT": str(ckpts["ft"]), "EXISTING": str(tmp_path / "existing"),
             "NEW": str(tmp_path / "new")}
    out = run(*[subst.get(a, a) for a in args], home=home)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) <= 3
    assert (tmp_path / "existing" / "keep.txt").exists()


def test_debug_shows_traceback(home):
    out = run("--debug", "classify", "/no/such/video.mp4", home=home)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_export_command_json(ckpts, home, tmp_path):
    out = run("export", str(ckpts["ft"]), "-o", str(tmp_path / "e"), "--frames", "4", "--max-batch", "2", "--json", home=home)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["kind"] == "classifier" and "joint_classifier" in summary["graphs"]
    assert all("rel err" in g["validation"] for g in summary["graphs"].values())
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["preprocess"]["num_frames"] == 4 and manifest["labels"][0] == "Speech"
    # the export directory is a model too
    out = run("classify", str(AUDIOSET_CLIP), "-m", str(tmp_path / "e"), "--json", home=home)
    assert out.returncode == 0, out.stderr


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def serve(tmp_path):
    """Start local HTTP servers on 127.0.0.1 serving a folder; returns a factory of base URLs."""
    servers = []

    def start(root: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def mirror(ckpts, tmp_path, serve):
    """The registry's file names, as a mirror serves them."""
    root = tmp_path / "mirror"
    root.mkdir()
    shutil.copy(ckpts["ft"], root / "as-full-51.2.pth")
    shutil.copy(AUDIOSET_LABELS, root / "class_labels_indices.csv")
    return serve(root)


def test_registry_path_download_then_classify_with_default_model(mirror, tmp_path):
    home = tmp_path / "fresh-home"
    out = run("models", "--json", home=home)
    assert not next(m for m in json.loads(out.stdout)["models"] if m["name"] == "as-full-51.2")["cached"]
    out = run("download", "as-full-51.2", "--mirror", mirror, "--json", home=home)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)[0]
    assert Path(got["path"]).is_file() and Path(got["labels"]).is_file()
    # the main job: no --model, the default model comes from the cache (mirror not needed now)
    out = run("classify", str(AUDIOSET_CLIP), "--engine", "ort", "--json", home=home)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["top"][0]["label"]
    out = run("models", "--json", home=home)
    assert next(m for m in json.loads(out.stdout)["models"] if m["name"] == "as-full-51.2")["cached"]


def test_download_rejects_a_wrong_file(ckpts, serve, tmp_path):
    """A pre-training checkpoint served under the classifier's name is refused and not cached;
    so is a missing file."""
    root = tmp_path / "bad-mirror"
    root.mkdir()
    shutil.copy(ckpts["pt"], root / "as-full-51.2.pth")
    base = serve(root)
    home = tmp_path / "h2"
    out = run("download", "as-full-51.2", "--mirror", base, home=home)
    assert out.returncode == 2 and "pretrain" in out.stderr and "Traceback" not in out.stderr
    assert not (home / "checkpoints" / "as-full-51.2.pth").exists()
    out = run("download", "as-full-51.2", "--mirror", base + "/nowhere", home=home)
    assert out.returncode == 2 and "404" in out.stderr
    assert not (home / "checkpoints" / "as-full-51.2.pth").exists()


def test_download_of_several_tries_each(mirror, tmp_path):
    """A model the mirror lacks is reported; the others are still downloaded; exit 2."""
    home = tmp_path / "h4"
    out = run("download", "vgg-65.5", "as-full-51.2", "--mirror", mirror, "--json", home=home)
    assert out.returncode == 2, out.stderr
    got = {d["name"]: d for d in json.loads(out.stdout)}
    assert "error" in got["vgg-65.5"] and Path(got["as-full-51.2"]["path"]).is_file()
    assert "vgg-65.5" in out.stderr and "1 of 2 downloads failed" in out.stderr


def test_download_replaces_a_damaged_cached_copy(mirror, tmp_path):
    home = tmp_path / "h5"
    assert run("download", "as-full-51.2", "--mirror", mirror, home=home).returncode == 0
    cached = home / "checkpoints" / "as-full-51.2.pth"
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 3])  # damaged after it was downloaded
    out = run("classify", str(AUDIOSET_CLIP), "--json", home=home)
    assert out.returncode == 2 and "cavmae download as-full-51.2" in out.stderr, out.stderr
    out = run("download", "as-full-51.2", "--mirror", mirror, home=home)
    assert out.returncode == 0 and "damaged" in out.stderr, out.stderr
    assert cached.read_bytes() == good


def test_download_sha256_pinning(mirror, ckpts, tmp_path):
    from cavmae.fsio import sha256_file

    home = tmp_path / "h3"
    out = run("download", "as-full-51.2", "--mirror", mirror, "--sha256", "0" * 64, home=home)
    assert out.returncode == 2 and "sha-256" in out.stderr.lower()
    assert not (home / "checkpoints" / "as-full-51.2.pth").exists()
    good = sha256_file(ckpts["ft"])
    out = run("download", "as-full-51.2", "--mirror", mirror, "--sha256", good, home=home)
    assert out.returncode == 0, out.stderr


def test_bench_command_runs_baseline_and_engine(ckpts, home):
    out = run("bench", "-m", str(ckpts["ft"]), "--batch", "1", "--repeat", "1", "--warmup", "0", "--no-stages",
              "--frames", "2", "--json", home=home)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    names = {t["name"] for t in result["timings"]}
    assert {"baseline (reference loop)", "ort classify"} <= names
    assert result["ratios"]["ort/batch1"] > 0
    assert result["machine"]["physical_cores"] >= 1
