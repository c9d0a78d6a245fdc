"""Durable writes and the writer's lock for an index directory.

Every file an index names is written under a ``.tmp`` name, fsynced and renamed, so a process
killed at any point leaves only complete files behind (the writer deletes stray ``.tmp`` files
when it next opens the directory; one writer per directory, enforced by :func:`locked`, makes
the fixed ``.tmp`` name safe).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .layout import LOCK_NAME, EmbeddingIndexError


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (best effort)."""
    if sys.platform == "win32":  # pragma: no cover - directories cannot be fsynced there
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tmp_path(path: Path) -> Path:
    """The name ``path`` is written under before the rename."""
    return path.with_name(path.name + ".tmp")


def write_bytes_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a tmp file, fsync, rename into place."""
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, replaced atomically and durably."""
    data = (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    write_bytes_atomic(path, lambda f: f.write(data))
    fsync_dir(path.parent)


def replace_fsynced(tmp: Path, dest: Path) -> None:
    """Fsync ``tmp`` (written by other means, e.g. a memmap) and rename it to ``dest``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory/.lock`` exclusively, or fail at once when another process holds it.

    The lock file stays in place (removing it would race with a waiter); the lock itself is
    released by the OS when the process ends, however it ends.
    """
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            if sys.platform == "win32":  # pragma: no cover
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EmbeddingIndexError(
                f"{directory} is being written by another process; wait for it to finish (each"
                " process of a sharded job needs its own --shard i/n)"
            ) from None
        yield
    finally:
        os.close(fd)
