"""Decisions that only matter on GPU machines, checked with torch.cuda's answers stubbed (no
test machine of this project has a GPU): which GPU a training process takes, when bf16 is
chosen, restoring the GPUs' random states on a machine that shows fewer of them, and which GPUs
CUDA_VISIBLE_DEVICES leaves a process; and that only one process of a torchrun job prints its outcome."""

from __future__ import annotations

import pytest
import torch

from cavmae.runtime.hardware import _visible
from cavmae.train.configs import TrainConfigError
from cavmae.train.device import Dist, pick_device, precision_dtype
from cavmae.train.state import _rng_state, _set_rng_state


@pytest.fixture
def gpus(monkeypatch):
    """Make torch.cuda say it has ``n`` GPUs (set ``gpus.count``)."""

    class Fake:
        count = 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: Fake.count)
    return Fake


def test_each_process_takes_its_local_ranks_gpu_among_those_it_sees(gpus):
    assert pick_device("auto", Dist(2, 1, 1)) == torch.device("cuda", 1)
    assert pick_device("cuda", Dist(2, 1, 1)) == torch.device("cuda", 1)
    gpus.count = 1  # a launcher that gives each process its own CUDA_VISIBLE_DEVICES
    assert pick_device("auto", Dist(2, 1, 1)) == torch.device("cuda", 0)


def test_more_processes_than_gpus_on_a_node_are_refused(gpus):
    gpus.count = 2
    with pytest.raises(TrainConfigError, match="process 2 on this node sees 2 GPU"):
        pick_device("auto", Dist(4, 2, 2))


@pytest.mark.parametrize(("local", "gpus_seen", "expected"), [
    ("1", ("A", "B"), "cuda:1"), ("1", ("A",), "cuda:0"), ("0", (), "auto"),
])
def test_sharded_embedding_takes_the_same_gpu_as_training(monkeypatch, local, gpus_seen, expected):
    from cavmae.cli.embed_cmd import _torchrun_device
    from cavmae.runtime import hardware

    monkeypatch.setenv("LOCAL_RANK", local)
    monkeypatch.setattr(hardware, "gpu_names", lambda: gpus_seen)
    assert _torchrun_device("auto", "auto") == expected


def test_one_gpu_named_for_several_processes_is_refused(gpus):
    with pytest.raises(TrainConfigError, match="each process then takes the GPU of its LOCAL_RANK"):
        pick_device("cuda:0", Dist(2, 1, 1))
    assert pick_device("cuda:1", Dist()) == torch.device("cuda", 1)
    with pytest.raises(TrainConfigError, match="sees 2 GPU"):
        pick_device("cuda:2", Dist())


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch, native, expected):
    asked = []

    def bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native or including_emulation  # an older GPU: emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert precision_dtype("auto", torch.device("cuda", 0)) is expected
    assert asked == [False]


def test_a_resume_seeing_fewer_gpus_restores_the_states_it_can(gpus, monkeypatch):
    with monkeypatch.context() as m:  # this process's own states, so restoring them changes nothing
        m.setattr(torch.cuda, "is_available", lambda: False)
        saved = _rng_state()
    saved["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8  # saved on a machine with 8 GPUs
    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    _set_rng_state(saved)
    assert restored == [0, 1]


@pytest.mark.parametrize(("visible", "expected"), [
    (None, ("A", "B", "C")),
    ("2", ("C",)),
    ("2,0", ("C", "A")),
    ("1,7,0", ("B",)),  # CUDA stops at the first entry that names no GPU
    ("GPU-5d1c", ("NVIDIA GPU",)),
    ("", ()),
    ("0,0", ()),  # CUDA shows none when one is named twice
])
def test_the_gpus_a_process_sees_follow_cuda_visible_devices(visible, expected):
    assert _visible(("A", "B", "C"), visible) == expected


@pytest.mark.parametrize(("env", "speaks"), [
    ({}, True), ({"WORLD_SIZE": "2", "RANK": "0"}, True), ({"WORLD_SIZE": "2", "RANK": "1"}, False),
    ({"WORLD_SIZE": "1", "RANK": "3"}, True),
])
def test_only_rank_0_prints_a_torchrun_jobs_outcome(monkeypatch, env, speaks):
    from cavmae.cli.train_cmd import speaks_for_the_run

    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert speaks_for_the_run() is speaks
