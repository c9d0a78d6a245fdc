"""The training loop shared by pre-training and fine-tuning.

A recipe describes its kind of training as a :class:`Job` (model, step module, parameter
groups, data, forward, evaluation, what "better" means, which epochs keep a checkpoint);
:func:`run` trains it epoch by epoch, with resume, accumulation, DDP and mixed precision.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cavmae.checkpoint import save_checkpoint
from cavmae.checkpoint_keys import TrainedHead
from cavmae.data import StepBatchSampler, epoch_order
from cavmae.errors import CavmaeError, DatasetError, skipped_message

from .configs import TrainConfig, TrainConfigError
from .data import ERROR_KEY, RunData, to_device, training_loader
from .device import Dist, autocast, barrier, gather
from .optim import Optimization
from .state import (
    BEST_FILE,
    FINAL_FILE,
    METRICS_FILE,
    RESULT_FILE,
    SKIPPED_FILE,
    MetricsLog,
    RunState,
    epoch_file,
    json_default,
    save_state,
    start_or_resume,
    write_json,
)

log = logging.getLogger(__name__)

#: ``forward(module, batch, seed_words) -> loss terms``, the first term is optimized
Forward = Callable[[nn.Module, dict[str, Any], list[int]], tuple[torch.Tensor, ...]]
Callback = Callable[[dict[str, Any]], None]


class TrainingDivergedError(CavmaeError):
    """The loss became NaN or infinite."""


@dataclass
class Job:
    """Everything the generic loop needs from one kind of training."""

    cfg: TrainConfig
    model: nn.Module
    step_module: nn.Module
    param_groups: list[dict[str, Any]]
    data: RunData
    terms: tuple[str, ...]
    forward: Forward
    evaluate: Callable[[], dict[str, float]] | None
    better: Callable[[dict[str, float], float | None], tuple[bool, float]]
    epoch_checkpoint: Callable[[int], bool]
    #: a classifier's class names, fine-tune mode and task, kept in each checkpoint
    head: TrainedHead | None = None


def _head_fields(head: TrainedHead | None) -> dict[str, Any]:
    """``save_checkpoint``'s keyword arguments for a job's head (none for pre-training)."""
    h = head or TrainedHead()
    return {"labels": h.labels, "finetune_mode": h.finetune_mode, "task": h.task}


@dataclass
class TrainResult:
    """What a training run produced.

    ``completed`` is False when the run stopped at ``max_steps`` (continue it with a larger
    ``max_steps``, or none; the same ``max_steps`` stops again at once). A completed run given
    a larger ``epochs`` continues to it. ``epoch``: epochs completed; ``global_step``:
    optimizer steps done. ``model`` is this process's trained model in eval mode (fine-tuning:
    the model the final evaluation used). ``history`` holds the epoch records of
    ``metrics.jsonl``; ``final_metrics`` the final evaluation (fine-tuning).
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


def write_result(result: TrainResult) -> None:
    """``result.json``: the summary of a completed run."""
    summary = {
        "completed": result.completed, "epoch": result.epoch, "global_step": result.global_step,
        "final_checkpoint": result.final_checkpoint, "best_checkpoint": result.best_checkpoint,
        "averaged_checkpoint": result.averaged_checkpoint, "final_metrics": result.final_metrics,
        "history": result.history,
    }
    write_json(summary, result.run_dir / RESULT_FILE)


@contextmanager
def _progress(total: int, initial: int, desc: str, enabled: bool) -> Iterator[Any]:
    from cavmae.progress import progress_bar

    # a bar on a terminal, a line every few seconds in a log (never a bar in a log file)
    bar = progress_bar(
        total=total, initial=initial, desc=desc, unit="step", enabled=enabled, leave=False
    )
    try:
        yield bar
    finally:
        bar.close()


