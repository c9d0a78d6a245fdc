"""Pre-training and fine-tuning loops (the reference recipes of docs/model.md section 9).

``pretrain(PretrainConfig(...))`` and ``finetune(FinetuneConfig(...))`` run a whole training job
into ``config.output_dir`` (the *run directory*):

- ``config.json``: the config the run started with;
- ``metrics.jsonl``: one JSON object per line: ``{"event": "step", ...}`` every ``log_every``
  optimizer steps, ``{"event": "epoch", ...}`` after each epoch (training averages and
  validation metrics), ``{"event": "final", ...}`` at the end;
- ``model.{epoch}.pth``: the weights after each epoch, ``best.pth`` (best validation metric),
  ``final.pth`` (after the last epoch), ``wa.pth`` (fine-tuning: the average of the epoch
  checkpoints ``wa_start..wa_end``). All are reference-format files (``module.`` keys) with the
  model config embedded: :func:`cavmae.checkpoint.load_checkpoint` and the reference loader
  both read them;
- ``state.pt``: the resumable training state (model, optimizer, loss scaler, schedule
  position, best metric, history, RNG states), written atomically after every epoch and every
  ``save_every_steps`` optimizer steps. Starting a run whose directory holds a ``state.pt``
  continues it (``resume=True``); a killed run resumed this way ends with the same weights as an
  uninterrupted one. A run stopped by ``max_steps`` continues with a larger ``max_steps`` (or
  none); a finished run given a larger ``epochs`` trains on to it and ends with the weights of
  a run started with that ``epochs`` (the lr schedule does not depend on the epoch count);
- ``result.json``: a summary at the end.

Reproducibility: every random choice is a pure function of ``seed`` and a position. The epoch's
sample order is drawn from ``(seed, epoch)``; a sample's augmentation from ``(seed, epoch,
position in the epoch)``; the pre-training masks of a micro-batch from ``(seed, epoch, step,
micro-batch)``; the model's initialization from ``seed``. Nothing depends on the global RNGs,
on data-loader workers or on where a previous run stopped (the global RNG states are saved and
restored all the same).

Batching: ``batch_size`` is the number of samples per optimizer step over all processes. With
``W`` processes and ``accum_steps`` accumulation rounds each process runs micro-batches of
``batch_size / (W * accum_steps)`` samples. The contrastive loss is computed within each
micro-batch (as the reference computes it within each GPU's share of a DataParallel batch).

Distributed data parallel: when the environment says ``WORLD_SIZE > 1`` (``torchrun``), the
process group is initialized from the environment (NCCL on CUDA, gloo on CPU), each process
takes its shard of every step, gradients are averaged, evaluation is sharded and gathered, and
only rank 0 writes files and logs.

Mixed precision runs on CUDA only: bf16 where supported (no loss scaling), else fp16 with a
gradient scaler; CPU runs in float32.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cavmae.augment import AugmentConfig
from cavmae.checkpoint import checkpoint_meta, load_checkpoint, read_state_dict, save_checkpoint
from cavmae.coerce import FieldTypeError, coerce_fields
from cavmae.config import DEFAULT_PREPROCESS, PRESETS, ModelConfig, PreprocessConfig
from cavmae.data import (
    AVDataset,
    ClipRecord,
    LabelSet,
    StepBatchSampler,
    collate,
    epoch_order,
    eval_batches,
    read_clips,
    read_labels,
    read_weights,
)
from cavmae.errors import CavmaeError
from cavmae.masking import MASK_MODES, draw_noise
from cavmae.metrics import accuracy, mean_average_precision, retrieval_metrics
from cavmae.model import CAVMAE, CAVMAEFT
from cavmae.modes import FINETUNE_MODES, finetune_needs, lookup

__all__ = [
    "FinetuneConfig",
    "PretrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainingDivergedError",
    "average_checkpoints",
    "finetune",
    "predict_clips",
    "pretrain",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"

# tags that keep the seed streams of different uses apart
_MASK_TAG = 0x4D41534B
_EVAL_TAG = 0x4556414C


class TrainConfigError(CavmaeError):
    """A training config is invalid, or does not match the run it should resume."""


class TrainingDivergedError(CavmaeError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------------------------
# Configs


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (used by the CLI)."""
    if isinstance(default, dict | list):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _typed_model_config(values: dict[str, Any]) -> dict[str, Any]:
    """``model_config`` overrides checked against :class:`ModelConfig`'s fields and types."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FieldTypeError(
            [f"unknown model_config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"]
        )
    return coerce_fields(ModelConfig, values, prefix="model_config.")


# Fields that may change when a run is resumed (they do not change the trajectory).
_RESUMABLE_CHANGES = frozenset(
    {
        "output_dir", "epochs", "max_steps", "resume", "progress", "num_workers", "log_every",
        "save_every_steps", "save_epoch_checkpoints", "eval_batch_size", "device", "train_data",
        "val_data", "label_csv", "weight_csv", "init_checkpoint", "wa_end", "eval_every",
        "eval_at_start",
    }
)


@dataclass
class TrainConfig:
    """Fields shared by pre-training and fine-tuning. Load from YAML/JSON with ``from_file``."""

    train_data: str = _f("", "training set: a reference dataset JSON, or a CSV/JSON list of videos")
    output_dir: str = _f("", "run directory (checkpoints, metrics.jsonl, state.pt)")
    val_data: str | None = _f(None, "validation set, same formats as train_data")
    label_csv: str | None = _f(None, "label CSV (index,mid,display_name)")
    weight_csv: str | None = _f(None, "per-clip sampling weights (one per line): class-balanced sampling")
    model: str = _f("base", f"model size preset ({', '.join(PRESETS)}) when not starting from a checkpoint")
    model_config: dict = _f({}, "ModelConfig fields overriding the preset or the checkpoint")
    init_checkpoint: str | None = _f(None, "initialize from this checkpoint")
    epochs: int = _f(10, "number of epochs")
    batch_size: int = _f(48, "samples per optimizer step, over all processes")
    eval_batch_size: int | None = _f(None, "evaluation batch per process (default: the micro-batch)")
    lr: float = _f(1e-4, "base learning rate")
    betas: tuple[float, float] = _f((0.95, 0.999), "Adam betas")
    weight_decay: float = _f(5e-7, "Adam weight decay")
    lr_decay_start: int = _f(10, "MultiStepLR: first epoch after which the lr decays")
    lr_decay_step: int = _f(5, "MultiStepLR: decay every this many epochs from then on")
    lr_decay: float = _f(0.5, "MultiStepLR: decay factor")
    warmup_steps: int = _f(0, "linear lr warm-up over this many optimizer steps")
    accum_steps: int = _f(1, "gradient accumulation rounds per optimizer step")
    trainable_pos_embed: bool = _f(False, "train the encoder's position embeddings")
    mixup: float = _f(0.0, "mixup probability")
    mixup_alpha: float = _f(10.0, "mixup lambda ~ Beta(alpha, alpha)")
    freqm: int = _f(0, "SpecAugment: max frequency band width")
    timem: int = _f(0, "SpecAugment: max time band width")
    noise: bool = _f(True, "fbank noise + random time roll")
    roll_frames: int | None = _f(None, "max time roll in frames (default: target length, as the reference)")
    label_smooth: float = _f(0.0, "label smoothing")
    seed: int = _f(0, "random seed (data order, augmentation, masks, initialization)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("auto", "auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    num_workers: int = _f(4, "data-loader worker processes")
    save_every_steps: int = _f(0, "also write state.pt every N optimizer steps (0: only per epoch)")
    save_epoch_checkpoints: bool = _f(True, "write model.{epoch}.pth after every epoch")
    max_steps: int | None = _f(None, "stop after this many optimizer steps in total (resumable)")
    resume: bool = _f(True, "continue from state.pt when the run directory has one")
    log_every: int = _f(20, "write a step record to metrics.jsonl every N optimizer steps")
    progress: bool = _f(True, "show progress bars")
    eval_at_start: bool = _f(False, "evaluate once before training (epoch 0)")
    eval_every: int = _f(1, "validate every N epochs (and after the last one)")

    kind = "train"
    #: fields without which no run can start (``--help`` marks them, ``validate`` checks them)
    required_fields: ClassVar[tuple[str, ...]] = ("train_data", "output_dir")

    def __post_init__(self) -> None:
        # Every way of making a config (files, CLI, Python, ``replace``) gets typed values.
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        problems: list[str] = []
        typed: dict[str, Any] = {}
        try:
            typed = coerce_fields(type(self), values)
        except FieldTypeError as e:
            problems += e.problems
        if isinstance(self.model_config, dict):
            try:
                typed["model_config"] = _typed_model_config(self.model_config)
            except FieldTypeError as e:
                problems += e.problems
        if problems:
            raise TrainConfigError(f"invalid {self.kind} config: " + "; ".join(problems))
        for name, value in typed.items():
            object.__setattr__(self, name, value)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(
                f"unknown {cls.kind} config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Any:
        """Load a YAML (``.yaml``/``.yml``) or JSON file; ``overrides`` win over the file."""
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as e:
            raise TrainConfigError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: the config must be a mapping of field names to values")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        problems = [f"{name} is required" for name in self.required_fields if not getattr(self, name)]
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.accum_steps < 1:
            problems.append("batch_size and accum_steps must be >= 1")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if self.model not in PRESETS and not self.init_checkpoint:
            problems.append(f"model must be one of {', '.join(PRESETS)}, not {self.model!r}")
        if self.lr_decay_step < 1:
            problems.append("lr_decay_step must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1")
        try:
            self.augment_config()
        except ValueError as e:
            problems.append(str(e))
        problems += self._validate_extra()
        if problems:
            raise TrainConfigError(f"invalid {self.kind} config: " + "; ".join(problems))

    def _validate_extra(self) -> list[str]:
        return []

    def augment_config(self) -> AugmentConfig:
        return AugmentConfig(
            mixup=self.mixup,
            mixup_alpha=self.mixup_alpha,
            freqm=self.freqm,
            timem=self.timem,
            noise=self.noise,
            roll_frames=self.roll_frames,
            label_smooth=self.label_smooth,
        )


@dataclass
class PretrainConfig(TrainConfig):
    """CAV-MAE pre-training (defaults: the reference CAV-MAE-Scale++ recipe)."""

    epochs: int = _f(25, "number of epochs")
    batch_size: int = _f(256, "samples per optimizer step, over all processes")
    lr: float = _f(2e-4, "base learning rate")
    mask_ratio_a: float = _f(0.75, "audio mask ratio")
    mask_ratio_v: float = _f(0.75, "visual mask ratio")
    mask_mode: str = _f("unstructured", f"audio mask mode: {', '.join(MASK_MODES)}")
    mae_loss_weight: float = _f(1.0, "weight of the reconstruction loss")
    contrast_loss_weight: float = _f(0.01, "weight of the contrastive loss")
    bidirect_contrast: bool = _f(False, "contrastive loss in both directions")
    norm_pix_loss: bool = _f(True, "reconstruct per-patch normalized targets")

    kind = "pretrain"

    def _validate_extra(self) -> list[str]:
        problems = []
        if self.mask_mode not in MASK_MODES:
            problems.append(f"mask_mode must be one of {', '.join(MASK_MODES)}")
        for name in ("mask_ratio_a", "mask_ratio_v"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1)")
        return problems


@dataclass
class FinetuneConfig(TrainConfig):
    """Classifier fine-tuning (defaults: the reference AudioSet-20K recipe)."""

    epochs: int = _f(15, "number of epochs")
    batch_size: int = _f(36, "samples per optimizer step, over all processes")
    lr: float = _f(5e-5, "base learning rate (the backbone's)")
    lr_decay_start: int = _f(5, "MultiStepLR: first epoch after which the lr decays")
    lr_decay_step: int = _f(1, "MultiStepLR: decay every this many epochs from then on")
    trainable_pos_embed: bool = _f(True, "train the encoder's position embeddings")
    mixup: float = _f(0.5, "mixup probability")
    freqm: int = _f(48, "SpecAugment: max frequency band width")
    timem: int = _f(192, "SpecAugment: max time band width")
    label_smooth: float = _f(0.1, "label smoothing")
    mode: str = _f("multimodal", f"fine-tuning mode: {', '.join(FINETUNE_MODES)}")
    loss: str = _f("BCE", "BCE (multi-label) or CE (single-label)")
    metric: str = _f("auto", "main validation metric: mAP, acc, or auto (mAP for BCE, acc for CE)")
    head_lr: float = _f(50.0, "the new head's lr = head_lr x lr")
    freeze_backbone: bool = _f(False, "train the head only (linear probe)")
    wa: bool = _f(True, "average the weights of the epoch checkpoints wa_start..wa_end")
    wa_start: int = _f(1, "first epoch of the weight average")
    wa_end: int | None = _f(None, "last epoch of the weight average (default: the last epoch)")
    frame_aggregation: bool = _f(True, "final evaluation averages the predictions of all frames")

    kind = "finetune"
    required_fields = (*TrainConfig.required_fields, "label_csv")

    @property
    def main_metric(self) -> str:
        if self.metric == "auto":
            return "mAP" if self.loss == "BCE" else "acc"
        return self.metric

    def _validate_extra(self) -> list[str]:
        problems = []
        if self.mode not in FINETUNE_MODES:
            problems.append(f"mode must be {', '.join(FINETUNE_MODES)}, not {self.mode!r}")
        if self.loss not in ("BCE", "CE"):
            problems.append(f"loss must be BCE or CE, not {self.loss!r}")
        if self.metric not in ("auto", "mAP", "acc"):
            problems.append(f"metric must be auto, mAP or acc, not {self.metric!r}")
        if self.wa and not 1 <= self.wa_start <= (self.wa_end or self.epochs) <= self.epochs:
            problems.append(
                f"need 1 <= wa_start <= wa_end <= epochs, got {self.wa_start}, {self.wa_end}, {self.epochs}"
            )
        return problems


@dataclass
class TrainResult:
    """What a training run produced.

    ``completed`` is False when the run stopped at ``max_steps`` (continue it with a larger
    ``max_steps``, or none; the same ``max_steps`` stops again at once). A completed run given
    a larger ``epochs`` continues to it. ``epoch``: epochs completed; ``global_step``: optimizer steps done. ``model`` is this process's trained model in eval mode (fine-tuning: the
    model the final evaluation used). ``history`` holds the epoch records of ``metrics.jsonl``;
    ``final_metrics`` the final evaluation (fine-tuning).
    """

    run_dir: Path
    completed: bool
    epoch: int
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    final_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    averaged_checkpoint: Path | None = None
    model: nn.Module | None = None


# --------------------------------------------------------------------------------------------
# Process, device and precision


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _init_distributed(device_pref: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not dist.is_initialized():
        # Initialized once per process and kept for later runs in the same process (pretrain
        # then finetune): re-creating the rendezvous store on the same port can hang.
        use_cuda = device_pref != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        atexit.register(_destroy_group)
    return _Dist(dist.get_world_size(), dist.get_rank(), local)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device(pref: str, d: _Dist) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainConfigError(f"device {pref!r} asked for, but CUDA is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{d.local_rank}")
    return dev


def _precision(pref: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32."""
    if device.type != "cuda":
        if pref in ("bf16", "fp16"):
            raise TrainConfigError(f"precision {pref} needs a CUDA GPU; use fp32 (or auto) on CPU")
        return None
    if pref == "fp32":
        return None
    if pref == "bf16" or (pref == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule


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


# --------------------------------------------------------------------------------------------
# Files


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


class _MetricsLog:
    """``metrics.jsonl`` of the run, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        if self.enabled and self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# --------------------------------------------------------------------------------------------
# Data


def _preprocess_for(config: ModelConfig) -> PreprocessConfig:
    return dataclasses.replace(
        DEFAULT_PREPROCESS,
        target_length=config.audio_length,
        num_mel_bins=config.num_mel_bins,
        image_size=config.image_size,
    )


@dataclass
class _Data:
    train: AVDataset
    val: AVDataset | None
    weights: np.ndarray | None
    labels: LabelSet | None


def _load_data(
    cfg: TrainConfig, labels: LabelSet | None, preprocess: PreprocessConfig, audio: bool, video: bool
) -> _Data:
    train_clips = read_clips(cfg.train_data)
    weights = read_weights(cfg.weight_csv, len(train_clips)) if cfg.weight_csv else None
    train = AVDataset(
        train_clips, labels, augment=cfg.augment_config(), frame="random",
        audio=audio, video=video, preprocess=preprocess,
    )
    val = None
    if cfg.val_data:
        val_clips: list[ClipRecord] = read_clips(cfg.val_data)
        val = AVDataset(val_clips, labels, frame="middle", audio=audio, video=video, preprocess=preprocess)
    return _Data(train, val, weights, labels)


def _loader(dataset: AVDataset, batches: Any, num_workers: int, device: torch.device) -> Any:
    return torch.utils.data.DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _gather(obj: Any, d: _Dist) -> list[Any]:
    """Every rank's ``obj`` in rank order (just ``[obj]`` without DDP)."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Model wrappers (what DDP wraps)


class _PretrainStep(nn.Module):
    """The pre-training forward returning a tuple of the loss terms."""

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


PRETRAIN_TERMS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")


class _ClassifierStep(nn.Module):
    def __init__(self, model: CAVMAEFT, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, audio: torch.Tensor | None, image: torch.Tensor | None) -> torch.Tensor:
        return self.model(audio, image, self.mode)


def _mask_noise(cfg: PretrainConfig, model: CAVMAE, b: int, seed_words: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed_words)
    mc = model.config
    na = draw_noise(rng, b, mc.num_audio_tokens, mc.audio_grid, cfg.mask_ratio_a, cfg.mask_mode)
    nv = draw_noise(rng, b, mc.num_visual_tokens)
    return torch.from_numpy(np.ascontiguousarray(na)), torch.from_numpy(nv)


def _classification_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    logits = logits.float()
    if loss == "BCE":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------------------------
# Evaluation


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
    _dist: _Dist | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores of every clip of ``dataset`` (in order): ``([N, C] float32, targets [N, C] or None)``.

    With ``dataset.frame == "all"`` the reference frame aggregation: per frame, the logits are
    turned into probabilities (``activation`` ``"sigmoid"`` or ``"softmax"``) and averaged over
    the frames; the audio branch runs once per clip. With one frame per clip the scores are
    the activated logits (raw logits for ``activation=None``). Audio-only mode ignores frames.
    """
    d = _dist or _Dist()
    device = torch.device(device)
    model.eval()
    batches = eval_batches(len(dataset), batch_size, d.world_size, d.rank)
    uses_audio, uses_video = lookup(mode).audio, lookup(mode).video

    def act(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if activation == "sigmoid":
            return torch.sigmoid(x)
        if activation == "softmax":
            return torch.softmax(x, dim=-1)
        return x

    scores, targets = [], []
    for batch in _loader(dataset, batches, num_workers, device):
        batch = _to(batch, device)
        with _autocast(device, amp_dtype):
            a = model.forward_audio_branch(batch["audio"]) if uses_audio else None
            if not uses_video:
                out = act(model.head(model.pooled_features(a, None, mode)))
            elif "frames" in batch:
                frames = batch["frames"]
                out = 0
                for f in range(frames.shape[1]):
                    v = model.forward_visual_branch(frames[:, f])
                    out = out + act(model.head(model.pooled_features(a, v, mode)))
                out = out / frames.shape[1]
            else:
                v = model.forward_visual_branch(batch["image"])
                out = act(model.head(model.pooled_features(a, v, mode)))
        scores.append(out.float().cpu().numpy())
        if "target" in batch:
            targets.append(batch["target"].cpu().numpy())
    c = model.config.num_classes
    local = (
        np.concatenate(scores) if scores else np.zeros((0, c), np.float32),
        np.concatenate(targets) if targets else None,
    )
    parts = _gather(local, d)
    s = np.concatenate([p[0] for p in parts])
    t = None if any(p[1] is None for p in parts) else np.concatenate([p[1] for p in parts])
    if t is None and dataset.labels is not None and len(s) == 0:
        t = np.zeros((0, c), np.float32)
    return s, t


def _classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    hard = (targets > 0.5).astype(np.float32)
    return {
        "mAP": mean_average_precision(scores, hard).map,
        "acc": accuracy(scores, hard),
    }


@torch.no_grad()
def _evaluate_finetune(
    model: CAVMAEFT, ds: AVDataset, cfg: FinetuneConfig, device: torch.device,
    amp: torch.dtype | None, d: _Dist, batch_size: int,
) -> dict[str, float]:
    logits, targets = predict_clips(
        model, ds, mode=cfg.mode, batch_size=batch_size, device=device, activation=None,
        amp_dtype=amp, _dist=d,
    )
    assert targets is not None
    loss = _classification_loss(torch.from_numpy(logits), torch.from_numpy(targets), cfg.loss)
    return {"loss": float(loss), **_classification_metrics(logits, targets)}


@torch.no_grad()
def _evaluate_pretrain(
    model: CAVMAE, ds: AVDataset, cfg: PretrainConfig, device: torch.device,
    amp: torch.dtype | None, d: _Dist, batch_size: int,
) -> dict[str, float]:
    """Masked losses and contrastive accuracy (reference validation, fixed masks) plus
    unmasked retrieval over the whole set (R@1 visual->audio, the contrastive direction)."""
    model.eval()
    step = _PretrainStep(model, cfg)
    sums = dict.fromkeys(PRETRAIN_TERMS, 0.0)
    count = 0
    emb_a, emb_v = [], []
    for batch in _loader(ds, eval_batches(len(ds), batch_size, d.world_size, d.rank), 0, device):
        batch = _to(batch, device)
        b = batch["audio"].shape[0]
        first = int(batch["index"][0])
        na, nv = _mask_noise(cfg, model, b, [cfg.seed, _EVAL_TAG, first])
        with _autocast(device, amp):
            terms = step(batch["audio"], batch["image"], na.to(device), nv.to(device))
            ea, ev = model.embed(batch["audio"], batch["image"])
        for k, v in zip(PRETRAIN_TERMS, terms, strict=True):
            sums[k] += float(v) * b
        count += b
        emb_a.append(ea.float().cpu())
        emb_v.append(ev.float().cpu())
    parts = _gather((sums, count, emb_a, emb_v), d)
    n = sum(p[1] for p in parts)
    out = {k: sum(p[0][k] for p in parts) / max(n, 1) for k in PRETRAIN_TERMS}
    a = torch.cat([x for p in parts for x in p[2]])
    v = torch.cat([x for p in parts for x in p[3]])
    if len(a) > 1:
        sim = (v @ a.T).numpy()  # query: visual clip, item: audio clip
        r = retrieval_metrics(sim)
        out["retrieval_v2a_r1"] = r["R@1"] / 100.0
        out["retrieval_a2v_r1"] = retrieval_metrics(sim.T)["R@1"] / 100.0
    return out


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Job:
    """Everything the generic loop needs from one kind of training."""

    cfg: TrainConfig
    model: nn.Module
    step_module: nn.Module
    param_groups: list[dict[str, Any]]
    data: _Data
    terms: tuple[str, ...]
    forward: Callable[[nn.Module, dict[str, Any], list[int]], tuple[torch.Tensor, ...]]
    evaluate: Callable[[], dict[str, float]] | None
    better: Callable[[dict[str, float], float | None], tuple[bool, float]]
    epoch_checkpoint: Callable[[int], bool]


def _check_resume_config(run_dir: Path, cfg: TrainConfig, saved_json: str) -> None:
    saved = json.loads(saved_json)
    now = json.loads(json.dumps(cfg.to_dict()))
    diff = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    ]
    if diff:
        raise TrainConfigError(
            f"{run_dir} holds a run started with another config ({'; '.join(diff)}); resume it "
            "with the same settings, or use another output_dir"
        )


def _check_epochs(run_dir: Path, cfg: TrainConfig, tr: dict[str, Any]) -> None:
    """Refuse an ``epochs`` below what the run in ``run_dir`` has already trained."""
    started = tr["epoch"] - (0 if tr["step_in_epoch"] else 1)  # epochs with any step done
    if cfg.epochs < started:
        what = (f"a finished run of {started} epochs" if tr["finished"]
                else f"a run that has trained into epoch {started}")
        raise TrainConfigError(
            f"{run_dir} holds {what}; epochs {cfg.epochs} cannot undo that: give epochs >= "
            f"{started} (more continues the run), or use another output_dir"
        )


@contextmanager
def _progress(total: int, initial: int, desc: str, enabled: bool) -> Iterator[Any]:
    from cavmae.progress import progress_bar

    # a bar on a terminal, a line every few seconds in a log (never a bar in a log file)
    bar = progress_bar(total=total, initial=initial, desc=desc, unit="step", enabled=enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _run(
    job: _Job,
    d: _Dist,
    device: torch.device,
    amp: torch.dtype | None,
    on_step: Callable[[dict[str, Any]], None] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> tuple[TrainResult, dict[str, Any]]:
    cfg = job.cfg
    run_dir = Path(cfg.output_dir)
    state_path = run_dir / STATE_FILE
    mlog = _MetricsLog(run_dir / METRICS_FILE, d.main)
    model = job.model

    optimizer = torch.optim.Adam(job.param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = MultiStepWarmup(optimizer, cfg.lr_decay_start, cfg.lr_decay_step, cfg.lr_decay, cfg.warmup_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    epoch, step_in_epoch, global_step = 1, 0, 0
    meters: dict[str, float] = {}
    best: dict[str, Any] = {"value": None, "epoch": 0}
    history: list[dict[str, Any]] = []
    finished = False

    if state_path.exists():
        if not cfg.resume:
            raise TrainConfigError(
                f"{run_dir} already holds a training state ({STATE_FILE}); pass resume=True "
                "(--resume) to continue it, or choose another output_dir"
            )
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        tr = st["training"]
        if tr["kind"] != cfg.kind:
            raise TrainConfigError(f"{run_dir} holds a {tr['kind']} run, not a {cfg.kind} run")
        _check_resume_config(run_dir, cfg, tr["config"])
        _check_epochs(run_dir, cfg, tr)
        model.load_state_dict(st["state_dict"])
        optimizer.load_state_dict(tr["optimizer"])
        if tr["scaler"]:
            scaler.load_state_dict(tr["scaler"])
        epoch, step_in_epoch, global_step = tr["epoch"], tr["step_in_epoch"], tr["global_step"]
        meters, best, history = dict(tr["meters"]), dict(tr["best"]), list(tr["history"])
        # A finished run asked for more epochs continues: the schedule is a function of (epoch,
        # step) that does not depend on the epoch count, so epochs N+1.. are exactly those of
        # a run started with the larger count.
        finished = bool(tr["finished"]) and epoch > cfg.epochs
        if tr["finished"] and not finished:
            log.info("%s: continuing a finished run of %d epochs to %d", run_dir, epoch - 1, cfg.epochs)
        _set_rng_state(tr["rng"])
        mlog.truncate(int(tr["log_offset"]))
        log.info("resuming %s at epoch %d, step %d", run_dir, epoch, global_step)
    elif d.main:
        _atomic_json({"kind": cfg.kind, **cfg.to_dict()}, run_dir / CONFIG_FILE)
        mlog.truncate(0)

    def save_state() -> None:
        if not d.main:
            return
        state = {
            "cavmae": checkpoint_meta(model),  # type: ignore[arg-type]
            "state_dict": model.state_dict(),
            "training": {
                "kind": cfg.kind, "config": json.dumps(cfg.to_dict()),
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "world_size": d.world_size, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "scheduler": scheduler.state_dict(),
                "meters": meters, "best": best, "history": history, "finished": finished,
                "log_offset": mlog.offset(), "rng": _rng_state(),
            },
        }
        _atomic_torch_save(state, state_path)

    ddp_module = job.step_module
    if d.active:
        ddp_module = nn.parallel.DistributedDataParallel(
            job.step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    train_ds = job.data.train

    if cfg.eval_at_start and job.evaluate is not None and global_step == 0 and not history:
        rec = {"event": "epoch", "epoch": 0, "step": 0, **{f"val_{k}": v for k, v in job.evaluate().items()}}
        history.append(rec)
        mlog.write(rec)
        if on_epoch is not None and d.main:
            on_epoch(rec)

    stopped = False
    while epoch <= cfg.epochs and not finished:
        order = epoch_order(len(train_ds), cfg.seed, epoch, weights=job.data.weights)
        sampler = StepBatchSampler(
            order, cfg.batch_size, seed=cfg.seed, epoch=epoch, world_size=d.world_size,
            rank=d.rank, accum_steps=cfg.accum_steps, start_step=step_in_epoch,
        )
        if sampler.steps == 0:
            raise TrainConfigError(
                f"the training set has {len(order)} samples per epoch, fewer than one batch of "
                f"{cfg.batch_size}; lower batch_size"
            )
        if step_in_epoch == 0:
            meters = {}
        t0 = time.time()
        model.train()
        it = iter(_loader(train_ds, sampler, cfg.num_workers, device))
        with _progress(sampler.steps, step_in_epoch, f"{cfg.kind} epoch {epoch}/{cfg.epochs}",
                       cfg.progress and d.main) as bar:
            while step_in_epoch < sampler.steps:
                if cfg.max_steps is not None and global_step >= cfg.max_steps:
                    stopped = True
                    break
                lr = scheduler.apply(epoch, global_step)
                totals = torch.zeros(len(job.terms), dtype=torch.float64)
                indices: list[int] = []
                for a in range(cfg.accum_steps):
                    batch = _to(next(it), device)
                    indices += batch["index"].tolist()
                    j = a * d.world_size + d.rank
                    sync = a == cfg.accum_steps - 1 or not d.active
                    ctx = nullcontext() if sync else ddp_module.no_sync()  # type: ignore[operator]
                    with ctx:
                        with _autocast(device, amp):
                            terms = job.forward(ddp_module, batch, [cfg.seed, epoch, step_in_epoch, j])
                        scaler.scale(terms[0] / cfg.accum_steps).backward()
                    totals += torch.stack([t.detach().double().cpu() for t in terms])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                totals /= cfg.accum_steps
                if d.active:
                    dist.all_reduce(totals)
                    totals /= d.world_size
                values = dict(zip(job.terms, totals.tolist(), strict=True))
                if not math.isfinite(values["loss"]):
                    raise TrainingDivergedError(
                        f"the loss is {values['loss']} at epoch {epoch}, step {global_step}; "
                        "lower the learning rate (lr) or use fp32"
                    )
                for k, v in values.items():
                    meters[k] = meters.get(k, 0.0) + v
                step_in_epoch += 1
                global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if on_step is not None:
                    on_step({"epoch": epoch, "step": global_step, "indices": indices, **values})
                if cfg.log_every and global_step % cfg.log_every == 0:
                    mlog.write({"event": "step", "epoch": epoch, "step": global_step, "lr": lr, **values})
                if cfg.save_every_steps and global_step % cfg.save_every_steps == 0:
                    save_state()
        del it
        if stopped:
            break

        # -- end of epoch ------------------------------------------------------------------
        n = max(step_in_epoch, 1)
        rec: dict[str, Any] = {
            "event": "epoch", "epoch": epoch, "step": global_step,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v / n for k, v in meters.items()},
        }
        if job.evaluate is not None and (epoch % max(cfg.eval_every, 1) == 0 or epoch == cfg.epochs):
            metrics = job.evaluate()
            rec.update({f"val_{k}": v for k, v in metrics.items()})
            improved, value = job.better(metrics, best["value"])
            if improved:
                best = {"value": value, "epoch": epoch}
                if d.main:
                    save_checkpoint(model, run_dir / "best.pth")  # type: ignore[arg-type]
        rec["time_s"] = round(time.time() - t0, 3)
        if d.main and job.epoch_checkpoint(epoch):
            save_checkpoint(model, run_dir / f"model.{epoch}.pth")  # type: ignore[arg-type]
        history.append(rec)
        mlog.write(rec)
        log.info("%s", json.dumps(rec, default=_json_default))
        if on_epoch is not None and d.main:
            on_epoch(rec)
        epoch += 1
        step_in_epoch = 0
        meters = {}
        save_state()

    if stopped:
        save_state()
        _barrier(d)
        return TrainResult(run_dir, False, epoch - 1, global_step, history, model=model.eval()), {}

    completed_now = not finished
    if d.main and completed_now:
        save_checkpoint(model, run_dir / "final.pth")  # type: ignore[arg-type]
    finished = True
    if completed_now:
        save_state()
    _barrier(d)
    result = TrainResult(
        run_dir, True, min(epoch, cfg.epochs + 1) - 1, global_step, history,
        final_checkpoint=run_dir / "final.pth",
        best_checkpoint=(run_dir / "best.pth") if best["epoch"] else None,
        model=model.eval(),
    )
    return result, {"best": best, "mlog": mlog}


def _barrier(d: _Dist) -> None:
    if d.active:
        dist.barrier()


def _prepare_run(cfg: TrainConfig) -> tuple[_Dist, torch.device, torch.dtype | None]:
    cfg.validate()
    d = _init_distributed(cfg.device)
    device = _device(cfg.device, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    amp = _precision(cfg.precision, device)
    if cfg.batch_size % (d.world_size * cfg.accum_steps):
        raise TrainConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps = "
            f"{d.world_size} x {cfg.accum_steps}"
        )
    if d.main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    _barrier(d)
    _seed_everything(cfg.seed)
    return d, device, amp


def _model_config(cfg: TrainConfig, **changes: Any) -> ModelConfig:
    try:
        return PRESETS[cfg.model].replace(**{**cfg.model_config, **changes})
    except TypeError as e:
        raise TrainConfigError(f"invalid model_config: {e}") from None


# --------------------------------------------------------------------------------------------
# Pre-training


def pretrain(
    config: PretrainConfig,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run (or resume) CAV-MAE pre-training; see the module docstring for the run directory.

    ``on_step`` is called on every process after each optimizer step with the epoch, the global
    step, the clip indices this process used and the step's loss terms; ``on_epoch`` on rank 0
    with each epoch record (what ``metrics.jsonl`` gets).
    """
    cfg = config
    d, device, amp = _prepare_run(cfg)
    if cfg.init_checkpoint:
        model = load_checkpoint(
            cfg.init_checkpoint, kind="pretrain",
            **{**cfg.model_config, "norm_pix_loss": cfg.norm_pix_loss},
        )
    else:
        model = CAVMAE(_model_config(cfg, norm_pix_loss=cfg.norm_pix_loss))
    assert isinstance(model, CAVMAE)
    model.pos_embed_a.requires_grad_(cfg.trainable_pos_embed)
    model.pos_embed_v.requires_grad_(cfg.trainable_pos_embed)
    model.to(device).train()
    data = _load_data(cfg, None, _preprocess_for(model.config), True, True)  # labels unused
    step_module = _PretrainStep(model, cfg)
    eval_bs = cfg.eval_batch_size or cfg.batch_size // (d.world_size * cfg.accum_steps)

    def forward(module: nn.Module, batch: dict[str, Any], words: list[int]) -> tuple[torch.Tensor, ...]:
        b = batch["audio"].shape[0]
        na, nv = _mask_noise(cfg, model, b, [words[0], _MASK_TAG, *words[1:]])
        return module(batch["audio"], batch["image"], na.to(device), nv.to(device))

    def evaluate() -> dict[str, float]:
        assert data.val is not None
        out = _evaluate_pretrain(model, data.val, cfg, device, amp, d, eval_bs)
        model.train()
        return out

    def better(metrics: dict[str, float], best: float | None) -> tuple[bool, float]:
        return best is None or metrics["loss"] < best, metrics["loss"]

    job = _Job(
        cfg, model, step_module,
        [{"params": [p for p in model.parameters() if p.requires_grad]}],
        data, PRETRAIN_TERMS, forward, evaluate if data.val is not None else None, better,
        lambda e: cfg.save_epoch_checkpoints,
    )
    result, extra = _run(job, d, device, amp, on_step, on_epoch)
    if result.completed and d.main:
        _atomic_json(_summary(result), Path(cfg.output_dir) / RESULT_FILE)
    return result


def _summary(result: TrainResult) -> dict[str, Any]:
    return {
        "completed": result.completed, "epoch": result.epoch, "global_step": result.global_step,
        "final_checkpoint": result.final_checkpoint, "best_checkpoint": result.best_checkpoint,
        "averaged_checkpoint": result.averaged_checkpoint, "final_metrics": result.final_metrics,
        "history": result.history,
    }


# --------------------------------------------------------------------------------------------
# Fine-tuning


def finetune(
    config: FinetuneConfig,
    *,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run (or resume) classifier fine-tuning, then the final evaluation.

    Each epoch is validated on the middle frame (``val_loss``, ``val_mAP``, ``val_acc``). At the
    end the evaluated model is the weight average (``wa``), else the best epoch, else the last;
    with ``frame_aggregation`` its predictions are averaged over all frames (docs/model.md section 4).
    """
    cfg = config
    d, device, amp = _prepare_run(cfg)
    assert cfg.label_csv
    labels = read_labels(cfg.label_csv)
    if cfg.init_checkpoint:
        model = load_checkpoint(
            cfg.init_checkpoint, kind="classifier", **{**cfg.model_config, "num_classes": len(labels)}
        )
    else:
        model = CAVMAEFT(_model_config(cfg, num_classes=len(labels)))
    assert isinstance(model, CAVMAEFT)
    model.pos_embed_a.requires_grad_(cfg.trainable_pos_embed)
    model.pos_embed_v.requires_grad_(cfg.trainable_pos_embed)
    head = [p for n, p in model.named_parameters() if n.startswith("mlp_head.")]
    base = [p for n, p in model.named_parameters() if not n.startswith("mlp_head.") and p.requires_grad]
    if cfg.freeze_backbone:
        for p in base:
            p.requires_grad_(False)
        base = []
    groups = [g for g in ({"params": base, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * cfg.head_lr}) if g["params"]]
    model.to(device).train()
    audio, video = finetune_needs(cfg.mode)
    preprocess = _preprocess_for(model.config)
    data = _load_data(cfg, labels, preprocess, audio, video)
    step_module = _ClassifierStep(model, cfg.mode)
    eval_bs = cfg.eval_batch_size or cfg.batch_size // (d.world_size * cfg.accum_steps)
    wa_end = min(cfg.wa_end or cfg.epochs, cfg.epochs)

    def forward(module: nn.Module, batch: dict[str, Any], words: list[int]) -> tuple[torch.Tensor, ...]:
        logits = module(batch.get("audio"), batch.get("image"))
        loss = _classification_loss(logits, batch["target"], cfg.loss)
        return (loss,)

    def evaluate() -> dict[str, float]:
        assert data.val is not None
        out = _evaluate_finetune(model, data.val, cfg, device, amp, d, eval_bs)
        model.train()
        return out

    def better(metrics: dict[str, float], best: float | None) -> tuple[bool, float]:
        value = metrics[cfg.main_metric]
        return best is None or value > best, value

    job = _Job(
        cfg, model, step_module, groups, data, ("loss",), forward,
        evaluate if data.val is not None else None, better,
        lambda e: cfg.save_epoch_checkpoints or (cfg.wa and cfg.wa_start <= e <= wa_end),
    )
    result, extra = _run(job, d, device, amp, on_step, on_epoch)
    if not result.completed:
        return result

    run_dir = Path(cfg.output_dir)
    # -- weights to evaluate: average, else best, else last ------------------------------
    chosen = "final"
    if cfg.wa:
        paths = [run_dir / f"model.{e}.pth" for e in range(cfg.wa_start, wa_end + 1)]
        if d.main:
            averaged = average_checkpoints(paths)
            model.load_state_dict(averaged)
            save_checkpoint(model, run_dir / "wa.pth")
        _barrier(d)
        if not d.main:
            state, _ = read_state_dict(run_dir / "wa.pth")
            model.load_state_dict(state)
        result.averaged_checkpoint = run_dir / "wa.pth"
        chosen = "wa"
    elif result.best_checkpoint is not None:
        state, _ = read_state_dict(result.best_checkpoint)
        model.load_state_dict(state)
        chosen = "best"
    model.to(device).eval()

    final: dict[str, Any] = {"model": chosen}
    if data.val is not None:
        frames = "all" if cfg.frame_aggregation and video else "middle"
        val = AVDataset(
            data.val.clips, labels, frame=frames, audio=audio, video=video, preprocess=preprocess
        )
        scores, targets = predict_clips(
            model, val, mode=cfg.mode, batch_size=max(1, eval_bs // 2 if frames == "all" else eval_bs),
            device=device, activation="sigmoid" if cfg.loss == "BCE" else "softmax",
            amp_dtype=amp, _dist=d,
        )
        assert targets is not None
        final.update(_classification_metrics(scores, targets))
        final["frame_aggregation"] = frames == "all"
        final["num_clips"] = int(len(scores))
    result.final_metrics = final
    if d.main:
        extra["mlog"].write({"event": "final", **final})
        _atomic_json(_summary(result), run_dir / RESULT_FILE)
    result.model = model
    return result
