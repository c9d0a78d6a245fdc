"""What an export checks before any tracing: its arguments and its destination (one line each,
in seconds, not after minutes of work)."""

from __future__ import annotations

from pathlib import Path

from cavmae import fsio
from cavmae.config import check_max_batch, check_num_frames
from cavmae.errors import ExportError
from cavmae.labels import TASKS
from cavmae.manifest import EXPORT_PRECISIONS, is_export_dir
from cavmae.masking import kept_tokens
from cavmae.model import CAVMAEEncoder
from cavmae.modes import FINETUNE_MODES
from cavmae.stages import model_kind

from .graph_store import foreign_files


def check_mask_ratios(net: CAVMAEEncoder, mask_ratio_a: float, mask_ratio_v: float) -> None:
    """Before tracing: a ratio that keeps no token of a pre-training model fails (one line)."""
    if model_kind(net) == "pretrain":
        kept_tokens(net.config.num_audio_tokens, net.config.num_visual_tokens, mask_ratio_a, mask_ratio_v)


def check_arguments(precision: str, finetune_mode: str | None, out_dir: Path, overwrite: bool, num_frames: int,
                     max_batch: int, task: str | None) -> None:
    check_num_frames(num_frames)
    check_max_batch(max_batch)
    if task is not None and task not in TASKS:
        raise ExportError(f"task must be 'multi-label' or 'single-label', not {task!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; an export is a folder: choose another path")
    if precision not in EXPORT_PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(EXPORT_PRECISIONS)}, not {precision!r}")
    if finetune_mode is not None and finetune_mode not in FINETUNE_MODES:
        raise ExportError(f"finetune_mode must be one of {', '.join(FINETUNE_MODES)}")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not is_export_dir(out_dir):
        # --overwrite replaces an earlier export only: a folder of other files is the user's
        raise ExportError(f"{out_dir} is not empty and holds no earlier export; choose another directory")
    if not overwrite:
        raise ExportError(f"{out_dir} is an export; choose another directory or pass --overwrite")


def check_destination(out_dir: Path, checkpoint: str | None) -> None:
    """Before any tracing: the export may replace ``out_dir`` (never the checkpoint it is made
    from, nor files no export writes) and its folder takes files (a read-only folder fails now,
    not after minutes of work)."""
    if checkpoint and Path(checkpoint).resolve().is_relative_to(out_dir.resolve()):
        raise ExportError(f"the checkpoint {checkpoint} is inside {out_dir}, which the export replaces;"
                          " choose another directory")
    # an earlier export (only --overwrite gets here with one) is replaced whole, in one rename:
    # not when the folder also holds what the user keeps there
    foreign = foreign_files(out_dir) if is_export_dir(out_dir) else []
    if foreign:
        more, it = (f" and {len(foreign) - 1} more", "them") if len(foreign) > 1 else ("", "it")
        raise ExportError(f"{out_dir} holds {foreign[0]}{more}, which no export writes and --overwrite"
                          f" would delete; move {it} out of the folder, or choose another directory")
    if not fsio.writable_dir(out_dir.parent):
        raise ExportError(f"cannot write into {out_dir.parent}: not a writable folder")
