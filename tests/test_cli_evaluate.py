"""``cavmae evaluate`` through the real console script (subprocess), on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_evaluation import (
    CLIP_LABELS,
    build_reference_dataset,
    make_classifier_checkpoint,
    multi_hot,
    reference_inputs,
    write_label_csv,
)

from cavmae.media import load_clip
from cavmae.metrics import mean_average_precision, retrieval_metrics
from media_factory import make_media, make_text_file

SCRIPT = Path(sys.executable).with_name("cavmae")


def _command() -> list[str]:
    exe = SCRIPT if SCRIPT.is_file() else shutil.which("cavmae")
    return [str(exe)] if exe else [sys.executable, "-m", "cavmae.cli.main"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_eval")
    home = tmp / "home"
    e = {**os.environ, "CAVMAE_NO_PROGRESS": "1", "CAVMAE_HOME": str(home)}
    e.pop("CAVMAE_MODEL", None)
    return {
        "tmp": tmp,
        "home": home,
        "env": e,
        "ckpt": make_classifier_checkpoint(tmp / "ft.pth"),
        "labels": write_label_csv(tmp / "my.csv"),
        "json": build_reference_dataset(tmp / "ds"),
    }


def run(env, *args: str) -> subprocess.CompletedProcess:
    cmd = [*_command(), "evaluate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env["env"], timeout=600)


def model_args(env) -> list[str]:
    return [
        "--model",
        str(env["ckpt"]),
        "--engine",
        "ort",
        "--device",
        "cpu",
        "--labels",
        str(env["labels"]),
    ]


@pytest.fixture(scope="module")
def pipe(env):
    """The same checkpoint through the library, sharing the CLI's export cache."""
    from cavmae.runtime import load

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAVMAE_HOME", str(env["home"]))
        yield load(env["ckpt"], engine="ort", device="cpu")


def test_help_shows_examples(env):
    out = run(env, "--help")
    assert out.returncode == 0
    assert "Examples:" in out.stdout and "cavmae evaluate eval.json" in out.stdout
    assert "--labels-file" in out.stdout and "--json" in out.stdout


def test_reference_json_metrics_match_library(env, pipe, tmp_path):
    pred = tmp_path / "pred.npz"
    out = run(
        env,
        str(env["json"]),
        *model_args(env),
        "--json",
        "--batch-size",
        "2",
        "--predictions",
        str(pred),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["num_items"] == report["num_evaluated"] == len(CLIP_LABELS)
    assert report["num_failed"] == 0 and report["failed"] == []
    assert report["task"] == "multi-label" and report["mode"] == "av"
    audio, frames = reference_inputs(env["json"])
    targets = multi_hot(list(CLIP_LABELS.values()))
    probs = pipe.classify_batch(audio, frames, "av")
    want = mean_average_precision(probs, targets).map
    assert report["classification"]["mAP"] == pytest.approx(want, abs=1e-6)
    ea = pipe.embed_audio(audio).astype(np.float64)
    ev = pipe.embed_frames(frames, "middle").astype(np.float64)
    sim = ea @ ev.T
    for key, s in (("audio_to_visual", sim), ("visual_to_audio", sim.T)):
        assert report["retrieval"][key] == pytest.approx(retrieval_metrics(s))
    with np.load(pred) as z:
        np.testing.assert_allclose(z["scores"], probs, atol=1e-5)
        assert list(z["ids"]) == list(CLIP_LABELS)


def test_bad_item_is_skipped_and_exit_code_is_2(env, tmp_path):
    root = env["json"].parent
    entries = json.loads(env["json"].read_text())["data"]
    for e in entries:
        e["wav"] = str(root / e["wav"])
        e["video_path"] = str(root / e["video_path"])
    entries.insert(
        1,
        {
            "video_id": "ghost",
            "wav": str(tmp_path / "ghost.wav"),
            "video_path": str(root / "frames"),
            "labels": "/m/dog",
        },
    )
    data = tmp_path / "with_bad.json"
    data.write_text(json.dumps({"data": entries}))
    out = run(env, str(data), *model_args(env), "--json")
    assert out.returncode == 2, out.stderr
    report = json.loads(out.stdout)
    assert report["num_failed"] == 1 and report["num_evaluated"] == len(CLIP_LABELS)
    assert report["failed"][0]["id"] == "ghost" and "ghost.wav" in report["failed"][0]["error"]
    assert report["classification"]["mAP"] is not None
    assert "ghost.wav" in out.stderr  # reported as it happens
    # text output says it too
    text = run(env, str(data), *model_args(env), "--no-retrieval")
    assert text.returncode == 2
    assert "mAP" in text.stdout and "1 failed" in text.stdout


def test_video_folder_with_labels_file(env, pipe, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    paths = [
        make_media(folder / f"v{k}.mp4", duration=1.0, fps=10, tones=(300.0 + 200 * k,))
        for k in range(3)
    ]
    labels_file = folder / "labels.csv"
    labels_file.write_text('v0.mp4,Dog;Music\nv1,"Male speech, man speaking"\nv2,/m/cat\n')
    out = run(env, str(folder), "--labels-file", str(labels_file), *model_args(env), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["dataset_kind"] == "videos" and report["num_evaluated"] == 3
    clips = [load_clip(p) for p in paths]
    probs = pipe.classify_batch(
        np.stack([c.audio for c in clips]), np.stack([c.frames for c in clips])
    )
    targets = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]])
    assert report["classification"]["mAP"] == pytest.approx(
        mean_average_precision(probs, targets).map, abs=1e-6
    )

    # a corrupt video in the batch: skipped, reported, exit 1
    make_text_file(folder / "zz_corrupt.mp4")
    labels_file.write_text(labels_file.read_text() + "zz_corrupt.mp4,Dog\n")
    out = run(env, str(folder), "--labels-file", str(labels_file), *model_args(env), "--json")
    assert out.returncode == 2
    report = json.loads(out.stdout)
    assert [f["id"] for f in report["failed"]] == ["zz_corrupt"] and report["num_evaluated"] == 3


def test_user_mistakes_exit_2_with_one_line(env, tmp_path):
    out = run(env, str(tmp_path / "missing.json"), *model_args(env))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "missing.json" in out.stderr
    three = tmp_path / "three.csv"
    three.write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n2,/m/c,C\n")
    args = model_args(env)
    args[args.index("--labels") + 1] = str(three)
    out = run(env, str(env["json"]), *args)
    assert out.returncode == 2 and "3 classes but the model has 4" in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_empty_label_strings_turn_classification_off(env, tmp_path):
    """Every entry ``"labels": ""``: the note of an unlabelled dataset, no mAP line of 0 classes."""
    root = env["json"].parent
    entries = json.loads(env["json"].read_text())["data"]
    for e in entries:
        e["wav"], e["video_path"], e["labels"] = str(root / e["wav"]), str(root / e["video_path"]), ""
    data = tmp_path / "empty-labels.json"
    data.write_text(json.dumps({"data": entries}))
    out = run(env, str(data), *model_args(env))
    assert out.returncode == 0, out.stderr
    assert "classification off: the dataset has no labels" in out.stderr + out.stdout
    assert "mAP" not in out.stdout and "classes have positives" not in out.stdout
