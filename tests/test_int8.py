"""int8 exports end to end on a tiny classifier: quantize, gate on the sample clips, manifest
report, pipeline, and a refused gate that leaves nothing on disk. No timing assertions."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cavmae import CAVMAEFT, TINY, save_checkpoint
from cavmae.cpu_flags import int8_products_saturate
from cavmae.export import export_model
from cavmae.export.int8 import Int8GateError, Int8Options
from cavmae.manifest import Manifest
from cavmae.media import load_clip
from cavmae.runtime import load
from conftest import AUDIOSET_CLIP, VGGSOUND_CLIP
from media_factory import make_media, make_text_file

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))
#: the graphs of a quick gated export: both encoders and the classifier the gate compares
GATE_GRAPHS = ["audio_encoder", "visual_encoder", "joint_classifier"]
QUANT_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"}


def run(*args: str, home: Path, progress: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAVMAE_HOME": str(home)}
    if progress:  # stderr is a pipe here: one line per step
        env.pop("CAVMAE_NO_PROGRESS", None)
    else:
        env["CAVMAE_NO_PROGRESS"] = "1"
    return subprocess.run([CAVMAE_EXE, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny 527-class classifier (weights perturbed so the classes do not all tie)."""
    tmp = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    model = CAVMAEFT(TINY.replace(num_classes=527)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, save_checkpoint(model, tmp / "ft.pth"), tmp


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _reference_top5(model: CAVMAEFT, clip) -> set[int]:
    """The reference loop in fp32 PyTorch: the whole forward per frame, sigmoid averaged."""
    a = torch.from_numpy(clip.audio)[None]
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(a, torch.from_numpy(f)[None])) for f in clip.frames])
    return set(np.argsort(-probs.mean(0).numpy())[:5].tolist())


def test_cli_int8_export_gates_reports_and_runs(tiny):
    model, ckpt, tmp = tiny
    out = tmp / "int8"
    r = run("export", str(ckpt), "-o", str(out), "--precision", "int8", "--max-batch", "2", "--json",
            home=tmp / "home")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    manifest = Manifest.load(out)
    assert manifest.precision == "int8"
    gate = manifest.quantization
    assert gate == summary["int8_gate"]
    assert gate["method"] == "dynamic" and gate["per_channel"] is True and gate["passed"] is True
    # 7-bit weights exactly where this CPU's int8 products would saturate (no VNNI)
    assert gate["reduce_range"] is int8_products_saturate()
    # the gate ran on both sample clips, per clip and per classifier graph
    assert [c["clip"] for c in gate["clips"]] == sorted([AUDIOSET_CLIP.name, VGGSOUND_CLIP.name])
    for c in gate["clips"]:
        assert 4 <= c["top5_shared"] <= 5
        assert "joint_classifier" in c["top5_by_graph"]
        assert 0 <= c["probs_max_abs"] < 0.05
        assert set(c["cosines"]) >= {"audio_embedding", "visual_embedding", "audio_tokens", "visual_tokens"}
        assert min(c["cosines"].values()) >= 0.99
    assert gate["worst"]["top5_shared_min"] == min(c["top5_shared"] for c in gate["clips"])
    # the encoders really are int8 on disk, and the head's Gemm stayed fp32
    for name in ("audio_encoder", "visual_encoder", "joint_classifier"):
        assert manifest.graphs[name].precision == "int8"
        assert "MatMulInteger" in _ops(out / manifest.graphs[name].file)
    head = [n for n in onnx.load(str(out / "joint_classifier.onnx")).graph.node if "mlp_head" in n.name]
    assert {n.op_type for n in head} & {"Gemm", "MatMul"} and not {n.op_type for n in head} & QUANT_OPS
    assert gate["kept_fp32"]  # the head's product, named in the report
    # the runtime runs the int8 export and agrees with the reference loop
    pipe = load(out, engine="ort", device="cpu")
    clip = load_clip(AUDIOSET_CLIP)
    probs = pipe.classify(clip.audio, clip.frames)
    assert probs.shape == (527,) and np.isfinite(probs).all()
    assert len(set(np.argsort(-probs)[:5].tolist()) & _reference_top5(model, clip)) >= 4
    # dynamic int8 scales activations per run; runs never span two clips (cavmae.run_sizes),
    # so a clip's result is the same alone and in a batch
    other = load_clip(VGGSOUND_CLIP)
    batched = pipe.classify_batch(np.stack([clip.audio, other.audio]), np.stack([clip.frames, other.frames]))
    np.testing.assert_array_equal(batched, np.stack([probs, pipe.classify(other.audio, other.frames)]))
    # the embedding graphs hold int8 products too: the same holds for embeddings
    audio2, frames2 = np.stack([clip.audio, other.audio]), np.stack([clip.frames, other.frames])
    np.testing.assert_array_equal(pipe.embed_audio(audio2)[0], pipe.embed_audio(clip.audio[None])[0])
    for frame in ("middle", "mean"):
        np.testing.assert_array_equal(pipe.embed_frames(frames2, frame)[1],
                                      pipe.embed_frames(other.frames[None], frame)[0])
    pipe.close()


