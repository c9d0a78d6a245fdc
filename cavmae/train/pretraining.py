"""The pre-training recipe: masked reconstruction plus audio-visual contrast."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cavmae.model import CAVMAE

from .configs import PretrainConfig
from .data import load_data, preprocess_for
from .device import prepare_run
from .evaluation import evaluate_pretrain
from .loop import Callback, Job, TrainResult, run, write_result
from .models import initial_model
from .steps import MASK_TAG, PRETRAIN_TERMS, PretrainStep, mask_noise


def pretrain(
    config: PretrainConfig, *, on_step: Callback | None = None, on_epoch: Callback | None = None
) -> TrainResult:
    """Run (or resume) CAV-MAE pre-training; see :mod:`cavmae.train` for the run directory.

    ``on_step`` is called on every process after each optimizer step with the epoch, the global
    step, the clip indices this process used and the step's loss terms; ``on_epoch`` on rank 0
    with each epoch record (what ``metrics.jsonl`` gets).
    """
    cfg = config
    d, device, amp = prepare_run(cfg)
    model = initial_model(cfg, CAVMAE, "pretrain", norm_pix_loss=cfg.norm_pix_loss)
    model.to(device).train()
    data = load_data(cfg, None, preprocess_for(model.config), True, True)  # labels unused
    eval_bs = cfg.eval_batch_size or cfg.batch_size // (d.world_size * cfg.accum_steps)

    def forward(module: nn.Module, batch: dict[str, Any], words: list[int]) -> tuple[torch.Tensor, ...]:
        # the masks of a micro-batch: a function of (seed, epoch, step, micro-batch)
        b = batch["audio"].shape[0]
        na, nv = mask_noise(cfg, model, b, [words[0], MASK_TAG, *words[1:]])
        return module(batch["audio"], batch["image"], na.to(device), nv.to(device))

    def evaluate() -> dict[str, float]:
        assert data.val is not None
        out = evaluate_pretrain(model, data.val, cfg, device, amp, d, eval_bs)
        model.train()
        return out

    def better(metrics: dict[str, float], best: float | None) -> tuple[bool, float]:
        return best is None or metrics["loss"] < best, metrics["loss"]

    job = Job(
        cfg, model, PretrainStep(model, cfg),
        [{"params": [p for p in model.parameters() if p.requires_grad]}],
        data, PRETRAIN_TERMS, forward, evaluate if data.val is not None else None, better,
        lambda e: cfg.save_epoch_checkpoints,
    )
    result = run(job, d, device, amp, on_step, on_epoch)
    if result.completed and d.main:
        write_result(result)
    return result
