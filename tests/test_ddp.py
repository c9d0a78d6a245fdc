"""Distributed data parallel with two CPU processes (gloo on 127.0.0.1).

Each process runs a short pre-training and then fine-tunes from it, exactly as under
``torchrun``: the environment carries RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Checked:
the two ranks see disjoint shards that together make up each global batch, their final weights
are identical, only rank 0 wrote the run directory, and the result equals a single-process run
with two gradient-accumulation rounds (the same micro-batches, summed in another order).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cavmae.train import FinetuneConfig, PretrainConfig, finetune, pretrain
from synthetic_av import make_synthetic_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configs(ds, out: Path, accum: int) -> tuple[PretrainConfig, FinetuneConfig]:
    common = dict(
        train_data=str(ds.splits["train"]), val_data=str(ds.splits["val"]), model="tiny",
        batch_size=8, accum_steps=accum, num_workers=0, progress=False, log_every=1, seed=3,
        device="cpu",  # gloo on the CPU, also on a machine with GPUs
    )
    pre = PretrainConfig(output_dir=str(out / "pre"), epochs=1, lr=1e-3, contrast_loss_weight=1.0, **common)
    ft = FinetuneConfig(
        output_dir=str(out / "ft"), label_csv=str(ds.label_csv), init_checkpoint=str(out / "pre" / "final.pth"),
        weight_csv=str(ds.weight_csv), epochs=2, lr=1e-3, head_lr=10, loss="CE", wa_start=1, **common,
    )
    return pre, ft


def _worker(rank: int, world: int, port: int, root: str, ds) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    pre, ft = _configs(ds, Path(root) / "ddp", accum=1)
    seen: list[tuple[str, int, list[int]]] = []
    r1 = pretrain(pre, on_step=lambda s: seen.append(("pre", s["step"], s["indices"])))
    r2 = finetune(ft, on_step=lambda s: seen.append(("ft", s["step"], s["indices"])))
    torch.save(
        {
            "seen": seen,
            "pre": r1.model.state_dict(),
            "ft": r2.model.state_dict(),
            "final_metrics": r2.final_metrics,
        },
        Path(root) / f"rank{rank}.pt",
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("ddp_data"), num_classes=4, splits={"train": 4, "val": 2}, seconds=1.0
    )


def test_two_process_ddp_matches_accumulation(tmp_path, dataset):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), dataset), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # disjoint shards that together make up each step's global batch
    steps0 = {(k, s): idx for k, s, idx in ranks[0]["seen"]}
    steps1 = {(k, s): idx for k, s, idx in ranks[1]["seen"]}
    assert steps0.keys() == steps1.keys() and len(steps0) == 2 + 4
    for key in steps0:
        assert len(steps0[key]) == len(steps1[key]) == 4
    pre_epoch = [i for (k, _), idx in sorted(steps0.items()) if k == "pre" for i in idx]
    pre_epoch += [i for (k, _), idx in sorted(steps1.items()) if k == "pre" for i in idx]
    assert len(set(pre_epoch)) == 16  # a permutation: every clip exactly once per epoch

    # identical weights on both ranks
    for part in ("pre", "ft"):
        for k, v in ranks[0][part].items():
            assert torch.equal(v, ranks[1][part][k]), (part, k)
    assert ranks[0]["final_metrics"] == ranks[1]["final_metrics"]

    # only rank 0 wrote: one record per event, no stray temporary files
    run = tmp_path / "ddp" / "ft"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4]
    assert sum(r["event"] == "final" for r in records) == 1
    assert not list(tmp_path.rglob("*.tmp"))
    assert {p.name for p in run.iterdir()} >= {
        "config.json", "metrics.jsonl", "state.pt", "model.1.pth", "model.2.pth", "best.pth",
        "final.pth", "wa.pth", "result.json",
    }

    # a single process with 2 accumulation rounds runs the same micro-batches
    pre, ft = _configs(dataset, tmp_path / "single", accum=2)
    single_pre = pretrain(pre).model.state_dict()
    single_ft = finetune(ft).model.state_dict()
    for ref, got in ((single_pre, ranks[0]["pre"]), (single_ft, ranks[0]["ft"])):
        for k, v in ref.items():
            g = got[k]
            if k.endswith("attn.qkv.bias"):
                # The key bias has no effect on attention, so its true gradient is 0 and Adam
                # turns float noise (which differs with the summation order) into lr-sized steps.
                d = v.shape[0] // 3
                torch.testing.assert_close(g[d : 2 * d], v[d : 2 * d], rtol=0, atol=1e-2)
                g, v = torch.cat([g[:d], g[2 * d :]]), torch.cat([v[:d], v[2 * d :]])
            # Adam also magnifies float noise in near-zero gradients elementwise, so compare
            # whole tensors: relative difference 1e-5 typically, 1e-3 allowed
            assert ((g - v).norm() / v.norm().clamp_min(1e-12)).item() < 1e-3, k


def _failing_worker(rank: int, world: int, port: int, root: str, ds, when: str) -> None:
    """Pre-training where only rank 1's clips stop loading: after its first few reads
    (``when="train"``), or those of the validation set (``"val"``)."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import cavmae.data
    from cavmae.errors import CavmaeError, MediaError

    if rank == 1:
        real, reads = cavmae.data.read_wav, [0]
        val = {c.wav for c in cavmae.data.read_clips(str(ds.splits["val"]))}

        def gone_after_a_step(path, *args, **kwargs):
            reads[0] += 1
            # train: the first micro-batch loads, later ones find the disk gone
            if (reads[0] > 4) if when == "train" else (str(path) in val):
                raise MediaError(f"{path}: the disk is gone")
            return real(path, *args, **kwargs)

        cavmae.data.read_wav = gone_after_a_step
    pre, _ = _configs(ds, Path(root) / "fail", accum=1)
    try:
        pretrain(pre)
        message = "finished"
    except CavmaeError as e:
        message = str(e)
    (Path(root) / f"rank{rank}.txt").write_text(message)


@pytest.mark.parametrize("when", ["train", "val"])
def test_a_batch_failing_on_one_process_stops_all_and_saves(tmp_path, dataset, when):
    """Without telling the others, rank 1 would stop alone and rank 0 wait in the gradients'
    all-reduce or validation's gather (gloo's timeout is half an hour): the test would time out
    with nothing saved."""
    ctx = mp.start_processes(_failing_worker, args=(2, _free_port(), str(tmp_path), dataset, when),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a process was left waiting for the other")
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert "the disk is gone" in said[1], said
    other = "another training process" if when == "train" else "another process failed while validating"
    assert other in said[0], said
    assert "the run is saved" in said[0]
    assert (tmp_path / "fail" / "pre" / "state.pt").is_file()
