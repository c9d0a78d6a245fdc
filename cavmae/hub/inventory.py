"""What the cache holds, when each item was last used, and removing items.

The cache root and its layout are :mod:`cavmae.hub.cache`'s; this module reads that layout:

- ``checkpoints/{name}.pth`` and label CSVs (one entry each; a ``.part`` file is an unfinished
  download);
- ``exports/{key}/`` one entry per export directory, sized with everything inside it (the
  optimized copies ONNX Runtime and TensorRT cache there, ``.ort/`` and ``.trt/``). Exports of
  one checkpoint share the graphs they have in common as hard links (``cavmae.export.graph_store``):
  such a file is counted once, in the first entry listed that holds it, as ``du`` does, and
  the later ones show it as ``shared``; so the sizes add up to the disk used. A hidden
  ``exports/.{key}.*`` directory is an export in progress or one a crash left behind;
- ``trt/`` TensorRT engines cached outside read-only export directories.

Only names cavmae writes are items: a released model's checkpoint or label CSV, an export key
directory, a TensorRT engine or timing cache. Anything else a user puts there is not listed,
so ``cache clear`` and ``prune`` never remove it.

Last use: an export directory's modification time, which ``mark_used`` sets each time the
runtime opens it; a file's later of access and modification time (``mark_used`` sets the access
time only, so a checkpoint's mtime, part of its hash memo key, never changes). Listing never
reads a file, so it does not count as a use.

Removal takes the same lock the writer of an item takes (download or export), without waiting:
an item being written right now is skipped, never pulled from under its writer. Plain stdlib.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from cavmae import fsio
from cavmae.errors import CavmaeError

from .cache import cavmae_home
from .download import lock_path, part_path
from .registry import cache_file_names

#: kinds of cache entries, in listing order
KINDS = ("checkpoint", "labels", "export", "trt-engine", "partial")
#: the names cavmae gives what it writes under exports/ and trt/ (anything else is the user's)
_EXPORT_KEY = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{12}$")  # runtime.loader: {sha[:16]}-{digest[:12]}
_EXPORT_STAGING = re.compile(r"^\.[0-9a-f]{16}-[0-9a-f]{12}\.\d+\.[0-9a-f]{8}\.(tmp|old)$")  # fsio.temp_sibling
_TRT_FILE = re.compile(r"^([a-z_]+-[0-9a-f]{16}\.engine|timing-.+\.cache)$")  # engines.trt.cache

#: top-level names under the cache root that ``clear`` removes (nothing else is touched, so a
#: $CAVMAE_HOME that also holds other files keeps them)
MANAGED = ("checkpoints", "exports", "trt", "hashes.json")


@dataclass(frozen=True)
class CacheEntry:
    """One removable item of the cache."""

    kind: str
    name: str
    path: Path
    size: int  # bytes, everything inside for a directory (a hard-linked file counted once)
    last_used: float  # seconds since the epoch
    detail: str = ""
    #: bytes of hard-linked files inside that an earlier entry of the listing counted
    shared: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind, "name": self.name, "path": str(self.path), "size_bytes": self.size,
            "shared_bytes": self.shared,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.last_used)),
            "detail": self.detail,
        }


# --- listing ---------------------------------------------------------------------------------


def _tree_size(path: Path, seen: set[tuple[int, int]] | None = None) -> tuple[int, int]:
    """(bytes, shared bytes) of the files under ``path``. A file with other hard links counts
    once: the first time it is met (its inode goes into ``seen``); met again, in this entry or
    a later one, its bytes are ``shared`` instead."""
    seen = set() if seen is None else seen
    total = shared = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    shared += st.st_size
                    continue
                seen.add(key)
            total += st.st_size
    return total, shared


def _file_used(st: os.stat_result) -> float:
    return max(st.st_atime, st.st_mtime)


def _export_detail(path: Path) -> tuple[str, str]:
    """(display name, detail) of an export directory, from its manifest (JSON only)."""
    try:
        data = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return path.name, "no readable manifest"
    source = data.get("source") or {}
    origin = source.get("name") or (Path(source["checkpoint"]).name if source.get("checkpoint") else "?")
    graphs, pending = data.get("graphs") or {}, data.get("pending") or []
    written = f", {len(graphs) - len(pending)} of {len(graphs)} graphs" if pending else ""
    return str(origin), f"{data.get('model_kind', '?')}, {data.get('precision', '?')}{written}, key {path.name}"


def _checkpoint_entries(folder: Path) -> Iterator[CacheEntry]:
    ours = cache_file_names()
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if not p.is_file() or p.name.removesuffix(".part") not in ours:
            continue
        st = p.stat()
        if p.name.endswith(".part"):
            yield CacheEntry("partial", p.name[: -len(".part")], p, st.st_size, st.st_mtime, "unfinished download")
        elif p.suffix == ".csv":
            yield CacheEntry("labels", p.stem, p, st.st_size, _file_used(st), "label CSV")
        else:
            yield CacheEntry("checkpoint", p.stem, p, st.st_size, _file_used(st))


def _export_entries(folder: Path) -> Iterator[CacheEntry]:
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if not p.is_dir() or p.is_symlink() or not (_EXPORT_KEY.match(p.name) or _EXPORT_STAGING.match(p.name)):
            continue
        st = p.stat()
        if p.name.startswith("."):  # export_model's temporary sibling
            yield CacheEntry("partial", p.name, p, 0, st.st_mtime, "unfinished export")  # sized later
            continue
        name, detail = _export_detail(p)
        yield CacheEntry("export", name, p, 0, st.st_mtime, detail)


def _trt_entries(folder: Path) -> Iterator[CacheEntry]:
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if p.is_file() and _TRT_FILE.match(p.name):
            st = p.stat()
            yield CacheEntry("trt-engine", p.name, p, st.st_size, _file_used(st))


def list_cache(home: Path | None = None) -> list[CacheEntry]:
    """Every removable item under the cache root, by kind, then name."""
    home = cavmae_home() if home is None else home
    entries = [
        *_checkpoint_entries(home / "checkpoints"),
        *_export_entries(home / "exports"),
        *_trt_entries(home / "trt"),
    ]
    entries.sort(key=lambda e: (KINDS.index(e.kind), e.name, str(e.path)))
    seen: set[tuple[int, int]] = set()  # hard-linked files already counted
    for i, e in enumerate(entries):
        if e.path.is_dir():
            size, shared = _tree_size(e.path, seen)
            entries[i] = replace(e, size=size, shared=shared)
    return entries


# --- last use --------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        return False
    return True


def mark_used(*paths: Path) -> None:
    """Record that cache items were used now (paths outside the cache root are left alone).

    A directory gets a new mtime; a file a new access time with its mtime kept to the
    nanosecond. Failures (read-only cache) are ignored: last use is advice, not state.
    """
    home = cavmae_home()
    now = time.time_ns()
    for path in paths:
        if not _inside(path, home):
            continue
        try:
            if path.is_dir():
                os.utime(path, ns=(now, now))
            else:
                os.utime(path, ns=(now, path.stat().st_mtime_ns))
        except OSError:
            pass


# --- removal ---------------------------------------------------------------------------------

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``"30d"`` -> seconds. Units: s, m (minutes), h, d, w."""
    m = _AGE.match(text.lower())
    if not m:
        raise CavmaeError(f"cannot read the age {text!r}: use a number and a unit s, m, h, d or w (e.g. 30d, 12h)")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def older_than(entries: Iterable[CacheEntry], seconds: float, now: float | None = None) -> list[CacheEntry]:
    """The entries last used more than ``seconds`` ago."""
    now = time.time() if now is None else now
    return [e for e in entries if now - e.last_used > seconds]


