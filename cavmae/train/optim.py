"""Optimizer, learning-rate schedule and loss scaler of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .configs import TrainConfig


class MultiStepWarmup:
    """The reference schedule as a pure function of ``(epoch, global_step)``.

    ``MultiStepLR(milestones=range(start, 1000, step), gamma)`` stepped once per epoch: during
    epoch ``e`` (1-based) the lr is ``base * gamma ** #{m in milestones : m <= e - 1}``;
    times a linear warm-up ``min(1, (global_step + 1) / warmup_steps)`` over the first steps.
    Each parameter group keeps its own base lr (``initial_lr``).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, start: int, step: int, gamma: float, warmup_steps: int
    ) -> None:
        self.optimizer = optimizer
        self.start, self.step, self.gamma, self.warmup_steps = start, step, gamma, warmup_steps
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])

    def decays(self, epoch: int) -> int:
        done = epoch - 1
        if done < self.start:
            return 0
        return min(1 + (done - self.start) // self.step, len(range(self.start, 1000, self.step)))

    def factor(self, epoch: int, global_step: int) -> float:
        warm = min(1.0, (global_step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return self.gamma ** self.decays(epoch) * warm

    def apply(self, epoch: int, global_step: int) -> float:
        f = self.factor(epoch, global_step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "milestone_start": self.start, "milestone_step": self.step, "gamma": self.gamma,
            "warmup_steps": self.warmup_steps,
            "base_lrs": [g["initial_lr"] for g in self.optimizer.param_groups],
        }


@dataclass
class Optimization:
    """Adam, the reference schedule and the fp16 loss scaler (a no-op unless fp16)."""

    optimizer: torch.optim.Optimizer
    scheduler: MultiStepWarmup
    scaler: torch.amp.GradScaler

    @classmethod
    def create(
        cls, param_groups: list[dict[str, Any]], cfg: TrainConfig, amp: torch.dtype | None
    ) -> Optimization:
        optimizer = torch.optim.Adam(
            param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        scheduler = MultiStepWarmup(
            optimizer, cfg.lr_decay_start, cfg.lr_decay_step, cfg.lr_decay, cfg.warmup_steps
        )
        return cls(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=amp == torch.float16))

    def step(self) -> None:
        """Apply the accumulated gradients and clear them."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
