"""Reading and writing CAV-MAE checkpoints.

Formats read:
- the reference format: a plain state dict saved from a ``DataParallel`` wrapper (every key
  starts with ``module.``), as the released checkpoints are;
- this project's ``.pth`` files, which are reference-format files that also carry the model
  config in the state dict's ``_metadata`` (invisible to ``load_state_dict``);
- a training-state dict ``{"cavmae": meta, "state_dict": ...}`` (what the trainer writes);
- ``.safetensors`` files, with the config in the header metadata.

What a state dict cannot reveal (attention heads, ``norm_pix_loss``) comes from the embedded
config when there is one, else from the released models' conventions (64 channels per encoder
head, 32 per decoder head) and keyword overrides.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import fsio
from .checkpoint_keys import META_KEY, TrainedHead, count_blocks, kind_of_keys, unreadable
from .config import BASE, ModelConfig
from .errors import CheckpointError
from .hub import registry
from .labels import LabelSet
from .model import CAVMAE, CAVMAEFT, CAVMAEEncoder

log = logging.getLogger(__name__)

META_VERSION = 1
KINDS = ("pretrain", "classifier")
_ENCODER_HEAD_DIM = 64  # ViT-B convention of every released model
_DECODER_HEAD_DIM = 32


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file holds, as far as its keys and shapes tell."""

    kind: str
    config: ModelConfig
    num_keys: int
    num_params: int


def model_kind(model: CAVMAEEncoder) -> str:
    if isinstance(model, CAVMAE):
        return "pretrain"
    if isinstance(model, CAVMAEFT):
        return "classifier"
    raise TypeError(f"not a CAV-MAE model: {type(model).__name__}")


