"""Ordered, bounded, threaded prefetch: run a function over items ahead of the consumer.

Decoding media releases the GIL, so a few threads keep a model busy while the next clips are
read. The one implementation for every batch job (embedding an index, evaluating a dataset):

- results come back in input order, whatever order the threads finish in;
- at most ``ahead`` items are in flight (taken from the input and not yet released by the
  consumer, the one it is holding included), so a long input list never sits decoded in
  memory, and the input iterable is read lazily;
- an ``Exception`` raised by ``fn`` is delivered with its item as :attr:`Fetched.error`
  instead of ending the iteration, so one bad file does not stop a batch job
  (``KeyboardInterrupt`` and other ``BaseException`` still propagate);
- closing the iterator early (``break``) cancels what was not started and waits for the rest.

Example::

    for got in prefetch(decode, paths, workers=4):
        if got.error is not None:
            report(got.item, got.error)
        else:
            use(got.value)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Fetched", "prefetch"]


@dataclass(frozen=True)
class Fetched(Generic[T, R]):
    """One item and what ``fn(item)`` gave: its ``value``, or the ``error`` it raised."""

    item: T
    value: R | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        """Whether ``fn(item)`` returned (``value`` may still be ``None`` if ``fn`` returned it)."""
        return self.error is None

    def unwrap(self) -> R:
        """The value, or the captured exception raised again."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # fn may legitimately return None


def _call(fn: Callable[[T], R], item: T) -> Fetched[T, R]:
    try:
        return Fetched(item, value=fn(item))
    except Exception as e:  # delivered with its item: the consumer decides what a failure means
        return Fetched(item, error=e)


def prefetch(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    ahead: int | None = None,
    thread_name: str = "cavmae-prefetch",
) -> Generator[Fetched[T, R], None, None]:  # a generator: close() stops the threads
    """``Fetched(item, fn(item) or its exception)`` for each item, in input order.

    ``workers`` threads call ``fn``; with ``workers <= 0`` it is called inline in the
    consumer's thread, one item at a time (no threads, same results). ``ahead`` bounds the
    items in flight (default ``2 * workers``, at least 1): an item counts from the moment it
    is taken from ``items`` until the consumer asks for the one after it.
    """
    if workers <= 0:
        for item in items:
            yield _call(fn, item)
        return
    window = max(1, 2 * workers if ahead is None else ahead)
    it = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name)
    try:
        pending: deque[Future[Fetched[T, R]]] = deque()

        def submit_next() -> None:
            for item in it:  # pulls at most one item: the input is read lazily
                pending.append(pool.submit(_call, fn, item))
                return

        while len(pending) < window:
            before = len(pending)
            submit_next()
            if len(pending) == before:
                break
        while pending:
            yield pending.popleft().result()
            # refill only once the consumer is back for more: the item it held counts as in
            # flight until then, so at most ``window`` items are ever held at once.
            submit_next()
    finally:
        # An early close must not leave threads working on items nobody will read.
        pool.shutdown(wait=True, cancel_futures=True)
