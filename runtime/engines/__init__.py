"""Engine factory: pick an inference engine by name and open an export directory with it.

``create_engine("ort" | "trt" | "torch" | "auto", export_dir, manifest, device)`` imports the
chosen engine's module only when asked, so ``import cavmae.runtime.engines`` needs neither
TensorRT nor torch. ``"auto"`` resolves through cheap hardware probes (no torch import):
TensorRT when it is installed and a CUDA GPU is present, else ONNX Runtime on CUDA when its
CUDA provider is available, else ONNX Runtime on the CPU.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from cavmae.errors import CavmaeError
from cavmae.manifest import Manifest

from .. import hardware
from .base import Engine, GraphSession

__all__ = ["ENGINES", "Engine", "GraphSession", "create_engine", "resolve_engine"]

#: Engines by command-line name; "auto" picks one of them.
ENGINES: tuple[str, ...] = ("ort", "trt", "torch")

# name -> (module, class); imported lazily.
_CLASSES = {
    "ort": ("cavmae.runtime.engines.ort", "OrtEngine"),
    "trt": ("cavmae.runtime.engines.trt", "TrtEngine"),
    "torch": ("cavmae.runtime.engines.torch_engine", "TorchEngine"),
}

_DEVICES = ("auto", "cpu", "cuda")


def _check_device(device: str | None) -> str:
    """Normalize a device string: None -> "auto"; accepts "cpu", "cuda", "cuda:N", "auto"."""
    if device is None:
        return "auto"
    d = device.strip().lower()
    kind, _, index = d.partition(":")
    if kind not in _DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise CavmaeError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return d


def resolve_engine(name: str = "auto", device: str | None = "auto") -> tuple[str, str]:
    """Turn a requested (engine, device) pair into a concrete one.

    ``name="auto"``: with device "cpu" -> ("ort", "cpu"); with device "cuda[:N]" -> "trt"
    if TensorRT is installed, else "ort" (which reports a missing CUDA provider clearly);
    with device "auto" -> TensorRT + CUDA if usable, else ONNX Runtime CUDA if usable, else
    ONNX Runtime CPU. An explicit engine with device "auto" gets "cuda" where it makes sense
    ("trt" always; "ort"/"torch" when a GPU is usable) and "cpu" otherwise.
    """
    key = name.strip().lower()
    if key != "auto" and key not in ENGINES:
        raise CavmaeError(f"unknown engine {name!r}; choose one of: auto, {', '.join(ENGINES)}")
    dev = _check_device(device)

    if key == "auto":
        if dev == "cpu":
            return "ort", "cpu"
        if dev.startswith("cuda"):
            return ("trt" if hardware.tensorrt_importable() else "ort"), dev
        if hardware.tensorrt_available():
            return "trt", "cuda"
        if hardware.ort_cuda_available():
            return "ort", "cuda"
        return "ort", "cpu"

    if dev != "auto":
        return key, dev
    if key == "trt":
        return "trt", "cuda"
    if key == "ort":
        return "ort", ("cuda" if hardware.ort_cuda_available() else "cpu")
    return key, ("cuda" if hardware.cuda_available() else "cpu")


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass for a concrete engine name (imports its module)."""
    try:
        module, cls = _CLASSES[name]
    except KeyError:
        raise CavmaeError(
            f"unknown engine {name!r}; choose one of: auto, {', '.join(ENGINES)}"
        ) from None
    return getattr(importlib.import_module(module), cls)


def create_engine(
    name: str,
    export_dir: str | Path,
    manifest: Manifest | None = None,
    device: str | None = "cpu",
    **options: Any,
) -> Engine:
    """Open ``export_dir`` with engine ``name`` on ``device``.

    ``manifest`` defaults to the one in ``export_dir``. ``options`` go to the engine class
    (e.g. ``threads=`` for "ort", ``opt_batch=`` / ``workspace_bytes=`` for "trt"). Raises
    ``EngineUnavailableError`` when the engine cannot run here, with what to install.
    """
    engine_name, dev = resolve_engine(name, device)
    if manifest is None:
        manifest = Manifest.load(export_dir)
    return engine_class(engine_name)(export_dir, manifest, dev, **options)
