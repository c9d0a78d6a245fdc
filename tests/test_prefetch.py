"""cavmae.prefetch: order, bound on items in flight, errors delivered with their item."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from cavmae.prefetch import Fetched, prefetch


class _Tracker:
    """Counts items submitted and not yet consumed; records the highest count seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = 0
        self.consumed = 0
        self.peak = 0
        self.threads: set[str] = set()

    def work(self, x: int) -> int:
        with self.lock:
            self.started += 1
            self.peak = max(self.peak, self.started - self.consumed)
            self.threads.add(threading.current_thread().name)
        # later items finish first, so ordering is really exercised
        time.sleep(0.002 * (x % 3))
        return x * x

    def consume(self) -> None:
        with self.lock:
            self.consumed += 1


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_in_input_order(workers: int) -> None:
    got = list(prefetch(lambda x: x * 10, range(20), workers=workers))
    assert [g.item for g in got] == list(range(20))
    assert [g.value for g in got] == [x * 10 for x in range(20)]
    assert all(g.ok and g.error is None for g in got)


@pytest.mark.parametrize(("workers", "ahead", "bound"), [(2, None, 4), (3, 2, 2), (1, 1, 1)])
def test_at_most_ahead_items_in_flight(workers: int, ahead: int | None, bound: int) -> None:
    t = _Tracker()
    out = []
    for got in prefetch(t.work, range(30), workers=workers, ahead=ahead, thread_name="pf-test"):
        time.sleep(0.001)  # a slow consumer: threads would run far ahead if unbounded
        out.append(got.unwrap())
        t.consume()  # released: the next item may now be taken
    assert out == [x * x for x in range(30)]
    assert 1 <= t.peak <= bound
    assert all(name.startswith("pf-test") for name in t.threads)


def test_input_is_read_lazily() -> None:
    pulled: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            pulled.append(i)
            yield i

    it = prefetch(lambda x: x, items(), workers=2, ahead=3)
    assert pulled == []  # nothing happens before the first next()
    assert next(it).value == 0
    assert len(pulled) == 3  # the window: nothing more until the consumer asks again
    it.close()


def test_exception_is_delivered_with_its_item_and_iteration_goes_on() -> None:
    def fn(x: int) -> int:
        if x % 4 == 1:
            raise ValueError(f"bad {x}")
        return x

    for workers in (0, 2):
        got = list(prefetch(fn, range(10), workers=workers))
        assert [g.item for g in got] == list(range(10))
        bad = [g for g in got if not g.ok]
        assert [g.item for g in bad] == [1, 5, 9]
        assert all(isinstance(g.error, ValueError) and g.value is None for g in bad)
        assert str(bad[0].error) == "bad 1"
        with pytest.raises(ValueError, match="bad 5"):
            bad[1].unwrap()
        assert [g.value for g in got if g.ok] == [0, 2, 3, 4, 6, 7, 8]


def test_base_exception_is_not_captured() -> None:
    def fn(x: int) -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(prefetch(fn, [1], workers=0))


def test_early_close_stops_submitting() -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            calls.append(x)
        return x

    it = prefetch(fn, range(1000), workers=2, ahead=4)
    assert next(it).item == 0
    it.close()  # waits for the threads; nothing new is submitted after close
    assert len(calls) <= 4


def test_empty_input_and_fetched_type() -> None:
    assert list(prefetch(lambda x: x, [], workers=3)) == []
    f: Fetched[str, int] = Fetched("a", value=None)
    assert f.ok and f.unwrap() is None
