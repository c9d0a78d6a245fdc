"""One name per stage, each graph declared once (cavmae.graphs), input checks in the engine base."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cavmae import CAVMAE, CAVMAEFT, TINY, modes, save_checkpoint
from cavmae import graphs as g
from cavmae.errors import CavmaeError
from cavmae.manifest import Manifest
from cavmae.runtime.engines.base import Engine, GraphSession
from cavmae.stages import build_stages, graph_specs
from tiny_graphs import proj_spec

REPO = Path(__file__).resolve().parents[1]

#: the files that must name graphs and tensors only through cavmae.graphs
READERS = [
    "export/onnx_export.py",
    "export/validate.py",
    "export/triton.py",
    "runtime/pipeline.py",
    *(str(p.relative_to(REPO)) for p in sorted((REPO / "runtime" / "engines").rglob("*.py"))),
]


def _tensor_names() -> set[str]:
    return {t.name for d in g.GRAPHS.values() for t in (*d.inputs, *d.outputs)}


def test_every_graph_is_a_model_stage_of_the_same_name() -> None:
    """graph ``X`` <-> model method ``forward_X`` <-> ``X.onnx``: one name through the layers."""
    for decl in g.GRAPHS.values():
        owner = CAVMAE if decl in g.PRETRAIN_GRAPHS else CAVMAEFT
        assert callable(getattr(owner, decl.method, None)), decl.method
        assert decl.method == f"forward_{decl.name}" and decl.file == f"{decl.name}.onnx"
    # the modes table refers to declared graphs, and only to classifier heads
    assert {m.graph for m in modes.TABLE} == {d.name for d in g.CLASSIFIER_GRAPHS}
    # the old names are gone
    for old in ("forward_audio_branch", "forward_visual_branch", "embed_audio", "embed_visual"):
        assert not hasattr(CAVMAEFT, old), old


@pytest.mark.parametrize("cls,finetune", [(CAVMAEFT, "multimodal"), (CAVMAEFT, "audioonly"),
                                          (CAVMAEFT, "videoonly"), (CAVMAE, "multimodal")])
def test_specs_come_from_the_declarations(cls, finetune: str) -> None:
    model = cls(TINY)
    opts = dict(num_frames=3, max_batch=2, finetune_mode=finetune, mask_ratio_a=0.75, mask_ratio_v=0.5)
    stages = build_stages(model, **opts)
    specs = graph_specs(model, **opts)
    assert specs == {k: s.spec for k, s in stages.items()}
    for name, stage in stages.items():
        decl = g.GRAPHS[name]
        assert stage.decl is decl
        assert [t.name for t in stage.spec.inputs] == [t.name for t in decl.inputs]
        assert [t.name for t in stage.spec.outputs] == [t.name for t in decl.outputs]
        assert stage.spec.max_batch == (6 if decl.per_frame else 2)
        assert decl.dynamic_axes() == {t.name: {0: "batch"} for t in (*decl.inputs, *decl.outputs)}
        # the module is the model's own stage method: same numbers
        inputs = stage.sample(np.random.default_rng(0), 2)
        args = [torch.from_numpy(inputs[t.name]) for t in stage.spec.inputs]
        with torch.no_grad():
            out = stage.module(*args)
            params = {p: stage.module.params[p] for p in decl.params}
            want = getattr(model, decl.method)(*args, **params)
        for a, b in zip(out if isinstance(out, tuple) else (out,),
                        want if isinstance(want, tuple) else (want,), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if cls is CAVMAE:
        keep = stages["masked_encoder"].spec.inputs[2]
        assert keep.shape == ("batch", 128) and keep.dtype == "int64"
        assert "128 audio + 98 visual" in stages["masked_encoder"].spec.description


def test_tolerances_are_declared_per_output() -> None:
    """Validation judges outputs by their declaration, not by a name test in the validator."""
    from cavmae.export.validate import check_output

    assert g.PROBS.tolerance is g.PROBABILITIES and g.PROBABILITIES.ranked
    assert all(t.tolerance is g.FEATURES for d in g.GRAPHS.values() for t in d.outputs if t is not g.PROBS)
    ref = np.array([[0.90, 0.80, 0.70, 0.6000, 0.5995, 0.10, 0.05]], dtype=np.float32)
    swapped = ref.copy()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    # any output declared as probabilities is judged by its ranking up to near-ties ...
    assert check_output("scores", swapped, ref, "fp16", g.PROBABILITIES).passed
    # ... and a features output by cosine, whatever it is called
    assert check_output("probs", ref * 1.5, ref, "fp16", g.FEATURES).passed
    assert not check_output("probs", ref * 1.5, ref, "fp16", g.PROBABILITIES).passed


def test_no_graph_or_tensor_name_literals_in_the_readers() -> None:
    names = set(g.GRAPHS) | _tensor_names()
    found = []
    for rel in READERS:
        tree = ast.parse((REPO / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert not found, "name literals instead of cavmae.graphs declarations:\n" + "\n".join(found)


# ------------------------------------------------------------------------------- engines
class _Unchecked(GraphSession):
    """A new engine's session that does no checking of its own."""

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.calls: list[tuple[dict[str, np.ndarray], int]] = []

    def _run(self, inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        self.calls.append((inputs, batch))
        return {t.name: np.zeros(t.concrete_shape(batch), np.float32) for t in self.spec.outputs}


class _FakeEngine(Engine):
    name = "fake"

    def _open(self, spec) -> GraphSession:
        return _Unchecked(spec)


def _fake_engine(tmp_path: Path) -> _FakeEngine:
    from cavmae.config import DEFAULT_PREPROCESS

    manifest = Manifest(model_kind="classifier", model_config=TINY, preprocess=DEFAULT_PREPROCESS,
                        graphs={"proj": proj_spec(max_batch=2)})
    return _FakeEngine(tmp_path, manifest)


def _inputs(batch: int, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"x": np.zeros((batch, 4, 8), np.float32), "idx": np.zeros((batch, 3), np.int64)}
    return {**base, **changes}


@pytest.mark.parametrize("bad,match", [
    (_inputs(1, x=np.zeros((1, 4, 8), np.float64)), "dtype float32"),
    ({"x": np.zeros((1, 4, 8), np.float32)}, "missing input"),
    (_inputs(1, extra=np.zeros(1)), "unknown input"),
    (_inputs(3), "batch size 3"),
    (_inputs(1, x=np.zeros((1, 4, 7), np.float32)), "axis 2 should be 8"),
])
def test_base_class_checks_inputs_for_every_engine(tmp_path: Path, bad: Mapping[str, Any], match: str) -> None:
    session = _fake_engine(tmp_path).session("proj")
    with pytest.raises(CavmaeError, match=match):
        session.run(bad)
    assert session.calls == []  # the engine never saw them


def test_base_class_hands_checked_arrays_to_run_impl(tmp_path: Path) -> None:
    session = _fake_engine(tmp_path).session("proj")
    x = np.asfortranarray(np.ones((2, 4, 8), np.float32))
    out = session.run(_inputs(2, x=x))
    (inputs, batch), = session.calls
    assert batch == 2 and inputs["x"].flags.c_contiguous and set(out) == {"y", "z"}


def test_an_engine_cannot_replace_the_checked_run() -> None:
    with pytest.raises(TypeError, match="implement _run"):
        class _Sneaky(GraphSession):  # noqa: F841 - the class statement itself must fail
            def run(self, inputs):
                return {}

            def _run(self, inputs, batch):
                return {}


def test_torch_engine_builds_the_stages_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cavmae.stages as stages_mod
    from cavmae.runtime import load

    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(TINY).eval(), tmp_path / "ft.pth")
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    calls = []
    real = stages_mod.build_stages

    def counting(*args: Any, **kwargs: Any):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages_mod, "build_stages", counting)
    pipe = load(ckpt, engine="torch", device="cpu", num_frames=2)
    assert len(calls) == 1
    audio = np.zeros((1, TINY.audio_length, TINY.num_mel_bins), np.float32)
    assert pipe.run_audio_encoder(audio).shape == (1, TINY.num_audio_tokens, TINY.embed_dim)
