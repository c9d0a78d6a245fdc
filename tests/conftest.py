"""Shared fixtures: tiny models, reference-format checkpoints, the sample media."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the two real sample clips (package data in cavmae/assets/media; examples/media links to them)
MEDIA = REPO / "examples" / "media"
AUDIOSET_CLIP = MEDIA / "00W1lcxW-WU_40.000.mp4"
VGGSOUND_CLIP = MEDIA / "KlsG1EnBEjc_000361.mp4"
#: the AudioSet label set that ships inside the package
AUDIOSET_LABELS = REPO / "cavmae" / "assets" / "audioset_class_labels_indices.csv"


def pytest_collection_modifyitems(config, items):
    """Skip GPU / TensorRT tests cleanly where those are absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    try:
        import importlib.util

        has_trt = importlib.util.find_spec("tensorrt") is not None
    except Exception:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not (has_cuda and has_trt):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))


@pytest.fixture(scope="session")
def sample_clips() -> list[Path]:
    # The clips are part of the repository: a missing one is a broken checkout, not a skip.
    clips = [AUDIOSET_CLIP, VGGSOUND_CLIP]
    missing = [str(c) for c in clips if not c.is_file()]
    assert not missing, f"sample media missing from the checkout: {missing}"
    return clips