def test_cli_classify_precision(tiny):
    """``classify --precision``: a checkpoint is exported in int8 (gated) into the cache on first
    use; an export directory runs at its own precision and refuses another; a precision the
    engine does not run is one line before any work; bf16 runs on the torch engine."""
    _, ckpt, tmp = tiny
    home = tmp / "classify-home"
    r = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--precision", "int8", "--json", home=home,
            progress=True)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["top"]) == 5
    # the int8 step says what it does: the reference run, each graph quantized, the gate
    steps = [line for line in r.stderr.splitlines() if line.startswith("export: int8: ")]
    assert "fp32 reference outputs on 2 clip(s)" in steps[0]
    assert any("joint_classifier quantized" in line for line in steps)
    assert steps[-1].startswith("export: int8: gate passed (2 clip(s), top-5 shared >= ")
    (export,) = [d for d in (home / "exports").iterdir() if (d / "manifest.json").is_file()]
    manifest = Manifest.load(export)
    assert manifest.precision == "int8" and manifest.quantization["passed"]
    # the export directory: its own precision by default, another one refused
    r = run("classify", str(AUDIOSET_CLIP), "-m", str(export), "--json", home=home)
    assert r.returncode == 0, r.stderr
    r = run("classify", str(AUDIOSET_CLIP), "-m", str(export), "--precision", "fp32", home=home)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("Error: ") and "is an export in int8, not fp32" in r.stderr
    # bf16 is the torch engine's: refused on ONNX Runtime before anything is exported
    fresh = tmp / "bf16-home"
    r = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--precision", "bf16", home=fresh)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--engine torch" in r.stderr, r.stderr
    assert not (fresh / "exports").exists()
    r = run("classify", str(AUDIOSET_CLIP), "-m", str(ckpt), "--engine", "torch", "--precision", "bf16",
            "--json", home=fresh)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["top"]) == 5


def test_cli_int8_gate_refusal_leaves_nothing(tiny):
    _, ckpt, tmp = tiny
    clips = tmp / "calib"
    clips.mkdir()
    shutil.copy(VGGSOUND_CLIP, clips / VGGSOUND_CLIP.name)
    before = set(tmp.iterdir())
    out = tmp / "refused"
    r = run("export", str(ckpt), "-o", str(out), "--precision", "int8", "--max-batch", "1",
            "--calibration", str(clips), "--int8-min-cosine", "1", home=tmp / "home")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: int8 accuracy gate failed")
    assert VGGSOUND_CLIP.name in lines[0] and "--int8-min-cosine" in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert set(tmp.iterdir()) == before  # no temporary sibling left either


def test_calibration_dir_without_clips_is_one_error(tiny, tmp_path):
    _, ckpt, tmp = tiny
    (tmp_path / "notes.txt").write_text("no clips here")
    r = run("export", str(ckpt), "-o", str(tmp_path / "out"), "--precision", "int8",
            "--calibration", str(tmp_path), home=tmp / "home")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("Error: calibration clips: no video files")
    assert not (tmp_path / "out").exists()


def test_calibration_clips_the_gate_cannot_use_are_skipped(tiny, tmp_path, caplog):
    model, _, _ = tiny
    clips = tmp_path / "calib"
    clips.mkdir()
    shutil.copy(VGGSOUND_CLIP, clips / "b_good.mp4")
    make_media(clips / "a_audio_only.mp4", with_video=False)
    make_text_file(clips / "c_not_media.mp4")
    with caplog.at_level(logging.WARNING, logger="cavmae.export.int8"):
        result = export_model(model, tmp_path / "out", "int8", max_batch=1, graphs=GATE_GRAPHS,
                              int8=Int8Options(calibration=clips))
    assert [c["clip"] for c in result.manifest.quantization["clips"]] == ["b_good.mp4"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"skipped {clips / 'a_audio_only.mp4'}: has no video stream")
    assert warnings[1].startswith(f"skipped {clips / 'c_not_media.mp4'}")


