"""Mask ratios that keep no token: refused in one line, naming the largest ratio allowed, by
the masking rule itself and before any work at every entry point (export, runtime load)."""

from __future__ import annotations

import pytest
import torch

from cavmae import CAVMAE, TINY, save_checkpoint
from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import CavmaeError
from cavmae.export import export_model
from cavmae.masking import MaskRatioError, kept_tokens, max_mask_ratio, num_kept
from cavmae.runtime import load
from cavmae.stages import graph_specs, make_manifest

LA, LV = TINY.num_audio_tokens, TINY.num_visual_tokens  # 512 and 196, as the full-size model


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 100, 196, 512, 1000, 1568])
def test_largest_ratio_is_the_rules_own_edge(tokens):
    limit = max_mask_ratio(tokens)
    assert num_kept(tokens, limit) >= 1
    above = round(limit + 1e-4, 4)
    if above < 1:  # the next ratio of four decimals keeps nothing
        with pytest.raises(MaskRatioError, match=f"largest ratio that keeps one is {limit:g}"):
            num_kept(tokens, above)


def test_zero_kept_tokens_is_a_one_line_user_error():
    with pytest.raises(MaskRatioError) as info:
        num_kept(LV, 0.995, "visual")
    assert isinstance(info.value, CavmaeError) and isinstance(info.value, ValueError)
    assert str(info.value) == (f"mask ratio 0.995 keeps none of the {LV} visual tokens;"
                               " the largest ratio that keeps one is 0.9948")
    # one ratio for both modalities: the limit named suits both (audio alone would allow 0.998)
    with pytest.raises(MaskRatioError, match="512 audio tokens; .* of both modalities is 0.9948"):
        kept_tokens(LA, LV, 0.999, 0.999)
    with pytest.raises(MaskRatioError, match=f"none of the {LV} visual tokens; .* keeps one is 0.9948"):
        kept_tokens(LA, LV, 0.5, 0.995)
    assert kept_tokens(LA, LV, 0.9948, 0.9948) == (2, 1)


def test_export_refuses_before_tracing(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(MaskRatioError, match="keeps none of the 196 visual tokens"):
        export_model(CAVMAE(TINY), tmp_path / "pt", mask_ratio_a=0.5, mask_ratio_v=0.995)
    assert not list(tmp_path.iterdir())  # nothing traced, no temporary directory


def test_runtime_load_refuses_before_any_export(tmp_path, monkeypatch):
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    torch.manual_seed(0)
    net = CAVMAE(TINY)
    ckpt = save_checkpoint(net, tmp_path / "pt.pth")
    with pytest.raises(MaskRatioError, match="keeps none of the 512 audio tokens"):
        load(ckpt, engine="ort", device="cpu", mask_ratio_a=0.999, mask_ratio_v=0.999, task="reconstruct")
    assert not (tmp_path / "home" / "exports").exists()  # refused before hashing and exporting
    # an export directory: its manifest gives the token counts (its graphs are never opened)
    export = tmp_path / "export"
    make_manifest(net, graph_specs(net), precision="fp32", num_frames=10, max_batch=8, task=None,
                  finetune_mode="multimodal", labels=None, mask_ratio_a=0.75, mask_ratio_v=0.75,
                  preprocess=DEFAULT_PREPROCESS, source={}, versions={}).save(export)
    with pytest.raises(MaskRatioError, match="keeps none of the 196 visual tokens"):
        load(export, engine="ort", device="cpu", mask_ratio_a=0.5, mask_ratio_v=0.995)
    # a registry model: refused before its download (every released checkpoint is full-size)
    with pytest.raises(MaskRatioError, match="keeps none of the 512 audio tokens"):
        load("cav-mae-base-nonorm", engine="ort", device="cpu", mask_ratio_a=0.999, mask_ratio_v=0.5)
    assert not (tmp_path / "home" / "checkpoints").exists()
