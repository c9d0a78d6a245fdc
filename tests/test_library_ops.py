"""The public operations callers use: ``Pipeline.load_clip``/``classify_file``, the loader's
``ModelSource.load_model`` and ``model_labels`` (the labels of one load looked up once)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from cavmae import CAVMAEFT, TINY
from cavmae.errors import CavmaeError
from cavmae.export import export_model
from cavmae.hub import registry
from cavmae.media import load_clip
from cavmae.runtime import load
from cavmae.runtime import loader as loader_mod
from conftest import AUDIOSET_CLIP, REPO
from reference_format import save_reference_checkpoint

FRAMES = 5


@pytest.fixture(scope="module")
def five_frames(tmp_path_factory) -> Path:
    """A tiny classifier exported to aggregate 5 frames per clip."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ops") / "export"
    export_model(CAVMAEFT(TINY).eval(), out, num_frames=FRAMES, max_batch=1, validate=False)
    return out


def test_pipeline_load_clip_uses_the_exports_settings(five_frames: Path) -> None:
    pipe = load(five_frames, engine="ort", device="cpu")
    clip = pipe.load_clip(AUDIOSET_CLIP)
    assert clip.frames is not None and clip.frames.shape == (FRAMES, 3, 224, 224)
    assert clip.audio is not None and clip.audio.shape == (1024, 128)
    audio_only = pipe.load_clip(AUDIOSET_CLIP, offset=1.0, duration=4.0, need_video=False)
    assert audio_only.frames is None and audio_only.offset == 1.0
    # the media function reads the frames from the preprocessing it is given
    assert load_clip(AUDIOSET_CLIP, config=pipe.manifest.preprocess).frames.shape[0] == FRAMES


def test_classify_file_takes_mode_offset_and_window(five_frames: Path) -> None:
    pipe = load(five_frames, engine="ort", device="cpu")
    pred = pipe.classify_file(AUDIOSET_CLIP, "audio", offset=2.0, duration=5.0)
    assert (pred.mode, pred.offset, pred.end, pred.path) == ("audio", 2.0, 7.0, str(AUDIOSET_CLIP))
    clip = load_clip(AUDIOSET_CLIP, offset=2.0, duration=5.0, need_video=False)
    np.testing.assert_allclose(pred.probs, pipe.classify(clip.audio, None, "audio"), rtol=1e-5, atol=1e-6)
    whole = pipe.classify_file(AUDIOSET_CLIP)  # av, the model's 10 s span, ends at the file's end
    assert whole.mode == "av" and whole.end == pytest.approx(min(10.0, clip.duration))


def _calls(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {f"{node.module}:{a.name}" for a in node.names}
    return names


def test_callers_use_the_public_operations() -> None:
    """The CLI decodes through the pipeline, and nothing imports the loader's private names."""
    found = []
    for d in ("cli", "runtime", "export", "benchmarks"):
        for path in (REPO / d).rglob("*.py"):
            for name in _calls(ast.parse(path.read_text(encoding="utf-8"))):
                module, _, item = name.partition(":")
                private_loader = module.endswith("loader") and item.startswith("_")
                media_clip = d == "cli" and item == "load_clip"
                if private_loader or media_clip:
                    found.append(f"{path.relative_to(REPO)}: {name}")
    assert not found, found


def test_load_model_needs_a_checkpoint(five_frames: Path) -> None:
    source = loader_mod.resolve_model(five_frames)
    with pytest.raises(CavmaeError, match="needs the checkpoint"):
        source.load_model()


@pytest.fixture
def label_lookups(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """A cached registry checkpoint (vgg-65.5, 309 classes) and a record of every label lookup:
    registry fetches or local look-ups, and label CSVs read."""
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    save_reference_checkpoint(CAVMAEFT(TINY.replace(num_classes=309)).eval(),
                              home / "checkpoints" / "vgg-65.5.pth")
    monkeypatch.setenv("CAVMAE_HOME", str(home))
    csv = tmp_path / "vgg.csv"
    csv.write_text("index,mid,display_name\n" + "".join(f"{i},/m/{i},Sound {i}\n" for i in range(309)))
    calls: list[str] = []

    def spy(name, real):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(registry, "ensure_labels", spy("ensure", lambda *a, **k: csv))
    monkeypatch.setattr(registry, "local_labels", spy("local", lambda *a, **k: csv))
    import cavmae.export.onnx_export as onnx_export

    for module in (loader_mod, onnx_export):
        monkeypatch.setattr(module, "read_label_csv", spy("read", module.read_label_csv))
    return calls


def test_one_load_looks_up_the_labels_once(label_lookups: list[str]) -> None:
    pipe = load("vgg-65.5", engine="ort", device="cpu", max_batch=1)  # exports it into the cache
    assert label_lookups == ["ensure", "read"]
    assert pipe.labels is not None and pipe.labels[3] == "Sound 3"
    label_lookups.clear()
    again = load("vgg-65.5", engine="ort", device="cpu", max_batch=1)  # the export has the names
    assert label_lookups == [] and again.labels == pipe.labels


def test_a_users_labels_are_the_only_lookup(label_lookups: list[str], tmp_path: Path) -> None:
    mine = tmp_path / "mine.csv"
    mine.write_text("index,mid,display_name\n" + "".join(f"{i},/x/{i},Mine {i}\n" for i in range(309)))
    pipe = load("vgg-65.5", engine="ort", device="cpu", max_batch=1, labels=mine)
    assert label_lookups == ["read"]
    assert pipe.labels is not None and pipe.labels[0] == "Mine 0"
    label_lookups.clear()
    # the cached export never took the user's names: without --labels the registry's apply
    assert load("vgg-65.5", engine="ort", device="cpu", max_batch=1).labels[0] == "Sound 0"
    assert label_lookups == ["ensure", "read"]
