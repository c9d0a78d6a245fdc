"""Each fact stored once: input sizes, frames per clip, audio span, fine-tune mode, mask ratio."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from cavmae import CAVMAEFT, TINY
from cavmae.audio import audio_frames
from cavmae.config import BASE, DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.manifest import Manifest
from cavmae.masking import DEFAULT_MASK_RATIO

REPO = Path(__file__).resolve().parents[1]
SIZES = ("target_length", "num_mel_bins", "image_size")


def test_preprocessing_reads_the_input_sizes_from_the_model() -> None:
    fields = {f.name for f in dataclasses.fields(PreprocessConfig)}
    assert not fields & set(SIZES)  # stored once, in ModelConfig
    p = DEFAULT_PREPROCESS
    assert (p.target_length, p.num_mel_bins, p.image_size) == (
        BASE.audio_length, BASE.num_mel_bins, BASE.image_size) == (1024, 128, 224)
    other = BASE.replace(audio_length=512, image_size=160)
    bound = p.for_model(other)
    assert (bound.target_length, bound.image_size, bound.num_mel_bins) == (512, 160, 128)
    assert p.for_model(BASE) is p
    assert not set(SIZES) & set(p.to_dict())


def test_audio_seconds_fills_the_spectrogram_exactly() -> None:
    p = DEFAULT_PREPROCESS
    assert p.audio_seconds == pytest.approx(10.255)
    samples = round(p.audio_seconds * p.sample_rate)
    assert audio_frames(samples, p) == p.target_length
    assert audio_frames(samples - 1, p) == p.target_length - 1
    short = p.for_model(BASE.replace(audio_length=512))
    assert audio_frames(round(short.audio_seconds * p.sample_rate), short) == 512


def _manifest(**kw) -> Manifest:
    return Manifest(model_kind="classifier", model_config=TINY, preprocess=DEFAULT_PREPROCESS,
                    graphs={}, **kw)


def test_manifest_stores_frames_and_finetune_mode_once() -> None:
    m = _manifest(finetune_mode="audioonly").replace(num_frames=5)
    assert m.num_frames == m.preprocess.num_frames == 5
    assert m.modes == ("audioonly",)
    d = m.to_dict()
    assert "num_frames" not in d and "modes" not in d and d["preprocess"]["num_frames"] == 5
    assert not set(SIZES) & set(d["preprocess"])
    again = Manifest.from_dict(json.loads(json.dumps(d)))
    assert again == m and again.num_frames == 5 and again.finetune_mode == "audioonly"


def test_manifest_binds_preprocessing_to_the_model_sizes() -> None:
    small = TINY.replace(audio_length=512)
    m = Manifest(model_kind="pretrain", model_config=small, preprocess=DEFAULT_PREPROCESS, graphs={})
    assert m.preprocess.target_length == 512
    assert Manifest.from_dict(m.to_dict()).preprocess.target_length == 512


def test_old_manifests_still_load() -> None:
    """Manifests written before: top-level num_frames and modes, sizes repeated in preprocess."""
    old_preprocess = {**DEFAULT_PREPROCESS.to_dict(), "target_length": 1024, "num_mel_bins": 128,
                      "image_size": 224, "num_frames": 10}
    old = {"schema_version": 1, "model_kind": "classifier", "task": "multi-label",
           "precision": "fp32", "num_frames": 5, "max_batch": 4,
           "modes": ["audioonly"], "mask_ratio_a": None, "mask_ratio_v": None,
           "model_config": TINY.to_dict(), "preprocess": old_preprocess, "labels": None,
           "label_ids": None, "source": {"finetune_mode": "audioonly"}, "versions": {}, "graphs": {}}
    m = Manifest.from_dict(old)
    assert m.num_frames == m.preprocess.num_frames == 5  # the export's frames won
    assert m.finetune_mode == "audioonly" and m.modes == ("audioonly",)
    assert m.preprocess.target_length == TINY.audio_length
    pretrain = Manifest.from_dict({**old, "model_kind": "pretrain", "modes": []})
    assert pretrain.finetune_mode is None and pretrain.modes == ()


def test_export_frames_are_the_manifest_frames(tmp_path: Path) -> None:
    """``cavmae export --frames 5`` wrote num_frames 5 beside preprocess.num_frames 10."""
    from cavmae.export import export_model

    export_model(CAVMAEFT(TINY), tmp_path / "e", num_frames=5, max_batch=1, validate=False)
    raw = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert raw["preprocess"]["num_frames"] == 5 and "num_frames" not in raw
    m = Manifest.load(tmp_path / "e")
    assert m.num_frames == 5 and m.finetune_mode == "multimodal"
    assert "finetune_mode" not in m.source


def test_mask_ratio_is_one_constant() -> None:
    """The default mask ratio is written once, in cavmae.masking, and read everywhere else."""
    assert DEFAULT_MASK_RATIO == 0.75
    found = []
    for d in ("cavmae", "runtime", "export", "cli"):
        for path in (REPO / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value == 0.75:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == ["cavmae/masking.py:" + str(_line_of_constant())], found


def _line_of_constant() -> int:
    text = (REPO / "cavmae" / "masking.py").read_text().splitlines()
    return next(i for i, line in enumerate(text, 1) if line.startswith("DEFAULT_MASK_RATIO ="))