def _writer_lock(entry: CacheEntry) -> Path:
    """The lock file the writer of ``entry`` holds while writing it."""
    if entry.path.parent.name == "exports":
        # a hidden directory is an export in progress (fsio.temp_sibling names it after its key)
        key = fsio.temp_owner(entry.path.name) or entry.path.name
        return entry.path.with_name(key + ".lock")
    if entry.path.name.endswith(".part"):
        return lock_path(entry.path.with_name(entry.path.name[: -len(".part")]))
    return lock_path(entry.path)


def freed_bytes(entries: Iterable[CacheEntry]) -> int:
    """The bytes that removing ``entries`` gives back: a hard-linked file only when every link
    to it is inside them (a graph another export still links stays on disk)."""
    links: dict[tuple[int, int], list[int]] = {}  # inode -> [links met, nlink, size]
    total = 0
    for entry in entries:
        walk = os.walk(entry.path) if entry.path.is_dir() else [(str(entry.path.parent), [], [entry.path.name])]
        for root, _dirs, files in walk:
            for f in files:
                try:
                    st = os.lstat(os.path.join(root, f))
                except OSError:
                    continue
                if st.st_nlink <= 1:
                    total += st.st_size
                    continue
                seen = links.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_size])
                seen[0] += 1
    return total + sum(size for met, nlink, size in links.values() if met >= nlink)


def remove_entries(entries: Iterable[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Delete ``entries``; returns (removed, skipped because a process is writing them)."""
    removed: list[CacheEntry] = []
    busy: list[CacheEntry] = []
    for entry in entries:
        try:
            with fsio.exclusive_lock(_writer_lock(entry), timeout=0):
                if entry.path.is_dir():
                    shutil.rmtree(entry.path)
                else:
                    entry.path.unlink(missing_ok=True)
                    # an unfinished download of a removed checkpoint goes with it
                    if entry.kind == "checkpoint":
                        part_path(entry.path).unlink(missing_ok=True)
        except fsio.LockBusyError:
            busy.append(entry)
            continue
        except OSError as e:
            raise CavmaeError(f"cannot remove {entry.path}: {e.strerror or e}") from None
        removed.append(entry)
    return removed, busy


def clear_cache(home: Path | None = None) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove every cache item, then the hash memo; returns (removed, busy) like ``remove_entries``."""
    home = cavmae_home() if home is None else home
    removed, busy = remove_entries(list_cache(home))
    if not busy:
        (home / "hashes.json").unlink(missing_ok=True)
    return removed, busy


def format_size(n: float) -> str:
    """``1_400_000_000`` -> ``"1.3 GB"`` (binary multiples, as ``du -h``)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def format_age(seconds: float) -> str:
    """How long ago, roughly: ``"5 min"``, ``"3 h"``, ``"12 days"``."""
    seconds = max(0.0, seconds)
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} days"
