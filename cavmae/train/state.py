"""The run directory's files and the resumable training state (``state.pt``).

``state.pt`` holds the model, the optimizer, the loss scaler, the position (epoch, step in the
epoch, global step), the epoch's running sums, the best metric, the history, the metrics-log
offset, the clips skipped so far and the global RNG states: everything a resumed run needs to
continue bitwise on the CPU. (On a GPU, some kernels' backward passes, the token gather's and
the fused attention's, add in an order that varies from run to run, so a resumed run matches an
uninterrupted one as closely as two uninterrupted runs match each other.) Its metadata names
the classes of a fine-tuning run: a run resumes only with the same label set (the label CSV may
move, its classes may not change).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cavmae import fsio
from cavmae.checkpoint import checkpoint_meta
from cavmae.checkpoint_keys import META_KEY, TrainedHead
from cavmae.labels import LabelSet

from .configs import TrainConfig, TrainConfigError
from .optim import Optimization

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
BEST_FILE = "best.pth"
FINAL_FILE = "final.pth"
AVERAGED_FILE = "wa.pth"
#: the training clips that failed to load and were replaced, one ``video_id: reason`` a line
SKIPPED_FILE = "skipped.txt"
#: what a run writes into its directory: starting afresh must not mix with, or overwrite, these
_RUN_FILES = frozenset({STATE_FILE, METRICS_FILE, CONFIG_FILE, RESULT_FILE, BEST_FILE, FINAL_FILE,
                        AVERAGED_FILE, SKIPPED_FILE})
_EPOCH_FILE = re.compile(r"^model\.\d+\.pth$")


def epoch_file(epoch: int) -> str:
    """The name of the weights after ``epoch``."""
    return f"model.{epoch}.pth"

# Fields that may change when a run is resumed (they do not change the trajectory). Of the
# data files only the paths may change: the label set's content is compared (_check_labels).
_RESUMABLE_CHANGES = frozenset(
    {
        "output_dir", "epochs", "max_steps", "resume", "progress", "num_workers", "log_every",
        "save_every_steps", "save_epoch_checkpoints", "eval_batch_size", "device", "train_data",
        "val_data", "label_csv", "weight_csv", "init_checkpoint", "wa_end", "eval_every",
        "eval_at_start", "overwrite",
    }
)


def json_default(x: Any) -> Any:
    """JSON for the numpy scalars and paths in metric records."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def write_json(obj: Any, path: Path) -> None:
    fsio.write_json(path, obj, indent=2, default=str)


class MetricsLog:
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
            f.write(json.dumps(record, default=json_default) + "\n")


# --------------------------------------------------------------------------------------------
# Global RNG states (saved and restored, though no random choice of a run draws from them)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # the legacy tuple (name, keys, pos, gauss, cached)
    assert isinstance(np_state, tuple)
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
        # One state per GPU the saving process saw; a resume that sees fewer (another node,
        # CUDA_VISIBLE_DEVICES) restores those it has: set_rng_state_all would fail on the rest.
        for index, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


# --------------------------------------------------------------------------------------------
# Position of a run, resume and save


@dataclass
class RunState:
    """Where a run stands: what ``state.pt`` records besides the model and the optimizer."""

    epoch: int = 1  # the epoch being trained (1-based)
    step_in_epoch: int = 0
    global_step: int = 0
    meters: dict[str, float] = field(default_factory=dict)  # sums of this epoch's loss terms
    best: dict[str, Any] = field(default_factory=lambda: {"value": None, "epoch": 0})
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # video_id -> why it did not load


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


