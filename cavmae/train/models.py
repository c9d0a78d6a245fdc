"""The model a run starts from: a preset with overrides, or ``init_checkpoint``."""

from __future__ import annotations

from typing import Any, TypeVar

from cavmae.checkpoint import load_checkpoint
from cavmae.config import PRESETS, ModelConfig
from cavmae.model import CAVMAE, CAVMAEFT

from .configs import TrainConfig, TrainConfigError, model_config_problems

M = TypeVar("M", CAVMAE, CAVMAEFT)


def model_config_for(cfg: TrainConfig, **changes: Any) -> ModelConfig:
    """The preset ``cfg.model`` with ``cfg.model_config`` and ``changes`` applied, checked
    (ModelConfig does not check its values; a bad one fails deep in building the model)."""
    try:
        config = PRESETS[cfg.model].replace(**{**cfg.model_config, **changes})
    except TypeError as e:
        raise TrainConfigError(f"invalid model_config: {e}") from None
    problems = model_config_problems(config)
    if problems:
        raise TrainConfigError(f"invalid {cfg.kind} config: " + "; ".join(problems))
    return config


def initial_model(cfg: TrainConfig, cls: type[M], kind: str, **changes: Any) -> M:
    """A new ``cls`` (initialized from the global RNG), or ``cfg.init_checkpoint`` loaded as
    ``kind``; ``changes`` override the model config either way. The encoder's position
    embeddings train only with ``trainable_pos_embed``."""
    if cfg.init_checkpoint:
        try:
            model = load_checkpoint(cfg.init_checkpoint, kind=kind, **{**cfg.model_config, **changes})
        except ValueError as e:
            # The checkpoint's own sizes build; the model_config overrides applied to them may
            # not (heads that do not split the width), and only building finds out.
            if not cfg.model_config:
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TrainConfigError(
                f"invalid {cfg.kind} config: model_config {cfg.model_config} does not fit "
                f"{cfg.init_checkpoint} ({first})"
            ) from None
    else:
        model = cls(model_config_for(cfg, **changes))
    assert isinstance(model, cls)
    model.pos_embed_a.requires_grad_(cfg.trainable_pos_embed)
    model.pos_embed_v.requires_grad_(cfg.trainable_pos_embed)
    return model
