"""How this process's C heap (glibc malloc) treats freed memory: one policy per kind of process.

Both are set with ``mallopt`` and are no-ops where the C library has none (not glibc).

- :func:`keep_freed_memory`, for one-shot commands that load or export a model: freed memory
  stays in the process for the next allocation. glibc's default hands every block over 32 MB
  back to the kernel when it is freed, so each large buffer of an export (the serialized
  graph, its copies, ONNX Runtime's arenas) is new memory whose pages the kernel zeroes on
  first touch: 1.9 million minor page faults in one first use of a full-size checkpoint.
  Kept, they were 1.4 million, and the first use took 17.0-17.6 s instead of 17.8-19.2 s
  (three pairs taking turns on a 2-core Xeon, benchmarks/README.md, "First use"). The price:
  the process does not shrink back after its peak. Over a long batch it does not creep either:
  `cavmae classify` over 60 clips (tiny model, decoding on 2 threads) held 458 -> 465 MB kept,
  392 -> 434 MB with glibc's default (2-core EPYC, one run each).
  Such a process is also not torn down at its end (:func:`is_one_shot`): the console script
  ends it once its output is flushed, without freeing the model's memory object by object or
  running the libraries' exit handlers, which took about 0.5 s of a full-size first use
  (2-core EPYC: exit 12.8 s after the start instead of 13.3 s, one pair of runs).
- :func:`steady_heap`, for the long-running server: request-sized buffers go back to the
  system when freed, so memory stays flat over hours of requests (see the function).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8

#: never give the top of the heap back (64 GiB: more than any machine this runs on holds)
_NEVER_TRIM = 64 << 30
#: grow the heap by this much more than asked, so growth takes fewer system calls
_TOP_PAD = 64 << 20


def _mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "mallopt", None)


#: set by keep_freed_memory: this process runs one command and ends
_one_shot = False


def is_one_shot() -> bool:
    """Whether :func:`keep_freed_memory` made this a one-shot process (see the module doc)."""
    return _one_shot


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never shrink it, and mark the process as
    one-shot (see the module doc). True when the C library took the settings."""
    global _one_shot
    _one_shot = True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success; all three are needed (mmap off alone still trims the top)
    return all([mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM), mallopt(M_TOP_PAD, _TOP_PAD)])


def steady_heap() -> bool:
    """Make glibc return request-sized buffers to the system once they are freed.

    Each request allocates a few MB of frames and spectrograms on several threads. glibc's
    default raises its mmap threshold after such buffers are freed and serves the next ones from
    per-thread arenas, which then stay large: a long-running server's memory creeps up by tens
    of percent without leaking. A fixed 1 MB threshold and two arenas keep it flat (measured by
    benchmarks/serve_load.py). True when the C library took the settings.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return all([mallopt(M_MMAP_THRESHOLD, 1 << 20), mallopt(M_ARENA_MAX, 2)])
