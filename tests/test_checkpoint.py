"""Loading and saving checkpoints: reference format, own format, safetensors, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cavmae import CAVMAE, CAVMAEFT, TINY, load_checkpoint, save_checkpoint
from cavmae.checkpoint import inspect_checkpoint, verify_checkpoint_file
from cavmae.errors import CavmaeError, CheckpointError
from cavmae.model import MODES
from reference_format import save_reference_checkpoint


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1024, 128, generator=g), torch.randn(2, 3, 224, 224, generator=g)


def _random_model(cls, config=TINY, seed=0):
    torch.manual_seed(seed)
    m = cls(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))  # learned-looking positions and norms
    return m


def test_reference_format_classifier_gives_identical_outputs(tmp_path, inputs):
    model = _random_model(CAVMAEFT)
    path = save_reference_checkpoint(model, tmp_path / "ref.pth")
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in raw)
    # a reference file does not say how many heads a tiny model has: pass it
    loaded = load_checkpoint(path, num_heads=TINY.num_heads)
    assert isinstance(loaded, CAVMAEFT) and not loaded.training
    # a classifier file says nothing of a decoder; every encoder and head field must match
    unused = {"decoder_embed_dim", "decoder_depth", "decoder_num_heads"}
    got, want = loaded.config.to_dict(), model.config.to_dict()
    assert {k: v for k, v in got.items() if k not in unused} == {k: v for k, v in want.items() if k not in unused}
    audio, image = inputs
    with torch.no_grad():
        for mode in MODES:
            assert torch.equal(loaded(audio, image, mode), model(audio, image, mode)), mode
        for got, want in zip(loaded.forward_feat(audio, image), model.forward_feat(audio, image), strict=True):
            assert torch.equal(got, want)


def test_reference_format_pretrain_seeded_forward_identical(tmp_path, inputs):
    model = _random_model(CAVMAE, TINY.replace(norm_pix_loss=True))
    path = save_reference_checkpoint(model, tmp_path / "ref.pth")
    loaded = load_checkpoint(path, num_heads=4, decoder_num_heads=4, norm_pix_loss=True)
    assert isinstance(loaded, CAVMAE) and loaded.config.norm_pix_loss
    audio, image = inputs
    noise_a, noise_v = torch.rand(2, 512), torch.rand(2, 196)
    with torch.no_grad():
        a = loaded(audio, image, noise_a=noise_a, noise_v=noise_v)
        b = model(audio, image, noise_a=noise_a, noise_v=noise_v)
    for name in ("loss", "loss_c", "c_acc", "pred_a", "pred_v", "mask_a", "mask_v"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_own_format_roundtrip_keeps_config(tmp_path, inputs, suffix):
    model = _random_model(CAVMAE, TINY.replace(norm_pix_loss=True))
    path = save_checkpoint(model, tmp_path / f"own{suffix}")
    loaded = load_checkpoint(path)  # no overrides needed: the config travels with the file
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_class_names_travel_with_the_file(tmp_path, suffix):
    from cavmae.checkpoint_keys import peek_metadata
    from cavmae.labels import LabelSet

    model = _random_model(CAVMAEFT, TINY.replace(num_classes=3))
    names = LabelSet(names=("dog bark", "rain", "siren"), ids=("/m/a", "/m/b", "/m/c"))
    path = save_checkpoint(model, tmp_path / f"named{suffix}", labels=names)
    meta = peek_metadata(path)
    assert meta is not None and meta["kind"] == "classifier"
    assert LabelSet.from_meta(meta["labels"]) == names
    assert load_checkpoint(path).config.num_classes == 3  # the names change nothing else
    unnamed = save_checkpoint(model, tmp_path / f"unnamed{suffix}")
    assert "labels" not in (peek_metadata(unnamed) or {})
    with pytest.raises(CheckpointError, match="do not fit"):  # 2 names for 3 classes
        save_checkpoint(model, tmp_path / f"bad{suffix}", labels=LabelSet(names=("a", "b"), ids=("a", "b")))
    with pytest.raises(CheckpointError, match="apply to a classifier, not a pretrain"):
        save_checkpoint(_random_model(CAVMAE), tmp_path / f"pre{suffix}", labels=names)
    assert not (tmp_path / f"bad{suffix}").exists()
    # a reference file carries no metadata; odd metadata shapes are ignored, not trusted
    assert peek_metadata(save_reference_checkpoint(model, tmp_path / "ref.pth")) is None
    for odd in (None, [], {"names": ["a"], "ids": []}, {"names": [1, 2, 3], "ids": ["a", "b", "c"]}):
        assert LabelSet.from_meta(odd) is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_finetune_mode_and_task_travel_with_the_file(tmp_path, suffix):
    from cavmae.checkpoint_keys import TrainedHead, embedded_head

    model = _random_model(CAVMAEFT, TINY.replace(num_classes=3))
    path = save_checkpoint(model, tmp_path / f"a{suffix}", finetune_mode="audioonly", task="single-label")
    assert embedded_head(path) == TrainedHead(finetune_mode="audioonly", task="single-label")
    assert embedded_head(save_checkpoint(model, tmp_path / f"b{suffix}")) == TrainedHead()
    with pytest.raises(CheckpointError, match="fine-tune mode must be one of"):
        save_checkpoint(model, tmp_path / f"c{suffix}", finetune_mode="stereo")
    with pytest.raises(CheckpointError, match="task must be one of"):
        save_checkpoint(model, tmp_path / f"c{suffix}", task="regression")
    # values this project does not write read as unknown, not trusted
    assert TrainedHead.from_meta({"finetune_mode": "stereo", "task": 3}) == TrainedHead()


def test_saved_file_loads_with_reference_recipe(tmp_path):
    model = _random_model(CAVMAEFT)
    path = save_checkpoint(model, tmp_path / "own.pth")
    target = nn.DataParallel(CAVMAEFT(TINY))
    result = target.load_state_dict(torch.load(path, map_location="cpu"))
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target.module.mlp_head[1].weight, model.mlp_head[1].weight)


def test_pretrain_checkpoint_starts_a_classifier_only_when_asked(tmp_path):
    pre = _random_model(CAVMAE)
    path = save_checkpoint(pre, tmp_path / "pre.pth")
    assert isinstance(load_checkpoint(path), CAVMAE)
    ft = load_checkpoint(path, kind="classifier", num_classes=309)
    assert isinstance(ft, CAVMAEFT) and ft.config.num_classes == 309
    assert torch.equal(ft.blocks_u[0].attn.qkv.weight, pre.blocks_u[0].attn.qkv.weight)
    cls_path = save_checkpoint(ft, tmp_path / "ft.pth")
    with pytest.raises(CheckpointError, match="cannot be loaded as a pretrain"):
        load_checkpoint(cls_path, kind="pretrain")


def test_partial_and_mismatched_loads_are_refused(tmp_path):
    model = _random_model(CAVMAEFT)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    broken = dict(state)
    del broken["module.blocks_u.0.norm1_a.weight"]
    broken["module.extra.weight"] = torch.zeros(3)
    broken["module.norm_v.bias"] = torch.zeros(5)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "broken.pth", num_heads=4)
    msg = str(e.value)
    assert "missing keys: blocks_u.0.norm1_a.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "mis-shaped keys: norm_v.bias [5] != [64]" in msg


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(junk)
    assert str(e.value) == f"not a PyTorch checkpoint, or truncated (24 bytes): {junk}"
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pth")
    torch.save({"module.foo": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="neither a decoder"):
        load_checkpoint(tmp_path / "foreign.pth")


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1])
def test_truncated_checkpoint_is_one_line(tmp_path, keep):
    """Cut anywhere (a half-finished copy or download): one line with the size and path, never
    torch's multi-line message or its advice to set weights_only=False."""
    whole = save_reference_checkpoint(_random_model(CAVMAEFT), tmp_path / "whole.pth").read_bytes()
    n = int(len(whole) * keep) if isinstance(keep, float) else keep % len(whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole[:n])
    for read in (load_checkpoint, inspect_checkpoint):
        with pytest.raises(CheckpointError) as e:
            read(cut)
        assert str(e.value) == f"not a PyTorch checkpoint, or truncated ({n} bytes): {cut}"


