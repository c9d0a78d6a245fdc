"""What one micro-batch computes: the pre-training and the fine-tuning forward and loss.

The step modules are what DDP wraps, so the whole forward runs inside the wrapper.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cavmae.masking import draw_noise
from cavmae.model import CAVMAE, CAVMAEFT

from .configs import PretrainConfig

# tags that keep the seed streams of different uses apart
MASK_TAG = 0x4D41534B
EVAL_TAG = 0x4556414C

#: the loss terms a pre-training step returns, in order (the first is optimized)
PRETRAIN_TERMS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


class PretrainStep(nn.Module):
    """The pre-training forward returning a tuple of the loss terms (:data:`PRETRAIN_TERMS`)."""

    def __init__(self, model: CAVMAE, cfg: PretrainConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(
        self, audio: torch.Tensor, image: torch.Tensor, noise_a: torch.Tensor, noise_v: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        c = self.cfg
        out = self.model(
            audio, image, c.mask_ratio_a, c.mask_ratio_v, noise_a=noise_a, noise_v=noise_v,
            mask_mode=c.mask_mode, mae_loss_weight=c.mae_loss_weight,
            contrast_loss_weight=c.contrast_loss_weight, bidirect_contrast=c.bidirect_contrast,
        )
        return out.loss, out.loss_mae, out.loss_mae_a, out.loss_mae_v, out.loss_c, out.c_acc


class ClassifierStep(nn.Module):
    """The classifier's logits in one fine-tuning mode."""

    def __init__(self, model: CAVMAEFT, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, audio: torch.Tensor | None, image: torch.Tensor | None) -> torch.Tensor:
        return self.model(audio, image, self.mode)


def mask_noise(
    cfg: PretrainConfig, model: CAVMAE, b: int, seed_words: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masking noise of ``b`` clips, a pure function of ``seed_words``."""
    rng = np.random.default_rng(seed_words)
    mc = model.config
    na = draw_noise(rng, b, mc.num_audio_tokens, mc.audio_grid, cfg.mask_ratio_a, cfg.mask_mode)
    nv = draw_noise(rng, b, mc.num_visual_tokens)
    return torch.from_numpy(np.ascontiguousarray(na)), torch.from_numpy(nv)


def classification_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """BCE (multi-label) or CE (single-label) in float32."""
    logits = logits.float()
    if loss == "BCE":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)
