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
  uninterrupted one. A directory holding an earlier run's files but no ``state.pt`` is refused
  (starting afresh there would replace and mix that run's files) unless ``overwrite=True``,
  which deletes the run's files (only those named here) first. Ctrl-C while ``state.pt`` is
  written lets the save finish, then stops (a second Ctrl-C abandons it; the previous file stays). A run stopped by ``max_steps`` continues with a larger ``max_steps`` (or
  none); a finished run given a larger ``epochs`` trains on to it and ends with the weights of
  a run started with that ``epochs`` (the lr schedule does not depend on the epoch count);
- ``result.json``: a summary at the end;
- ``skipped.txt``: the training clips that failed to load mid-run (corrupt or unreadable), one
  ``video_id: reason`` a line; each was replaced by the next clip of the list that loads, with a
  warning. Files that do not exist are refused before the run starts (and before its directory
  is made); a run stopped by an error while loading data or validating saves ``state.pt``
  first, so running it again after the fix continues where it stopped.

A fine-tuning run resumes only with the label set it started with (the label CSV may move; its
classes and their order may not change).

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
process group is initialized from the environment (on GPUs NCCL for the gradients and gloo for
the few CPU exchanges; gloo alone on CPUs), each process takes the GPU of its ``LOCAL_RANK`` and
its shard of every step, gradients are averaged, evaluation is sharded and gathered, and only
rank 0 writes files and logs.

Mixed precision runs on CUDA only: bf16 where the GPU runs it natively (no loss scaling), else
fp16 with a gradient scaler; CPU runs in float32.

Modules, one job each: ``configs`` (fields, file loading, validation), ``models`` (the model a
run starts from), ``data`` (datasets and loaders), ``device`` (processes, device, precision),
``optim`` (optimizer, lr schedule, loss scaler), ``state`` (run-directory files, ``state.pt``,
resume), ``steps`` (the forward and loss of a micro-batch), ``evaluation`` (validation during
training), ``loop`` (the epoch loop shared by both recipes), ``pretraining`` and ``finetuning``
(the two recipes).
"""

from __future__ import annotations

from .configs import FinetuneConfig, PretrainConfig, TrainConfig, TrainConfigError
from .evaluation import predict_clips
from .finetuning import average_checkpoints, finetune
from .loop import TrainingDivergedError, TrainResult
from .optim import MultiStepWarmup
from .pretraining import pretrain

__all__ = [
    "FinetuneConfig",
    "MultiStepWarmup",
    "PretrainConfig",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainingDivergedError",
    "average_checkpoints",
    "finetune",
    "predict_clips",
    "pretrain",
]
