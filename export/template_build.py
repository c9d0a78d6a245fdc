"""Make the graph templates (:mod:`cavmae.export.graph_templates`) of the released checkpoints.

    python -m cavmae.export.template_build            # (re)writes export/templates/
    python -m cavmae.export.template_build --check    # rebuilds in memory, compares, exit 1 on a difference

How a template is made sure of: the graph is traced twice, from two models whose every tensor is
random (so no two weights are equal and the exporter merges none), each with its own seed. An
initializer equal in both traces is a constant of the graph and stays in the template; one that
differs must be, in both traces, a tensor of the stage's ``state_dict`` as is or transposed
(found by its bytes), else the graph gets no template: a weight the exporter combined with
something else could not be filled in. With those weights taken out, the two traces must be the
same bytes. Run it after changing the model code or the exporter (the shipped templates then
no longer validate, and first uses trace again until they are rebuilt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from cavmae import fsio
from cavmae.checkpoint import model_class
from cavmae.config import BASE, ModelConfig
from cavmae.hub.registry import list_models
from cavmae.model import CAVMAEEncoder
from cavmae.stages import PlannedGraph, plan_graphs, stage_of

from .graph_templates import FORMAT, INDEX_NAME, TEMPLATE_DIR, Weight, template_key, template_model
from .onnx_export import OPSET, export_stage

#: the two seeds of a template's two traces
SEEDS = (1, 2)


class NoTemplate(Exception):
    """This graph cannot be made a template (see the module docstring)."""


@dataclass(frozen=True)
class Target:
    """A model size and deployment whose graphs get templates."""

    kind: str
    config: ModelConfig
    task: str
    finetune_mode: str

    def plan(self) -> dict[str, PlannedGraph]:
        return plan_graphs(self.kind, self.config, task=self.task, finetune_mode=self.finetune_mode)


def released_targets() -> list[Target]:
    """The deployments of every registry checkpoint at the defaults a first use exports with
    (10 frames, the default mask ratios), without repeats."""
    found: dict[tuple[str, str, str, str], Target] = {}
    for info in list_models():
        if info.kind == "classifier":
            assert info.num_classes is not None and info.task is not None
            config = BASE.replace(num_classes=info.num_classes)
            target = Target("classifier", config, info.task, info.finetune_mode or "multimodal")
        else:
            target = Target("pretrain", BASE.replace(**info.config_overrides), "multi-label", "multimodal")
        found.setdefault((target.kind, repr(target.config), target.task, target.finetune_mode), target)
    return list(found.values())


def _random_model(target: Target, seed: int) -> CAVMAEEncoder:
    """A model of ``target``'s size whose every float tensor is random (seeded)."""
    torch.manual_seed(seed)
    model = model_class(target.kind)(target.config).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(0.0, 0.02)
    return model


def _trace(target: Target, planned: PlannedGraph, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The traced graph of ``planned`` from a random model, and its stage's state dict."""
    stage = stage_of(_random_model(target, seed), planned)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.onnx"
        export_stage(stage, path)
        model = onnx.load(str(path))
    state = {k: v.detach().numpy() for k, v in stage.module.state_dict().items()}
    return model, state


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


def _sources(state: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Digest of every tensor (and of every matrix transposed) -> (key, transposed)."""
    found: dict[str, tuple[str, bool]] = {}
    for key, array in state.items():
        found.setdefault(_digest(array), (key, False))
        if array.ndim == 2:
            found.setdefault(_digest(array.T), (key, True))
    return found


def _weights(first: onnx.ModelProto, second: onnx.ModelProto,
             states: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]) -> list[Weight]:
    """The initializers of ``first`` that are weights, each traced back to the state dict."""
    other = {t.name: t for t in second.graph.initializer}
    sources = _sources(states[0])
    weights: list[Weight] = []
    for init in first.graph.initializer:
        if init.name not in other:
            raise NoTemplate(f"the traces name their initializers differently ({init.name})")
        a, b = numpy_helper.to_array(init), numpy_helper.to_array(other[init.name])
        if a.shape == b.shape and np.array_equal(a, b):
            continue  # a constant of the graph
        source = sources.get(_digest(a))
        if source is None:
            raise NoTemplate(f"{init.name} {a.shape} is no tensor of the model, as is or transposed")
        key, transpose = source
        want = states[1][key].T if transpose else states[1][key]
        if not np.array_equal(b, want):
            raise NoTemplate(f"{init.name} comes from {key} in one trace and not in the other")
        weights.append(Weight(init.name, key, transpose, tuple(int(d) for d in a.shape)))
    return weights


def build_template(target: Target, planned: PlannedGraph) -> bytes:
    """The template of one graph (serialized), made sure of as the module docstring says."""
    (first, s1), (second, s2) = (_trace(target, planned, seed) for seed in SEEDS)
    weights = _weights(first, second, (s1, s2))
    one = template_model(first, weights).SerializeToString()
    two = template_model(second, weights).SerializeToString()
    if one != two:
        raise NoTemplate("the two traces differ beyond their weights")
    return one


def build_all(targets: list[Target], log: bool = True) -> Iterator[tuple[str, str, bytes | None, str]]:
    """``(key, graph name, template bytes or None, why none)`` for every graph of ``targets``."""
    done: set[str] = set()
    for target in targets:
        for name, planned in target.plan().items():
            key = template_key(planned, target.config.to_dict(), OPSET)
            if key in done:
                continue
            done.add(key)
            if log:
                print(f"{target.kind} {target.config.num_classes} {target.task} {target.finetune_mode}: "
                      f"{name}", file=sys.stderr, flush=True)
            try:
                yield key, name, build_template(target, planned), ""
            except NoTemplate as e:
                yield key, name, None, str(e)


def _file_name(name: str, data: bytes) -> str:
    return f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cavmae.export.template_build", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=TEMPLATE_DIR, help="template directory (default: the shipped one)")
    ap.add_argument("--check", action="store_true",
                    help="rebuild without writing and compare with --out; exit 1 on any difference")
    args = ap.parse_args(argv)
    index: dict[str, str] = {}
    files: dict[str, bytes] = {}
    refused: list[str] = []
    for key, name, data, why in build_all(released_targets()):
        if data is None:
            refused.append(f"{name}: {why}")
            continue
        index[key] = _file_name(name, data)
        files[index[key]] = data
    for line in refused:
        print(f"no template: {line}", file=sys.stderr)
    document = {"format": FORMAT, "opset": OPSET, "torch": torch.__version__, "templates": dict(sorted(index.items()))}
    if args.check:
        try:
            shipped = json.loads((args.out / INDEX_NAME).read_text())
        except (OSError, ValueError) as e:
            print(f"cannot read {args.out / INDEX_NAME}: {e}", file=sys.stderr)
            return 1
        stale = sorted(set(shipped.get("templates", {}).items()) ^ set(index.items()))
        missing = [f for f in files if not (args.out / f).is_file()]
        for line in [*(f"index differs: {k} -> {v}" for k, v in stale), *(f"missing: {f}" for f in missing)]:
            print(line, file=sys.stderr)
        return 1 if stale or missing or refused else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.onnx"):
        if old.name not in files:
            old.unlink()
    for file, data in files.items():
        fsio.write_bytes(args.out / file, data)
    fsio.write_json(args.out / INDEX_NAME, document)
    print(f"{len(files)} templates for {len(index)} graphs in {args.out}", file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    raise SystemExit(main())
