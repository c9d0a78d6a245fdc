"""The fine-tuning recipe: a classifier trained on labels, then its final evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cavmae.checkpoint import read_state_dict, save_checkpoint
from cavmae.checkpoint_keys import TrainedHead
from cavmae.data import AVDataset, read_labels
from cavmae.labels import LabelSet
from cavmae.model import CAVMAEFT
from cavmae.modes import finetune_needs

from .configs import FinetuneConfig, TrainConfigError
from .data import RunData, check_files, load_data, preprocess_for
from .device import Dist, barrier, prepare_run
from .evaluation import classification_metrics, evaluate_finetune, predict_clips
from .loop import Callback, Job, TrainResult, run, write_result
from .models import initial_model
from .state import AVERAGED_FILE, METRICS_FILE, MetricsLog, epoch_file
from .steps import ClassifierStep, classification_loss

HEAD_PREFIX = "mlp_head."


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the state dicts in ``paths`` (reference weight averaging)."""
    if not paths:
        raise TrainConfigError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for p in paths:
        state, _ = read_state_dict(p)
        if total and set(state) != set(total):
            raise TrainConfigError(f"{p} has other keys than {paths[0]}; cannot average them")
        for k, v in state.items():
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(paths)).float() for k, v in total.items()}


def _param_groups(model: CAVMAEFT, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """The backbone at ``lr`` (none with ``freeze_backbone``) and the new head at ``head_lr x lr``."""
    head = [p for n, p in model.named_parameters() if n.startswith(HEAD_PREFIX)]
    base = [p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIX) and p.requires_grad]
    if cfg.freeze_backbone:
        for p in base:
            p.requires_grad_(False)
        base = []
    groups = ({"params": base, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.head_lr})
    return [g for g in groups if g["params"]]


def finetune(
    config: FinetuneConfig, *, on_step: Callback | None = None, on_epoch: Callback | None = None
) -> TrainResult:
    """Run (or resume) classifier fine-tuning, then the final evaluation.

    Each epoch is validated on the middle frame (``val_loss``, ``val_mAP``, ``val_acc``). At the
    end the evaluated model is the weight average (``wa``), else the best epoch, else the last;
    with ``frame_aggregation`` its predictions are averaged over all frames (docs/model.md
    section 4). ``on_step`` and ``on_epoch`` as for :func:`cavmae.train.pretrain`.
    """
    cfg = config
    d, device, amp = prepare_run(cfg)
    assert cfg.label_csv
    labels = read_labels(cfg.label_csv)
    model = initial_model(cfg, CAVMAEFT, "classifier", num_classes=len(labels))
    groups = _param_groups(model, cfg)
    model.to(device).train()
    audio, video = finetune_needs(cfg.mode)
    data = load_data(cfg, labels, preprocess_for(model.config), audio, video)
    final_val = _final_val_set(cfg, data)
    if final_val is not None:  # the end's evaluation may read frames the epochs' does not
        check_files(final_val, str(cfg.val_data))
    eval_bs = cfg.eval_batch_size or cfg.batch_size // (d.world_size * cfg.accum_steps)
    wa_end = min(cfg.wa_end or cfg.epochs, cfg.epochs)

    def forward(module: nn.Module, batch: dict[str, Any], words: list[int]) -> tuple[torch.Tensor, ...]:
        logits = module(batch.get("audio"), batch.get("image"))
        return (classification_loss(logits, batch["target"], cfg.loss),)

    def evaluate() -> dict[str, float]:
        assert data.val is not None
        out = evaluate_finetune(model, data.val, cfg, device, amp, d, eval_bs)
        model.train()
        return out

    def better(metrics: dict[str, float], best: float | None) -> tuple[bool, float]:
        value = metrics[cfg.main_metric]
        return best is None or value > best, value

    job = Job(
        cfg, model, ClassifierStep(model, cfg.mode), groups, data, ("loss",), forward,
        evaluate if data.val is not None else None, better,
        lambda e: cfg.save_epoch_checkpoints or (cfg.wa and cfg.wa_start <= e <= wa_end),
        head=trained_head(cfg, labels),
    )
    result = run(job, d, device, amp, on_step, on_epoch)
    if not result.completed:
        return result
    chosen = _load_final_weights(model, cfg, result, d, wa_end, labels)
    model.to(device).eval()
    result.final_metrics = {"model": chosen}
    if final_val is not None:
        result.final_metrics.update(_final_evaluation(model, cfg, final_val, device, amp, d, eval_bs))
    if d.main:
        MetricsLog(result.run_dir / METRICS_FILE, True).write({"event": "final", **result.final_metrics})
        write_result(result)
    result.model = model
    return result


def trained_head(cfg: FinetuneConfig, labels: LabelSet) -> TrainedHead:
    """What this fine-tuning fixes about the head, kept in every checkpoint it writes: the class
    names, the mode (its inputs) and the task its loss trains for (CE: softmax, single-label)."""
    return TrainedHead(labels=labels, finetune_mode=cfg.mode,
                       task="single-label" if cfg.loss == "CE" else "multi-label")


def _load_final_weights(
    model: CAVMAEFT, cfg: FinetuneConfig, result: TrainResult, d: Dist, wa_end: int, labels: LabelSet
) -> str:
    """Load the weights to evaluate into ``model``: the average (``"wa"``), else the best
    epoch (``"best"``), else keep the last (``"final"``)."""
    run_dir = result.run_dir
    if cfg.wa:
        if d.main:
            paths = [run_dir / epoch_file(e) for e in range(cfg.wa_start, wa_end + 1)]
            model.load_state_dict(average_checkpoints(paths))
            head = trained_head(cfg, labels)
            save_checkpoint(model, run_dir / AVERAGED_FILE, labels=head.labels, finetune_mode=head.finetune_mode,
                            task=head.task)
        barrier(d)
        if not d.main:
            state, _ = read_state_dict(run_dir / AVERAGED_FILE)
            model.load_state_dict(state)
        result.averaged_checkpoint = run_dir / AVERAGED_FILE
        return "wa"
    if result.best_checkpoint is not None:
        state, _ = read_state_dict(result.best_checkpoint)
        model.load_state_dict(state)
        return "best"
    return "final"


def _final_val_set(cfg: FinetuneConfig, data: RunData) -> AVDataset | None:
    """The validation set of the final evaluation: all frames of each clip with
    ``frame_aggregation``, else the middle one; no frame fallback (evaluation never has one)."""
    if data.val is None:
        return None
    audio, video = finetune_needs(cfg.mode)
    frames = "all" if cfg.frame_aggregation and video else "middle"
    return AVDataset(
        data.val.clips, data.labels, frame=frames, audio=audio, video=video,
        preprocess=data.val.preprocess,
    )


def _final_evaluation(
    model: CAVMAEFT, cfg: FinetuneConfig, val: AVDataset, device: torch.device,
    amp: torch.dtype | None, d: Dist, eval_bs: int,
) -> dict[str, Any]:
    """Metrics of the final validation set (:func:`_final_val_set`)."""
    frames = val.frame
    scores, targets = predict_clips(
        model, val, mode=cfg.mode, batch_size=max(1, eval_bs // 2 if frames == "all" else eval_bs),
        device=device, activation="sigmoid" if cfg.loss == "BCE" else "softmax",
        amp_dtype=amp, _dist=d,
    )
    assert targets is not None
    return {
        **classification_metrics(scores, targets),
        "frame_aggregation": frames == "all",
        "num_clips": int(len(scores)),
    }
