"""``cavmae classify`` over many inputs decodes the next clips on threads while the model runs:
the same probabilities as clip-after-clip ``Pipeline.classify_file``, in input order, a bad file
reported at its turn, clips already done never decoded, at most ``workers + 1`` clips in flight;
the console script's output does not depend on ``--workers``; the folder benchmark runs tiny."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cavmae.errors import MediaError
from cavmae.runtime.classify_records import classify_files
from conftest import AUDIOSET_CLIP, REPO, VGGSOUND_CLIP
from media_factory import make_truncated

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny random-weight AudioSet classifier exported to ONNX."""
    import torch

    from cavmae import CAVMAEFT, TINY
    from cavmae.export import export_model

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("classify-prefetch")
    return export_model(CAVMAEFT(TINY.replace(num_classes=527)), tmp / "export", num_frames=10,
                        max_batch=1, validate=False).out_dir


@pytest.fixture(scope="module")
def pipe(export):
    from cavmae.runtime import load

    p = load(export, engine="ort", device="cpu")
    yield p
    p.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> list[Path]:
    """The two sample clips with a truncated file between them."""
    tmp = tmp_path_factory.mktemp("inputs")
    a, c = tmp / "a.mp4", tmp / "c.mp4"
    shutil.copyfile(AUDIOSET_CLIP, a)
    shutil.copyfile(VGGSOUND_CLIP, c)
    return [a, make_truncated(AUDIOSET_CLIP, tmp / "b.mp4"), c]


@pytest.mark.parametrize("workers", [2, 0])
def test_same_probabilities_as_classify_file_in_input_order(pipe, folder, workers):
    outcomes = list(classify_files(pipe, folder, mode="auto", workers=workers))
    assert [o.job.path for o in outcomes] == folder
    assert all(o.last for o in outcomes)
    bad = outcomes[1]
    assert isinstance(bad.error, MediaError) and bad.prediction is None and "b.mp4" in str(bad.error)
    for o in (outcomes[0], outcomes[2]):
        assert o.error is None and o.prediction is not None
        ref = pipe.classify_file(o.job.path, "av")
        np.testing.assert_allclose(o.prediction.probs, ref.probs, rtol=0, atol=1e-6)
        got = o.prediction
        assert (got.path, got.mode, got.offset, got.labels) == (ref.path, ref.mode, ref.offset, ref.labels)
        assert got.end == pytest.approx(ref.end, abs=1e-9)


def test_windows_match_classify_file_window_by_window(pipe):
    outcomes = list(classify_files(pipe, [AUDIOSET_CLIP], mode="audio", window=4.0, hop=3.0))
    assert [o.job.start for o in outcomes] == [0.0, 3.0, 6.0]
    assert [o.last for o in outcomes] == [False, False, True]
    for o in outcomes:
        ref = pipe.classify_file(AUDIOSET_CLIP, "audio", offset=o.job.start, duration=4.0)
        np.testing.assert_allclose(o.prediction.probs, ref.probs, rtol=0, atol=1e-6)
        assert o.prediction.end == pytest.approx(ref.end, abs=1e-9) and o.prediction.mode == "audio"


def _spy_decoding(monkeypatch, pipe, fail=None):
    """Record (thread name, path, offset) of every decode; ``fail(path, offset)`` may raise."""
    calls: list[tuple[str, str, float]] = []
    real = pipe.load_clip

    def load_clip(path, **kw):
        calls.append((threading.current_thread().name, Path(path).name, kw.get("offset", 0.0)))
        if fail is not None:
            fail(Path(path), kw.get("offset", 0.0))
        return real(path, **kw)

    monkeypatch.setattr(pipe, "load_clip", load_clip)
    return calls


def test_done_clips_are_never_decoded(pipe, folder, monkeypatch):
    calls = _spy_decoding(monkeypatch, pipe)
    done = {(str(folder[0]), 0.0)}
    outcomes = list(classify_files(pipe, [folder[0], folder[2]], mode="auto",
                                   is_done=lambda key: (str(key["path"]), key["start"]) in done))
    first, second = outcomes
    assert first.prediction is None and first.error is None and first.last
    assert second.prediction is not None
    assert [name for _, name, _ in calls] == ["c.mp4"]
    # decoding ran on the prefetch threads, not in the caller's (the model's) thread
    assert all(thread.startswith("cavmae-classify") for thread, _, _ in calls)


