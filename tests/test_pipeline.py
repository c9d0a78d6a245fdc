"""Pipelines against the reference computations, on the ort and torch engines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cavmae import CAVMAE, CAVMAEFT, TINY, save_checkpoint
from cavmae.errors import CavmaeError, ModelKindError
from cavmae.export import export_model
from cavmae.manifest import Manifest
from cavmae.masking import draw_noise
from cavmae.media import load_clip
from cavmae.runtime import load
from conftest import AUDIOSET_CLIP, VGGSOUND_CLIP

ENGINES = ["ort", "torch"]


@pytest.fixture(scope="module")
def classifier_files(tmp_path_factory):
    """A tiny 527-class classifier checkpoint and its export (max batch 2 clips)."""
    tmp = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    model = CAVMAEFT(TINY.replace(num_classes=527)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = save_checkpoint(model, tmp / "ft.pth")
    export_model(ckpt, tmp / "export", max_batch=2)
    return model, ckpt, tmp / "export"


@pytest.fixture(scope="module")
def clips():
    return {p.name: load_clip(p) for p in (AUDIOSET_CLIP, VGGSOUND_CLIP)}


def reference_loop(model: CAVMAEFT, audio: np.ndarray, frames: np.ndarray, mode="multimodal", act=torch.sigmoid):
    """The reference evaluation: whole forward once per frame, probabilities averaged."""
    a = torch.from_numpy(audio)[None]
    with torch.no_grad():
        probs = [act(model(a, torch.from_numpy(f)[None], mode)) for f in frames]
    return torch.cat(probs).mean(0).numpy()


def _pipeline(engine, files):
    model, ckpt, export_dir = files
    # the torch engine runs the checkpoint; ort runs the export directory
    return load(ckpt if engine == "torch" else export_dir, engine=engine, device="cpu")


@pytest.mark.parametrize("engine", ENGINES)
def test_classify_matches_reference_per_frame_loop(engine, classifier_files, clips):
    model = classifier_files[0]
    pipe = _pipeline(engine, classifier_files)
    for name, clip in clips.items():
        want = reference_loop(model, clip.audio, clip.frames)
        got = pipe.classify_file(clip.path)
        assert got.probs.shape == (527,)
        np.testing.assert_allclose(got.probs, want, atol=1e-4, err_msg=name)
        assert got.top(1)[0][1] == pipe.labels[int(np.argmax(want))]


@pytest.mark.parametrize("engine", ENGINES)
def test_single_modality_modes(engine, classifier_files, clips):
    model = classifier_files[0]
    pipe = _pipeline(engine, classifier_files)
    clip = clips[AUDIOSET_CLIP.name]
    with torch.no_grad():
        want_audio = torch.sigmoid(model(torch.from_numpy(clip.audio)[None], None, "missingaudioonly"))[0].numpy()
    np.testing.assert_allclose(pipe.classify(clip.audio, None, "audio"), want_audio, atol=1e-5)
    want_visual = reference_loop(model, clip.audio, clip.frames, "missingvideoonly")
    np.testing.assert_allclose(pipe.classify(None, clip.frames, "visual"), want_visual, atol=1e-5)
    assert pipe.classify_modes == ("av", "audio", "visual")


def test_batched_classification_chunks_past_max_batch(classifier_files, clips):
    pipe = _pipeline("ort", classifier_files)
    clip_list = list(clips.values())
    audio = np.stack([c.audio for c in clip_list] * 2)  # 4 clips > max batch 2
    frames = np.stack([c.frames for c in clip_list] * 2)
    batched = pipe.classify_batch(audio, frames)
    single = np.stack([pipe.classify(c.audio, c.frames) for c in clip_list] * 2)
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_batch_mistakes_are_named_before_anything_runs(classifier_files, clips):
    pipe = _pipeline("ort", classifier_files)
    clip = clips[AUDIOSET_CLIP.name]
    # two frame sets with one audio: refused, not one clip silently dropped
    with pytest.raises(CavmaeError, match="audio holds 1 clip.*frames 2"):
        pipe.classify_batch(clip.audio[None], np.stack([clip.frames, clip.frames]))
    # the shape in the message is the one the caller passed, not a chunk of it
    with pytest.raises(CavmaeError, match=r"got \[1024, 128\] \(2 axes\)"):
        pipe.embed_audio(clip.audio)
    with pytest.raises(CavmaeError, match=r"5 axes\), got \[10, 3, 224, 224\]"):
        pipe.embed_frames(clip.frames)
    # an empty batch is an empty answer of the right shape
    empty = pipe.classify_batch(np.zeros((0, 1024, 128), np.float32), np.zeros((0, 10, 3, 224, 224), np.float32))
    assert empty.shape == (0, 527) and pipe.embed_audio(np.zeros((0, 1024, 128), np.float32)).shape == (0, 64)


def test_prediction_record_and_pipeline_as_context(classifier_files, clips):
    _, _, export_dir = classifier_files
    with load(export_dir, engine="ort") as pipe:
        pred = pipe.classify_file(AUDIOSET_CLIP)
    record = pred.to_record(top_k=3)
    json.dumps(record)  # plain JSON types
    assert [t["index"] for t in record["top"]] == [i for i, _, _ in pred.top(3)]
    assert record["path"] == str(AUDIOSET_CLIP) and record["mode"] == "av" and record["end"] == 10.0
    with pytest.raises(CavmaeError, match="k must be"):
        pred.top(-1)
    # ties rank by class order in both places
    tied = type(pred)(probs=np.array([0.2, 0.5, 0.5, 0.1], np.float32), labels=None)
    assert [i for i, _, _ in tied.top(3)] == [1, 2, 0] == [t["index"] for t in tied.to_record(3)["top"]]


@pytest.mark.parametrize("engine", ENGINES)
def test_embeddings_and_localization(engine, classifier_files, clips):
    model = classifier_files[0]
    pipe = _pipeline(engine, classifier_files)
    clip = clips[VGGSOUND_CLIP.name]
    ea, ev = pipe.embed(clip.audio, clip.frames)
    with torch.no_grad():
        wa, wv = model.embed(torch.from_numpy(clip.audio)[None], torch.from_numpy(clip.frames[5])[None])
        _, patches = model.forward_feat(torch.from_numpy(clip.audio)[None], torch.from_numpy(clip.frames[2])[None])
    np.testing.assert_allclose(ea, wa[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ev, wv[0].numpy(), atol=1e-5)
    assert abs(np.linalg.norm(ea) - 1) < 1e-5
    _, mean_v = pipe.embed(None, clip.frames, frame="mean")
    assert abs(np.linalg.norm(mean_v) - 1) < 1e-5 and not np.allclose(mean_v, ev)
    heat = pipe.localize(clip.audio, clip.frames[2])
    want = torch.nn.functional.normalize(patches[0], dim=-1) @ wa[0]
    assert heat.shape == (14, 14)
    np.testing.assert_allclose(heat.ravel(), want.numpy(), atol=1e-5)


@pytest.fixture(scope="module", params=[False, True], ids=["nonorm", "normpix"])
def pretrain_files(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    torch.manual_seed(1)
    model = CAVMAE(TINY.replace(norm_pix_loss=request.param)).eval()
    ckpt = save_checkpoint(model, tmp / "pt.pth")
    export_model(ckpt, tmp / "export", max_batch=1)
    return model, ckpt, tmp / "export"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask_mode", ["unstructured", "time"])
def test_reconstruction_matches_model_forward(engine, mask_mode, pretrain_files, clips):
    model, ckpt, export_dir = pretrain_files
    pipe = load(ckpt if engine == "torch" else export_dir, engine=engine, device="cpu")
    clip = clips[AUDIOSET_CLIP.name]
    rec = pipe.reconstruct(clip.audio, clip.frames[5], seed=7, mask_mode=mask_mode)
    # the same draw, through the PyTorch pre-training forward
    rng = np.random.default_rng(7)
    noise_a = torch.from_numpy(draw_noise(rng, 1, 512, (8, 64), 0.75, mask_mode))
    noise_v = torch.from_numpy(draw_noise(rng, 1, 196))
    with torch.no_grad():
        out = model(torch.from_numpy(clip.audio)[None], torch.from_numpy(clip.frames[5])[None],
                    noise_a=noise_a, noise_v=noise_v)
    np.testing.assert_array_equal(rec.mask_a, out.mask_a[0].numpy())
    np.testing.assert_array_equal(rec.mask_v, out.mask_v[0].numpy())
    assert rec.mse_a == pytest.approx(out.loss_mae_a.item(), rel=1e-4)
    assert rec.mse_v == pytest.approx(out.loss_mae_v.item(), rel=1e-4)
    if not model.config.norm_pix_loss:  # predictions are in input units: compare them directly
        from cavmae.patches import unpatchify

        pred = unpatchify(out.pred_a, 16, (8, 64), 1)  # [1, 1, F, T]
        np.testing.assert_allclose(rec.audio_pred, pred[0, 0].T.numpy(), atol=1e-4)
    # visible patches are the input, removed ones the prediction
    keep = rec.mask_a.reshape(8, 64) == 0
    t, f = np.nonzero(np.kron(keep.T, np.ones((16, 16))))
    np.testing.assert_array_equal(rec.audio_pasted[t, f], clip.audio[t, f])
    assert rec.audio.shape == (1024, 128) and rec.image_pasted.shape == (3, 224, 224)
    if mask_mode == "time":
        assert rec.mask_a.reshape(8, 64).min(0).sum() == 48  # whole time columns removed


def test_wrong_task_for_model_kind(classifier_files, pretrain_files, clips):
    clip = clips[AUDIOSET_CLIP.name]
    with pytest.raises(ModelKindError, match="pre-training model"):
        load(pretrain_files[2], engine="ort", device="cpu").classify(clip.audio, clip.frames)
    pipe = load(classifier_files[2], engine="ort", device="cpu")
    with pytest.raises(ModelKindError, match="reconstruction needs"):
        pipe.reconstruct(clip.audio, clip.frames[5])
    with pytest.raises(CavmaeError, match="mode must be one of"):
        pipe.classify(clip.audio, clip.frames, mode="stereo")
    pre = load(pretrain_files[2], engine="ort", device="cpu")
    with pytest.raises(CavmaeError, match="export again with those ratios"):
        pre.reconstruct(clip.audio, clip.frames[5], mask_ratio_a=0.5)
    with pytest.raises(CavmaeError, match="seed must be"):
        pre.reconstruct(clip.audio, clip.frames[5], seed=-1)
    # nothing masked: no reconstruction error to report (it was NaN)
    unmasked = load(pretrain_files[1], engine="torch", device="cpu", mask_ratio_a=0.0)
    with pytest.raises(CavmaeError, match="remove no audio patch"):
        unmasked.reconstruct(clip.audio, clip.frames[5])
    with pytest.raises(CavmaeError, match="class names apply to a classifier"):
        load(pretrain_files[2], engine="ort", labels=AUDIOSET_CLIP)


def test_checkpoint_is_exported_once_into_the_cache(classifier_files, tmp_path, monkeypatch):
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path))
    ckpt = classifier_files[1]
    load(ckpt, engine="ort", device="cpu")
    exports = list((tmp_path / "exports").iterdir())
    assert len([e for e in exports if e.is_dir()]) == 1
    stamp = (exports[0] / "manifest.json").stat().st_mtime_ns
    load(ckpt, engine="ort", device="cpu")
    assert (exports[0] / "manifest.json").stat().st_mtime_ns == stamp  # reused, not re-exported
    load(ckpt, engine="ort", device="cpu", num_frames=5)  # other settings -> another export
    assert len([e for e in (tmp_path / "exports").iterdir() if e.is_dir()]) == 2


def test_a_graph_deleted_from_the_cache_is_written_again(classifier_files, clips, tmp_path, monkeypatch):
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path))
    clip = clips[AUDIOSET_CLIP.name]
    want = load(classifier_files[1], engine="ort").classify(clip.audio, clip.frames)
    (export,) = [e for e in (tmp_path / "exports").iterdir() if e.is_dir()]
    (export / "joint_classifier.onnx").unlink()
    again = load(classifier_files[1], engine="ort").classify(clip.audio, clip.frames)
    np.testing.assert_allclose(again, want, atol=1e-6)
    assert (export / "joint_classifier.onnx").is_file()


def test_a_damaged_manifest_is_named_not_a_crash(classifier_files, tmp_path):
    import shutil

    export = shutil.copytree(classifier_files[2], tmp_path / "exp")
    good = json.loads((export / "manifest.json").read_text())
    for edit, what in [({"labels": good["labels"][:10]}, "10 labels for 527 classes"),
                       ({"graphs": None}, "AttributeError"), ({"model_kind": "banana"}, "model_kind 'banana'"),
                       ({"max_batch": 0}, "max batch below 1"), ({"precision": "int4"}, "precision 'int4'")]:
        (export / "manifest.json").write_text(json.dumps({**good, **edit}))
        with pytest.raises(CavmaeError, match=f"manifest.json is damaged.*{what}"):
            load(export, engine="ort")


def test_api_arguments_are_checked_up_front(classifier_files, tmp_path):
    _, ckpt, _ = classifier_files
    with pytest.raises(CavmaeError, match="max batch must be"):
        export_model(ckpt, tmp_path / "x", max_batch=0)
    with pytest.raises(CavmaeError, match="max batch must be"):
        load(ckpt, engine="ort", max_batch=-3)
    with pytest.raises(CavmaeError, match="task must be"):
        export_model(ckpt, tmp_path / "x", task="bogus")
    with pytest.raises(CavmaeError, match="task must be one of"):
        load(ckpt, engine="ort", task="bogus")
    with pytest.raises(CavmaeError, match="engine 'torch' takes no option 'threads'"):
        load(ckpt, engine="torch", threads=1)
    # the public engine factory still takes the torch engine's own options
    from cavmae.runtime.engines import create_engine

    assert create_engine("torch", classifier_files[2], device="cpu", precision="bf16").describe() == "torch bf16 on cpu"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CavmaeError, match="is a file"):
        export_model(ckpt, tmp_path / "file")
    assert not (tmp_path / "x").exists()


def test_a_finetuned_checkpoint_names_its_classes(tmp_path, monkeypatch):
    """The class names a checkpoint carries reach the results of every engine and the export
    made from it; ``labels=`` still replaces them."""
    from cavmae.labels import LabelSet
    from cavmae.runtime.classify_records import label_names

    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    torch.manual_seed(1)
    names = LabelSet(names=("dog bark", "rain", "siren"), ids=("/m/a", "/m/b", "/m/c"))
    ckpt = save_checkpoint(CAVMAEFT(TINY.replace(num_classes=3)).eval(), tmp_path / "mine.pth", labels=names)
    for engine in ENGINES:
        pipe = load(ckpt, engine=engine, device="cpu")
        assert label_names(pipe) == names.names, engine
    export_model(ckpt, tmp_path / "export", max_batch=1)
    assert load(tmp_path / "export", device="cpu").manifest.labels == names.names
    (tmp_path / "other.csv").write_text("index,mid,display_name\n0,x,one\n1,y,two\n2,z,three\n")
    assert load(ckpt, engine="torch", device="cpu", labels=tmp_path / "other.csv").manifest.labels == ("one", "two", "three")


def test_a_checkpoint_serves_the_mode_and_task_it_was_finetuned_for(tmp_path, monkeypatch, clips):
    """An audio-only model trained with cross-entropy must not be served through the
    audio-visual head it never trained, nor with sigmoid scores."""
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    torch.manual_seed(2)
    ckpt = save_checkpoint(CAVMAEFT(TINY.replace(num_classes=3)).eval(), tmp_path / "audio.pth",
                           finetune_mode="audioonly", task="single-label")
    clip = clips[AUDIOSET_CLIP.name]
    for engine in ENGINES:
        pipe = load(ckpt, engine=engine, device="cpu")
        assert pipe.classify_modes == ("audio",) and pipe.manifest.task == "single-label", engine
        assert pipe.classify(clip.audio, None, "audio").sum() == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(ModelKindError, match="cannot classify in mode 'av'"):
            pipe.classify(clip.audio, clip.frames, "av")
    manifest = export_model(ckpt, tmp_path / "export", max_batch=1).manifest
    assert (manifest.finetune_mode, manifest.task) == ("audioonly", "single-label")
    assert "joint_classifier" not in manifest.graphs
    from cavmae.cli.main import cli

    run = CliRunner().invoke(cli, ["export", str(ckpt), "-o", str(tmp_path / "cli-export"), "--json"])
    assert run.exit_code == 0, run.output
    assert (Manifest.load(tmp_path / "cli-export").finetune_mode, Manifest.load(tmp_path / "cli-export").task) \
        == ("audioonly", "single-label")


BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_where_torch_cannot_be_imported(classifier_files, clips, tmp_path):
    model, _, export_dir = classifier_files
    clip = clips[AUDIOSET_CLIP.name]
    want = reference_loop(model, clip.audio, clip.frames)
    code = BLOCK_TORCH + f"""
import json
from cavmae.runtime import load
pipe = load({str(export_dir)!r}, engine="ort", device="cpu")
pred = pipe.classify_file({str(AUDIOSET_CLIP)!r})
ea, ev = pipe.embed(*[getattr(__import__("cavmae.media", fromlist=["x"]).load_clip({str(AUDIOSET_CLIP)!r}), k) for k in ("audio", "frames")])
print(json.dumps({{"probs": pred.probs.tolist(), "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    np.testing.assert_allclose(np.array(result["probs"]), want, atol=1e-4)
