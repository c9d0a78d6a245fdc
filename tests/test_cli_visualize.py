"""``cavmae reconstruct`` / ``cavmae localize`` through the real console script, tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cavmae import CAVMAE, CAVMAEFT, TINY, save_checkpoint
from conftest import AUDIOSET_CLIP
from media_factory import make_media

CAVMAE_BIN = shutil.which("cavmae", path=str(Path(sys.executable).parent)) or "cavmae"
ORT = ["--engine", "ort", "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny checkpoints and a private cache shared by the module's runs (exports are cached)."""
    if not AUDIOSET_CLIP.is_file():
        pytest.skip(f"sample media not found: {AUDIOSET_CLIP}")
    tmp = tmp_path_factory.mktemp("viz")
    torch.manual_seed(0)
    pretrain = save_checkpoint(CAVMAE(TINY).eval(), tmp / "pretrain.pth")
    torch.manual_seed(0)
    classifier = save_checkpoint(CAVMAEFT(TINY).eval(), tmp / "classifier.pth")
    environ = {**os.environ, "CAVMAE_HOME": str(tmp / "home"), "CAVMAE_NO_PROGRESS": "1"}
    environ.pop("CAVMAE_MODEL", None)
    return {"tmp": tmp, "pretrain": str(pretrain), "classifier": str(classifier), "environ": environ}


def run(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CAVMAE_BIN, *args], env=env["environ"], capture_output=True, text=True, timeout=300)


def _png_shape(path: Path) -> tuple[int, ...]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"{path} is not a readable PNG"
    return image.shape