def test_a_window_failing_ends_its_file_and_the_next_goes_on(pipe, monkeypatch):
    def fail(path, offset):
        if path == AUDIOSET_CLIP and offset == 3.0:
            raise MediaError(f"{path}: broken at 3 s")

    _spy_decoding(monkeypatch, pipe, fail)
    outcomes = list(classify_files(pipe, [AUDIOSET_CLIP, VGGSOUND_CLIP], mode="audio", window=4.0, hop=3.0))
    got = [(o.job.path.name, o.job.start, o.error is not None, o.last) for o in outcomes]
    assert got == [(AUDIOSET_CLIP.name, 0.0, False, False), (AUDIOSET_CLIP.name, 3.0, True, True),
                   (VGGSOUND_CLIP.name, 0.0, False, False), (VGGSOUND_CLIP.name, 3.0, False, False),
                   (VGGSOUND_CLIP.name, 6.0, False, True)]


def test_other_errors_propagate_at_their_turn(pipe, monkeypatch):
    def fail(path, offset):
        if path == VGGSOUND_CLIP:
            raise RuntimeError("a bug")

    _spy_decoding(monkeypatch, pipe, fail)
    outcomes = classify_files(pipe, [AUDIOSET_CLIP, VGGSOUND_CLIP, AUDIOSET_CLIP], mode="av")
    assert next(outcomes).prediction is not None  # the file before the bug is delivered first
    with pytest.raises(RuntimeError, match="a bug"):
        next(outcomes)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_at_most_workers_plus_one_clips_in_flight(pipe, tmp_path, workers):
    files = []
    for i in range(7):
        files.append(tmp_path / f"{i}.mp4")
        shutil.copyfile(AUDIOSET_CLIP, files[-1])
    taken = [0]

    def counted():
        for f in files:
            taken[0] += 1
            yield f

    most = 0
    for n, outcome in enumerate(classify_files(pipe, counted(), mode="audio", workers=workers)):
        assert outcome.prediction is not None
        most = max(most, taken[0] - n)  # taken from the inputs and not handed back yet
    assert most == workers + 1


def _run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAVMAE_HOME": str(home), "CAVMAE_NO_PROGRESS": "1"}
    env.pop("CAVMAE_MIRROR", None)
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=env, timeout=600)


def test_console_output_does_not_depend_on_workers(export, folder, tmp_path):
    runs = {w: _run("classify", *map(str, folder), "-m", str(export), "--json", "--all-scores",
                    "--workers", w, home=tmp_path / "home") for w in ("0", "2")}
    for out in runs.values():
        assert out.returncode == 2, out.stderr
        lines = out.stderr.splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"warning: skipped {folder[1]}: "), out.stderr
        assert lines[1] == "1 of 3 inputs failed; the others were classified"
    inline, ahead = ([json.loads(line) for line in runs[w].stdout.splitlines()] for w in ("0", "2"))
    assert [r["path"] for r in ahead] == [str(folder[0]), str(folder[2])]
    assert runs["0"].stderr == runs["2"].stderr
    for a, b in zip(inline, ahead, strict=True):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=0, atol=1e-6)


def test_one_bad_input_is_one_error_line(export, folder, tmp_path):
    out = _run("classify", str(folder[1]), "-m", str(export), home=tmp_path / "home")
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "b.mp4" in lines[0], out.stderr


def test_folder_benchmark_runs_tiny(tmp_path, monkeypatch):
    """The benchmark's own code path on the tiny model: figures present, no timing asserted."""
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    spec = importlib.util.spec_from_file_location("folder_throughput", REPO / "benchmarks" / "folder_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    module.main(["--tiny", "--clips", "4", "--rounds", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    result = json.loads(out.read_text())["precisions"]["fp32"]
    assert set(result["clips_per_s"]) == {"sequential", "overlapped", "model", "decode"}
    assert all(v > 0 for v in result["clips_per_s"].values())
    assert result["clips_in_flight"] == 3
    assert [r["clips"] for r in result["runs"]["overlapped"]] == [4]
    assert result["overlapped_vs_model_rate"] > 0
