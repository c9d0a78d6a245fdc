"""Editing a serialized ONNX model without re-serializing its weights gives the same model as
parsing, editing and serializing it whole."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

from cavmae import CAVMAEFT, TINY
from cavmae.export.onnx_export import export_stage, stamp_shapes
from cavmae.export.onnx_wire import write_edited_model
from cavmae.stages import build_stages

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter


def _traced_bytes(stage) -> bytes:
    args = tuple(torch.from_numpy(v) for v in stage.sample(np.random.default_rng(0), 2).values())
    buffer = io.BytesIO()
    torch.onnx.export(stage.module, args, buffer, input_names=[t.name for t in stage.spec.inputs],
                      output_names=[t.name for t in stage.spec.outputs],
                      dynamic_axes=stage.decl.dynamic_axes(), opset_version=17, dynamo=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stages():
    torch.manual_seed(0)
    return build_stages(CAVMAEFT(TINY).eval(), num_frames=2, max_batch=2)


@pytest.mark.parametrize("name", ["audio_encoder", "joint_classifier"])
def test_edited_file_is_the_model_edited_whole(stages, name, tmp_path):
    stage = stages[name]
    data = _traced_bytes(stage)
    whole = onnx.load_from_string(data)
    stamp_shapes(whole, stage)
    path = tmp_path / "edited.onnx"
    write_edited_model(data, path, lambda m: stamp_shapes(m, stage))
    edited = onnx.load(str(path))
    assert len(edited.graph.initializer) == len(whole.graph.initializer) > 0
    # the same model, field by field; only where the weights sit in the bytes differs
    assert edited == whole
    assert [d.dim_value or d.dim_param for d in edited.graph.output[0].type.tensor_type.shape.dim] == \
        list(stage.spec.outputs[0].shape)
    onnx.checker.check_model(str(path), full_check=True)


def test_export_stage_writes_a_file_onnx_runtime_runs(stages, tmp_path):
    import onnxruntime as ort

    stage = stages["audio_encoder"]
    inputs = stage.sample(np.random.default_rng(1), 2)
    want = export_stage(stage, tmp_path / "a.onnx", inputs=inputs)
    session = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True))
    for out, value in want.items():
        np.testing.assert_allclose(got[out], value, rtol=1e-4, atol=1e-5)


def test_an_edit_that_adds_weights_is_refused(stages, tmp_path):
    data = _traced_bytes(stages["audio_encoder"])

    def adds(model: onnx.ModelProto) -> None:
        model.graph.initializer.add().name = "extra"

    with pytest.raises(ValueError, match="must not add initializers"):
        write_edited_model(data, tmp_path / "x.onnx", adds)


def test_truncated_bytes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="truncated"):
        write_edited_model(b"\x3a\xff\x01", tmp_path / "x.onnx", lambda m: None)
