"""Engine factory: pick an inference engine by name and open an export directory with it.

``create_engine("ort" | "trt" | "torch" | "auto", export_dir, manifest, device)`` imports the
chosen engine's module only when asked, so ``import cavmae.runtime.engines`` needs neither
TensorRT nor torch. ``"auto"`` resolves through cheap hardware probes (no torch import):
TensorRT when it is installed and a CUDA GPU is present, else ONNX Runtime on CUDA when its
CUDA provider is available, else ONNX Runtime on the CPU.

``check_engine(name, device)`` is the one place that decides, before any work (download,
export, baseline), whether an (engine, device) pair can run on this machine; every command and
``load()`` call it first, so a missing TensorRT or GPU is one line, not a crash minutes later.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from cavmae.errors import CavmaeError, EngineUnavailableError
from cavmae.manifest import Manifest

from .. import hardware
from .base import Engine, GraphSession
from .devices import normalize_device

__all__ = ["ENGINES", "Engine", "GraphSession", "check_engine", "check_engine_options", "create_engine", "resolve_engine"]

#: Engines by command-line name; "auto" picks one of them.
ENGINES: tuple[str, ...] = ("ort", "trt", "torch")

# name -> (module, class); imported lazily.
_CLASSES = {
    "ort": ("cavmae.runtime.engines.ort", "OrtEngine"),
    "trt": ("cavmae.runtime.engines.trt", "TrtEngine"),
    "torch": ("cavmae.runtime.engines.torch_engine", "TorchEngine"),
}

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
    dev = normalize_device(device)

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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_engine(name: str = "auto", device: str | None = "auto") -> tuple[str, str]:
    """Resolve ``(name, device)`` like ``resolve_engine`` and make sure it can run here.

    Cheap probes only (installed packages, the driver's GPU list, ONNX Runtime's providers;
    torch is imported only for the torch engine on CUDA), so it costs milliseconds and runs
    before anything slow. Raises ``EngineUnavailableError`` saying what to install or use.
    """
    engine, dev = resolve_engine(name, device)
    kind, _, index = dev.partition(":")
    if engine == "trt":
        if kind != "cuda":
            raise EngineUnavailableError(
                f"the TensorRT engine runs on CUDA GPUs only, not on {dev!r}: use --device cuda,"
                " or --engine ort for the CPU"
            )
        if not hardware.tensorrt_importable():
            raise EngineUnavailableError(
                "TensorRT is not installed: pip install 'cavmae[trt]' (TensorRT 10+ and"
                " cuda-python, on a machine with an NVIDIA GPU), or use --engine ort"
            )
        if not _installed("cuda"):
            raise EngineUnavailableError(
                "the TensorRT engine needs cuda-python: pip install 'cavmae[trt]', or use --engine ort"
            )
    if engine == "torch" and not _installed("torch"):
        raise EngineUnavailableError("the torch engine needs PyTorch: pip install torch, or use --engine ort")
    if kind != "cuda":
        return engine, dev
    gpus = hardware.gpu_names()
    if not gpus:
        raise EngineUnavailableError(
            f"--device {dev}: no NVIDIA GPU is visible here (no driver, or CUDA_VISIBLE_DEVICES"
            " hides it); use --device cpu"
        )
    if index and int(index) >= len(gpus):
        raise EngineUnavailableError(
            f"--device {dev}: there is no GPU {index} ({len(gpus)} visible: cuda:0"
            + (f" to cuda:{len(gpus) - 1}" if len(gpus) > 1 else "") + ")"
        )
    if engine == "ort" and "CUDAExecutionProvider" not in hardware.ort_providers():
        raise EngineUnavailableError(
            f"ONNX Runtime here has no CUDA provider for --device {dev}: pip uninstall onnxruntime"
            " && pip install 'cavmae[gpu]' (onnxruntime-gpu with CUDA and cuDNN), or use --device cpu"
        )
    if engine == "torch":
        import torch

        if not torch.cuda.is_available():
            raise EngineUnavailableError(
                f"this PyTorch ({torch.__version__}) cannot use the GPU for --device {dev}: install a"
                " CUDA build of torch, or use --device cpu or --engine ort"
            )
    return engine, dev


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass for a concrete engine name (imports its module)."""
    try:
        module, cls = _CLASSES[name]
    except KeyError:
        raise CavmaeError(
            f"unknown engine {name!r}; choose one of: auto, {', '.join(ENGINES)}"
        ) from None
    return getattr(importlib.import_module(module), cls)


def check_engine_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``CavmaeError`` naming an option engine ``name`` does not take (a misspelling, or
    one of another engine's), with the ones it takes, before anything is loaded."""
    import inspect

    params = inspect.signature(engine_class(name).__init__).parameters
    takes = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    unknown = [k for k in options if k not in takes]
    if unknown:
        raise CavmaeError(f"engine {name!r} takes no option {unknown[0]!r}; its options: {', '.join(takes) or 'none'}")


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
    engine_name, dev = check_engine(name, device)
    check_engine_options(engine_name, options)
    if manifest is None:
        manifest = Manifest.load(export_dir)
    return engine_class(engine_name)(export_dir, manifest, dev, **options)
