"""The writer's lock of an index directory.

Every file an index names is written with :mod:`cavmae.fsio` (a unique temporary name, fsynced,
renamed, the directory fsynced), so a process killed at any point leaves only complete files
behind; the writer deletes stray ``.tmp`` files when it next opens the directory, which is safe
because :func:`locked` allows one writer per directory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cavmae import fsio

from .layout import LOCK_NAME, EmbeddingIndexError


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory/.lock`` exclusively, or fail at once when another process holds it.

    The lock file stays in place (the layout names it); the lock itself is released by the OS
    when the process ends, however it ends.
    """
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(fsio.exclusive_lock(directory / LOCK_NAME, timeout=0, remove=False))
        except fsio.LockBusyError:
            raise EmbeddingIndexError(
                f"{directory} is being written by another process; wait for it to finish (each"
                " process of a sharded job needs its own --shard i/n)"
            ) from None
        yield
