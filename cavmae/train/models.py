"""The model a run starts from: a preset with overrides, or ``init_checkpoint``."""

from __future__ import annotations

from typing import Any, TypeVar

from cavmae.checkpoint import load_checkpoint
from cavmae.config import PRESETS, ModelConfig
from cavmae.model import CAVMAE, CAVMAEFT

from .configs import TrainConfig, TrainConfigError

M = TypeVar("M", CAVMAE, CAVMAEFT)


def model_config_for(cfg: TrainConfig, **changes: Any) -> ModelConfig:
    """The preset ``cfg.model`` with ``cfg.model_config`` and ``changes`` applied."""
    try:
        return PRESETS[cfg.model].replace(**{**cfg.model_config, **changes})
    except TypeError as e:
        raise TrainConfigError(f"invalid model_config: {e}") from None


def initial_model(cfg: TrainConfig, cls: type[M], kind: str, **changes: Any) -> M:
    """A new ``cls`` (initialized from the global RNG), or ``cfg.init_checkpoint`` loaded as
    ``kind``; ``changes`` override the model config either way. The encoder's position
    embeddings train only with ``trainable_pos_embed``."""
    if cfg.init_checkpoint:
        model = load_checkpoint(cfg.init_checkpoint, kind=kind, **{**cfg.model_config, **changes})
    else:
        model = cls(model_config_for(cfg, **changes))
    assert isinstance(model, cls)
    model.pos_embed_a.requires_grad_(cfg.trainable_pos_embed)
    model.pos_embed_v.requires_grad_(cfg.trainable_pos_embed)
    return model
