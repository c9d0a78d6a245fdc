"""The training and validation sets of a run and their loaders.

A run checks up front that every file its datasets name exists (:func:`check_files`): a
missing file is a wrong path or an unfinished ``cavmae prepare``, found in seconds instead of
hours into the run. A clip that exists but fails to load mid-run (corrupt, truncated, deleted
since) is replaced by another clip (``AVDataset(skip_bad_clips=True)``) and reported by the
loop; only a dataset where clip after clip fails stops the run (:func:`training_loader` carries
that error across worker processes as one clean line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cavmae.config import DEFAULT_PREPROCESS, ModelConfig, PreprocessConfig
from cavmae.data import AVDataset, ItemKey, LabelSet, collate, read_clips, read_weights
from cavmae.errors import CavmaeError, DatasetError

from .configs import TrainConfig, TrainConfigError

#: the key of a training batch that stands for the error that stopped its loading
ERROR_KEY = "error"
#: how many missing files a refusal names
_SHOWN = 3


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
    """The training set (augmented, a random frame, bad clips replaced) and the validation set
    (the middle frame), their files checked (:func:`check_files`)."""
    train_clips = read_clips(cfg.train_data)
    if getattr(cfg, "loss", None) == "CE" and labels is not None:
        _check_single_label(train_clips, labels)
    weights = read_weights(cfg.weight_csv, len(train_clips)) if cfg.weight_csv else None
    train = AVDataset(
        train_clips, labels, augment=cfg.augment_config(), frame="random", audio=audio,
        video=video, preprocess=preprocess, frame_fallback=cfg.frame_fallback, skip_bad_clips=True,
    )
    check_files(train, cfg.train_data)
    val = None
    if cfg.val_data:
        val = AVDataset(
            read_clips(cfg.val_data), labels, frame="middle", audio=audio, video=video,
            preprocess=preprocess, frame_fallback=cfg.frame_fallback,
        )
        check_files(val, cfg.val_data)
    return RunData(train, val, weights, labels)


def check_files(dataset: AVDataset, source: str) -> None:
    """Refuse a dataset naming files that do not exist, in one line naming the first few.

    Refused rather than skipped: a missing file is a wrong path or an unfinished ``cavmae
    prepare`` that the user should see before hours of training, and dropping the clips would
    silently train on another dataset (and misalign a weight CSV, one line per clip).
    """
    missing = dataset.missing_files()
    if not missing:
        return
    clips = len({i for i, _ in missing})
    shown = ", ".join(path for _, path in missing[:_SHOWN])
    more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
    raise DatasetError(
        f"{source}: {clips} of its {len(dataset)} clips name missing files ({shown}{more}); fix "
        "the paths or re-run `cavmae prepare` for those clips, or remove their entries"
    )


def loader(dataset: Any, batches: Any, num_workers: int, device: torch.device, collate_fn: Any = collate) -> Any:
    """A loader of ``dataset`` in the given batches (a list or a batch sampler)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


class _TrainItems:
    """A training set whose items turn a ``CavmaeError`` into ``{ERROR_KEY: message}``: a
    DataLoader worker's exception reaches the main process with its traceback folded into the
    message, an item keeps it one line."""

    def __init__(self, dataset: AVDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        try:
            return self.dataset[key]
        except CavmaeError as e:
            return {ERROR_KEY: str(e)}


def _train_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [it[ERROR_KEY] for it in items if ERROR_KEY in it]
    return {ERROR_KEY: errors[0]} if errors else collate(items)


def training_loader(dataset: AVDataset, sampler: Any, num_workers: int, device: torch.device) -> Any:
    """The loader of the training batches; a batch that could not be loaded is
    ``{ERROR_KEY: message}`` (the loop raises it)."""
    return loader(_TrainItems(dataset), sampler, num_workers, device, _train_collate)


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