def test_calibration_without_a_usable_clip_fails_before_tracing(tiny, tmp_path):
    _, ckpt, tmp = tiny
    make_media(tmp_path / "audio_only.mp4", with_video=False)
    make_media(tmp_path / "video_only.mp4", with_audio=False)
    r = run("export", str(ckpt), "-o", str(tmp_path / "out"), "--precision", "int8",
            "--calibration", str(tmp_path), home=tmp / "home", progress=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["warning", "warning", "Error"], r.stderr  # no graph traced
    assert "audio_only.mp4: has no video stream" in lines[0] and "video_only.mp4: has no audio" in lines[1]
    assert lines[2] == ("Error: calibration clips: none of the 2 clip(s) can be used (each skipped with a"
                        " warning); the int8 gate needs clips with an audio and a video stream")
    assert not (tmp_path / "out").exists()


def test_static_qdq_and_runtime_load_with_precision(tiny, tmp_path, monkeypatch):
    model, ckpt, _ = tiny
    # static QDQ, calibrated on the sample clips, through the library
    graphs = ["audio_encoder", "visual_encoder", "joint_classifier"]
    result = export_model(model, tmp_path / "static", "int8", max_batch=1, graphs=graphs,
                          int8=Int8Options(method="static"))
    gate = result.manifest.quantization
    assert gate["method"] == "static" and gate["worst"]["top5_shared_min"] >= 4
    assert "QuantizeLinear" in _ops(tmp_path / "static" / "visual_encoder.onnx")
    # an impossible gate through the library: the typed error, nothing written
    impossible = Int8Options(min_top5=5, min_cosine=1.0, calibration=[AUDIOSET_CLIP])
    with pytest.raises(Int8GateError, match="int8 accuracy gate failed"):
        export_model(model, tmp_path / "never", "int8", max_batch=1, graphs=graphs, int8=impossible)
    assert not (tmp_path / "never").exists()
    # a checkpoint opened with precision="int8" is exported (gated) into the cache once
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    pipe = load(ckpt, engine="ort", device="cpu", precision="int8", max_batch=1)
    assert pipe.manifest.precision == "int8" and pipe.manifest.quantization["passed"]
    clip = load_clip(VGGSOUND_CLIP)
    assert pipe.classify(clip.audio, clip.frames).shape == (527,)
    pipe.close()



def test_bench_runs_int8_beside_fp32_and_torch_bf16_on_cpu(tiny):
    _, ckpt, tmp = tiny
    r = run("bench", "-m", str(ckpt), "--engine", "ort", "--engine", "torch", "--precision", "int8",
            "--torch-precision", "bf16", "--device", "cpu", "--batch", "1", "--warmup", "0",
            "--repeat", "1", "--no-stages", "--json", home=tmp / "bench-home")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["ratios"]) == {"ort/batch1", "ort-int8/batch1", "torch-bf16/batch1"}
    names = {t["name"] for t in result["timings"]}
    assert {"ort classify", "ort-int8 classify", "torch-bf16 classify"} <= names
    assert result["engines"]["torch-bf16"].startswith("torch bf16 on cpu")


@pytest.mark.parametrize(("per_channel", "reduce_range"), [(True, False), (False, False), (True, True)])
def test_dynamic_quantization_writes_what_onnx_runtime_writes(tmp_path, per_channel, reduce_range):
    """cavmae.export.dynamic_int8 against onnxruntime.quantization.quantize_dynamic on the tiny
    encoder and joint classifier: the same int8 weights, scales and zero points under the same
    names, the encoder's outputs bit for bit; the joint classifier's within float rounding (ONNX
    Runtime also rewrites the fp32 head's Gemm into MatMul + Add; here it stays a Gemm)."""
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cavmae.export.dynamic_int8 import quantize_dynamic_int8
    from cavmae.export.int8 import INT8_OPS, nodes_to_quantize
    from cavmae.export.onnx_export import export_stage
    from cavmae.stages import build_stages

    torch.manual_seed(0)
    stages = build_stages(CAVMAEFT(TINY.replace(num_classes=527)).eval(), num_frames=2, max_batch=2)
    for name, exact in (("audio_encoder", True), ("joint_classifier", False)):
        src, theirs, ours = (tmp_path / f"{name}.{k}.onnx" for k in ("fp32", "ort", "ours"))
        export_stage(stages[name], src)
        nodes = nodes_to_quantize(src)
        quantize_dynamic(src, theirs, op_types_to_quantize=list(INT8_OPS), per_channel=per_channel,
                         weight_type=QuantType.QInt8, nodes_to_quantize=nodes, reduce_range=reduce_range,
                         extra_options={"MatMulConstBOnly": True})
        count = quantize_dynamic_int8(src, ours, nodes, per_channel=per_channel,  # weight products only
                                      reduce_range=reduce_range)
        want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(theirs)).graph.initializer}
        got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ours)).graph.initializer}
        quantized = [k for k in want if k.endswith(("_quantized", "_scale", "_zero_point"))]
        assert len(quantized) == 3 * count > 0
        for k in quantized:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        feeds = stages[name].sample(np.random.default_rng(1), 2)
        run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds) for p in (theirs, ours)]
        for a, b in zip(*run, strict=True):
            if exact:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("flags", "machine", "saturate"), [
    ({"avx2", "avx512bw"}, "x86_64", True),  # vpmaddubsw: 16-bit pair sums
    ({"avx2", "avx512_vnni"}, "x86_64", False),
    ({"avx2", "avx_vnni"}, "x86_64", False),
    ({"avx2", "amx_int8"}, "x86_64", False),
    ({"asimd"}, "aarch64", False),
])
def test_int8_products_saturate_where_the_cpu_has_no_vnni(flags, machine, saturate):
    assert int8_products_saturate(frozenset(flags), machine) is saturate


def test_reduced_range_weights_keep_every_pair_sum_in_16_bits():
    from cavmae.export.dynamic_int8 import quantize_weight

    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    q, _ = quantize_weight(w, per_channel=True, reduce_range=True)
    assert int(np.abs(q.astype(np.int32)).max()) == 64 and 2 * 255 * 64 <= 32767