def run_files(run_dir: Path) -> list[Path]:
    """The files of a run (``state.pt``, ``config.json``, ``metrics.jsonl``, ``result.json``,
    ``skipped.txt``, ``model.N.pth``, ``best/final/wa.pth``) in ``run_dir``, sorted; other
    files are not the run's and are left alone."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir()
                  if (p.name in _RUN_FILES or _EPOCH_FILE.match(p.name)) and not p.is_dir())


def _finished_any_epoch(found: list[Path]) -> bool:
    """Whether the run files ``found`` hold any result: a checkpoint or result file, or an epoch
    recorded in ``metrics.jsonl`` (a run stopped in its first epoch has only step records;
    ``skipped.txt`` lists inputs, no result)."""
    if any(p.name not in (CONFIG_FILE, METRICS_FILE, SKIPPED_FILE) for p in found):
        return True
    metrics = next((p for p in found if p.name == METRICS_FILE), None)
    if metrics is None:
        return False
    try:
        with open(metrics, encoding="utf-8") as f:
            return any(json.loads(line).get("event") != "step" for line in f if line.strip())
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: judged worth keeping


def claim_run_dir(cfg: TrainConfig, main: bool) -> None:
    """Make sure a run may start or continue in ``cfg.output_dir``, before anything is written.

    A directory with a ``state.pt`` is resumed (:func:`start_or_resume` decides how). One with
    run files but no ``state.pt`` holds an earlier run that cannot be continued: starting afresh
    there would truncate its ``metrics.jsonl``, replace its checkpoints and leave the epoch
    checkpoints beyond the new run's epochs mixed in, so it is refused unless ``overwrite``,
    which deletes that run's files (rank 0; ``state.pt`` first, so a deletion cut short never
    leaves a resumable state without its files). Every process calls this before the first
    barrier, so all see the directory as it was and agree.
    """
    run_dir = Path(cfg.output_dir)
    found = run_files(run_dir)
    if cfg.overwrite:
        if main and found:
            log.info("%s: deleting the files of the earlier run (overwrite)", run_dir)
            for path in sorted(found, key=lambda p: p.name != STATE_FILE):
                path.unlink(missing_ok=True)
        return
    if not found or (run_dir / STATE_FILE).exists() or not _finished_any_epoch(found):
        return  # a run stopped in its first epoch (before any save) has nothing to lose: restarted
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    raise TrainConfigError(
        f"{run_dir} holds files of an earlier run ({names}) but no {STATE_FILE} to continue it "
        f"from; choose another output_dir, or pass overwrite=True (--overwrite) to delete that "
        "run's files and start afresh"
    )


def start_or_resume(
    cfg: TrainConfig, model: nn.Module, opt: Optimization, mlog: MetricsLog, main: bool,
    *, head: TrainedHead | None = None,
) -> RunState:
    """Continue the run in ``cfg.output_dir`` from its ``state.pt``, or start it afresh there.

    Resuming checks that the run is the same (kind, config, epochs, ``head``'s label set, the
    model's weights) and loads model, optimizer, scaler and RNG states in place and cuts
    ``metrics.jsonl`` back to what it held at the save; a fresh start makes the run directory
    and writes ``config.json`` (rank 0): nothing is created before the run is sure to start.
    """
    run_dir = Path(cfg.output_dir)
    state_path = run_dir / STATE_FILE
    if not state_path.exists():
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json({"kind": cfg.kind, **cfg.to_dict()}, run_dir / CONFIG_FILE)
            mlog.truncate(0)
        return RunState()
    if not cfg.resume:
        raise TrainConfigError(
            f"{run_dir} already holds a training state ({STATE_FILE}); pass resume=True "
            "(--resume) to continue it, choose another output_dir, or pass overwrite=True "
            "(--overwrite) to delete that run's files and start afresh"
        )
    st = _read_state(state_path)
    tr = st["training"]
    if tr["kind"] != cfg.kind:
        raise TrainConfigError(f"{run_dir} holds a {tr['kind']} run, not a {cfg.kind} run")
    _check_resume_config(run_dir, cfg, tr["config"])
    _check_epochs(run_dir, cfg, tr)
    _check_labels(run_dir, st.get(META_KEY), head)
    _load_weights(state_path, model, opt, st)
    rs = RunState(
        tr["epoch"], tr["step_in_epoch"], tr["global_step"],
        dict(tr["meters"]), dict(tr["best"]), list(tr["history"]),
        skipped=dict(tr.get("skipped", {})),  # absent from states saved before it was kept
    )
    # A finished run asked for more epochs continues: the schedule is a function of (epoch,
    # step) that does not depend on the epoch count, so epochs N+1.. are exactly those of
    # a run started with the larger count.
    rs.finished = bool(tr["finished"]) and rs.epoch > cfg.epochs
    if tr["finished"] and not rs.finished:
        log.info("%s: continuing a finished run of %d epochs to %d", run_dir, rs.epoch - 1, cfg.epochs)
    _set_rng_state(tr["rng"])
    mlog.truncate(int(tr["log_offset"]))
    log.info("resuming %s at epoch %d, step %d", run_dir, rs.epoch, rs.global_step)
    return rs


def _read_state(state_path: Path) -> dict[str, Any]:
    """``state.pt`` as saved; one that cannot be read is one line saying what to do."""
    damaged = (f"{state_path} is damaged and cannot be resumed from ({{}}); choose another "
               "output_dir, or pass overwrite=True (--overwrite) to delete this run's files and "
               "start it over")
    try:
        st = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, overwritten, or not a torch file at all
        # torch's own words help nobody here (a bare number for a text file, advice to
        # unpickle untrusted code for another pickle): say what the file is
        raise TrainConfigError(damaged.format(
            "it is empty" if state_path.stat().st_size == 0
            else "not a whole training state: cut short, overwritten, or not written by cavmae"
        )) from None
    if not isinstance(st, dict) or not isinstance(st.get("training"), dict) or "state_dict" not in st:
        raise TrainConfigError(damaged.format("a PyTorch file, but not a cavmae training state"))
    return st


def _check_labels(run_dir: Path, meta: Any, head: TrainedHead | None) -> None:
    """Refuse to resume a fine-tuning run with another label set than it started with: its
    epochs so far trained the classes of the first, in its order, and the checkpoints would
    carry the names of the second. The content is compared, not the label CSV's path."""
    now = head.labels if head is not None else None
    before = LabelSet.from_meta(meta.get("labels")) if isinstance(meta, dict) else None
    if now is None or before is None or now == before:
        return  # (a state saved without class names: the weights' shapes are still checked)
    if len(now) != len(before):
        change = f"{len(before)} classes, now {len(now)}"
    elif sorted(zip(now.ids, now.names, strict=True)) == sorted(zip(before.ids, before.names, strict=True)):
        change = f"the same {len(now)} classes in another order"
    else:
        i = next(i for i in range(len(now)) if (now.ids[i], now.names[i]) != (before.ids[i], before.names[i]))
        change = (f"class {i} was {before.ids[i]} ({before.names[i]}), now {now.ids[i]} "
                  f"({now.names[i]})")
    raise TrainConfigError(
        f"{run_dir} holds a run started with other labels ({change}); resume it with the label "
        "CSV it started with, or train these labels into a new output folder (-o / output_dir)"
    )


def _load_weights(state_path: Path, model: nn.Module, opt: Optimization, st: dict[str, Any]) -> None:
    """Load the saved model, optimizer and scaler in place; weights of another model (another
    size, another head) are one line, not a deep PyTorch error."""
    mine, saved = model.state_dict(), st["state_dict"]
    odd = [f"{k} is {list(saved[k].shape)} there, {list(v.shape)} here" for k, v in mine.items()
           if k in saved and getattr(saved[k], "shape", None) != v.shape]
    odd += [f"{k} is missing there" for k in mine if k not in saved]
    odd += [f"{k} is not in this model" for k in saved if k not in mine]
    tr = st["training"]
    try:
        if not odd:
            model.load_state_dict(saved)
            opt.optimizer.load_state_dict(tr["optimizer"])
            if tr["scaler"]:
                opt.scaler.load_state_dict(tr["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        odd.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if odd:
        more = f" and {len(odd) - 2} more" if len(odd) > 2 else ""
        raise TrainConfigError(
            f"{state_path} holds another model than this run builds ({'; '.join(odd[:2])}{more});"
            " resume it with the settings it started with, or use a new output folder "
            "(-o / output_dir)"
        )


def save_state(
    cfg: TrainConfig, model: nn.Module, opt: Optimization, rs: RunState, world_size: int,
    mlog: MetricsLog, *, head: TrainedHead | None = None,
) -> None:
    """Write ``state.pt`` atomically (rank 0 calls it), and ``skipped.txt`` when clips were
    skipped (it lists what the state holds, so the two always agree)."""
    run_dir = Path(cfg.output_dir)
    if rs.skipped:
        fsio.write_text(run_dir / SKIPPED_FILE, "".join(f"{vid}: {why}\n" for vid, why in rs.skipped.items()))
    state = {
        META_KEY: checkpoint_meta(model, head),  # type: ignore[arg-type]
        "state_dict": model.state_dict(),
        "training": {
            "kind": cfg.kind, "config": json.dumps(cfg.to_dict()),
            "epoch": rs.epoch, "step_in_epoch": rs.step_in_epoch, "global_step": rs.global_step,
            "world_size": world_size, "optimizer": opt.optimizer.state_dict(),
            "scaler": opt.scaler.state_dict(), "scheduler": opt.scheduler.state_dict(),
            "meters": rs.meters, "best": rs.best, "history": rs.history, "finished": rs.finished,
            "log_offset": mlog.offset(), "rng": _rng_state(), "skipped": rs.skipped,
        },
    }
    # To a path, not a file object: torch's writer turns an exception raised inside a
    # file object's write (Ctrl-C) into a RuntimeError ("unexpected pos") that hides it.
    with _sigint_held() as interrupted:
        try:
            with fsio.atomic_path(run_dir / STATE_FILE) as tmp:
                torch.save(state, tmp)
        except BaseException as e:  # the save was abandoned; the previous state.pt is intact
            if interrupted() and not isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt from e
            raise


@contextlib.contextmanager
def _sigint_held() -> Iterator[Callable[[], bool]]:
    """Hold back Ctrl-C while the block runs, then deliver it as usual: a save it would cut
    short is finished instead (seconds at most) and the run stops on a whole ``state.pt``. A
    second Ctrl-C does not wait: it interrupts at once, the save is abandoned. Yields a
    function that says whether a Ctrl-C came. Only the main thread receives signals; elsewhere,
    or where SIGINT is not handled by Python code, nothing is held back.
    """
    previous = signal.getsignal(signal.SIGINT)
    came: list[tuple[int, Any]] = []
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield lambda: False
        return

    def hold(signum: int, frame: Any) -> None:
        came.append((signum, frame))
        if len(came) > 1:
            previous(signum, frame)

    signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(came)
    finally:
        signal.signal(signal.SIGINT, previous)
    if len(came) == 1:  # held back: deliver it now that the block is done
        previous(*came[0])
