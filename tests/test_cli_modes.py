"""Modes through the real console script: ``--mode auto`` per file, hints that name real flags,
one input failing, and the window tiling of ``classify --window``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cavmae import CAVMAEFT, TINY
from cavmae.modes import AUTO, CLI_MODES
from conftest import AUDIOSET_CLIP
from media_factory import make_media

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAVMAE_HOME": str(home), "CAVMAE_NO_PROGRESS": "1"}
    env.pop("CAVMAE_MIRROR", None)
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two tiny exports (audio-visual, audio-only) and odd media: no audio, no video, .wav,
    .mp3, an image, a 30.02 s clip."""
    from cavmae.export import export_model

    tmp = tmp_path_factory.mktemp("cli-modes")
    torch.manual_seed(0)
    cfg = TINY.replace(num_classes=527)
    models = {}
    for finetune in ("multimodal", "audioonly"):
        models[finetune] = export_model(CAVMAEFT(cfg), tmp / finetune, finetune_mode=finetune, num_frames=10,
                                        max_batch=1, validate=False).out_dir
    media = tmp / "media"
    media.mkdir()
    files = {
        "silent": make_media(media / "silent.mp4", duration=2.0, fps=5, with_audio=False),
        "podcast": make_media(media / "podcast.mp4", duration=2.0, with_video=False),
        "wav": make_media(media / "tone.wav", duration=2.0, with_video=False, audio_codec="pcm_s16le"),
        "mp3": make_media(media / "tone.mp3", duration=2.0, with_video=False, audio_codec="libmp3lame"),
        "long": make_media(media / "long.mp4", duration=30.02, fps=5, size=(32, 32)),
    }
    files["image"] = media / "still.png"
    cv2.imwrite(str(files["image"]), np.full((48, 64, 3), 120, np.uint8))
    return {"models": models, "files": files, "home": tmp / "home", "tmp": tmp}


def _flags_are_valid(stderr: str) -> None:
    """Every ``--mode X`` a message suggests is a value ``classify --mode`` accepts."""
    for value in re.findall(r"--mode (\w+)", stderr):
        assert value in (AUTO, *CLI_MODES), stderr


def test_auto_classifies_each_file_with_the_streams_it_has(env):
    f = env["files"]
    inputs = [AUDIOSET_CLIP, f["silent"], f["podcast"], f["wav"], f["mp3"], f["image"]]
    out = run("classify", *map(str, inputs), "-m", str(env["models"]["multimodal"]), "--json",
              home=env["home"])
    assert out.returncode == 0, out.stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, out.stdout.splitlines())}
    assert len(records) == len(inputs)
    expected = {AUDIOSET_CLIP.name: "av", "silent.mp4": "visual", "podcast.mp4": "audio",
                "tone.wav": "audio", "tone.mp3": "audio", "still.png": "visual"}
    assert {name: r["mode"] for name, r in records.items()} == expected
    notes = [line for line in out.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 5, out.stderr  # one line per file that lacks a stream, none for the full clip
    assert any("silent.mp4: no audio stream; classified with visual only" in n for n in notes)
    assert any("tone.wav: no video stream; classified with audio only" in n for n in notes)
    assert "failed" not in out.stderr
    _flags_are_valid(out.stderr)


def test_one_input_failing_is_one_error_line(env):
    # an audio-only model cannot classify a silent video: say so, naming what would work
    out = run("classify", str(env["files"]["silent"]), "-m", str(env["models"]["audioonly"]),
              home=env["home"])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("Error: ") and "silent.mp4: has no audio stream" in lines[0]
    assert "-m" in lines[0] and "inputs failed" not in out.stderr
    _flags_are_valid(out.stderr)


@pytest.mark.parametrize(
    ("file", "mode", "hint"),
    [("silent", "audio", "--mode visual"), ("podcast", "av", "--mode audio"), ("image", "av", "--mode visual")],
)
def test_missing_stream_hint_names_a_valid_mode(env, file, mode, hint):
    out = run("classify", str(env["files"][file]), "-m", str(env["models"]["multimodal"]), "--mode", mode,
              home=env["home"])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and hint in out.stderr, out.stderr
    assert "--mode video" not in out.stderr
    _flags_are_valid(out.stderr)


def test_search_hints_name_search_flags(env):
    index = env["tmp"] / "index"
    out = run("embed", str(AUDIOSET_CLIP), "-o", str(index), "-m", str(env["models"]["multimodal"]),
              home=env["home"])
    assert out.returncode == 0, out.stderr
    silent = str(env["files"]["silent"])
    out = run("search", str(index), "--audio", silent, home=env["home"])
    assert out.returncode == 2 and "--mode" not in out.stderr
    assert "has no audio stream" in out.stderr and "--video" in out.stderr, out.stderr
    out = run("search", str(index), "--video", silent, "--modality", "audio", home=env["home"])
    assert out.returncode == 2 and "--mode" not in out.stderr
    assert "--modality visual" in out.stderr, out.stderr


def test_windows_tile_without_a_near_duplicate_at_the_end(env):
    out = run("classify", str(env["files"]["long"]), "-m", str(env["models"]["multimodal"]), "--window", "10",
              "--hop", "5", "--json", home=env["home"])
    assert out.returncode == 0, out.stderr
    starts = [json.loads(line)["start"] for line in out.stdout.splitlines()]
    assert starts == [0, 5, 10, 15, 20]  # 30.02 s: no extra window at 20.02
    help_text = " ".join(run("classify", "--help", home=env["home"]).stdout.split())  # click rewraps
    assert "longer than" in help_text and "H/2" in help_text and "0, 5, 10, 15, 20" in help_text
