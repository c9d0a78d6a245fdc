"""Graph templates: a graph filled with a checkpoint's weights computes what tracing it would, an
export fills the graphs it has templates for (and traces when a template does not fit), and
the shipped templates cover the released checkpoints and are what the builder makes today."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import cavmae.export.onnx_export as onnx_export
from cavmae import BASE, CAVMAEFT, TINY, save_checkpoint
from cavmae.export import export_model
from cavmae.export.graph_templates import (
    FORMAT,
    INDEX_NAME,
    TEMPLATE_DIR,
    TemplateMismatch,
    fill_template,
    read_template,
    template_key,
)
from cavmae.export.template_build import (
    Target,
    _random_model,
    build_all,
    build_template,
    released_targets,
)
from cavmae.export.validate import validate_graph
from cavmae.runtime import load
from cavmae.stages import plan_graphs, stage_of

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter

TINY_TARGET = Target("classifier", TINY.replace(num_classes=527), "multi-label", "multimodal")
FILLED = ("audio_encoder", "visual_encoder", "joint_classifier")


@pytest.fixture(scope="module")
def tiny_templates(tmp_path_factory) -> Path:
    """Templates of the tiny classifier's encoders and joint classifier at 2 frames, as the
    builder makes them, in a directory of their own."""
    out = tmp_path_factory.mktemp("templates")
    plan = plan_graphs("classifier", TINY_TARGET.config, num_frames=2, max_batch=2)
    index = {}
    for name in FILLED:
        (out / f"{name}.onnx").write_bytes(build_template(TINY_TARGET, plan[name]))
        index[template_key(plan[name], TINY_TARGET.config.to_dict(), onnx_export.OPSET)] = f"{name}.onnx"
    (out / INDEX_NAME).write_text(json.dumps({"format": FORMAT, "templates": index}))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    model = CAVMAEFT(TINY_TARGET.config).eval()
    with torch.no_grad():  # no two weights equal (the default init has ones and zeros)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.mark.parametrize("name", ["audio_encoder", "joint_classifier"])
def test_a_filled_template_computes_the_stage(name, tmp_path):
    planned = TINY_TARGET.plan()[name]
    data = build_template(TINY_TARGET, planned)
    template, weights = read_template(data)
    assert weights and not {w.name for w in weights} & {t.name for t in template.graph.initializer}
    assert len(data) < 100_000  # nodes and constants only
    stage = stage_of(_random_model(TINY_TARGET, seed=11), planned)  # weights the template never saw
    fill_template(data, stage.module, tmp_path / "g.onnx")
    onnx.checker.check_model(str(tmp_path / "g.onnx"), full_check=True)
    report = validate_graph(stage, tmp_path / "g.onnx", "fp32", batch=1, seed=5)
    assert report.passed, report.summary()


def test_a_template_refuses_a_model_it_does_not_fit(tmp_path):
    planned = TINY_TARGET.plan()["joint_classifier"]
    data = build_template(TINY_TARGET, planned)
    other = Target("classifier", TINY.replace(num_classes=309), "multi-label", "multimodal")
    stage = stage_of(_random_model(other, seed=1), other.plan()["joint_classifier"])
    with pytest.raises(TemplateMismatch, match="mlp_head"):
        fill_template(data, stage.module, tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()


def _outputs(export_dir: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((TINY.audio_length, TINY.num_mel_bins), dtype=np.float32)
    frames = rng.standard_normal((2, 3, TINY.image_size, TINY.image_size), dtype=np.float32)
    pipe = load(export_dir, engine="ort", device="cpu")
    return {"probs": pipe.classify(audio, frames), "audio_embed": pipe.embed_audio(audio[None])}


def test_an_export_fills_its_graphs_from_templates(tiny_templates, ckpt, tmp_path, monkeypatch):
    traced: list[str] = []
    real = onnx_export.export_stage
    monkeypatch.setattr(onnx_export, "export_stage", lambda s, *a, **k: traced.append(s.decl.name) or real(s, *a, **k))
    filled = export_model(ckpt, tmp_path / "filled", num_frames=2, max_batch=2, templates=tiny_templates)
    assert {n for n, r in filled.reports.items() if r.template} == set(FILLED)
    assert set(traced) == set(filled.reports) - set(FILLED)
    recorded = json.loads((tmp_path / "filled" / "validation.json").read_text())["graphs"]
    assert recorded["joint_classifier"]["template"] == "joint_classifier.onnx"
    assert recorded["joint_classifier"]["batch"] == 1  # PyTorch ran on the one sample ONNX Runtime ran

    plain = export_model(ckpt, tmp_path / "traced", num_frames=2, max_batch=2, templates=None)
    assert not any(r.template for r in plain.reports.values())
    got, want = _outputs(tmp_path / "filled"), _outputs(tmp_path / "traced")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_template_that_fails_validation_is_traced_instead(tiny_templates, ckpt, tmp_path, caplog):
    broken = tmp_path / "templates"
    broken.mkdir()
    for f in tiny_templates.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    model, weights = read_template((broken / "joint_classifier.onnx").read_bytes())
    softmax = next(n for n in model.graph.node if n.op_type in ("Sigmoid", "Softmax"))
    softmax.op_type = "Relu"  # the graph no longer computes the stage
    if softmax.attribute:
        del softmax.attribute[:]
    model.metadata_props.add(key="cavmae.template.weights", value=json.dumps([w.to_list() for w in weights]))
    (broken / "joint_classifier.onnx").write_bytes(model.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="cavmae.export.onnx_export"):
        result = export_model(ckpt, tmp_path / "out", num_frames=2, max_batch=2, templates=broken,
                              graphs=list(FILLED))
    assert result.reports["joint_classifier"].passed and result.reports["joint_classifier"].template is None
    assert result.reports["audio_encoder"].template == "audio_encoder.onnx"
    assert "joint_classifier: the shipped template does not fit" in caplog.text


def test_the_shipped_templates_cover_every_released_checkpoint():
    index = json.loads((TEMPLATE_DIR / INDEX_NAME).read_text())
    for target in released_targets():
        for name, planned in target.plan().items():
            key = template_key(planned, target.config.to_dict(), onnx_export.OPSET)
            assert key in index["templates"], f"{target}: {name}"
            file = TEMPLATE_DIR / index["templates"][key]
            assert file.is_file() and file.stat().st_size < 300_000


@pytest.mark.slow
def test_the_shipped_templates_are_what_the_builder_makes():
    """One graph rebuilt full size (the joint classifier: seconds) is byte for byte the shipped
    one. The exporter's output depends on torch's version: on another, the shipped files still
    work (validation checks every filled graph) but are not rebuilt identically."""
    index = json.loads((TEMPLATE_DIR / INDEX_NAME).read_text())
    if index.get("torch") != torch.__version__:
        pytest.skip(f"templates built with torch {index.get('torch')}, this is {torch.__version__}")
    target = Target("classifier", BASE, "multi-label", "multimodal")
    (key, name, data, why), = [b for b in build_all([_only(target, "joint_classifier")], log=False)]
    assert data is not None, why
    assert (TEMPLATE_DIR / index["templates"][key]).read_bytes() == data


def _only(target: Target, graph: str) -> Target:
    class One(Target):
        def plan(self):
            return {graph: super().plan()[graph]}

    return One(target.kind, target.config, target.task, target.finetune_mode)


def test_templates_can_be_turned_off(tiny_templates, monkeypatch):
    from cavmae.export.graph_templates import NO_TEMPLATES_ENV, find_template

    planned = plan_graphs("classifier", TINY_TARGET.config, num_frames=2, max_batch=2)["joint_classifier"]
    assert find_template(planned, TINY_TARGET.config.to_dict(), onnx_export.OPSET, tiny_templates) is not None
    assert find_template(planned, TINY_TARGET.config.to_dict(), onnx_export.OPSET, None) is None
    monkeypatch.setenv(NO_TEMPLATES_ENV, "1")
    assert find_template(planned, TINY_TARGET.config.to_dict(), onnx_export.OPSET, tiny_templates) is None


def test_fp16_and_int8_exports_start_from_filled_graphs(ckpt, tmp_path):
    """fp16 converts, and int8 quantizes and gates, a filled fp32 graph as a traced one."""
    plan = plan_graphs("classifier", TINY_TARGET.config)  # 10 frames: the int8 gate's sample clips
    index = {}
    for name in FILLED:
        (tmp_path / f"{name}.onnx").write_bytes(build_template(TINY_TARGET, plan[name]))
        index[template_key(plan[name], TINY_TARGET.config.to_dict(), onnx_export.OPSET)] = f"{name}.onnx"
    (tmp_path / INDEX_NAME).write_text(json.dumps({"format": FORMAT, "templates": index}))
    for precision in ("fp16", "int8"):
        result = export_model(ckpt, tmp_path / precision, precision, max_batch=1, graphs=list(FILLED),
                              templates=tmp_path)
        assert all(r.passed and r.template == f"{n}.onnx" for n, r in result.reports.items()), precision
        assert result.manifest.precision == precision
    assert result.manifest.quantization["passed"]


def test_a_damaged_template_is_traced_instead(tiny_templates, ckpt, tmp_path):
    damaged = tmp_path / "templates"
    damaged.mkdir()
    for f in tiny_templates.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "visual_encoder.onnx").write_bytes(b"\x07not a model")
    with pytest.raises(TemplateMismatch, match="not a readable graph template"):
        read_template((damaged / "visual_encoder.onnx").read_bytes())
    result = export_model(ckpt, tmp_path / "out", num_frames=2, max_batch=2, templates=damaged,
                          graphs=["visual_encoder"])
    report = result.reports["visual_encoder"]
    assert report.passed and report.template is None