def test_reconstruct_json_and_png(env):
    out = env["tmp"] / "rec" / "figure.png"
    r = run(env, "reconstruct", str(AUDIOSET_CLIP), "-o", str(out), "-m", env["pretrain"], *ORT,
            "--mask-ratio", "0.75", "--mask-mode", "time", "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["output"] == str(out) and out.is_file()
    assert _png_shape(out) == (rec["height"], rec["width"], 3) == (1340, 1164, 3)
    assert rec["mask_ratio_a"] == rec["mask_ratio_v"] == 0.75 and rec["mask_mode"] == "time"
    assert rec["seed"] == 3 and rec["frame"] == 5 and 4.0 < rec["frame_time"] < 6.0
    assert rec["removed_a"] == 384 and rec["tokens_a"] == 512  # 48 of 64 time columns x 8 rows
    assert rec["removed_v"] == 147 and rec["tokens_v"] == 196
    assert np.isfinite(rec["mse_a"]) and np.isfinite(rec["mse_v"]) and rec["mse_a"] > 0


def test_reconstruct_plain_output_with_defaults(env):
    out = env["tmp"] / "rec_default.png"
    r = run(env, "reconstruct", str(AUDIOSET_CLIP), "-o", str(out), "-m", env["pretrain"], *ORT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: audio MSE") and "0.75/0.75" in r.stdout
    assert _png_shape(out) == (1340, 1164, 3)


def test_localize_json_and_png(env):
    out = env["tmp"] / "loc.png"
    r = run(env, "localize", str(AUDIOSET_CLIP), "-o", str(out), "-m", env["classifier"], *ORT,
            "--frame", "2", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["frame"] == 2 and rec["output"] == str(out)
    assert _png_shape(out) == (rec["height"], rec["width"], 3) == (564, 1000, 3)
    heat = np.array(rec["map"])
    stats = rec["heatmap"]
    assert heat.shape == (14, 14) and stats["grid"] == [14, 14]
    assert -1 <= stats["min"] <= stats["mean"] <= stats["max"] <= 1
    assert heat[tuple(stats["peak"])] == pytest.approx(stats["max"], abs=1e-5)
    assert "fine-tuned classifier" in r.stderr  # a classifier works, with a note


def test_wrong_model_kind_is_a_one_line_error(env):
    out = env["tmp"] / "never.png"
    for model in (env["classifier"], "as-full-51.2"):  # a file, and a registry name (not downloaded)
        r = run(env, "reconstruct", str(AUDIOSET_CLIP), "-o", str(out), "-m", model, *ORT)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:")
        assert "pre-training model" in lines[0] and "cav-mae-base-nonorm" in lines[0]
    assert not out.exists()
    assert not (Path(env["environ"]["CAVMAE_HOME"]) / "checkpoints" / "as-full-51.2.pth").exists()


@pytest.mark.parametrize("command", ["reconstruct", "localize"])
def test_user_mistakes_exit_2_with_one_line(env, command):
    silent = make_media(env["tmp"] / f"silent_{command}.mp4", with_audio=False)
    cases = [
        ([str(env["tmp"] / "missing.mp4"), "-o", str(env["tmp"] / "x.png")], "no such file"),
        ([str(silent), "-o", str(env["tmp"] / "x.png")], "no audio stream"),
        ([str(AUDIOSET_CLIP), "-o", str(env["tmp"] / "x.jpg")], ".png"),
    ]
    for args, text in cases:
        r = run(env, command, *args, "-m", env["pretrain"], *ORT)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], r.stderr


def test_mask_ratio_that_keeps_no_token_is_one_line(env):
    out = env["tmp"] / "none-kept.png"
    for ratio, tokens in (("0.999", "512 audio tokens"), ("0.995", "196 visual tokens")):
        r = run(env, "reconstruct", str(AUDIOSET_CLIP), "-o", str(out), "-m", env["pretrain"], *ORT,
                "--mask-ratio", ratio)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: mask ratio {ratio} keeps none of the {tokens}")
        assert "largest ratio that keeps a token of both modalities is 0.9948" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("command", ["reconstruct", "localize"])
def test_help_has_an_example(env, command):
    r = run(env, command, "--help")
    assert r.returncode == 0
    assert "Examples:" in r.stdout and f"cavmae {command} video.mp4 -o" in r.stdout
    assert "--json" in r.stdout


def test_reconstruct_draws_non_ascii_names_and_marks_the_padding(env):
    """A file name in any script is drawn as such (not as '?'); the spectrograms carry a white
    line where the clip's audio ends and the zero padding begins."""
    figures = {}
    for name in ("Café_Привет.mp4", "Caf?_??????.mp4"):
        clip = env["tmp"] / name
        shutil.copyfile(AUDIOSET_CLIP, clip)
        out = env["tmp"] / f"named_{len(figures)}.png"
        r = run(env, "reconstruct", str(clip), "-o", str(out), "-m", env["pretrain"], *ORT, "--json")
        assert r.returncode == 0, r.stderr
        figures[name] = (cv2.imread(str(out)), json.loads(r.stdout))
    (named, rec), (asked, _) = figures["Café_Привет.mp4"], figures["Caf?_??????.mp4"]
    assert not np.array_equal(named[:40], asked[:40])  # the titles differ
    np.testing.assert_array_equal(named[40:], asked[40:])  # and nothing else
    # the 10 s sample clip fills fewer than the 1024 rows (10.255 s): the padded rows are the
    # ones that hold the normalized zero of every bin
    from cavmae.config import DEFAULT_PREPROCESS as P
    from cavmae.media import load_clip

    spec = load_clip(AUDIOSET_CLIP, need_video=False).audio
    padded = np.all(np.isclose(spec, -P.fbank_mean / P.fbank_std), axis=1)
    assert 990 < rec["audio_frames"] < 1024
    assert not padded[: rec["audio_frames"]].any() and padded[rec["audio_frames"] :].all()
    top = 62 + 24 + 1
    column = named[top : top + 256, 64 + rec["audio_frames"]]
    assert np.all(column == 255)
    assert not np.all(named[top : top + 256, 64 + rec["audio_frames"] - 1] == 255)