def model_class(kind: str) -> type[CAVMAE] | type[CAVMAEFT]:
    if kind not in KINDS:
        raise CheckpointError(f"model kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return CAVMAE if kind == "pretrain" else CAVMAEFT


# -- reading -------------------------------------------------------------------------------


def _torch_load(path: Path, map_location: str | torch.device, mmap: bool) -> Any:
    """``torch.load`` with ``weights_only``; any failure becomes one line of ours.

    Torch's own messages run over several lines, get cut mid-sentence in a one-line error, and
    advise ``weights_only=False``, which would let the file run code: never relay them.
    ``mmap`` maps a zip-format file instead of reading it (only its keys and shapes are needed
    to tell what it is); the legacy format cannot be mapped and is read.
    """
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except Exception as e:  # zip, pickle and unpickler errors all mean "not usable"
        if is_zip and isinstance(e, pickle.UnpicklingError):
            # An intact archive whose pickle names classes beyond tensors and containers.
            raise CheckpointError(
                f"{path} holds Python objects other than tensors (a pickled model or trainer "
                "state?); cavmae reads state dicts of tensors only, since unpickling anything "
                "else could run code: save model.state_dict() instead"
            ) from None
        raise unreadable(path) from None


def read_state_dict(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Load a checkpoint file's tensors (``module.`` stripped) and its embedded metadata, if any.

    ``mmap=True`` maps the file rather than reading it: enough to look at keys and shapes fast.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    obj = _torch_load(path, map_location, mmap)
    meta = None
    if isinstance(obj, Mapping) and META_KEY in obj and "state_dict" in obj:
        meta, obj = obj[META_KEY], obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict")
    if meta is None:
        raw = getattr(obj, "_metadata", None) or {}
        if isinstance(raw.get("", {}).get(META_KEY), str):
            meta = json.loads(raw[""][META_KEY])
    tensors = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is not a tensor; is this a checkpoint?")
        tensors[k.removeprefix("module.")] = v
    return tensors, meta


def _read_safetensors(
    path: Path, map_location: str | torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            header = f.metadata() or {}
            tensors = {k.removeprefix("module."): f.get_tensor(k) for k in f.keys()}
    except Exception:
        raise unreadable(path, "a safetensors checkpoint") from None
    meta = json.loads(header[META_KEY]) if META_KEY in header else None
    return tensors, meta


def infer_kind(state: Mapping[str, torch.Tensor]) -> str:
    """``"pretrain"`` when the state holds a decoder, ``"classifier"`` when it holds a head."""
    return kind_of_keys(state)


def infer_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """A ``ModelConfig`` that fits the tensors of ``state`` (reference key names)."""
    try:
        w = state["patch_embed_a.proj.weight"]  # [D, 1, p, p]
        d, patch = int(w.shape[0]), int(w.shape[-1])
        depth = count_blocks(state, "blocks_a")
        if count_blocks(state, "blocks_v") != depth:
            raise CheckpointError("blocks_a and blocks_v differ in depth; not a CAV-MAE checkpoint")
        mel = int(overrides.get("num_mel_bins", BASE.num_mel_bins))
        la = int(state["pos_embed_a"].shape[1])
        lv = int(state["pos_embed_v"].shape[1])
        side = round(lv**0.5)
        values: dict[str, Any] = {
            "embed_dim": d,
            "patch_size": patch,
            "depth_modality": depth,
            "depth_joint": count_blocks(state, "blocks_u"),
            "num_heads": max(1, d // _ENCODER_HEAD_DIM),
            "mlp_ratio": state["blocks_a.0.mlp.fc1.weight"].shape[0] / d,
            "num_mel_bins": mel,
            "audio_length": la // (mel // patch) * patch,
            "image_size": side * patch,
        }
    except KeyError as e:
        raise CheckpointError(f"the checkpoint lacks {e.args[0]!r}; not a CAV-MAE checkpoint") from None
    if "mlp_head.1.weight" in state:
        values["num_classes"] = int(state["mlp_head.1.weight"].shape[0])
    if "decoder_embed.weight" in state:
        dd = int(state["decoder_embed.weight"].shape[0])
        values["decoder_embed_dim"] = dd
        values["decoder_depth"] = count_blocks(state, "decoder_blocks")
        values["decoder_num_heads"] = max(1, dd // _DECODER_HEAD_DIM)
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except TypeError as e:
        raise CheckpointError(f"invalid config override: {e}") from None


def expected_shapes(kind: str, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes a model of ``kind`` and ``config`` has (built on ``meta``)."""
    with torch.device("meta"):
        model = model_class(kind)(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {list(state[k].shape)} != {list(expected[k])}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_describe(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    kind: str | None = None,
    mirror: str | None = None,
    progress: bool = True,
    mmap: bool = False,
    **overrides: Any,
) -> CAVMAE | CAVMAEFT:
    """Load a checkpoint file or a registry name into a new model, in eval mode.

    ``path`` is a checkpoint file, or a registry name such as ``"as-full-51.2"`` (see
    ``cavmae models``): its cached file, downloaded (from ``mirror`` if given) when missing,
    with the registry's facts about it (``norm_pix_loss`` of pre-trained models).

    ``kind`` None takes the checkpoint's own kind. ``kind="classifier"`` on a pre-training
    checkpoint builds a classifier from its encoder with a freshly initialized head (how
    fine-tuning starts; give ``num_classes``). ``overrides`` set config fields a state dict cannot
    reveal (``num_heads``, ``norm_pix_loss``, ...). Partial loads are refused.

    ``mmap=True`` maps the file instead of reading it (a zip-format file, onto the CPU): the
    weights are read when first used, from the page cache when the file was just hashed.
    """
    path, info = registry.checkpoint_file(path, mirror=mirror, progress=progress)
    state, meta = read_state_dict(path, map_location, mmap=mmap)
    file_kind = (meta or {}).get("kind") or infer_kind(state)
    known = info.config_overrides if info is not None else {}
    base: dict[str, Any] = {**(meta or {}).get("config", {}), **known}
    config = infer_config(state, **{**base, **overrides})
    kind = kind or file_kind
    if kind not in KINDS:
        raise CheckpointError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    expected = expected_shapes(kind, config)
    if kind != file_kind:
        if (file_kind, kind) != ("pretrain", "classifier"):
            raise CheckpointError(
                f"{path} is a {file_kind} checkpoint; it cannot be loaded as a {kind} model"
                " (only a pre-training checkpoint can start a classifier)"
            )
        state = {k: v for k, v in state.items() if k in expected}
        head = {k: v for k, v in expected.items() if k.startswith("mlp_head.")}
        check_state(state, {k: v for k, v in expected.items() if k not in head}, str(path))
    else:
        check_state(state, expected, str(path))
    model = _model_from_state(kind, config, state) if kind == file_kind else None
    if model is None:  # a fresh head (or weights to cast): built and initialized, then loaded
        model = model_class(kind)(config)
        model.load_state_dict(state, strict=kind == file_kind)
    model.to(map_location)
    return model.eval()  # type: ignore[return-value]  # model_class(kind) builds CAVMAE or CAVMAEFT


def _model_from_state(kind: str, config: ModelConfig, state: Mapping[str, torch.Tensor]) -> CAVMAEEncoder | None:
    """The model built on ``meta`` and given the tensors of ``state`` (no random initialization
    of weights that the checkpoint overwrites: seconds for a full-size model); None when a
    tensor's dtype differs from the model's (then loading casts it)."""
    with torch.device("meta"):
        model = model_class(kind)(config)
    want = model.state_dict()
    if any(state[k].dtype != v.dtype for k, v in want.items()):
        return None
    model.load_state_dict(state, strict=True, assign=True)
    return model


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read a checkpoint's kind and config and check its keys and shapes, without building it.

    Fast on a large file: the file is memory-mapped and only keys and shapes are looked at, so
    a caller can refuse a wrong checkpoint before hashing or exporting it.
    """
    state, meta = read_state_dict(path, mmap=True)
    kind = (meta or {}).get("kind") or infer_kind(state)
    config = infer_config(state, **dict((meta or {}).get("config", {})))
    check_state(state, expected_shapes(kind, config), str(path))
    return CheckpointInfo(
        kind=kind,
        config=config,
        num_keys=len(state),
        num_params=sum(v.numel() for v in state.values()),
    )


def verify_checkpoint_file(
    path: str | Path, kind: str | None = None, num_classes: int | None = None
) -> CheckpointInfo:
    """Structural check of a downloaded file: it is a complete CAV-MAE checkpoint of the claimed
    ``kind`` with ``num_classes`` classes. Raises ``CheckpointError`` otherwise."""
    info = inspect_checkpoint(path)
    if kind is not None and info.kind != kind:
        raise CheckpointError(f"{path} is a {info.kind} checkpoint, expected a {kind} checkpoint")
    if num_classes is not None and info.kind == "classifier" and info.config.num_classes != num_classes:
        raise CheckpointError(
            f"{path} has {info.config.num_classes} classes, expected {num_classes}"
        )
    return info


# -- writing -------------------------------------------------------------------------------


def checkpoint_meta(model: CAVMAEEncoder, head: TrainedHead | None = None) -> dict[str, Any]:
    """The metadata embedded in files this project writes: kind and config, and for a fine-tuned
    classifier what its training fixed (:class:`~cavmae.checkpoint_keys.TrainedHead`), so that
    what is made from the file names its classes and serves its mode and task."""
    meta = {"version": META_VERSION, "kind": model_kind(model), "config": model.config.to_dict()}
    if head is not None:
        head.check(model_kind(model), model.config.num_classes)
        meta.update(head.to_meta())
    return meta


def save_checkpoint(
    model: CAVMAEEncoder,
    path: str | Path,
    *,
    labels: LabelSet | None = None,
    finetune_mode: str | None = None,
    task: str | None = None,
) -> Path:
    """Write ``model``'s weights so that both ``load_checkpoint`` and the reference recipe
    (``DataParallel(model).load_state_dict(torch.load(path))``) accept the file.

    ``.safetensors`` paths get a safetensors file with the config in its header; anything else a
    ``module.``-prefixed state dict with the config in its ``_metadata``. A classifier's class
    names (``labels``), ``finetune_mode`` and ``task`` (``multi-label``/``single-label``) are kept
    beside the config when given. Written atomically.
    """
    path = Path(path)
    state = model.state_dict()
    head = TrainedHead(labels=labels, finetune_mode=finetune_mode, task=task)
    try:
        head.check(model_kind(model), model.config.num_classes)
    except CheckpointError as e:
        raise CheckpointError(f"cannot save {path}: {e}") from None
    meta = json.dumps(checkpoint_meta(model, head))
    with fsio.atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in state.items()}
            save_file(tensors, str(tmp), metadata={META_KEY: meta})
        else:
            out: OrderedDict[str, torch.Tensor] = OrderedDict(
                ("module." + k, v.detach().cpu()) for k, v in state.items()
            )
            # torch's per-module metadata (under the DataParallel prefix), ours at the root
            own = getattr(state, "_metadata", {}) or {}
            metadata = OrderedDict({"": {"version": 1, META_KEY: meta}})
            for prefix, value in own.items():
                metadata["module" + ("." + prefix if prefix else "")] = value
            out._metadata = metadata  # type: ignore[attr-defined]
            torch.save(out, tmp)
    return path
