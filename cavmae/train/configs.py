"""Training configs: the fields of a run, their types, loading from YAML/JSON and validation."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cavmae.augment import AugmentConfig
from cavmae.coerce import FieldTypeError, coerce_fields
from cavmae.config import PRESETS, ModelConfig
from cavmae.errors import CavmaeError
from cavmae.masking import DEFAULT_MASK_RATIO, MASK_MODES
from cavmae.modes import FINETUNE_MODES

__all__ = ["FinetuneConfig", "PretrainConfig", "TrainConfig", "TrainConfigError"]


class TrainConfigError(CavmaeError):
    """A training config is invalid, or does not match the run it should resume."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (used by the CLI)."""
    if isinstance(default, dict | list):

        def fresh() -> Any:  # each config gets its own copy of a mutable default
            return type(default)(default)

        return field(default_factory=fresh, metadata={"help": help}, **kw)
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


@dataclass
class TrainConfig:
    """Fields shared by pre-training and fine-tuning. Load from YAML/JSON with ``from_file``."""

    train_data: str = _f("", "training set: a reference dataset JSON, or a CSV/JSON list of videos")
    output_dir: str = _f("", "run directory (checkpoints, metrics.jsonl, state.pt)")
    val_data: str | None = _f(None, "validation set, same formats as train_data")
    label_csv: str | None = _f(None, "label CSV (index,mid,display_name)")
    weight_csv: str | None = _f(None, "per-clip sampling weights (one per line): class-balanced sampling")
    # The reference's training loader reads the nearest lower frame when a frame file is missing
    # (short clips have fewer than 10); evaluation never does (a missing frame fails the clip).
    frame_fallback: bool = _f(True, "use the nearest lower frame when a reference-layout frame is missing")
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
    overwrite: bool = _f(
        False, "start afresh in an output_dir that holds an earlier run, deleting that run's files "
        "(state.pt, config.json, metrics.jsonl, result.json, model.N/best/final/wa.pth) first",
    )
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

                data = yaml.safe_load(text)
                if data is None:  # an empty file (or comments only): an empty config
                    data = {}
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
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, not {self.precision!r}")
        if self.model not in PRESETS and not self.init_checkpoint:
            problems.append(f"model must be one of {', '.join(PRESETS)}, not {self.model!r}")
        if self.lr_decay_step < 1:
            problems.append("lr_decay_step must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1")
        problems += _range_problems(self, at_least={
            "warmup_steps": 0, "num_workers": 0, "save_every_steps": 0, "lr_decay_start": 0,
            "eval_every": 1, "log_every": 1, "eval_batch_size": 1, "weight_decay": 0.0,
        }, above={"lr": 0.0})
        # The checks below compare numbers; a NaN or infinity is reported once, above.
        odd = _nonfinite(self)
        if "lr_decay" not in odd and not 0 < self.lr_decay <= 1:
            problems.append(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if "betas" not in odd and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not odd & {"mixup", "mixup_alpha", "label_smooth"}:
            try:
                self.augment_config()
            except ValueError as e:
                problems.append(str(e))
        problems += self._model_config_problems()
        problems += self._validate_extra(odd)
        if problems:
            raise TrainConfigError(f"invalid {self.kind} config: " + "; ".join(problems))

    def _model_config_problems(self) -> list[str]:
        """What keeps the model config (the preset with ``model_config`` applied) from building
        a model. With ``init_checkpoint`` the base config is the checkpoint's, known only when
        it is read, so only the overrides' own ranges are checked here (the rest when the
        model is built: :func:`cavmae.train.models.initial_model`)."""
        if self.init_checkpoint or self.model not in PRESETS:
            return _range_problems(_Overrides(self.model_config), _MODEL_AT_LEAST, _MODEL_ABOVE,
                                   prefix="model_config.", fields_of=ModelConfig, at_most=_MODEL_AT_MOST)
        return model_config_problems(PRESETS[self.model].replace(**self.model_config))

    def _validate_extra(self, odd: set[str]) -> list[str]:
        """The kind's own checks; ``odd`` names the fields that hold a NaN or an infinity
        (already reported)."""
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
    mask_ratio_a: float = _f(DEFAULT_MASK_RATIO, "audio mask ratio")
    mask_ratio_v: float = _f(DEFAULT_MASK_RATIO, "visual mask ratio")
    mask_mode: str = _f("unstructured", f"audio mask mode: {', '.join(MASK_MODES)}")
    mae_loss_weight: float = _f(1.0, "weight of the reconstruction loss")
    contrast_loss_weight: float = _f(0.01, "weight of the contrastive loss")
    bidirect_contrast: bool = _f(False, "contrastive loss in both directions")
    norm_pix_loss: bool = _f(True, "reconstruct per-patch normalized targets")

    kind = "pretrain"

    def _validate_extra(self, odd: set[str]) -> list[str]:
        problems = []
        if self.mask_mode not in MASK_MODES:
            problems.append(f"mask_mode must be one of {', '.join(MASK_MODES)}")
        for name in ("mask_ratio_a", "mask_ratio_v"):
            # 0 masks nothing: the reconstruction loss, a mean over masked patches, is undefined
            if name not in odd and not 0.0 < getattr(self, name) < 1.0:
                problems.append(f"{name} must be in (0, 1), got {getattr(self, name)}")
        return problems + _range_problems(
            self, at_least={"mae_loss_weight": 0.0, "contrast_loss_weight": 0.0}, finite=False
        )


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

    def _validate_extra(self, odd: set[str]) -> list[str]:
        problems = _range_problems(self, above={"head_lr": 0.0}, finite=False)
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


@functools.cache
def _float_fields(cls: type) -> tuple[str, ...]:
    """The fields of dataclass ``cls`` that hold floats (alone, optional, or in a tuple)."""
    def floats(annotation: Any) -> bool:
        return annotation is float or any(floats(a) for a in typing.get_args(annotation))

    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if floats(hints[f.name]))


