"""Graph-level reuse between exports: one validated file per graph identity, hard-linked.

Two exports of one checkpoint often share graphs: a classifier exported for 10 and for 16 frames
has the same encoders (only the heads that take all frames of a clip differ), a pre-training
model exported for two mask ratios the same encoders and embeddings. A graph's file depends on
nothing but its **identity**:

- the checkpoint's sha256 and the model config (the weights and the sizes);
- the graph's name, its traced precision, its inputs and outputs with their shapes (only the
  batch axis is symbolic, so no batch limit enters) and the fixed arguments of its stage
  (``task``, ``num_frames``, ``mode``, ``keep_a``: whatever the declaration lists);
- the exporter's versions (cavmae, torch, onnx, onnxruntime, the opset) and the validation's
  seed and batch.

A new export looks for a graph of the same identity in the other export directories it is
given (the cache's) and, when one validated there, hard-links that file (a copy where the
directories lie on different file systems) with the optimized copies ONNX Runtime saved beside
it (``.ort/{graph}.*``), instead of tracing and validating it again; the validation report is
carried over and says where from. Hard links make removal safe: deleting one export unlinks
its names only, and a graph another export uses stays on disk through that export's link.

Files are only ever replaced by a rename (``cavmae.fsio``), never written in place, so a
linked file cannot change under the other exports that share it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cavmae import fsio
from cavmae.graphs import GRAPHS
from cavmae.manifest import MANIFEST_NAME, GraphSpec, Manifest

log = logging.getLogger(__name__)

#: the validation record of an export (seed, per-graph checks with their identities)
VALIDATION_NAME = "validation.json"
#: where ONNX Runtime keeps the optimized copies of an export's graphs (runtime/engines/ort.py)
ORT_DIRNAME = ".ort"
#: where TensorRT keeps the engines built from an export's graphs (runtime/engines/trt/cache.py)
TRT_DIRNAME = ".trt"


def graph_identity(
    *,
    sha256: str,
    spec: GraphSpec,
    precision: str,
    params: Mapping[str, Any],
    model_config: Mapping[str, Any],
    versions: Mapping[str, Any],
    seed: int,
    batch: int,
    onnx_batch: int,
    template: str | None = None,
) -> str:
    """The hex sha256 naming everything a graph's file and its validation depend on.

    ``spec`` contributes its name and its tensors (names, shapes, dtypes); its batch limit and
    description do not, as they are not in the file. ``precision`` is the traced one (fp32 or
    fp16). ``template``: the sha256 of the template the graph was filled from (None: traced).
    """
    facts = {
        "sha256": sha256,
        "graph": spec.name,
        "precision": precision,
        "inputs": [t.to_dict() for t in spec.inputs],
        "outputs": [t.to_dict() for t in spec.outputs],
        "params": dict(params),
        "model_config": dict(model_config),
        "versions": dict(versions),
        "validation": {"seed": int(seed), "batch": int(batch), "onnx_batch": int(onnx_batch)},
    }
    if template is not None:
        facts["template"] = template
    return fsio.json_sha256(facts)


def read_validation(export_dir: Path) -> dict[str, Any]:
    """The validation record of ``export_dir`` (``{"seed": ..., "graphs": {...}}``); an empty
    one when there is none or it cannot be read."""
    try:
        data = json.loads((Path(export_dir) / VALIDATION_NAME).read_text())
    except (OSError, ValueError):
        return {"seed": None, "graphs": {}}
    if not isinstance(data, dict) or not isinstance(data.get("graphs"), dict):
        return {"seed": None, "graphs": {}}
    return data


def write_validation(export_dir: Path, seed: int, graphs: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write the validation record of ``export_dir`` atomically."""
    return fsio.write_json(Path(export_dir) / VALIDATION_NAME,
                           {"seed": int(seed), "graphs": {k: dict(v) for k, v in graphs.items()}})


@dataclass(frozen=True)
class Reusable:
    """A validated graph file another export holds, and its validation report there."""

    export_dir: Path
    file: Path
    report: dict[str, Any]


