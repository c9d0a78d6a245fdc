"""Evaluation during training: clip scores, classification metrics, pre-training validation.

Evaluation is sharded over the processes of a run and gathered, so every rank gets the same
numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cavmae.data import AVDataset, eval_batches
from cavmae.errors import CavmaeError, DatasetError
from cavmae.metrics import accuracy, mean_average_precision, retrieval_metrics
from cavmae.model import CAVMAE, CAVMAEFT
from cavmae.modes import lookup

from .configs import FinetuneConfig, PretrainConfig
from .data import loader, to_device
from .device import Dist, autocast, gather
from .steps import EVAL_TAG, PRETRAIN_TERMS, PretrainStep, classification_loss, mask_noise


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    x = x.float()
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "softmax":
        return torch.softmax(x, dim=-1)
    return x


@torch.no_grad()
def predict_clips(
    model: CAVMAEFT,
    dataset: AVDataset,
    *,
    mode: str = "multimodal",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    activation: str | None = "sigmoid",
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    _dist: Dist | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores of every clip of ``dataset`` (in order): ``([N, C] float32, targets [N, C] or None)``.

    With ``dataset.frame == "all"`` the reference frame aggregation: per frame, the logits are
    turned into probabilities (``activation`` ``"sigmoid"`` or ``"softmax"``) and averaged over
    the frames; the audio branch runs once per clip. With one frame per clip the scores are
    the activated logits (raw logits for ``activation=None``). Audio-only mode ignores frames.
    """
    d = _dist or Dist()
    device = torch.device(device)
    model.eval()
    batches = eval_batches(len(dataset), batch_size, d.world_size, d.rank)
    uses_audio, uses_video = lookup(mode).audio, lookup(mode).video

    def scores_of(a: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        return _activate(model.head(model.pooled_features(a, v, mode)), activation)

    def frame_average(a: torch.Tensor | None, frames: torch.Tensor) -> torch.Tensor:
        total: Any = 0  # the sum of the frames' scores, in frame order
        for f in range(frames.shape[1]):
            total = total + scores_of(a, model.forward_visual_encoder(frames[:, f]))
        return total / frames.shape[1]

    scores, targets = [], []
    error: Exception | None = None
    try:
        for batch in loader(dataset, batches, num_workers, device):
            batch = to_device(batch, device)
            with autocast(device, amp_dtype):
                a = model.forward_audio_encoder(batch["audio"]) if uses_audio else None
                if not uses_video:
                    out = scores_of(a, None)
                elif "frames" in batch:
                    out = frame_average(a, batch["frames"])
                else:
                    out = scores_of(a, model.forward_visual_encoder(batch["image"]))
            scores.append(out.float().cpu().numpy())
            if "target" in batch:
                targets.append(batch["target"].cpu().numpy())
    except Exception as e:  # raised after the gather, on every process (_gather_or_raise)
        error = e
    c = model.config.num_classes
    local = (
        np.concatenate(scores) if scores else np.zeros((0, c), np.float32),
        np.concatenate(targets) if targets else None,
    )
    parts = _gather_or_raise(local, error, d)
    s = np.concatenate([p[0] for p in parts])
    t = None if any(p[1] is None for p in parts) else np.concatenate([p[1] for p in parts])
    if t is None and dataset.labels is not None and len(s) == 0:
        t = np.zeros((0, c), np.float32)
    return s, t


def _gather_or_raise(local: Any, error: Exception | None, d: Dist) -> list[Any]:
    """Every process's ``local`` (:func:`~cavmae.train.device.gather`), or, when one of them
    failed (``error``), an error on every process: its own, or one quoting the failed one.

    The gather comes first, so a process that failed still meets the others there: raising
    before it would leave them waiting in the gather until the job is killed, and the run's
    state would not be saved (the training loop saves on rank 0 when validation raises)."""
    said = None if error is None else str(error) if isinstance(error, CavmaeError) else f"{type(error).__name__}: {error}"
    parts = gather((local, said), d)
    if error is not None:
        raise error
    failed = [message for _, message in parts if message is not None]
    if failed:
        raise DatasetError(f"another process failed while validating: {failed[0]}")
    return [part for part, _ in parts]


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    hard = (targets > 0.5).astype(np.float32)
    return {
        "mAP": mean_average_precision(scores, hard).map,
        "acc": accuracy(scores, hard),
    }


@torch.no_grad()
def evaluate_finetune(
    model: CAVMAEFT, ds: AVDataset, cfg: FinetuneConfig, device: torch.device,
    amp: torch.dtype | None, d: Dist, batch_size: int,
) -> dict[str, float]:
    """Validation loss, mAP and accuracy on one frame per clip."""
    logits, targets = predict_clips(
        model, ds, mode=cfg.mode, batch_size=batch_size, device=device, activation=None,
        amp_dtype=amp, _dist=d,
    )
    assert targets is not None
    loss = classification_loss(torch.from_numpy(logits), torch.from_numpy(targets), cfg.loss)
    return {"loss": float(loss), **classification_metrics(logits, targets)}


@torch.no_grad()
def evaluate_pretrain(
    model: CAVMAE, ds: AVDataset, cfg: PretrainConfig, device: torch.device,
    amp: torch.dtype | None, d: Dist, batch_size: int,
) -> dict[str, float]:
    """Masked losses and contrastive accuracy (reference validation, fixed masks) plus
    unmasked retrieval over the whole set (R@1 visual->audio, the contrastive direction)."""
    model.eval()
    step = PretrainStep(model, cfg)
    sums = dict.fromkeys(PRETRAIN_TERMS, 0.0)
    count = 0
    emb_a, emb_v = [], []
    error: Exception | None = None
    try:
        for batch in loader(ds, eval_batches(len(ds), batch_size, d.world_size, d.rank), 0, device):
            batch = to_device(batch, device)
            b = batch["audio"].shape[0]
            first = int(batch["index"][0])
            na, nv = mask_noise(cfg, model, b, [cfg.seed, EVAL_TAG, first])
            with autocast(device, amp):
                terms = step(batch["audio"], batch["image"], na.to(device), nv.to(device))
                ea, ev = model.embed(batch["audio"], batch["image"])
            assert ea is not None and ev is not None  # both inputs given
            for k, v in zip(PRETRAIN_TERMS, terms, strict=True):
                sums[k] += float(v) * b
            count += b
            emb_a.append(ea.float().cpu())
            emb_v.append(ev.float().cpu())
    except Exception as e:  # raised after the gather, on every process (_gather_or_raise)
        error = e
    parts = _gather_or_raise((sums, count, emb_a, emb_v), error, d)
    n = sum(p[1] for p in parts)
    out = {k: sum(p[0][k] for p in parts) / max(n, 1) for k in PRETRAIN_TERMS}
    a = torch.cat([x for p in parts for x in p[2]])
    v = torch.cat([x for p in parts for x in p[3]])
    if len(a) > 1:
        sim = (v @ a.T).numpy()  # query: visual clip, item: audio clip
        out["retrieval_v2a_r1"] = retrieval_metrics(sim)["R@1"] / 100.0
        out["retrieval_a2v_r1"] = retrieval_metrics(sim.T)["R@1"] / 100.0
    return out
