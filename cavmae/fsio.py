"""File-system mechanisms every layer shares: atomic writes, publishing a directory, file hashes,
exclusive locks. Plain standard library (no torch, no numpy), so the torch-free runtime and the
hub use it too. The cache root (``$CAVMAE_HOME``) is :func:`cavmae.hub.cache.cavmae_home`.

Atomic writes. A file is written under a temporary sibling name, flushed and fsynced, renamed
over its final name with ``os.replace``, and then its directory is fsynced. A reader sees the old
file or the complete new one, never a part; a crash at any point leaves the old file (and at
worst a stray temporary, see :func:`temp_sibling`).

- The temporary name is unique per writer (``.{name}.{pid}.{random}.tmp``), so concurrent
  writers of one file (shards sharing the cache) never write into each other's temporary; the
  last rename wins, whole.
- The file is fsynced before the rename, else a crash soon after could leave the *new* name
  pointing at an empty or partly written file (delayed allocation on ext4/xfs).
- The directory is fsynced after the rename, always (decided once, here): without it the rename
  itself may be lost in a crash while later writes survive, so an order between files (index
  chunks before the ``index.json`` naming them, a checkpoint before the run state that names it)
  would not hold. It costs one more fsync per published file; the files written here are few
  and large (checkpoints, exports, result files rewritten at most every few seconds), so the
  simple rule wins over a per-caller choice.
- Files get the usual permissions (umask), not the 0600 of ``mkstemp``: exports, checkpoints
  and results are meant to be shared.
- Missing parent directories are created.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import CavmaeError

log = logging.getLogger(__name__)

__all__ = [
    "LockBusyError",
    "atomic_open",
    "atomic_path",
    "exclusive_lock",
    "fsync_dir",
    "hash_file_into",
    "memo_sha256",
    "publish_dir",
    "publish_file",
    "sha256_file",
    "staged_dir",
    "temp_owner",
    "temp_siblings",
    "temp_sibling",
    "writable_dir",
    "write_bytes",
    "write_json",
    "write_text",
]

_CHUNK = 1 << 20
# ".{name}.{pid}.{8 hex}.{tmp|old}": see temp_sibling
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.(?:tmp|old)$")


# --- names -----------------------------------------------------------------------------------


def temp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A fresh hidden name beside ``path``: ``.{name}.{pid}.{8 random hex}.{tag}``.

    Beside, so the rename stays on one file system; pid and random part, so writers in other
    processes and threads never share it; hidden and ending in ``.tmp`` (``.old`` for a replaced
    directory on its way out), so listings skip it and cleanups can find it.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{tag}")


def temp_owner(name: str) -> str | None:
    """The final name a :func:`temp_sibling` name stands for, or None for any other name."""
    m = _TEMP_NAME.match(name)
    return m.group("name") if m else None


def temp_siblings(path: str | Path) -> list[Path]:
    """The :func:`temp_sibling` names beside ``path`` that stand for it: what writers of
    ``path`` left when they were killed, for a caller that holds ``path``'s lock to remove."""
    path = Path(path)
    try:
        return sorted(p for p in path.parent.iterdir() if temp_owner(p.name) == path.name)
    except OSError:
        return []