def _nonfinite(config: Any, fields_of: type | None = None) -> set[str]:
    """The float fields of ``config`` (those of dataclass ``fields_of``, default its own type)
    holding a NaN or an infinity (a tuple: any element)."""
    odd = set()
    for name in _float_fields(fields_of or type(config)):
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            odd.add(name)
    return odd


def _range_problems(
    config: Any, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None,
    *, finite: bool = True, prefix: str = "", fields_of: type | None = None,
    at_most: dict[str, float] | None = None,
) -> list[str]:
    """The numbers of ``config`` that cannot be used, one line each: with ``finite``, every
    float field holding a NaN or an infinity (no comparison catches a NaN: ``nan < 0`` is
    False); then ``name must be >= low`` (``at_least``) or ``> low`` (``above``) for each field
    outside its range (None is unset; a field already found not finite is not repeated), and
    ``<= high`` (``at_most``). ``fields_of``: the dataclass whose fields ``config`` has, when
    it is not one itself."""
    odd = _nonfinite(config, fields_of)
    problems = [f"{prefix}{name} must be {_finite_what(getattr(config, name))}, got "
                f"{_shown(getattr(config, name))}" for name in sorted(odd)] if finite else []
    for bounds, op, fails in ((at_least or {}, ">=", lambda v, low: v < low),
                              (above or {}, ">", lambda v, low: not v > low),
                              (at_most or {}, "<=", lambda v, high: v > high)):
        for name, low in bounds.items():
            value = getattr(config, name)
            if value is not None and name not in odd and fails(value, low):
                problems.append(f"{prefix}{name} must be {op} {low}, got {value}")
    return problems


def _finite_what(value: Any) -> str:
    return "finite numbers" if isinstance(value, tuple) else "a finite number"


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------------------------
# Model config: what building a model needs (ModelConfig itself does not check its values)

_MODEL_AT_LEAST: dict[str, float] = {
    "embed_dim": 1, "num_heads": 1, "patch_size": 1, "audio_length": 1, "num_mel_bins": 1,
    "image_size": 1, "num_classes": 1, "decoder_embed_dim": 1, "decoder_num_heads": 1,
    "depth_modality": 0, "depth_joint": 0, "decoder_depth": 0,
}
_MODEL_ABOVE: dict[str, float] = {"mlp_ratio": 0.0, "layer_norm_eps": 0.0}
#: far past any CAV-MAE (the largest is 768 wide, 12 deep): a typo fails in one line, not by
#: asking for terabytes
_MODEL_AT_MOST: dict[str, float] = {
    "embed_dim": 8192, "num_heads": 256, "patch_size": 256, "audio_length": 1 << 16,
    "num_mel_bins": 1024, "image_size": 4096, "num_classes": 1 << 20, "decoder_embed_dim": 8192,
    "decoder_num_heads": 256, "depth_modality": 256, "depth_joint": 256, "decoder_depth": 256,
    "mlp_ratio": 64.0,
}


class _Overrides:
    """``model_config`` overrides read like a :class:`ModelConfig` (unset fields are None), so
    that :func:`_range_problems` checks the given ones alone."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def __getattr__(self, name: str) -> Any:
        return self.__dict__["values"].get(name)


def model_config_problems(config: ModelConfig) -> list[str]:
    """What keeps ``config`` from building a CAV-MAE model, one line each (``model_config.``
    names): sizes below 1, non-finite or non-positive ratios, a width the heads or the sin-cos
    position embedding cannot split, an input smaller than one patch."""
    problems = _range_problems(config, _MODEL_AT_LEAST, _MODEL_ABOVE, prefix="model_config.", at_most=_MODEL_AT_MOST)
    if problems:  # the structural checks below divide by these numbers
        return problems
    for part in ("", "decoder_"):
        width, heads = getattr(config, f"{part}embed_dim"), getattr(config, f"{part}num_heads")
        if width % heads:
            problems.append(f"model_config.{part}embed_dim {width} must be divisible by "
                            f"{part}num_heads {heads}")
        if width % 4:  # half the channels per grid axis, each half split into sin and cos
            problems.append(f"model_config.{part}embed_dim must be a multiple of 4 (the sin-cos "
                            f"position embedding), got {width}")
    for side in ("audio_length", "num_mel_bins", "image_size"):
        if getattr(config, side) < config.patch_size:
            problems.append(f"model_config.{side} {getattr(config, side)} is smaller than one "
                            f"patch (patch_size {config.patch_size})")
    return problems