class _Loop:
    """One run of a :class:`Job` in this process: its optimizer, position and files."""

    def __init__(
        self, job: Job, d: Dist, device: torch.device, amp: torch.dtype | None,
        on_step: Callback | None, on_epoch: Callback | None,
    ) -> None:
        self.job, self.cfg, self.d, self.device, self.amp = job, job.cfg, d, device, amp
        self.on_step, self.on_epoch = on_step, on_epoch
        self.run_dir = Path(self.cfg.output_dir)
        self.mlog = MetricsLog(self.run_dir / METRICS_FILE, d.main)
        self.opt = Optimization.create(job.param_groups, self.cfg, amp)
        n = len(job.data.train)  # an epoch draws as many samples as there are clips
        if n < self.cfg.batch_size:  # refused before the run directory is made
            raise TrainConfigError(
                f"the training set has {n} samples per epoch, fewer than one batch of "
                f"{self.cfg.batch_size}; lower batch_size"
            )
        self.rs: RunState = start_or_resume(self.cfg, job.model, self.opt, self.mlog, d.main,
                                            head=job.head)
        self.module = job.step_module  # what the forward calls: the step module or its DDP
        if d.active:
            self.module = nn.parallel.DistributedDataParallel(
                job.step_module,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )

    def save(self) -> None:
        """Save ``state.pt`` (rank 0) with the clips every process skipped. Every process calls
        this at the same points of the run (the gather is collective)."""
        if self.d.active:
            parts = gather(self.rs.skipped, self.d)
            self.rs.skipped = {vid: why for part in parts for vid, why in part.items()}
        self._write_state()

    def _write_state(self) -> None:
        if self.d.main:
            save_state(self.cfg, self.job.model, self.opt, self.rs, self.d.world_size, self.mlog,
                       head=self.job.head)

    @contextmanager
    def saved_on_failure(self) -> Iterator[None]:
        """Save the state when the block (loading a batch, validating) fails, then let the
        error go on, saying so. The model and the optimizer are then still those after the
        last whole step (a step's update itself is never inside such a block), so the run
        continues from there, bitwise, once the cause is fixed; without this, a bad file found
        mid-epoch would lose everything since the last save. Rank 0 saves alone: no
        collective, as the other processes may be stuck waiting for it. With several processes
        a failure reaches all of them: a training batch's through :meth:`next_batch`, a
        validation error through validation's gather (``evaluation._gather_or_raise``)."""
        try:
            yield
        except Exception as e:
            if not self.d.main:
                raise
            self._write_state()
            rs = self.rs
            note = (f"the run is saved at epoch {rs.epoch}, step {rs.global_step} in {self.run_dir}: "
                    "run the same command again to continue from there once the cause is fixed")
            if isinstance(e, CavmaeError):
                e.args = (f"{e}; {note}",)  # the CLI prints it as one line
            else:
                log.warning("%s", note)
            raise

    def next_batch(self, it: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next micro-batch, on the device; the clips replaced in it are recorded. A batch
        that cannot be loaded, on any process, stops every process, the state saved first."""
        error: Exception | None = None
        try:
            batch = next(it)
            if ERROR_KEY in batch:  # clip after clip failed: the dataset is broken
                raise DatasetError(batch[ERROR_KEY])
        except Exception as e:
            error = e
        # Every process learns whether any failed (one bool per micro-batch, as every process
        # loads the same number): otherwise a process whose batch failed would stop alone,
        # rank 0 would wait in the gradients' all-reduce until killed, and nothing be saved.
        failed = any(gather(error is not None, self.d)) if self.d.active else error is not None
        if failed:
            with self.saved_on_failure():
                raise error or DatasetError("another training process could not load its batch"
                                            " (its log says why)")
        for video_id, reason in batch.pop("skipped", ()):
            if video_id not in self.rs.skipped:  # once per clip, though drawn every epoch
                log.warning("%s; another clip of the training set took its place (listed in %s)",
                            skipped_message(f"clip {video_id}", reason), self.run_dir / SKIPPED_FILE)
                self.rs.skipped[video_id] = reason
        return to_device(batch, self.device)

    def record_epoch(self, rec: dict[str, Any]) -> None:
        self.rs.history.append(rec)
        self.mlog.write(rec)
        if self.on_epoch is not None and self.d.main:
            self.on_epoch(rec)

    def train_one_epoch(self) -> bool:
        """Train the rest of the current epoch; True when ``max_steps`` stopped it."""
        cfg, rs, d = self.cfg, self.rs, self.d
        data = self.job.data
        order = epoch_order(len(data.train), cfg.seed, rs.epoch, weights=data.weights)
        # __init__ made sure the epoch holds at least one step
        sampler = StepBatchSampler(
            order, cfg.batch_size, seed=cfg.seed, epoch=rs.epoch, world_size=d.world_size,
            rank=d.rank, accum_steps=cfg.accum_steps, start_step=rs.step_in_epoch,
        )
        if rs.step_in_epoch == 0:
            rs.meters = {}
        self.job.model.train()
        it = iter(training_loader(data.train, sampler, cfg.num_workers, self.device))
        desc = f"{cfg.kind} epoch {rs.epoch}/{cfg.epochs}"
        with _progress(sampler.steps, rs.step_in_epoch, desc, cfg.progress and d.main) as bar:
            while rs.step_in_epoch < sampler.steps:
                if cfg.max_steps is not None and rs.global_step >= cfg.max_steps:
                    return True
                lr = self.opt.scheduler.apply(rs.epoch, rs.global_step)
                values, indices = self.optimizer_step(it)
                for k, v in values.items():
                    rs.meters[k] = rs.meters.get(k, 0.0) + v
                rs.step_in_epoch += 1
                rs.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                where = {"epoch": rs.epoch, "step": rs.global_step}
                if self.on_step is not None:
                    self.on_step({**where, "indices": indices, **values})
                if cfg.log_every and rs.global_step % cfg.log_every == 0:
                    self.mlog.write({"event": "step", **where, "lr": lr, **values})
                if cfg.save_every_steps and rs.global_step % cfg.save_every_steps == 0:
                    self.save()
        return False

    def optimizer_step(self, it: Iterator[dict[str, Any]]) -> tuple[dict[str, float], list[int]]:
        """One optimizer step over ``accum_steps`` micro-batches: the loss terms averaged over
        micro-batches and processes, and the clip indices this process used."""
        cfg, d, job, rs = self.cfg, self.d, self.job, self.rs
        totals = torch.zeros(len(job.terms), dtype=torch.float64)
        indices: list[int] = []
        for a in range(cfg.accum_steps):
            batch = self.next_batch(it)
            indices += batch["index"].tolist()
            micro = a * d.world_size + d.rank  # the micro-batch's place among all processes'
            sync = a == cfg.accum_steps - 1 or not d.active  # DDP averages on the last one only
            with nullcontext() if sync else self.module.no_sync():  # type: ignore[operator]
                with autocast(self.device, self.amp):
                    words = [cfg.seed, rs.epoch, rs.step_in_epoch, micro]
                    terms = job.forward(self.module, batch, words)
                self.opt.scaler.scale(terms[0] / cfg.accum_steps).backward()
            totals += torch.stack([t.detach().double().cpu() for t in terms])
        self.opt.step()
        totals /= cfg.accum_steps
        if d.active:
            dist.all_reduce(totals)
            totals /= d.world_size
        values = dict(zip(job.terms, totals.tolist(), strict=True))
        if not math.isfinite(values["loss"]):
            raise TrainingDivergedError(
                f"the loss is {values['loss']} at epoch {rs.epoch}, step {rs.global_step}; "
                "lower the learning rate (lr) or use fp32"
            )
        return values, indices

    def end_epoch(self, started: float) -> None:
        """Validate, keep checkpoints, record the epoch, move to the next one and save."""
        cfg, rs, job = self.cfg, self.rs, self.job
        n = max(rs.step_in_epoch, 1)
        rec: dict[str, Any] = {
            "event": "epoch", "epoch": rs.epoch, "step": rs.global_step, "lr": self.opt.lr,
            **{f"train_{k}": v / n for k, v in rs.meters.items()},
        }
        due = rs.epoch % max(cfg.eval_every, 1) == 0 or rs.epoch == cfg.epochs
        if job.evaluate is not None and due:
            with self.saved_on_failure():  # the epoch's training is kept: resuming validates it
                metrics = job.evaluate()
            rec.update({f"val_{k}": v for k, v in metrics.items()})
            improved, value = job.better(metrics, rs.best["value"])
            if improved:
                rs.best = {"value": value, "epoch": rs.epoch}
                if self.d.main:
                    save_checkpoint(job.model, self.run_dir / BEST_FILE, **_head_fields(job.head))  # type: ignore[arg-type]
        rec["time_s"] = round(time.time() - started, 3)
        if self.d.main and job.epoch_checkpoint(rs.epoch):
            save_checkpoint(job.model, self.run_dir / epoch_file(rs.epoch), **_head_fields(job.head))  # type: ignore[arg-type]
        log.info("%s", json.dumps(rec, default=json_default))
        self.record_epoch(rec)
        rs.epoch += 1
        rs.step_in_epoch = 0
        rs.meters = {}
        self.save()

    def finish(self, stopped: bool) -> TrainResult:
        """Save where the run stands; a run completed just now also gets ``final.pth``."""
        rs, model = self.rs, self.job.model
        if stopped:
            self.save()
            barrier(self.d)
            return TrainResult(self.run_dir, False, rs.epoch - 1, rs.global_step, rs.history,
                               model=model.eval())
        completed_now = not rs.finished  # else a finished run was started again: nothing to do
        if self.d.main and completed_now:
            save_checkpoint(model, self.run_dir / FINAL_FILE, **_head_fields(self.job.head))  # type: ignore[arg-type]
        rs.finished = True
        if completed_now:
            self.save()
        barrier(self.d)
        return TrainResult(
            self.run_dir, True, min(rs.epoch, self.cfg.epochs + 1) - 1, rs.global_step, rs.history,
            final_checkpoint=self.run_dir / FINAL_FILE,
            best_checkpoint=(self.run_dir / BEST_FILE) if rs.best["epoch"] else None,
            model=model.eval(),
        )


def run(
    job: Job, d: Dist, device: torch.device, amp: torch.dtype | None,
    on_step: Callback | None = None, on_epoch: Callback | None = None,
) -> TrainResult:
    """Train ``job`` from where its run directory stands to ``epochs`` (or ``max_steps``)."""
    loop = _Loop(job, d, device, amp, on_step, on_epoch)
    cfg, rs = job.cfg, loop.rs
    if cfg.eval_at_start and job.evaluate is not None and rs.global_step == 0 and not rs.history:
        loop.record_epoch({"event": "epoch", "epoch": 0, "step": 0,
                           **{f"val_{k}": v for k, v in job.evaluate().items()}})
    while rs.epoch <= cfg.epochs and not rs.finished:
        started = time.time()
        if loop.train_one_epoch():
            return loop.finish(stopped=True)
        loop.end_epoch(started)
    return loop.finish(stopped=False)