def test_truncated_safetensors_is_one_line(tmp_path):
    whole = save_checkpoint(_random_model(CAVMAEFT), tmp_path / "m.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(cut)
    assert str(e.value) == f"not a safetensors checkpoint, or truncated ({len(whole) // 2} bytes): {cut}"


def test_pickled_code_is_not_executed(tmp_path):
    """weights_only=True: a checkpoint carrying arbitrary objects is rejected, not unpickled."""
    torch.save({"module.x": torch.zeros(1), "payload": object()}, tmp_path / "evil.pth", )
    with pytest.raises(CheckpointError, match="objects other than tensors") as e:
        load_checkpoint(tmp_path / "evil.pth")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_load_checkpoint_by_registry_name(tmp_path, monkeypatch):
    """A registry name loads its cached file (no network when it is there), with the registry's
    facts: cav-mae-base-nonorm predicts pixels (norm_pix_loss False), the others do not."""
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CAVMAE_MIRROR", "http://127.0.0.1:9/unreachable")  # a fetch would fail
    ckpts = tmp_path / "home" / "checkpoints"
    ckpts.mkdir(parents=True)
    save_reference_checkpoint(_random_model(CAVMAEFT), ckpts / "as-full-51.2.pth")
    save_reference_checkpoint(_random_model(CAVMAE), ckpts / "cav-mae-base-nonorm.pth")
    save_reference_checkpoint(_random_model(CAVMAE), ckpts / "cav-mae-base.pth")
    assert isinstance(load_checkpoint("as-full-51.2", num_heads=TINY.num_heads), CAVMAEFT)
    heads = {"num_heads": TINY.num_heads, "decoder_num_heads": TINY.decoder_num_heads}
    assert load_checkpoint("cav-mae-base-nonorm", **heads).config.norm_pix_loss is False
    assert load_checkpoint("cav-mae-base", **heads).config.norm_pix_loss is True
    with pytest.raises(CheckpointError, match="loaded by its name: 'as-full-51.2'"):
        load_checkpoint("as-full-51.2.pth")  # not a file here
    with pytest.raises(CavmaeError, match="did you mean as-full-51.2"):
        load_checkpoint("as-full-51")


def test_verify_checkpoint_file_checks_kind_and_classes(tmp_path):
    path = save_reference_checkpoint(_random_model(CAVMAEFT), tmp_path / "ft.pth")
    info = verify_checkpoint_file(path, kind="classifier", num_classes=TINY.num_classes)
    assert info.kind == "classifier" and info.num_keys == len(CAVMAEFT(TINY).state_dict())
    with pytest.raises(CheckpointError, match="expected a pretrain"):
        verify_checkpoint_file(path, kind="pretrain")
    with pytest.raises(CheckpointError, match="expected 527"):
        verify_checkpoint_file(path, num_classes=527)


@pytest.mark.slow
def test_full_size_reference_checkpoint_inference(tmp_path):
    """A full-size classifier file in the released layout: 478 keys, config inferred from shapes."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CAVMAEFT().state_dict().items()}
    # random tensors with the right shapes, written like the released files (no model built)
    g = torch.Generator().manual_seed(0)
    torch.save({"module." + k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, tmp_path / "as.pth")
    info = inspect_checkpoint(tmp_path / "as.pth")
    assert info.kind == "classifier" and info.num_keys == 478
    cfg = info.config
    assert (cfg.embed_dim, cfg.depth_modality, cfg.depth_joint, cfg.num_heads, cfg.num_classes,
            cfg.audio_length, cfg.image_size) == (768, 11, 1, 12, 527, 1024, 224)


def test_peek_reads_kind_classes_and_depth_without_torch(tmp_path):
    """Every format this project writes or reads gives the same summary as the torch reader;
    only the legacy (pre-zip) format is left to torch."""
    from cavmae.checkpoint_keys import peek_checkpoint

    ft, pt = _random_model(CAVMAEFT), _random_model(CAVMAE)
    files = {
        "reference": save_reference_checkpoint(ft, tmp_path / "ref.pth"),
        "own": save_checkpoint(ft, tmp_path / "own.pth"),
        "safetensors": save_checkpoint(ft, tmp_path / "own.safetensors"),
        "pretrain": save_checkpoint(pt, tmp_path / "pt.pth"),
    }
    torch.save({"cavmae": {"kind": "classifier"}, "state_dict": ft.state_dict()}, tmp_path / "state.pt")
    files["trainer state"] = tmp_path / "state.pt"
    for what, path in files.items():
        summary, info = peek_checkpoint(path), inspect_checkpoint(path)
        assert summary is not None, what
        assert summary.kind == info.kind, what
        assert summary.num_classes == (info.config.num_classes if info.kind == "classifier" else None)
        assert (summary.depth_modality, summary.depth_joint) == (TINY.depth_modality, TINY.depth_joint)
        assert summary.num_keys == info.num_keys, what
    torch.save({"module." + k: v for k, v in ft.state_dict().items()}, tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    assert peek_checkpoint(tmp_path / "legacy.pth") is None  # torch reads it
    # the pickle is never executed: a foreign global stops the peek (torch then refuses it)
    torch.save({"module.x": torch.zeros(1), "payload": object()}, tmp_path / "evil.pth")
    assert peek_checkpoint(tmp_path / "evil.pth") is None
    whole = files["reference"].read_bytes()
    for n in (0, 10, len(whole) // 2, len(whole) - 1):
        (tmp_path / "cut.pth").write_bytes(whole[:n])
        with pytest.raises(CheckpointError, match=rf"^not a PyTorch checkpoint, or truncated \({n} bytes\)"):
            peek_checkpoint(tmp_path / "cut.pth")
    whole = files["safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) - 1])
    with pytest.raises(CheckpointError, match="^not a safetensors checkpoint, or truncated"):
        peek_checkpoint(tmp_path / "cut.safetensors")
