"""Triton model repository: configs checked against Triton's own ModelConfig protobuf and the ONNX
files, the ensemble checked with a port of Triton's ensemble validation and run step by step in
ONNX Runtime with Triton's batch/no-batch shape rules."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cavmae import CAVMAE, CAVMAEFT, TINY
from cavmae.errors import CavmaeError, ExportError
from cavmae.export import export_model
from cavmae.export.triton import (
    BATCH_TO_FRAMES,
    ENSEMBLE_NAME,
    FRAMES_TO_BATCH,
    LABELS_FILE,
    write_triton_repository,
)
from cavmae.manifest import Manifest

NUM_FRAMES, MAX_BATCH = 4, 3
LABELS = [f'class "{i}" ünïcode' for i in range(TINY.num_classes)]
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


# --------------------------------------------------------------------------- Triton's protobuf
def _model_config_pb2():
    """``tritonclient.grpc.model_config_pb2``; without the grpc extra, the same generated file
    loaded directly (the package ``__init__`` insists on grpcio, the message module does not)."""
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except ImportError:
        pytest.skip("tritonclient is not installed (pip install 'tritonclient[grpc]')")
    except RuntimeError:
        spec = importlib.util.find_spec("tritonclient")
        path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
        mspec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        return module


@pytest.fixture(scope="module")
def pb2():
    return _model_config_pb2()


def parse_config(path: Path, pb2) -> Any:
    """Parse a config.pbtxt strictly: unknown fields, wrong types and bad enums all raise."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb2.ModelConfig())


def load_configs(repo: Path, pb2) -> dict[str, Any]:
    return {p.parent.name: parse_config(p, pb2) for p in sorted(repo.glob("*/config.pbtxt"))}


# --------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("triton") / "classifier"
    export_model(CAVMAEFT(TINY), out, num_frames=NUM_FRAMES, max_batch=MAX_BATCH, labels=LABELS)
    return out


@pytest.fixture(scope="module")
def classifier_repo(classifier_export) -> Path:
    repo = classifier_export.parent / "repo"
    write_triton_repository(classifier_export, repo, max_queue_delay_us=250, instance_kind="KIND_GPU")
    return repo


@pytest.fixture(scope="module")
def pretrain_repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("triton_pt")
    export_model(CAVMAE(TINY), base / "export", max_batch=2, graphs=["masked_encoder", "decoder", "audio_encoder"])
    write_triton_repository(base / "export", base / "repo")
    return base / "repo"


@pytest.fixture(scope="module")
def fp16_repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("triton_fp16")
    export_model(CAVMAEFT(TINY), base / "export", precision="fp16", num_frames=2, max_batch=2,
                 graphs=["audio_encoder", "visual_encoder", "joint_classifier"])
    write_triton_repository(base / "export", base / "repo", instance_kind="cpu")
    return base / "repo"


@pytest.fixture(scope="module")
def audio_only_repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("triton_audio")
    export_model(CAVMAEFT(TINY), base / "export", finetune_mode="audioonly", max_batch=2,
                 graphs=["audio_encoder", "audio_classifier"], labels=LABELS)
    write_triton_repository(base / "export", base / "repo")
    return base / "repo"


# --------------------------------------------------------------------------- ONNX-side facts
def onnx_io(path: Path) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``{name: (triton type, dims with -1 for symbolic axes)}`` for inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(vis):
        out = {}
        for vi in vis:
            t = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out[vi.name] = (ONNX_TO_TRITON[t.elem_type], dims)
        return out

    return describe(model.graph.input), describe(model.graph.output)


def assert_config_matches_onnx(name: str, cfg, model_dir: Path, pb2) -> None:
    """What Triton's ONNX Runtime backend checks at load time: names, types and dims (without
    the batch axis for batching models, whose first ONNX axis must then be dynamic)."""
    inputs, outputs = onnx_io(model_dir / "1" / "model.onnx")
    for declared, actual in ((cfg.input, inputs), (cfg.output, outputs)):
        assert {t.name for t in declared} == set(actual), name
        for t in declared:
            dtype, dims = actual[t.name]
            assert pb2.DataType.Name(t.data_type) == dtype, (name, t.name)
            if cfg.max_batch_size > 0:
                assert dims[0] == -1, (name, t.name, "batch axis must be dynamic")
                assert tuple(t.dims) == dims[1:], (name, t.name)
            else:
                assert tuple(t.dims) == dims, (name, t.name)


