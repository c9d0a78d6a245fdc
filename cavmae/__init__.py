"""cavmae: CAV-MAE (Contrastive Audio-Visual Masked Autoencoder) for deployment.

``import cavmae`` stays light: it does not import torch. The model API (``CAVMAE``,
``CAVMAEFT``, ``load_checkpoint``, ``save_checkpoint``) is imported on first attribute access,
so the runtime can run where torch is absent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import BASE, PRESETS, TINY, ModelConfig, PreprocessConfig
from .errors import CavmaeError

__version__ = "0.1.0"

# name -> submodule that defines it (imported lazily because they need torch)
_LAZY = {
    "CAVMAE": "cavmae.model",
    "CAVMAEFT": "cavmae.model",
    "load_checkpoint": "cavmae.checkpoint",
    "save_checkpoint": "cavmae.checkpoint",
}

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import load_checkpoint, save_checkpoint
    from .model import CAVMAE, CAVMAEFT

__all__ = [
    "BASE",
    "CAVMAE",
    "CAVMAEFT",
    "PRESETS",
    "TINY",
    "CavmaeError",
    "ModelConfig",
    "PreprocessConfig",
    "__version__",
    "load_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cavmae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
