"""Encoder runs sized for a CPU: how many rows a run holds, that the ONNX Runtime pipeline splits
batches that way (never across two clips), and that fp32 outputs do not change with the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae.errors import CavmaeError
from cavmae.export import export_model
from cavmae.media import load_clip
from cavmae.run_sizes import CPU_TOKENS_PER_RUN, rows_per_run
from cavmae.runtime import load
from conftest import AUDIOSET_CLIP, VGGSOUND_CLIP


@pytest.mark.parametrize(("tokens", "per_clip", "want"), [
    (196, 10, 5),   # ViT-B frames, 10 per clip: two runs of 980 tokens
    (512, 1, 1),    # one spectrogram per clip: never two clips in a run
    (196, 4, 4),    # a 4-frame export: the whole clip fits
    (196, 16, 4),   # 16 frames: the largest divisor that fits (784 tokens)
    (196, 7, 1),    # a prime frame count: one frame per run
    (4096, 10, 1),  # rows larger than the budget: one per run
])
def test_rows_per_run_divides_the_clip_and_fits_the_budget(tokens, per_clip, want):
    got = rows_per_run(tokens, per_clip)
    assert got == want
    assert per_clip % got == 0
    assert got == 1 or got * tokens <= CPU_TOKENS_PER_RUN


def test_rows_per_run_refuses_empty_sizes():
    with pytest.raises(ValueError):
        rows_per_run(0, 10)
    with pytest.raises(ValueError):
        rows_per_run(196, 0)


def tiny_export(tmp: Path) -> Path:
    """A tiny classifier (ViT-B token counts, small widths) exported with max batch 2 clips."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(TINY.replace(num_classes=527)).eval(), tmp / "ft.pth")
    export_model(ckpt, tmp / "export", max_batch=2, graphs=["audio_encoder", "visual_encoder", "joint_classifier"])
    return tmp / "export"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("runs"))


def _record_batches(pipe, graph: str) -> list[int]:
    """Wrap ``graph``'s session so each run's batch size is recorded."""
    session = pipe.engine.session(graph)
    seen: list[int] = []
    run = session.run

    def recording(inputs):
        seen.append(len(next(iter(inputs.values()))))
        return run(inputs)

    session.run = recording
    return seen


def test_the_cpu_pipeline_runs_each_clip_in_cache_sized_runs(export_dir):
    clips = [load_clip(p) for p in (AUDIOSET_CLIP, VGGSOUND_CLIP)]
    audio = np.stack([c.audio for c in clips])
    frames = np.stack([c.frames for c in clips])
    pipe = load(export_dir, engine="ort", device="cpu")
    assert pipe.engine.cpu_sized_runs
    audio_runs = _record_batches(pipe, "audio_encoder")
    frame_runs = _record_batches(pipe, "visual_encoder")
    batched = pipe.classify_batch(audio, frames)
    # 2 clips: one spectrogram per audio run, 5 of a clip's 10 frames per visual run
    assert audio_runs == [1, 1]
    assert frame_runs == [5, 5, 5, 5]
    # fp32: the split changes nothing, bit for bit, against whole-batch runs
    whole = load(export_dir, engine="ort", device="cpu")
    whole.engine.cpu_sized_runs = False
    whole_runs = _record_batches(whole, "visual_encoder")
    np.testing.assert_array_equal(whole.classify_batch(audio, frames), batched)
    assert whole_runs == [20]
    pipe.close()
    whole.close()


def test_a_bad_frames_per_clip_is_one_error(export_dir):
    pipe = load(export_dir, engine="ort", device="cpu")
    images = np.zeros((2, 3, 224, 224), np.float32)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(CavmaeError, match="frames_per_clip"):
            pipe.run_visual_encoder(images, bad)
    pipe.close()