# --------------------------------------------------------------------------- Triton ensemble rules
@dataclass
class Node:
    """An ensemble tensor as Triton's validator sees it (``ensemble_utils.cc`` TensorNode)."""

    model: str
    dtype: int
    dims: tuple[int, ...]
    batching: bool

    @property
    def full_dims(self) -> tuple[int, ...]:
        return ((-1,) if self.batching else ()) + self.dims


def dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """``CompareDimsWithWildcard``: same rank, each axis equal or -1 on either side."""
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def validate_ensemble(ensemble, configs: dict[str, Any]) -> None:
    """A port of Triton's ``ValidateEnsembleConfig`` (minus decoupled models), plus the checks
    that every ensemble input is consumed and every output produced."""
    batching = ensemble.max_batch_size > 0
    tensors: dict[str, Node] = {}

    def consistent(name: str, node: Node) -> None:
        if name not in tensors:
            tensors[name] = node
            return
        have = tensors[name]
        assert have.dtype == node.dtype, f"{name}: type differs between {have.model} and {node.model}"
        assert dims_match(have.dims, node.dims) or dims_match(have.full_dims, node.full_dims), (
            f"{name}: {have.full_dims} from {have.model} vs {node.full_dims} from {node.model}"
        )

    for t in ensemble.input:
        tensors[t.name] = Node("ensemble", t.data_type, tuple(t.dims), batching)
    for t in ensemble.output:
        tensors[t.name] = Node("ensemble", t.data_type, tuple(t.dims), batching)
    produced = {t.name for t in ensemble.input}
    consumed: set[str] = set()
    for step in ensemble.ensemble_scheduling.step:
        assert step.model_name in configs, f"step uses {step.model_name}, not in the repository"
        cfg = configs[step.model_name]
        assert cfg.platform != "ensemble"
        if cfg.max_batch_size != 0:
            assert cfg.max_batch_size >= ensemble.max_batch_size, step.model_name
        model_batching = cfg.max_batch_size > 0
        ins = {t.name: t for t in cfg.input}
        outs = {t.name: t for t in cfg.output}
        # every model input mapped exactly once (a map cannot repeat a key), none invented
        assert set(step.input_map) == set(ins), step.model_name
        assert set(step.output_map) <= set(outs), step.model_name
        assert len(set(step.output_map.values())) == len(step.output_map)
        for key, value in step.input_map.items():
            # data flow: steps are listed in dependency order here, which Triton does not
            # require, but it makes "produced before consumed" a simple check
            assert value in produced, f"{step.model_name} reads {value} before anything writes it"
            consistent(value, Node(step.model_name, ins[key].data_type, tuple(ins[key].dims), model_batching))
            consumed.add(value)
        for key, value in step.output_map.items():
            consistent(value, Node(step.model_name, outs[key].data_type, tuple(outs[key].dims), model_batching))
            produced.add(value)
    assert {t.name for t in ensemble.input} <= consumed, "an ensemble input is never used"
    assert {t.name for t in ensemble.output} <= produced, "an ensemble output is never produced"