# --- durable renames -------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """Make renames inside directory ``path`` durable (best effort: some file systems refuse)."""
    if sys.platform == "win32":  # pragma: no cover - directories cannot be opened there
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    # read-only is enough on POSIX (and works on files we may not write, e.g. hard links);
    # Windows wants write access
    fd = os.open(path, os.O_RDWR if sys.platform == "win32" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: str | Path, dest: str | Path) -> None:
    """Fsync ``tmp`` (written by any means: a library writing to a path, a memory map), rename
    it over ``dest``, fsync the directory. ``tmp`` must be on ``dest``'s file system."""
    tmp, dest = Path(tmp), Path(dest)
    _fsync_file(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; published when the block ends.

    For writers that want a file name (``torch.save(obj, tmp)``, ``np.lib.format.open_memmap``,
    ONNX Runtime's optimized-model path). An exception in the block deletes the temporary and
    leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        publish_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a rename; a leftover after an error


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "wb", *, encoding: str | None = None, newline: str | None = None
) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, atomically: the file appears whole when the block ends
    without an exception, and not at all otherwise. ``mode`` is ``"wb"`` or ``"w"`` (text,
    UTF-8 unless ``encoding`` says otherwise)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); returns ``path``."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """``obj`` as JSON (``json.dumps(obj, indent=indent, **dumps)`` and a newline) at ``path``,
    atomically, in UTF-8; returns ``path``."""
    return write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


# --- directories -----------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    """Fsync every regular file under ``root`` and every directory, so what is published is on
    disk before the rename that publishes it. Symbolic links are left alone."""
    for current, _dirs, files in os.walk(root):
        for name in files:
            p = Path(current, name)
            if not p.is_symlink():
                with contextlib.suppress(OSError):  # e.g. a read-only hard link
                    _fsync_file(p)
        fsync_dir(current)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_dir(work: str | Path, dest: str | Path) -> Path:
    """Move the finished directory ``work`` to ``dest``, replacing what is there; returns ``dest``.

    Its files are fsynced first. An existing ``dest`` (directory, file or symlink) is renamed
    aside, ``work`` renamed into place, then the old one removed; if the move fails the old one
    is put back, so ``dest`` names the old or the new content at every moment, never a mix and,
    on one file system, never nothing. Where ``work`` lies on another file system (a
    repository that is a mount point) the move is a copy and not atomic.
    """
    work, dest = Path(work), Path(dest)
    _fsync_tree(work)
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = temp_sibling(dest, "old")
        os.replace(dest, old)
    try:
        try:
            os.replace(work, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            log.debug("%s is on another file system than %s: copying", work, dest)
            shutil.move(str(work), str(dest))
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    fsync_dir(dest.parent)
    if old is not None:
        _remove(old)
    return dest


def make_temp_dir(beside: str | Path) -> Path:
    """A new empty directory named by :func:`temp_sibling` next to ``beside``, with the usual
    permissions (umask; ``mkdtemp`` would make it private)."""
    path = temp_sibling(beside)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()  # fails if the name exists: the random part makes that a real surprise
    return path


@contextlib.contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``dest`` to fill; published to ``dest`` with
    :func:`publish_dir` when the block ends, deleted with everything in it on an exception."""
    work = make_temp_dir(dest)
    try:
        yield work
        publish_dir(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def probe_writable(path: str | Path) -> None:
    """Raise ``OSError`` (naming the path) unless a file can be written at ``path``: its folder
    is made when missing and a probe file created and removed there. For checking an output
    before long work, so a read-only or mistyped folder fails first, not last."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    for folder in path.parents:  # the nearest existing one must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(folder))
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = temp_sibling(path, "probe")
    probe.write_bytes(b"")
    probe.unlink()


def probe_dir(path: str | Path) -> None:
    """Raise ``OSError`` (naming the path) unless files can be created in the folder ``path``.
    The folders made to find out are removed again, so checking an output before long work
    leaves nothing behind when the work is then refused for another reason."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    try:
        probe_writable(path / "probe")
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not made after all, or no longer empty: not ours to remove
                break


def writable_dir(path: str | Path) -> bool:
    """True when ``path`` is (or can be made) a directory we can create files in.

    Tries for real instead of trusting ``os.access``: root ignores permission bits but not
    read-only mounts, and a file squatting on the name must count as "not writable".
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_sibling(path / "probe")
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError as e:
        log.debug("%s is not writable: %s", path, e)
        return False


# --- hashes ----------------------------------------------------------------------------------


def hash_file_into(h: Any, path: str | Path, chunk_size: int = _CHUNK) -> None:
    """Feed the bytes of ``path`` into the hash object ``h`` (``hashlib``-like), in chunks."""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)


def json_sha256(facts: Any) -> str:
    """Hex SHA-256 of ``facts`` as canonical JSON (sorted keys; ``str`` for what JSON lacks): the
    one way this project names a set of facts (cache keys, graph identities, template keys)."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    hash_file_into(h, path, chunk_size)
    return h.hexdigest()


def memo_sha256(path: str | Path, memo: str | Path) -> str:
    """:func:`sha256_file` remembered in the JSON file ``memo``, keyed by (resolved path, size,
    mtime in ns), so a large file is hashed once until it changes.

    The memo is advice: an unreadable one is ignored, one that cannot be written is logged, and
    two processes adding entries at once may lose one (it is hashed again next time).
    """
    path, memo = Path(path), Path(memo)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    digest = known.get(key)
    if not isinstance(digest, str):
        digest = known[key] = sha256_file(path)
        try:
            write_json(memo, known, indent=0)
        except OSError as e:
            log.debug("cannot write the hash memo %s: %s", memo, e)
    return digest


# --- locks -----------------------------------------------------------------------------------


class LockBusyError(CavmaeError):
    """Another process (or another open of the file in this process) holds the lock."""


def _try_lock(fd: int) -> bool:
    """Lock ``fd`` exclusively without waiting; False when someone else holds it."""
    try:
        if sys.platform == "win32":  # pragma: no cover - not tested on Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
            return False
        raise


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, *, timeout: float | None = None, remove: bool = True
) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed) for the ``with`` body.

    ``timeout``: seconds to wait for another holder (``None`` as long as it takes, ``0`` not at
    all); then :class:`LockBusyError`. The kernel drops the lock when its holder dies, however
    it dies, so a crash never leaves a stale lock. ``flock`` is per open file, so two opens in
    one process (threads) exclude each other too.

    ``remove=True`` deletes the lock file on release (a cache stays free of ``.lock`` files). A
    waiter may have opened the file just before it was removed, so after locking a waiter checks
    that the path still names the file it locked, and starts over otherwise: two holders never
    coexist. ``remove=False`` leaves it (a directory whose layout names its lock file).
    Other OS errors (a read-only directory) propagate as ``OSError``.
    """
    path = Path(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while not _try_lock(fd):
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockBusyError(f"{path} is held by another process")
                time.sleep(0.05)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the file we locked was removed by the previous holder: retry
    try:
        yield
    finally:
        if remove and sys.platform != "win32":  # Windows cannot remove an open file
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)  # closing releases the lock
