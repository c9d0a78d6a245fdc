"""What a checkpoint file is, from its keys and shapes alone, without PyTorch.

Telling a pre-training checkpoint from a classifier (and its class count and depth) needs only
the state dict's keys and shapes, which a ``torch.save`` zip archive keeps in its small
``data.pkl``, and a ``.safetensors`` file in its JSON header. Reading just those takes
milliseconds and needs no torch import (itself seconds on a busy machine), so a command can
refuse a wrong model before it downloads, hashes or exports anything.

The pickle is read by an unpickler that knows only the few names a state dict uses (an
``OrderedDict`` of tensors) and builds shape placeholders instead of tensors: nothing in the
file is executed. Anything else (the legacy pre-zip format, other objects) gives None, and
the caller falls back to ``cavmae.checkpoint`` (which loads with torch).

Plain stdlib.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .labels import TASKS, LabelSet

#: where files this project writes keep its metadata (a safetensors header key, the root
#: entry of a state dict's ``_metadata``, a key of the trainer's state file)
META_KEY = "cavmae"

#: the key that tells each kind (the decoder of a pre-training model, the classifier's head)
DECODER_KEY = "decoder_embed.weight"
HEAD_KEY = "mlp_head.1.weight"


@dataclass(frozen=True)
class CheckpointSummary:
    """Kind, class count and depth of a checkpoint, read from its keys and shapes."""

    kind: str  # "pretrain" or "classifier"
    num_classes: int | None  # of a classifier
    depth_modality: int  # blocks per modality-specific encoder
    depth_joint: int  # joint blocks
    num_keys: int


def unreadable(path: Path, what: str = "a PyTorch checkpoint") -> CheckpointError:
    """The one-line error for a file that is not a checkpoint or was cut short."""
    try:
        size = f"{path.stat().st_size} bytes"
    except OSError:
        size = "size unknown"
    return CheckpointError(f"not {what}, or truncated ({size}): {path}")


def kind_of_keys(keys: Iterable[str]) -> str:
    """``"pretrain"`` when the keys hold a decoder, ``"classifier"`` when they hold a head."""
    names = set(keys)
    if DECODER_KEY in names:
        return "pretrain"
    if HEAD_KEY in names:
        return "classifier"
    raise CheckpointError(
        "the checkpoint has neither a decoder (decoder_embed.*) nor a classification head"
        " (mlp_head.*); it is not a CAV-MAE pre-training or fine-tuned checkpoint"
    )


def count_blocks(keys: Iterable[str], prefix: str) -> int:
    """How many ``{prefix}.{i}.`` blocks the keys hold."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


def summarize(shapes: dict[str, tuple[int, ...]]) -> CheckpointSummary:
    """The summary of a state dict given as key -> shape (``module.`` prefixes stripped)."""
    kind = kind_of_keys(shapes)
    head = shapes.get(HEAD_KEY)
    return CheckpointSummary(
        kind=kind,
        num_classes=int(head[0]) if kind == "classifier" and head else None,
        depth_modality=count_blocks(shapes, "blocks_a"),
        depth_joint=count_blocks(shapes, "blocks_u"),
        num_keys=len(shapes),
    )


def peek_checkpoint(path: str | Path) -> CheckpointSummary | None:
    """Kind, classes and depth of the checkpoint at ``path`` without torch; None when only
    torch can tell (legacy format, or objects beyond a plain state dict).

    Raises ``CheckpointError`` (one line) for a missing file, a file that is no checkpoint or
    one cut short, and a state dict that is not CAV-MAE's.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    shapes = _safetensors_shapes(path) if path.suffix == ".safetensors" else _torch_shapes(path)
    return None if shapes is None else summarize(shapes)


def peek_metadata(path: str | Path) -> dict[str, Any] | None:
    """The metadata this project embeds in the checkpoints it writes (config, kind, class
    names), read without torch; None for a file without it (the released checkpoints) or one
    only torch reads. Raises ``CheckpointError`` as :func:`peek_checkpoint` does."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        holder = _safetensors_header(path).get("__metadata__")
    else:
        obj = _torch_object(path)
        if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict):
            return obj[META_KEY]  # the trainer's state file keeps it as a dict
        per_module = getattr(obj, "_metadata", None)  # torch's, with ours under the root ""
        holder = per_module.get("") if isinstance(per_module, dict) else None
    raw = holder.get(META_KEY) if isinstance(holder, dict) else None
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


# -- torch.save zip archives -----------------------------------------------------------------


class _Shape(tuple):
    """Stands in for a tensor: its shape."""