class TritonEnsembleSim:
    """Runs an ensemble the way Triton's ensemble scheduler does, each step in ONNX Runtime.

    It keeps each tensor's batch size (0 when a non-batching model made it) and applies
    ``EnsembleContext::ReshapeTensorDims`` before a step, then the request checks Triton makes
    (batch size <= max_batch_size, non-batch dims match the config).
    """

    def __init__(self, repo: Path, configs: dict[str, Any]) -> None:
        self.repo, self.configs = repo, configs
        self.sessions: dict[str, ort.InferenceSession] = {}

    def session(self, model: str) -> ort.InferenceSession:
        if model not in self.sessions:
            self.sessions[model] = ort.InferenceSession(
                str(self.repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
            )
        return self.sessions[model]

    @staticmethod
    def reshape_tensor_dims(config_dims, model_batching: bool, tensor_batch: int, shape):
        if model_batching != (tensor_batch != 0):
            if model_batching:
                if dims_match(tuple(config_dims), tuple(shape)):
                    return (1, *shape)
            elif not dims_match(tuple(config_dims), tuple(shape)) and tensor_batch == 1:
                return tuple(shape[1:])
        return tuple(shape)

    def run(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ensemble = self.configs[name]
        batch = len(next(iter(inputs.values())))
        assert 1 <= batch <= ensemble.max_batch_size
        tensors = {k: (v, batch) for k, v in inputs.items()}
        for step in ensemble.ensemble_scheduling.step:
            cfg = self.configs[step.model_name]
            model_batching = cfg.max_batch_size > 0
            feed = {}
            for key, value in step.input_map.items():
                array, tensor_batch = tensors[value]
                config_dims = next(t.dims for t in cfg.input if t.name == key)
                shape = self.reshape_tensor_dims(config_dims, model_batching, tensor_batch, array.shape)
                if model_batching:
                    assert shape[0] <= cfg.max_batch_size, (step.model_name, shape)
                    assert dims_match(tuple(config_dims), shape[1:]), (step.model_name, key, shape)
                else:
                    assert dims_match(tuple(config_dims), shape), (step.model_name, key, shape)
                feed[key] = array.reshape(shape)
            request_batch = feed[next(iter(feed))].shape[0] if model_batching else 0
            names = list(step.output_map)
            results = self.session(step.model_name).run(names, feed)
            for key, array in zip(names, results, strict=True):
                tensors[step.output_map[key]] = (array, request_batch)
        return {t.name: tensors[t.name][0] for t in ensemble.output}


# --------------------------------------------------------------------------- tests
def test_every_config_parses_with_tritons_protobuf(classifier_repo, pb2):
    configs = load_configs(classifier_repo, pb2)
    graphs = {"audio_encoder", "visual_encoder", "audio_embed", "visual_embed",
              "joint_classifier", "audio_classifier", "visual_classifier"}
    assert set(configs) == graphs | {FRAMES_TO_BATCH, BATCH_TO_FRAMES, ENSEMBLE_NAME}
    for name, cfg in configs.items():
        assert cfg.name == name  # Triton requires the directory name
        assert (classifier_repo / name / "1").is_dir()


def test_text_format_parse_is_strict(pb2):
    from google.protobuf import text_format

    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "x"\nmax_batch: 4\n', pb2.ModelConfig())  # unknown field
    with pytest.raises(text_format.ParseError):
        text_format.Parse('max_batch_size: "4"\n', pb2.ModelConfig())  # wrong type


def test_graph_models_follow_the_manifest_and_the_onnx_files(classifier_export, classifier_repo, pb2):
    manifest = Manifest.load(classifier_export)
    configs = load_configs(classifier_repo, pb2)
    Kind = pb2.ModelInstanceGroup.Kind
    for name, spec in manifest.graphs.items():
        cfg = configs[name]
        assert cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
        assert cfg.max_batch_size == spec.max_batch
        assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
        assert [g.kind for g in cfg.instance_group] == [Kind.Value("KIND_GPU")]
        assert [t.name for t in cfg.input] == [t.name for t in spec.inputs]
        assert [t.name for t in cfg.output] == [t.name for t in spec.outputs]
        for declared, t in zip((*cfg.input, *cfg.output), (*spec.inputs, *spec.outputs), strict=True):
            assert tuple(declared.dims) == tuple(t.shape[1:])
        assert_config_matches_onnx(name, cfg, classifier_repo / name, pb2)
        # the model file is the export's file: hard-linked here (same filesystem)
        placed, original = classifier_repo / name / "1" / "model.onnx", classifier_export / spec.file
        assert placed.stat().st_ino == original.stat().st_ino
    assert configs["visual_encoder"].max_batch_size == MAX_BATCH * NUM_FRAMES


def test_reshape_helpers_are_non_batching_and_match_their_graphs(classifier_repo, pb2):
    configs = load_configs(classifier_repo, pb2)
    f2b, b2f = configs[FRAMES_TO_BATCH], configs[BATCH_TO_FRAMES]
    assert f2b.max_batch_size == 0 and b2f.max_batch_size == 0
    assert f2b.WhichOneof("scheduling_choice") is None  # no dynamic batcher without batching
    assert tuple(f2b.input[0].dims) == (-1, NUM_FRAMES, 3, 224, 224)
    assert tuple(f2b.output[0].dims) == (-1, 3, 224, 224)
    assert tuple(b2f.output[0].dims) == (-1, NUM_FRAMES, TINY.num_visual_tokens, TINY.embed_dim)
    for name in (FRAMES_TO_BATCH, BATCH_TO_FRAMES):
        assert_config_matches_onnx(name, configs[name], classifier_repo / name, pb2)
        onnx.checker.check_model(str(classifier_repo / name / "1" / "model.onnx"), full_check=True)
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((2, NUM_FRAMES, 3, 224, 224), dtype=np.float32)
    sess = ort.InferenceSession(str(classifier_repo / FRAMES_TO_BATCH / "1" / "model.onnx"))
    (images,) = sess.run(None, {"frames": frames})
    np.testing.assert_array_equal(images, frames.reshape(-1, 3, 224, 224))


def test_ensemble_passes_tritons_validation_rules(classifier_repo, pb2):
    configs = load_configs(classifier_repo, pb2)
    ens = configs[ENSEMBLE_NAME]
    assert ens.platform == "ensemble" and not ens.backend and not ens.instance_group
    assert ens.max_batch_size == MAX_BATCH
    assert [(t.name, tuple(t.dims)) for t in ens.input] == [
        ("audio", (TINY.audio_length, TINY.num_mel_bins)), ("frames", (NUM_FRAMES, 3, 224, 224))]
    assert [(t.name, tuple(t.dims)) for t in ens.output] == [
        ("logits", (NUM_FRAMES, TINY.num_classes)), ("probs", (TINY.num_classes,))]
    assert all(pb2.DataType.Name(t.data_type) == "TYPE_FP32" for t in (*ens.input, *ens.output))
    validate_ensemble(ens, configs)
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [
        "audio_encoder", FRAMES_TO_BATCH, "visual_encoder", BATCH_TO_FRAMES, "joint_classifier"]


def test_ensemble_validation_port_rejects_a_direct_frames_to_encoder_wiring(classifier_repo, pb2):
    """The port catches the design the helpers exist to avoid: frames straight into the encoder."""
    configs = load_configs(classifier_repo, pb2)
    ens = configs[ENSEMBLE_NAME]
    del ens.ensemble_scheduling.step[1]
    ens.ensemble_scheduling.step[1].input_map["image"] = "frames"
    with pytest.raises(AssertionError, match="frames"):
        validate_ensemble(ens, configs)


def test_ensemble_runs_like_the_pipeline(classifier_export, classifier_repo, pb2):
    """Run the ensemble with Triton's shape rules and compare it clip by clip with the graphs."""
    configs = load_configs(classifier_repo, pb2)
    rng = np.random.default_rng(1)
    batch = MAX_BATCH
    audio = rng.standard_normal((batch, TINY.audio_length, TINY.num_mel_bins), dtype=np.float32)
    frames = rng.standard_normal((batch, NUM_FRAMES, 3, 224, 224), dtype=np.float32)
    out = TritonEnsembleSim(classifier_repo, configs).run(ENSEMBLE_NAME, {"audio": audio, "frames": frames})
    assert out["probs"].shape == (batch, TINY.num_classes)
    assert out["logits"].shape == (batch, NUM_FRAMES, TINY.num_classes)

    def graph(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(classifier_export / f"{name}.onnx"), providers=["CPUExecutionProvider"])

    enc_a, enc_v, joint = graph("audio_encoder"), graph("visual_encoder"), graph("joint_classifier")
    for i in range(batch):  # one clip at a time, as the runtime pipeline does it
        (at,) = enc_a.run(None, {"audio": audio[i : i + 1]})
        (vt,) = enc_v.run(None, {"image": frames[i]})
        logits, probs = joint.run(None, {"audio_tokens": at, "visual_tokens": vt[None]})
        np.testing.assert_allclose(out["probs"][i], probs[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["logits"][i], logits[0], rtol=1e-4, atol=1e-4)


def test_labels_file_for_classifier_outputs(classifier_repo, pb2):
    configs = load_configs(classifier_repo, pb2)
    with_labels = {"joint_classifier", "audio_classifier", "visual_classifier", ENSEMBLE_NAME}
    for name, cfg in configs.items():
        files = {t.name: t.label_filename for t in cfg.output if t.label_filename}
        if name in with_labels:
            assert files == {"probs": LABELS_FILE}, name
            lines = (classifier_repo / name / LABELS_FILE).read_text(encoding="utf-8").splitlines()
            assert lines == LABELS
        else:
            assert not files and not (classifier_repo / name / LABELS_FILE).exists(), name


def test_pretrain_export_gets_graph_models_but_no_ensemble(pretrain_repo, pb2):
    configs = load_configs(pretrain_repo, pb2)
    assert set(configs) == {"masked_encoder", "decoder", "audio_encoder"}
    assert not list(pretrain_repo.glob(f"*/{LABELS_FILE}"))
    masked = configs["masked_encoder"]
    types = {t.name: pb2.DataType.Name(t.data_type) for t in masked.input}
    assert types == {"audio": "TYPE_FP32", "image": "TYPE_FP32", "ids_keep_a": "TYPE_INT64",
                     "ids_keep_v": "TYPE_INT64"}
    for name, cfg in configs.items():
        assert cfg.max_batch_size == 2
        assert_config_matches_onnx(name, cfg, pretrain_repo / name, pb2)


def test_fp16_export_keeps_float32_io(fp16_repo, pb2):
    configs = load_configs(fp16_repo, pb2)
    assert set(configs) == {"audio_encoder", "visual_encoder", "joint_classifier",
                            FRAMES_TO_BATCH, BATCH_TO_FRAMES, ENSEMBLE_NAME}
    Kind = pb2.ModelInstanceGroup.Kind
    for name, cfg in configs.items():
        assert {pb2.DataType.Name(t.data_type) for t in (*cfg.input, *cfg.output)} == {"TYPE_FP32"}, name
        if cfg.platform != "ensemble":
            assert [g.kind for g in cfg.instance_group] == [Kind.Value("KIND_CPU")]
            assert_config_matches_onnx(name, cfg, fp16_repo / name, pb2)
    # no labels in this export (10 classes have no bundled names): no label files anywhere
    assert not list(fp16_repo.glob(f"*/{LABELS_FILE}"))
    validate_ensemble(configs[ENSEMBLE_NAME], configs)


def test_single_modality_export_gets_an_audio_only_ensemble(audio_only_repo, pb2):
    configs = load_configs(audio_only_repo, pb2)
    assert set(configs) == {"audio_encoder", "audio_classifier", ENSEMBLE_NAME}
    ens = configs[ENSEMBLE_NAME]
    assert [t.name for t in ens.input] == ["audio"]
    validate_ensemble(ens, configs)
    audio = np.random.default_rng(2).standard_normal((2, TINY.audio_length, TINY.num_mel_bins), dtype=np.float32)
    out = TritonEnsembleSim(audio_only_repo, configs).run(ENSEMBLE_NAME, {"audio": audio})
    assert out["probs"].shape == (2, TINY.num_classes)


def test_symlinks_overwrite_and_errors(classifier_export, tmp_path, pb2):
    repo = tmp_path / "repo"
    (repo / "someone_else").mkdir(parents=True)
    written = write_triton_repository(classifier_export, repo, copy=False)
    assert written[-1] == repo / ENSEMBLE_NAME
    link = repo / "audio_encoder" / "1" / "model.onnx"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert link.resolve() == (classifier_export / "audio_encoder.onnx").resolve()
    # the helper graphs are written here, never links
    assert not (repo / FRAMES_TO_BATCH / "1" / "model.onnx").is_symlink()
    with pytest.raises(ExportError, match="overwrite"):
        write_triton_repository(classifier_export, repo)
    write_triton_repository(classifier_export, repo, overwrite=True)
    assert not link.is_symlink() and link.is_file()
    assert (repo / "someone_else").is_dir()  # other models stay
    assert not list(tmp_path.glob(".repo.*")) and not list(repo.glob(".*"))
    load_configs(repo, pb2)
    with pytest.raises(ExportError, match="instance kind"):
        write_triton_repository(classifier_export, tmp_path / "r2", instance_kind="KIND_TPU")
    with pytest.raises(ExportError, match="max_queue_delay_us"):
        write_triton_repository(classifier_export, tmp_path / "r3", max_queue_delay_us=-1)
    with pytest.raises(CavmaeError, match="not a cavmae export"):
        write_triton_repository(tmp_path / "nothing", tmp_path / "r4")
