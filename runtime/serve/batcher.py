"""A dynamic batcher: requests queue up and one thread runs them through the model in batches.

As Triton's dynamic batcher: a batch is started when it holds ``max_batch`` clips or when its
oldest request has waited ``max_wait`` seconds, whichever comes first. Only jobs with the same
``key`` (task and its options) share a model call; others wait for their own turn, in arrival
order. The queue is bounded (``max_queue`` jobs): :meth:`DynamicBatcher.submit` raises
:class:`QueueFull` instead of letting it grow.

The model runs on this one thread only: engines need not be thread-safe, and a batch uses all
the intra-op threads of the engine, so two batches at once would only compete for cores.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: ``run(key, payloads) -> one result per payload``, called on the batcher thread
RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """The batch queue holds ``max_queue`` jobs already."""


class BatcherStopped(Exception):
    """The batcher was stopped (the server is shutting down)."""


@dataclass
class _Job:
    key: Hashable
    payload: Any
    size: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Collects jobs into batches and runs them on one thread with ``run``."""

    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch: int,
        max_wait: float,
        max_queue: int,
        on_batch: Callable[[Hashable, int, float], None] | None = None,
    ) -> None:
        self._run = run
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the request side -----------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Jobs waiting for the model (not counting the batch running now)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, key: Hashable, payload: Any, size: int = 1) -> Future:
        """Queue one job of ``size`` clips; its future gets ``run``'s result for ``payload``."""
        job = _Job(key, payload, max(1, size))
        with self._cond:
            if self._stopping or self._thread is None:
                raise BatcherStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting for the model")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="cavmae-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the batch running now; jobs still queued fail with ``BatcherStopped``."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherStopped("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the model thread -----------------------------------------------------------------------
    def _next_batch(self) -> list[_Job] | None:
        """Wait for a batch (full, or its first job waited ``max_wait``); None when stopping."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue[0]
            deadline = first.enqueued + self.max_wait
            while not self._stopping:
                waiting = sum(j.size for j in self._queue if j.key == first.key)
                remaining = deadline - time.monotonic()
                if waiting >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            batch: list[_Job] = []
            total = 0
            for job in list(self._queue):
                if job.key != first.key:
                    continue
                if batch and total + job.size > self.max_batch:
                    break
                batch.append(job)
                total += job.size
            for job in batch:
                self._queue.remove(job)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # a request that timed out while queued has cancelled its future: skip it
            live = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if live:
                self._execute(live)

    def _execute(self, jobs: list[_Job]) -> None:
        key = jobs[0].key
        start = time.monotonic()
        try:
            results = self._run(key, [j.payload for j in jobs])
            if len(results) != len(jobs):
                raise RuntimeError(f"batch of {len(jobs)} jobs gave {len(results)} results")
        except Exception as e:
            if len(jobs) > 1:
                # one bad job must not fail the others: run each alone to find it
                log.info("batch of %d failed (%s); running its jobs one by one", len(jobs), e)
                for job in jobs:
                    self._execute([job])
                return
            jobs[0].future.set_exception(e)
            return
        finally:
            if self._on_batch is not None:
                self._on_batch(key, sum(j.size for j in jobs), time.monotonic() - start)
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
