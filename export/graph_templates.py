"""Weight-free graphs for the released model sizes: a first use fills in weights, traces nothing.

Tracing a full-size stage with PyTorch's exporter takes seconds per graph (most of a first
``cavmae classify`` on a 2-core CPU), and what it produces depends on the checkpoint only through
the weights it embeds: the nodes are the same for every checkpoint of one size. A **template** is
such a traced graph with its weights taken out, and for each weight a note of where it comes
from: a tensor of the stage module's ``state_dict``, as is or transposed (the exporter folds
``nn.Linear``'s ``weight.T`` into the file). Filling a template writes a graph that computes the
same function as tracing the same model would.

Templates ship in ``templates/`` beside this module (about 100 KB per graph), listed in
``templates/index.json`` by a key naming everything the graph's nodes depend on: the graph, its
inputs and outputs, its stage's fixed arguments, the model config and the opset
(:func:`template_key`). ``python -m cavmae.export.template_build`` makes them for the released
checkpoints' sizes (and checks each: see there).

Trust: a filled graph is validated against its PyTorch stage like a traced one (one ONNX Runtime
run against PyTorch on random inputs); when that fails, the exporter traces the graph instead,
so a template that no longer matches the model code costs time, never correctness.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # onnx depends on protobuf

from cavmae import fsio
from cavmae.errors import ExportError
from cavmae.stages import PlannedGraph

from .onnx_wire import write_model_with_weights

#: where the shipped templates live
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
INDEX_NAME = "index.json"
#: set (not "0") to trace every graph, as before templates existed
NO_TEMPLATES_ENV = "CAVMAE_NO_TEMPLATES"
#: bumped when the way a template is stored or filled changes
FORMAT = 1
#: the template's ``metadata_props`` entry listing its weights (removed when filled)
WEIGHTS_PROP = "cavmae.template.weights"


class TemplateMismatch(ExportError):
    """A template does not fit the module it is filled from (a missing weight, another shape)."""


@dataclass(frozen=True)
class Weight:
    """One initializer of a template: its name in the graph, the ``state_dict`` key it is
    taken from, whether it is stored transposed (a 2-D weight), its shape in the graph."""

    name: str
    key: str
    transpose: bool
    dims: tuple[int, ...]

    def to_list(self) -> list[Any]:
        return [self.name, self.key, self.transpose, list(self.dims)]

    @classmethod
    def from_list(cls, item: list[Any]) -> Weight:
        name, key, transpose, dims = item
        return cls(str(name), str(key), bool(transpose), tuple(int(d) for d in dims))


@dataclass(frozen=True)
class Template:
    """A shipped template: its file, read once, and the sha256 of its bytes (part of the
    identity of every graph filled from it)."""

    file: Path
    data: bytes = field(repr=False)

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def template_key(planned: PlannedGraph, model_config: Mapping[str, Any], opset: int) -> str:
    """The hex sha256 of everything a graph's nodes depend on, weights aside: its name, its
    inputs and outputs (only the batch axis symbolic), its stage's fixed arguments, the model
    config and the opset."""
    spec = planned.spec
    facts = {
        "format": FORMAT,
        "graph": spec.name,
        "inputs": [t.to_dict() for t in spec.inputs],
        "outputs": [t.to_dict() for t in spec.outputs],
        "params": dict(planned.params),
        "model_config": dict(model_config),
        "opset": int(opset),
    }
    return fsio.json_sha256(facts)


@functools.cache
def _index(directory: Path) -> dict[str, str]:
    try:
        data = json.loads((directory / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return {}
    templates = data.get("templates") if isinstance(data, dict) else None
    if not isinstance(templates, dict) or data.get("format") != FORMAT:
        return {}
    return {str(k): str(v) for k, v in templates.items()}


def find_template(
    planned: PlannedGraph, model_config: Mapping[str, Any], opset: int, directory: Path | None = TEMPLATE_DIR
) -> Template | None:
    """The template for ``planned`` in ``directory`` (None: templates off), or None.
    ``CAVMAE_NO_TEMPLATES=1`` in the environment turns templates off (every graph traced)."""
    if directory is None or os.environ.get(NO_TEMPLATES_ENV, "") not in ("", "0"):
        return None
    name = _index(Path(directory)).get(template_key(planned, model_config, opset))
    if name is None:
        return None
    file = Path(directory) / name
    try:
        return Template(file, file.read_bytes())
    except OSError:
        return None


def read_template(data: bytes) -> tuple[onnx.ModelProto, list[Weight]]:
    """The template model in ``data`` (its weight list taken out of it) and its weights."""
    model = onnx.ModelProto()
    try:
        try:
            model.ParseFromString(data)
        except DecodeError as e:
            raise ValueError(str(e) or "not a protobuf model") from None
        props = [p for p in model.metadata_props if p.key == WEIGHTS_PROP]
        if len(props) != 1:
            raise ValueError("no weight list")
        weights = [Weight.from_list(item) for item in json.loads(props[0].value)]
    except (ValueError, TypeError) as e:  # a damaged file: the exporter traces instead
        raise TemplateMismatch(f"not a readable graph template ({e})") from None
    keep = [p for p in model.metadata_props if p.key != WEIGHTS_PROP]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    return model, weights


def template_model(traced: onnx.ModelProto, weights: list[Weight]) -> onnx.ModelProto:
    """The template of the traced model ``traced``: its initializers named in ``weights``
    taken out and listed in its metadata (the rest, constants of the graph, stay)."""
    names = {w.name for w in weights}
    model = onnx.ModelProto()
    model.CopyFrom(traced)
    keep = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.metadata_props.add(key=WEIGHTS_PROP, value=json.dumps([w.to_list() for w in weights]))
    return model


def fill_template(template: bytes, module: torch.nn.Module, path: Path) -> None:
    """Write to ``path`` the graph of ``template`` with ``module``'s weights (its
    ``state_dict``, float32). Raises :class:`TemplateMismatch` when a weight is missing or has
    another shape or dtype than the template's; writes nothing then."""
    model, weights = read_template(template)
    state = module.state_dict()
    arrays: list[tuple[str, np.ndarray]] = []
    for w in weights:
        tensor = state.get(w.key)
        if tensor is None:
            raise TemplateMismatch(f"the model has no {w.key}")
        if tensor.dtype != torch.float32:
            raise TemplateMismatch(f"{w.key} is {tensor.dtype}, the template takes float32")
        if w.transpose:
            if tensor.dim() != 2:
                raise TemplateMismatch(f"{w.key} has {tensor.dim()} axes; the template transposes a matrix")
            tensor = tensor.t()  # made contiguous by torch: 2-3x faster than numpy's copy
        if tuple(tensor.shape) != w.dims:
            raise TemplateMismatch(f"{w.key} is {tuple(tensor.shape)} in the graph's layout, "
                                   f"the template takes {w.dims}")
        arrays.append((w.name, tensor.detach().cpu().contiguous().numpy()))
    write_model_with_weights(model, arrays, path)
