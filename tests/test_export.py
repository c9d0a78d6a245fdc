"""Export: graphs, manifest, validation, fp16, failure handling."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from cavmae import BASE, CAVMAE, CAVMAEFT, TINY, save_checkpoint
from cavmae.errors import ExportError
from cavmae.export import OPSET, export_model
from cavmae.manifest import Manifest


@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return CAVMAEFT(TINY).eval()


def _assert_static_except_batch(path, manifest_graph):
    model = onnx.load(str(path))
    assert model.opset_import[0].version == OPSET <= 20
    # weights inside the file: no external data
    assert all(not init.external_data for init in model.graph.initializer)
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        assert all(d.dim_value > 0 for d in dims[1:]), vi.name
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Softmax"} <= ops
    assert not ops & {"RandomUniform", "RandomNormal", "RandomUniformLike", "NonZero", "Multinomial"}


def test_classifier_export_writes_graphs_and_manifest(tmp_path, tiny_classifier):
    path = save_checkpoint(tiny_classifier, tmp_path / "ft.pth")
    result = export_model(path, tmp_path / "out", num_frames=10, max_batch=4)
    m = Manifest.load(tmp_path / "out")
    assert set(m.graphs) == {"audio_encoder", "visual_encoder", "audio_embed", "visual_embed",
                             "joint_classifier", "audio_classifier", "visual_classifier"}
    assert m.model_kind == "classifier" and m.task == "multi-label" and m.num_frames == 10
    assert m.graphs["visual_encoder"].max_batch == 40 and m.graphs["joint_classifier"].max_batch == 4
    assert m.graphs["joint_classifier"].input("visual_tokens").shape == ("batch", 10, 196, 64)
    assert m.source["sha256"] and len(m.source["sha256"]) == 64
    assert m.versions["opset"] == OPSET and "torch" in m.versions
    assert m.preprocess.fbank_mean == -5.081
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert raw["schema_version"] == 1
    for name, spec in m.graphs.items():
        _assert_static_except_batch(tmp_path / "out" / spec.file, spec)
        assert result.reports[name].passed
        assert all(o.max_rel_error <= 1e-4 for o in result.reports[name].outputs)


def test_finetune_mode_selects_heads(tmp_path, tiny_classifier):
    r = export_model(tiny_classifier, tmp_path / "a", finetune_mode="audioonly", task="single-label")
    assert "joint_classifier" not in r.manifest.graphs and "visual_classifier" not in r.manifest.graphs
    assert r.manifest.modes == ("audioonly",) and r.manifest.task == "single-label"


def test_pretrain_export_fixed_kept_tokens(tmp_path):
    torch.manual_seed(0)
    r = export_model(CAVMAE(TINY), tmp_path / "pt", mask_ratio_a=0.75, mask_ratio_v=0.5)
    m = r.manifest
    assert m.model_kind == "pretrain" and m.mask_ratio_v == 0.5
    assert m.graphs["masked_encoder"].input("ids_keep_a").shape == ("batch", 128)
    assert m.graphs["masked_encoder"].input("ids_keep_v").shape == ("batch", 98)
    assert m.graphs["masked_encoder"].input("ids_keep_a").dtype == "int64"
    assert m.graphs["decoder"].outputs[1].shape == ("batch", 196, 768)
    assert all(rep.passed for rep in r.reports.values())


def test_fp16_export_validates(tmp_path, tiny_classifier):
    r = export_model(tiny_classifier, tmp_path / "h", precision="fp16", graphs=["audio_encoder", "visual_encoder", "joint_classifier"])
    assert r.manifest.precision == "fp16"
    rep = r.reports["joint_classifier"]
    assert rep.passed and rep.outputs[1].topk_agree
    assert all(o.min_cosine >= 0.999 for rep in r.reports.values() for o in rep.outputs)
    # fp16 weights really are fp16, LayerNorm stays float32
    model = onnx.load(str(tmp_path / "h" / "audio_encoder.onnx"))
    dtypes = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    # float32 I/O, so callers feed the same arrays to both precisions
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_failed_validation_fails_export_and_leaves_nothing(tmp_path, tiny_classifier, monkeypatch):
    import cavmae.export.validate as validate
    from cavmae.graphs import Tolerance

    real = validate.check_output

    def strict(name, got, ref, precision, tolerance=None):
        return real(name, got, ref, precision, Tolerance(fp32_max_rel_error=0.0))  # nothing passes

    monkeypatch.setattr(validate, "check_output", strict)
    with pytest.raises(ExportError, match="validation failed for audio_encoder"):
        export_model(tiny_classifier, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.iterdir())  # the temporary directory is gone too


def test_overwrite_keeps_the_checkpoint_it_exports(tmp_path, tiny_classifier):
    out = tmp_path / "export"
    export_model(tiny_classifier, out, graphs=["audio_encoder"], validate=False)
    ckpt = save_checkpoint(tiny_classifier, out / "ft.pth")
    with pytest.raises(ExportError, match="inside"):
        export_model(ckpt, out, graphs=["audio_encoder"], validate=False, overwrite=True)
    assert ckpt.is_file()
    # nor any other file of the user's in it (the checkpoint, once given as a model object)
    with pytest.raises(ExportError, match="ft.pth, which no export writes"):
        export_model(tiny_classifier, out, graphs=["audio_encoder"], validate=False, overwrite=True)
    assert ckpt.is_file()
    ckpt.unlink()
    export_model(tiny_classifier, out, graphs=["audio_encoder"], validate=False, overwrite=True)
    assert Manifest.load(out).graphs  # an earlier export is replaced


def test_overwrite_refuses_an_export_holding_the_users_files(tmp_path, tiny_classifier):
    from cavmae.fsio import temp_sibling

    out = tmp_path / "export"
    export_model(tiny_classifier, out, graphs=["audio_encoder"], validate=False)
    # what exports and engines write there: caches, a Triton model, a dead run's temporary file
    for name in (".ort/audio_encoder.cpu.x.onnx", ".trt/engine.plan", "triton/audio_encoder/config.pbtxt",
                 "triton/cavmae_classify/config.pbtxt", "visual_encoder.onnx", temp_sibling(out / "x").name):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("written by cavmae")
    mine = [out / "my_notes.txt", out / "triton" / "my_model" / "config.pbtxt"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep me")
    with pytest.raises(ExportError, match=r"my_notes.txt and 1 more, which no export writes") as info:
        export_model(tiny_classifier, out, graphs=["audio_encoder"], validate=False, overwrite=True)
    assert "\n" not in str(info.value)
    assert all(p.read_text() == "keep me" for p in mine) and (out / ".ort").is_dir()
    mine[0].unlink()
    with pytest.raises(ExportError, match=r"holds \S*my_model, which"):  # the other Triton model
        export_model(tiny_classifier, out, graphs=["audio_encoder"], validate=False, overwrite=True)
    shutil.rmtree(mine[1].parent)
    export_model(tiny_classifier, out, graphs=["audio_encoder"], validate=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["audio_encoder.onnx", "manifest.json"]


def test_refuses_to_overwrite_and_bad_arguments(tmp_path, tiny_classifier):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    for overwrite in (False, True):  # --overwrite replaces an earlier export, not a folder of files
        with pytest.raises(ExportError, match="not empty and holds no earlier export"):
            export_model(tiny_classifier, tmp_path / "full", overwrite=overwrite)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(ExportError, match="precision"):
        export_model(tiny_classifier, tmp_path / "p", precision="int4")
    with pytest.raises(ExportError, match="unknown graph"):
        export_model(tiny_classifier, tmp_path / "g", graphs=["nope"])
    with pytest.raises(ExportError, match="label set has 3 classes"):
        export_model(tiny_classifier, tmp_path / "l", labels=["a", "b", "c"])


@pytest.mark.slow
@pytest.mark.parametrize("cls", [CAVMAEFT, CAVMAE])
def test_full_size_export_validates_and_pipelines_match(tmp_path, cls):
    """The real graphs: full-size random weights in the reference format, every graph validated,
    then the ort pipeline against the PyTorch model on a real clip (classification with the
    reference per-frame loop, embeddings, localization; reconstruction for pre-training)."""
    from cavmae import load_checkpoint
    from cavmae.masking import draw_noise
    from cavmae.media import load_clip
    from cavmae.runtime import load
    from conftest import AUDIOSET_CLIP

    torch.manual_seed(0)
    model = cls(BASE).eval()
    with torch.no_grad():  # trained-looking position embeddings and norms, not the init values
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "model.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    del model
    r = export_model(path, tmp_path / "out", max_batch=1)
    assert all(rep.passed for rep in r.reports.values()), {k: v.summary() for k, v in r.reports.items()}
    for spec in r.manifest.graphs.values():
        onnx.checker.check_model(str(tmp_path / "out" / spec.file), full_check=True)
        _assert_static_except_batch(tmp_path / "out" / spec.file, spec)
    size = sum((tmp_path / "out" / s.file).stat().st_size for s in r.manifest.graphs.values())
    assert size > 4 * 150e6  # weights really are inside the files

    model = load_checkpoint(path)
    pipe = load(tmp_path / "out", engine="ort", device="cpu")
    clip = load_clip(AUDIOSET_CLIP)
    audio, frames = torch.from_numpy(clip.audio)[None], torch.from_numpy(clip.frames)
    with torch.no_grad():
        a_tokens, v_tokens = model.forward_feat(audio, frames[5:6])
        ea, ev = model.embed(audio, frames[5:6])
    got_a, got_v = pipe.embed(clip.audio, clip.frames)
    np.testing.assert_allclose(got_a, ea[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(got_v, ev[0].numpy(), atol=1e-4)
    want_heat = torch.nn.functional.normalize(v_tokens[0], dim=-1) @ ea[0]
    np.testing.assert_allclose(pipe.localize(clip.audio, clip.frames[5]).ravel(), want_heat.numpy(), atol=1e-4)
    if cls is CAVMAEFT:
        assert r.manifest.labels is not None and len(r.manifest.labels) == 527 and r.manifest.labels[0] == "Speech"
        with torch.no_grad():
            want = torch.stack([torch.sigmoid(model(audio, frames[i : i + 1]))[0] for i in range(10)]).mean(0)
        np.testing.assert_allclose(pipe.classify(clip.audio, clip.frames), want.numpy(), atol=1e-4)
    else:
        rec = pipe.reconstruct(clip.audio, clip.frames[5], seed=3)
        rng = np.random.default_rng(3)
        noise_a = torch.from_numpy(draw_noise(rng, 1, 512, (8, 64), 0.75))
        noise_v = torch.from_numpy(draw_noise(rng, 1, 196))
        with torch.no_grad():
            out = model(audio, frames[5:6], noise_a=noise_a, noise_v=noise_v)
        np.testing.assert_array_equal(rec.mask_a, out.mask_a[0].numpy())
        assert rec.mse_a == pytest.approx(out.loss_mae_a.item(), rel=1e-3)
        assert rec.mse_v == pytest.approx(out.loss_mae_v.item(), rel=1e-3)


def test_two_exports_in_two_threads_both_succeed(tmp_path, tiny_classifier):
    """torch.onnx.export keeps global state: two exports in one process must take turns tracing,
    not fail one another."""
    import threading

    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            export_model(tiny_classifier, tmp_path / name, graphs=["audio_encoder", "audio_embed"], templates=None)
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and all((tmp_path / n / "audio_encoder.onnx").is_file() for n in ("a", "b"))
