"""Progress of long work: a bar on an interactive stderr, one line per step everywhere else.

Every progress display of the project goes through :func:`progress_bar`:

- stderr is a terminal: a tqdm bar (cleared when done);
- stderr is a pipe or a log file: no bar (its carriage returns make a log unreadable) but a
  plain line such as ``classify: 3/20 clips, 12 s, ~68 s left`` after the first step, the
  last one, and in between at most one every ``CAVMAE_PROGRESS_INTERVAL`` seconds
  (default 10; ``log_interval=0`` logs every step), so a log shows the job is alive;
- not requested, or ``CAVMAE_NO_PROGRESS`` set: nothing.

Output written while a bar is on screen goes through :func:`bar_paused`, so that results and
the bar never share a line.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "LineProgress", "bar_paused", "progress_bar", "progress_enabled", "progress_note", "progress_style",
]

#: seconds between two progress lines in a log, unless the caller or the environment says
DEFAULT_LOG_INTERVAL = 10.0


def progress_style(requested: bool = True) -> str | None:
    """``"bar"`` (a terminal), ``"lines"`` (a pipe or log) or None (asked not to show any)."""
    if not requested or os.environ.get("CAVMAE_NO_PROGRESS"):
        return None
    return "bar" if _isatty(sys.stderr) else "lines"


def progress_enabled(requested: bool = True) -> bool:
    """Whether a bar is drawn: asked for, stderr is a terminal and CAVMAE_NO_PROGRESS is unset."""
    return progress_style(requested) == "bar"


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    enabled: bool = True,
    log_interval: float | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm-like progress object on stderr (see the module docstring for what it shows).

    Takes tqdm's arguments (``total``, ``initial``, ``desc``, ``unit``, ``unit_scale`` ...) and
    offers its common interface: iteration, ``update``, ``set_postfix(_str)``, ``close`` and
    use as a context manager. ``log_interval``: the least seconds between two lines in a log.
    """
    style = progress_style(enabled)
    if style == "lines":
        return LineProgress(iterable, log_interval=log_interval, **kwargs)
    from tqdm import tqdm

    return tqdm(iterable, disable=style is None, file=sys.stderr, **kwargs)


def progress_note(message: str, *, enabled: bool = True) -> None:
    """One line on stderr for a log (stderr not a terminal), where no bar tells what runs."""
    if progress_style(enabled) == "lines":
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


@contextmanager
def bar_paused() -> Iterator[None]:
    """Clear the bars on screen while the caller prints, and redraw them after.

    Without it a result printed on stdout continues the line of a bar drawn on stderr.
    """
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:  # no bar was ever made
        yield
        return
    with tqdm_module.tqdm.external_write_mode(file=sys.stdout):
        yield
        sys.stdout.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _env_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("CAVMAE_PROGRESS_INTERVAL", DEFAULT_LOG_INTERVAL)))
    except ValueError:
        return DEFAULT_LOG_INTERVAL


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, s = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # unreachable; keeps type checkers content


class LineProgress:
    """Progress as plain lines on stderr, for logs and pipes; tqdm's interface, no bar."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: float | None = None,
        initial: float = 0,
        desc: str | None = None,
        unit: str = "it",
        unit_scale: bool = False,
        log_interval: float | None = None,
        **_ignored: Any,  # bar-only tqdm options (leave, ncols, unit_divisor ...)
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.n = iterable, total, initial
        self.desc, self.unit, self.unit_scale = desc or "progress", unit, unit_scale
        self.interval = _env_interval() if log_interval is None else log_interval
        self.postfix = ""
        self._initial = initial
        self._start = time.monotonic()
        self._last_line: float | None = None
        self._last_n = initial
        self._closed = False

    # -- tqdm's interface -------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        first = self._last_line is None
        last = self.total is not None and self.n >= self.total
        if first or last or now - (self._last_line or 0.0) >= self.interval:
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        """Nothing to redraw (tqdm compatibility)."""

    def close(self) -> None:
        """Log the final count once if the last step was not logged (a stop before the end)."""
        if self._closed:
            return
        self._closed = True
        if self.n != self._last_n:
            self._emit(time.monotonic())

    # -- the line ---------------------------------------------------------------------------
    def _count(self) -> str:
        if self.unit_scale and self.unit == "B":
            done = _size(self.n)
            return f"{done} of {_size(self.total)}" if self.total else done
        plural = self.unit if self.unit.endswith("s") or self.unit == "B" else self.unit + "s"
        done = f"{self.n:g}"
        return f"{done}/{self.total:g} {plural}" if self.total is not None else f"{done} {plural}"

    def _emit(self, now: float) -> None:
        elapsed = now - self._start
        parts = [self._count()]
        if self.postfix:
            parts.append(self.postfix)
        parts.append(_duration(elapsed))
        worked = self.n - self._initial
        if self.total is not None and 0 < worked and self.n < self.total:
            parts.append(f"~{_duration(elapsed / worked * (self.total - self.n))} left")
        sys.stderr.write(f"{self.desc}: {', '.join(parts)}\n")
        sys.stderr.flush()
        self._last_line, self._last_n = now, self.n
