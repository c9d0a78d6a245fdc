"""Which GPU a process of a multi-process job (``torchrun``) takes: one rule for training and
for sharded embedding. No torch: the caller says how many GPUs the process sees."""

from __future__ import annotations

from cavmae.errors import CavmaeError


def local_gpu_index(local_rank: int, visible: int) -> int:
    """The index, among the ``visible`` GPUs, of the process with ``local_rank`` on its node.

    Each process takes the GPU of its local rank; a process that sees one GPU takes it (a
    launcher that gives each process its own ``CUDA_VISIBLE_DEVICES`` shows it just that one).

    Raises:
        CavmaeError: more processes on the node than GPUs (two would share one, and NCCL refuses).
    """
    if visible == 1 or local_rank < visible:
        return 0 if visible == 1 else local_rank
    raise CavmaeError(
        f"process {local_rank} on this node sees {visible} GPU(s): start at most {visible} processes"
        " per node (torchrun --nproc-per-node), or give each its own CUDA_VISIBLE_DEVICES"
    )
