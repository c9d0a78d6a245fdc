"""Processes, devices and precision of a run: DDP from the environment, autocast, seeding."""

from __future__ import annotations

import atexit
import os
import pickle
import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cavmae import fsio
from cavmae.errors import CavmaeError
from cavmae.local_gpu import local_gpu_index

from .configs import TrainConfig, TrainConfigError
from .state import claim_run_dir


@dataclass
class Dist:
    """This process's place among the processes of a run (one process without ``torchrun``)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str) -> Dist:
    """The process group the environment describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not dist.is_initialized():
        # Initialized once per process and kept for later runs in the same process (pretrain
        # then finetune): re-creating the rendezvous store on the same port can hang.
        # With GPUs, NCCL carries the gradients and gloo what stays on the CPU (the step's loss
        # terms, the objects `gather` exchanges): NCCL alone refuses CPU tensors.
        use_cuda = device_pref != "cpu" and torch.cuda.is_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", init_method="env://")
        atexit.register(_destroy_group)
    return Dist(dist.get_world_size(), dist.get_rank(), local)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def pick_device(pref: str, d: Dist) -> torch.device:
    """``auto`` is this process's GPU when there is one, else the CPU. With several processes
    each takes the GPU of its ``LOCAL_RANK``, counted among the GPUs it sees (a launcher that
    gives each process its own ``CUDA_VISIBLE_DEVICES`` shows it one)."""
    if pref == "auto":
        return _local_gpu(d) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainConfigError(f"device {pref!r} asked for, but CUDA is not available here")
        if dev.index is None:
            return _local_gpu(d)
        if d.active:
            raise TrainConfigError(
                f"device {pref!r} names one GPU for all {d.world_size} processes; use --device cuda "
                "(or auto): each process then takes the GPU of its LOCAL_RANK"
            )
        if dev.index >= torch.cuda.device_count():
            raise TrainConfigError(f"device {pref!r} asked for, but this process sees "
                                   f"{torch.cuda.device_count()} GPU(s)")
    return dev


def _local_gpu(d: Dist) -> torch.device:
    try:
        return torch.device("cuda", local_gpu_index(d.local_rank, torch.cuda.device_count()))
    except CavmaeError as e:
        raise TrainConfigError(str(e)) from None


def precision_dtype(pref: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32."""
    if device.type != "cuda":
        if pref in ("bf16", "fp16"):
            raise TrainConfigError(f"precision {pref} needs a CUDA GPU; use fp32 (or auto) on CPU")
        return None
    if pref == "fp32":
        return None
    # Without emulation: older GPUs (compute capability < 8) emulate bf16 slowly; fp16 with a
    # gradient scaler is what they run well.
    if pref == "bf16" or (pref == "auto" and torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to ``dtype``; no context at all for float32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# The tensors of the latest `gather`, held until the next one. Gloo's worker thread lets go of
# a collective's tensors a moment after the caller is told it is done; were that the last
# reference, freeing them would need the GIL, and a process that exits right after a gather
# (one that stops on an error) can be finalizing the interpreter by then: the thread is then
# killed inside C++ and the process aborts ("terminate called without an active exception").
_last_exchange: list[torch.Tensor] = []


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` (picklable; the ranks trust each other) in rank order (just
    ``[obj]`` without DDP). Exchanged on the CPU (gloo)."""
    if not d.active:
        return [obj]
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(d.world_size)]
    dist.all_gather(sizes, size)
    mine = torch.zeros(int(max(s.item() for s in sizes)), dtype=torch.uint8)
    mine[: data.numel()] = data
    everyone = [torch.empty_like(mine) for _ in range(d.world_size)]
    dist.all_gather(everyone, mine)
    objs = [pickle.loads(t[: int(n.item())].numpy().tobytes()) for t, n in zip(everyone, sizes, strict=True)]
    for t in (mine, *everyone):
        t.resize_(0)  # the memory goes now; the tensor objects stay for gloo's thread
    _last_exchange[:] = [size, *sizes, mine, *everyone]
    return objs


def seed_everything(seed: int) -> None:
    """Seed the global RNGs (model initialization draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run(cfg: TrainConfig) -> tuple[Dist, torch.device, torch.dtype | None]:
    """Validate ``cfg``, join the process group, pick device and precision, check (and with
    ``overwrite`` clear) the run dir, and that it can be written. The run dir is made when
    the run starts (:func:`~cavmae.train.state.start_or_resume`), so that a run refused before
    (a bad dataset, a missing checkpoint) leaves no empty folder behind."""
    cfg.validate()
    d = init_distributed(cfg.device)
    device = pick_device(cfg.device, d)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    amp = precision_dtype(cfg.precision, device)
    if cfg.batch_size % (d.world_size * cfg.accum_steps):
        raise TrainConfigError(
            f"batch_size {cfg.batch_size} must be divisible by processes x accum_steps = "
            f"{d.world_size} x {cfg.accum_steps}"
        )
    claim_run_dir(cfg, d.main)  # every process, before the barrier: nothing is written yet
    if d.main:  # an unwritable run dir fails now, not after the model and data are loaded
        fsio.probe_dir(cfg.output_dir)
    barrier(d)
    seed_everything(cfg.seed)
    return d, device, amp
