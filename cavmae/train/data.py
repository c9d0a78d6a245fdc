"""The training and validation sets of a run and their loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cavmae.config import DEFAULT_PREPROCESS, ModelConfig, PreprocessConfig
from cavmae.data import AVDataset, LabelSet, collate, read_clips, read_weights

from .configs import TrainConfig, TrainConfigError


def preprocess_for(config: ModelConfig) -> PreprocessConfig:
    """The preprocessing whose shapes ``config``'s model takes."""
    return DEFAULT_PREPROCESS.for_model(config)


@dataclass
class RunData:
    train: AVDataset
    val: AVDataset | None
    weights: np.ndarray | None  # per-clip sampling weights (class-balanced sampling)
    labels: LabelSet | None


def load_data(
    cfg: TrainConfig, labels: LabelSet | None, preprocess: PreprocessConfig, audio: bool, video: bool
) -> RunData:
    """The training set (augmented, a random frame) and the validation set (the middle frame)."""
    train_clips = read_clips(cfg.train_data)
    if getattr(cfg, "loss", None) == "CE" and labels is not None:
        _check_single_label(train_clips, labels)
    weights = read_weights(cfg.weight_csv, len(train_clips)) if cfg.weight_csv else None
    train = AVDataset(
        train_clips, labels, augment=cfg.augment_config(), frame="random",
        audio=audio, video=video, preprocess=preprocess, frame_fallback=cfg.frame_fallback,
    )
    val = None
    if cfg.val_data:
        val = AVDataset(
            read_clips(cfg.val_data), labels, frame="middle", audio=audio, video=video,
            preprocess=preprocess, frame_fallback=cfg.frame_fallback,
        )
    return RunData(train, val, weights, labels)


def loader(dataset: AVDataset, batches: Any, num_workers: int, device: torch.device) -> Any:
    """A loader of ``dataset`` in the given batches (a list or a batch sampler)."""
    return torch.utils.data.DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
    }


def _check_single_label(clips: Any, labels: LabelSet) -> None:
    """Cross-entropy (``loss: CE``) wants one class per clip: refuse multi-label data, which
    would give targets summing to more than 1."""
    from cavmae.clip_lists import label_index, split_labels

    index = label_index(labels)
    for clip in clips:
        tokens = split_labels(clip.labels or (), index)
        if len(tokens) > 1:
            raise TrainConfigError(
                f"loss CE trains single-label data, but {clip.video_id} has {len(tokens)} labels"
                f" ({', '.join(tokens[:4])}); use loss BCE (--loss BCE) for multi-label data"
            )