def find_reusable(identity: str, search: Iterable[Path], *, exclude: Path | None = None) -> Reusable | None:
    """A graph of ``identity`` that passed validation in one of the export directories
    ``search`` and whose file is still there; None when there is none.

    Reads only each directory's ``validation.json`` (a few KB), never a graph.
    """
    for directory in search:
        if exclude is not None and _same_dir(directory, exclude):
            continue
        for name, report in read_validation(directory)["graphs"].items():
            if not isinstance(report, dict) or report.get("identity") != identity:
                continue
            file = Path(directory) / f"{name}.onnx"
            if report.get("passed") and file.is_file():
                return Reusable(Path(directory), file, report)
    return None


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def link_or_copy(src: Path, dest: Path) -> str:
    """Make ``dest`` name ``src``'s content: a hard link, else (another file system, or links
    not supported) a copy. Published atomically (a temporary name, then a rename). Returns
    ``"link"`` or ``"copy"``."""
    tmp = fsio.temp_sibling(dest)
    try:
        try:
            os.link(src, tmp)
            how = "link"
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            shutil.copy2(src, tmp)
            how = "copy"
        fsio.publish_file(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return how


def reuse_graph(found: Reusable, dest_dir: Path, *, with_optimized: bool = True) -> str:
    """Put the graph ``found`` into ``dest_dir`` (hard link or copy) with, when
    ``with_optimized``, the optimized copies ONNX Runtime saved beside it. Returns how the
    graph file came (``"link"`` or ``"copy"``); an optimized copy that cannot be linked is
    skipped (the engine makes it again)."""
    how = link_or_copy(found.file, Path(dest_dir) / found.file.name)
    if with_optimized:
        cache = found.export_dir / ORT_DIRNAME
        stem = found.file.stem + "."
        for opt in sorted(cache.iterdir()) if cache.is_dir() else ():
            if not opt.name.startswith(stem) or not opt.is_file():
                continue
            target = Path(dest_dir) / ORT_DIRNAME / opt.name
            try:
                target.parent.mkdir(exist_ok=True)
                if not target.exists():
                    link_or_copy(opt, target)
            except OSError as e:
                log.debug("not reusing the optimized copy %s: %s", opt, e)
    return how


def export_dirs(root: Path) -> list[Path]:
    """The finished export directories directly under ``root`` (the cache's ``exports/``),
    newest first; hidden ones (exports in progress) are left out."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
             and (p / VALIDATION_NAME).is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def foreign_files(export_dir: Path) -> list[Path]:
    """The entries of the export ``export_dir`` that no export writes, sorted: what replacing
    the export (``export --overwrite``) would delete of someone else's.

    An export writes its manifest, ``validation.json``, one file per graph (those its manifest
    declares, and any graph's name), the engines' caches (``.ort``, ``.trt``), the Triton
    repository's models (``triton/<model>``; the repository may hold other models, which are
    not the export's) and temporary names (:func:`cavmae.fsio.temp_sibling`) of a run that died.
    """
    from .triton import HELPER_MODELS, REPOSITORY_DIRNAME  # here: the cache's reuse needs no onnx

    export_dir = Path(export_dir)
    graphs = {f"{name}.onnx" for name in GRAPHS}
    try:
        declared = Manifest.load(export_dir).graphs
    except Exception:  # an unreadable manifest declares nothing beyond the graph names
        declared = {}
    graphs |= {spec.file for spec in declared.values()}
    models = {*GRAPHS, *declared, *HELPER_MODELS}
    owned = {MANIFEST_NAME, VALIDATION_NAME, *graphs}
    found: list[Path] = []
    for entry in sorted(export_dir.iterdir()):
        if fsio.temp_owner(entry.name) is not None or (entry.name in owned and entry.is_file()):
            continue
        if entry.name in (ORT_DIRNAME, TRT_DIRNAME) and entry.is_dir() and not entry.is_symlink():
            continue
        if entry.name == REPOSITORY_DIRNAME and entry.is_dir() and not entry.is_symlink():
            found += [p for p in sorted(entry.iterdir())
                      if p.name not in models and fsio.temp_owner(p.name) is None]
            continue
        found.append(entry)
    return found
