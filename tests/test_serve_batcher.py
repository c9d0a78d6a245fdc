"""The dynamic batcher alone, with a fake model: batch formation, keys, bounds, failures."""

from __future__ import annotations

import threading

import pytest

from cavmae.runtime.serve.batcher import BatcherStopped, DynamicBatcher, QueueFull


class FakeModel:
    """Records each call's key and batch; can be held closed to let a queue build up."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list[object]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, key, payloads):
        self.entered.set()
        assert self.gate.wait(30)
        self.calls.append((key, list(payloads)))
        if any(p == "bad" for p in payloads):
            raise ValueError("bad payload")
        return [f"{key}:{p}" for p in payloads]


def started(model: FakeModel, **kw) -> DynamicBatcher:
    b = DynamicBatcher(model, **{"max_batch": 4, "max_wait": 0.05, "max_queue": 100, **kw})
    b.start()
    return b


def hold_first(model: FakeModel, batcher: DynamicBatcher) -> None:
    """Occupy the model thread so that the next jobs queue up together."""
    model.gate.clear()
    model.entered.clear()
    batcher.submit("warm", "x")
    assert model.entered.wait(10)


def test_queued_jobs_share_batches_up_to_max_batch():
    model = FakeModel()
    b = started(model)
    hold_first(model, b)
    futures = [b.submit("classify", i) for i in range(10)]
    model.gate.set()
    assert [f.result(10) for f in futures] == [f"classify:{i}" for i in range(10)]
    sizes = [len(p) for k, p in model.calls if k == "classify"]
    assert sizes == [4, 4, 2]
    b.stop()


def alternating_calls(max_batch: int, jobs: int) -> list[tuple[str, list[int]]]:
    """The model calls for ``jobs`` jobs, alternately classify and embed, queued while the
    model is busy."""
    model = FakeModel()
    b = started(model, max_batch=max_batch)
    hold_first(model, b)
    futures = [b.submit(("embed" if i % 2 else "classify"), i) for i in range(jobs)]
    model.gate.set()
    for f in futures:
        f.result(10)
    b.stop()
    return [(k, p) for k, p in model.calls if k != "warm"]


def test_max_batch_one_runs_jobs_alone_and_keys_do_not_mix():
    assert [len(p) for _, p in alternating_calls(1, 4)] == [1, 1, 1, 1]
    assert dict(alternating_calls(8, 6)) == {"classify": [0, 2, 4], "embed": [1, 3, 5]}


def test_a_lone_job_runs_after_max_wait_and_sizes_count_clips():
    model = FakeModel()
    b = started(model, max_batch=4, max_wait=0.01)
    assert b.submit("classify", "only").result(10) == "classify:only"
    hold_first(model, b)
    big = b.submit("classify", "windows", size=3)
    small = [b.submit("classify", i) for i in range(2)]
    model.gate.set()
    big.result(10)
    for f in small:
        f.result(10)
    assert [p for k, p in model.calls if k == "classify"][1:] == [["windows", 0], [1]]
    b.stop()


def test_bounded_queue_raises_queue_full():
    model = FakeModel()
    b = started(model, max_queue=3)
    hold_first(model, b)
    for i in range(3):
        b.submit("classify", i)
    with pytest.raises(QueueFull):
        b.submit("classify", 99)
    assert b.depth == 3
    model.gate.set()
    b.stop()


def test_a_failing_job_fails_alone():
    model = FakeModel()
    b = started(model)
    hold_first(model, b)
    futures = [b.submit("classify", p) for p in ("a", "bad", "c")]
    model.gate.set()
    assert futures[0].result(10) == "classify:a" and futures[2].result(10) == "classify:c"
    with pytest.raises(ValueError, match="bad payload"):
        futures[1].result(10)
    b.stop()


def test_cancelled_jobs_are_skipped_and_stop_fails_the_rest():
    model = FakeModel()
    b = started(model)
    hold_first(model, b)
    gone = b.submit("classify", "gone")
    assert gone.cancel()
    kept = b.submit("classify", "kept")
    model.gate.set()
    assert kept.result(10) == "classify:kept"
    assert all("gone" not in p for _, p in model.calls)
    hold_first(model, b)
    waiting = b.submit("classify", "late")
    threading.Timer(0.2, model.gate.set).start()
    b.stop()
    with pytest.raises(BatcherStopped):
        waiting.result(10)
    with pytest.raises(BatcherStopped):
        b.submit("classify", "after")