def _rebuild_tensor(storage: Any, offset: Any, size: tuple[int, ...], *args: Any) -> _Shape:
    return _Shape(size)


class _Unknown(Exception):
    """The pickle names something a plain state dict does not hold."""


class _KeysUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): lambda data, *args: data,
    }

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name.endswith("Storage"):  # a storage type: shapes need none
            return name
        raise _Unknown(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> None:
        return None  # the tensor data, which a shape does not need


@dataclass(frozen=True)
class TrainedHead:
    """What fine-tuning fixed about a classifier, kept in the metadata of the checkpoints
    ``cavmae finetune`` writes, so that what is made from the file (``classify``, ``export``,
    ``serve``, ``evaluate``) follows it without flags: the class names, the fine-tune mode
    (an audio-only model has no trained audio-visual head) and the task (softmax for a model
    trained with cross-entropy). Each is None where unknown (the released checkpoints: their
    registry entries say it)."""

    labels: LabelSet | None = None
    finetune_mode: str | None = None
    task: str | None = None

    def to_meta(self) -> dict[str, Any]:
        """The metadata entries (only the known ones)."""
        out: dict[str, Any] = {}
        if self.labels is not None:
            out["labels"] = self.labels.to_meta()
        if self.finetune_mode is not None:
            out["finetune_mode"] = self.finetune_mode
        if self.task is not None:
            out["task"] = self.task
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> TrainedHead:
        """Read back :meth:`to_meta`'s entries; an entry that is not one of ours reads as None."""
        if not isinstance(meta, dict):
            return cls()
        from .modes import FINETUNE_MODES  # modes -> graphs: imported when read

        mode, task = meta.get("finetune_mode"), meta.get("task")
        return cls(labels=LabelSet.from_meta(meta.get("labels")),
                   finetune_mode=mode if mode in FINETUNE_MODES else None,
                   task=task if task in TASKS else None)

    def check(self, kind: str, num_classes: int) -> None:
        """Raise ``CheckpointError`` when this does not fit a ``kind`` model of ``num_classes``."""
        if kind != "classifier" and self != TrainedHead():
            raise CheckpointError(f"class names, fine-tune mode and task apply to a classifier, not a {kind} model")
        if self.labels is not None and len(self.labels) != num_classes:
            raise CheckpointError(f"{len(self.labels)} class names do not fit a model of {num_classes} classes")
        from .modes import FINETUNE_MODES

        if self.finetune_mode is not None and self.finetune_mode not in FINETUNE_MODES:
            raise CheckpointError(f"fine-tune mode must be one of {', '.join(FINETUNE_MODES)}, not {self.finetune_mode!r}")
        if self.task is not None and self.task not in TASKS:
            raise CheckpointError(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")


def embedded_head(path: str | Path) -> TrainedHead:
    """What a checkpoint ``cavmae finetune`` wrote keeps about its head (:class:`TrainedHead`);
    all None for other files."""
    return TrainedHead.from_meta(peek_metadata(path))


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    obj = _torch_object(path)
    if obj is None:
        return None
    if isinstance(obj, dict) and "state_dict" in obj and META_KEY in obj:
        obj = obj["state_dict"]  # the trainer's state file
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict")
    if not all(isinstance(v, _Shape) for v in obj.values()):
        return None  # non-tensor entries: cavmae.checkpoint says which
    return {str(k).removeprefix("module."): tuple(v) for k, v in obj.items()}


def _torch_object(path: Path) -> Any:
    """What ``data.pkl`` of a ``torch.save`` archive holds, tensors as shapes; None when only
    torch can read it (the legacy format, objects beyond a state dict)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80":  # a pickle: the legacy format, which only torch reads
            return None
        raise unreadable(path)  # a truncated archive loses its directory at the end
    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1:
                raise unreadable(path)
            obj = _KeysUnpickler(z.open(pkl[0])).load()
    except _Unknown:
        return None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError):
        raise unreadable(path) from None
    return obj


# -- safetensors -----------------------------------------------------------------------------


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header: 8 bytes little-endian length, then that much JSON; the file must be
    long enough for the tensor data it describes."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000 or path.stat().st_size < 8 + length:
                raise ValueError("header length out of range")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + length + end:
            raise ValueError("tensor data cut short")
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise unreadable(path, "a safetensors checkpoint") from None
    return header


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the header."""
    header = _safetensors_header(path)
    try:
        return {
            k.removeprefix("module."): tuple(int(n) for n in v["shape"])
            for k, v in header.items()
            if k != "__metadata__"
        }
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise unreadable(path, "a safetensors checkpoint") from None
