"""The export cache reuses graphs: exports of one checkpoint share the graphs they have in
common (hard links), trace only what differs, and add a graph the first time it is run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import cavmae.export.onnx_export as onnx_export
from cavmae import CAVMAE, CAVMAEFT, TINY, save_checkpoint
from cavmae.errors import CavmaeError
from cavmae.export import export_model
from cavmae.hub.inventory import list_cache, remove_entries
from cavmae.manifest import Manifest
from cavmae.runtime import load


@pytest.fixture()
def traced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the graphs traced from now on."""
    names: list[str] = []
    real = onnx_export.export_stage

    def counting(stage, path, *args, **kwargs):
        names.append(stage.decl.name)
        return real(stage, path, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_stage", counting)
    return names


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def classifier_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(CAVMAEFT(TINY).eval(), tmp_path_factory.mktemp("ckpt") / "ft.pth")


def _clip(frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((TINY.audio_length, TINY.num_mel_bins), dtype=np.float32)
    images = rng.standard_normal((frames, 3, TINY.image_size, TINY.image_size), dtype=np.float32)
    return audio, images


def _exports(home: Path) -> list[Path]:
    return sorted(p for p in (home / "exports").iterdir() if p.is_dir())


def _validation(directory: Path) -> dict:
    return json.loads((directory / "validation.json").read_text())["graphs"]


def test_frames_change_traces_only_the_frame_dependent_graphs(home, classifier_ckpt, traced, tmp_path):
    audio, images = _clip(3)
    first = load(classifier_ckpt, engine="ort", device="cpu", num_frames=2)
    first.classify(audio, images[:2])
    assert sorted(traced) == ["audio_encoder", "joint_classifier", "visual_encoder"]  # av mode only
    (two,) = _exports(home)
    assert set(Manifest.load(two).pending) == {"audio_embed", "visual_embed", "audio_classifier", "visual_classifier"}
    traced.clear()

    second = load(classifier_ckpt, engine="ort", device="cpu", num_frames=3)
    got = second.classify(audio, images)
    assert traced == ["joint_classifier"]  # the encoders do not depend on the frame count
    three = next(p for p in _exports(home) if p != two)
    for name in ("audio_encoder", "visual_encoder"):
        assert os.stat(two / f"{name}.onnx").st_ino == os.stat(three / f"{name}.onnx").st_ino
    reports = _validation(three)
    assert reports["audio_encoder"]["reused_from"] == str(two) and reports["audio_encoder"]["passed"]
    assert reports["joint_classifier"]["reused_from"] is None
    assert reports["audio_encoder"]["identity"] == _validation(two)["audio_encoder"]["identity"]
    assert reports["joint_classifier"]["identity"] != _validation(two)["joint_classifier"]["identity"]
    # the optimized copies ONNX Runtime saved while validating are shared too
    ort_copies = sorted(p.name for p in (three / ".ort").iterdir())
    assert any(n.startswith("audio_encoder.") for n in ort_copies)

    fresh = export_model(classifier_ckpt, tmp_path / "fresh", num_frames=3)
    want = load(fresh.out_dir, engine="ort", device="cpu").classify(audio, images)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_mask_ratio_change_re_exports_only_masked_encoder_and_decoder(home, traced, tmp_path):
    torch.manual_seed(1)
    ckpt = save_checkpoint(CAVMAE(TINY).eval(), tmp_path / "pt.pth")
    audio, images = _clip(1)
    for ratio in (0.75, 0.5):
        pipe = load(ckpt, engine="ort", device="cpu", task="reconstruct", mask_ratio_a=ratio, mask_ratio_v=ratio)
        pipe.embed(audio, images)
        rec = pipe.reconstruct(audio, images[0], seed=1)
        assert np.isfinite(rec.mse_a) and np.isfinite(rec.mse_v)
        pipe.close()
    first = {"audio_encoder", "visual_encoder", "audio_embed", "visual_embed", "masked_encoder", "decoder"}
    assert sorted(traced[: len(first)]) == sorted(first)
    assert sorted(traced[len(first):]) == ["decoder", "masked_encoder"]
    a, b = _exports(home)
    assert os.stat(a / "visual_encoder.onnx").st_ino == os.stat(b / "visual_encoder.onnx").st_ino
    assert os.stat(a / "decoder.onnx").st_ino != os.stat(b / "decoder.onnx").st_ino


def test_a_graph_is_added_on_demand_by_a_later_command(home, classifier_ckpt, traced):
    audio, images = _clip(2)
    load(classifier_ckpt, engine="ort", device="cpu", num_frames=2).classify(audio, images)
    traced.clear()
    pipe = load(classifier_ckpt, engine="ort", device="cpu", num_frames=2)  # same export
    ea, ev = pipe.embed(audio, images)
    assert sorted(traced) == ["audio_embed", "visual_embed"]
    assert ea is not None and ev is not None and ea.shape == (TINY.embed_dim,)
    (export,) = _exports(home)
    manifest = Manifest.load(export)
    assert set(manifest.pending) == {"audio_classifier", "visual_classifier"}
    assert set(_validation(export)) == set(manifest.graphs) - set(manifest.pending)
    traced.clear()
    pipe.classify(audio, None, "audio")  # a mode not run before: its head only
    assert traced == ["audio_classifier"]
    # the export directory alone cannot make a pending graph: one clear line says what to do
    with pytest.raises(CavmaeError, match="written the first time it runs"):
        load(export, engine="ort", device="cpu").classify(None, images, "visual")


def test_listing_counts_shared_files_once_and_prune_keeps_the_other_export(home, classifier_ckpt, traced):
    audio, images = _clip(3)
    load(classifier_ckpt, engine="ort", device="cpu", num_frames=2).classify(audio, images[:2])
    load(classifier_ckpt, engine="ort", device="cpu", num_frames=3).classify(audio, images)
    entries = [e for e in list_cache(home) if e.kind == "export"]
    assert len(entries) == 2
    inodes = {}
    for p in (home / "exports").rglob("*"):
        if p.is_file():
            st = p.stat()
            inodes[(st.st_dev, st.st_ino)] = st.st_size
    assert sum(e.size for e in entries) == sum(inodes.values())  # each file once
    shared = sum((e.path / f"{g}.onnx").stat().st_size for e in entries[1:] for g in ("audio_encoder", "visual_encoder"))
    assert entries[1].shared >= shared > 0 and entries[0].shared == 0
    removed, busy = remove_entries([entries[0]])
    assert removed == [entries[0]] and not busy and not entries[0].path.exists()
    traced.clear()
    frames = Manifest.load(entries[1].path).num_frames
    survivor = load(classifier_ckpt, engine="ort", device="cpu", num_frames=frames)
    assert survivor.classify(audio, images[:frames]).shape == (TINY.num_classes,)
    assert traced == []  # nothing traced again: its graphs are all still there
