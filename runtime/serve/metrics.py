"""Counters, gauges and histograms rendered in the Prometheus text format (version 0.0.4).

Written here rather than taken from ``prometheus_client`` to keep the ``serve`` extra light;
it holds only what ``/metrics`` shows. Thread-safe: the model thread records batch sizes while
the event loop records requests.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: request latency buckets in seconds (a tiny model answers in tens of ms, a full one on a CPU
#: in seconds)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = [*labels, extra] if extra else list(labels)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self._values.items())]


class Gauge:
    """A value read when the metrics are rendered (queue depths and the like)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_text, read

    def samples(self) -> list[str]:
        return [f"{self.name} {_number(self.read())}"]


class Histogram:
    """Observations counted into cumulative ``le`` buckets, per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket, [sum]
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * len(self.buckets), [0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
                    break
            total[0] += value

    def count(self, **labels: str) -> int:
        data = self._data.get(tuple(sorted(labels.items())))
        return sum(data[0]) if data else 0

    def mean(self, **labels: str) -> float | None:
        """The mean observation, or None before the first."""
        data = self._data.get(tuple(sorted(labels.items())))
        n = sum(data[0]) if data else 0
        return data[1][0] / n if data and n else None

    def samples(self) -> list[str]:
        out = []
        with self._lock:
            for key, (counts, total) in sorted(self._data.items()):
                running = 0
                for bound, c in zip(self.buckets, counts, strict=True):
                    running += c
                    out.append(f"{self.name}_bucket{_labels(key, ('le', _number(bound)))} {running}")
                out.append(f"{self.name}_sum{_labels(key)} {_number(total[0])}")
                out.append(f"{self.name}_count{_labels(key)} {running}")
        return out


class Metrics:
    """The service's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, max_batch: int) -> None:
        self.requests = Counter("cavmae_requests_total", "HTTP requests by endpoint and status code.")
        self.latency = Histogram("cavmae_request_duration_seconds",
                                 "Time from request start to the end of the response, by endpoint.",
                                 LATENCY_BUCKETS)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram("cavmae_batch_size", "Clips per model call.", sizes)
        self.model_seconds = Histogram("cavmae_batch_duration_seconds",
                                       "Time of one model call (a batch), by task.", LATENCY_BUCKETS)
        self._gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        lines: list[str] = []
        metrics: list[Counter | Histogram | Gauge] = [
            self.requests, self.latency, self.batch_size, self.model_seconds, *self._gauges
        ]
        for metric in metrics:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        return "\n".join(lines) + "\n"
