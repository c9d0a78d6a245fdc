"""Writing an index: buffered rows committed as chunks, small chunks merged by size tiers.

One writer per directory (``.lock``). A chunk's files are written under ``.tmp`` names, fsynced
and renamed before ``index.json`` (itself replaced atomically) lists the chunk, so a process
killed at any point leaves ``index.json`` naming only complete files; what it does not name is
deleted when the next writer opens the directory.

Opening a writer reads ``index.json`` only, and appending writes only new files: whether a path
is already in the index is a binary search of each part's ``keys.npy``, and the parts already
there are never rewritten just because rows were added. To keep the number of parts small,
parts of about the same size are merged (:data:`MERGE_FANOUT` of them into one, written as a new
chunk before ``index.json`` names it instead of them), so each row is copied once per size tier,
``log_F(N / commit_every)`` times over its life, instead of the whole index once per run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from cavmae import fsio

from .identity import check_compatible
from .items import PartItems
from .layout import (
    ARRAYS,
    CHUNK_RE,
    FORMAT_VERSION,
    META_NAME,
    SIDECARS,
    EmbeddingIndexError,
    Part,
    array_row_shape,
    check_new_index_dir,
    is_index,
    item_line,
    key_hash,
    line_offsets,
    load_npy,
    new_meta,
    new_uid,
    parse_frame,
    parts,
    path_key,
    read_meta,
    sorted_keys,
)
from .storage import locked

log = logging.getLogger(__name__)


def _check_arrays(path: Path, meta: dict[str, Any]) -> None:
    """Each part's arrays hold the rows, widths and types ``index.json`` says (memory-mapped:
    only the headers are read), and its items file reaches as far as its line offsets say (one
    ``stat``). Raises ``EmbeddingIndexError`` naming the damaged file."""
    for part in parts(meta):
        for what in ARRAYS:
            file = part.file(path, what)
            try:
                load_npy(file, part.count, *array_row_shape(what, int(meta["dim"])))
            except (OSError, ValueError) as e:
                raise EmbeddingIndexError(f"{file} is damaged: {e}") from None
        if int(meta["version"]) < 2:
            continue  # version 1 has no line offsets to compare with
        items = part.file(path, "items")
        try:
            end = int(load_npy(part.file(path, "offsets"), part.count + 1)[part.count])
            size = items.stat().st_size
        except (OSError, ValueError) as e:
            raise EmbeddingIndexError(f"{part.file(path, 'offsets')} is damaged: {e}") from None
        if size < end:
            raise EmbeddingIndexError(f"{items} is damaged: {size} bytes, its rows end at byte {end}")


@dataclass
class _Block:
    """Buffered rows: their items, ``audio``/``visual`` ``[n, D]`` (zeros where absent) and
    ``mask [n, 2]``."""

    items: list[dict[str, Any]]
    audio: np.ndarray
    visual: np.ndarray
    mask: np.ndarray

#: this many parts of one size tier (``floor(log_F(count))``) at the end are merged into one
MERGE_FANOUT = 8
_ALL_FILES = (*ARRAYS, "items", *SIDECARS)  # every file of a part


class IndexWriter:
    """Append rows to an index directory (created when missing); one writer at a time.

    Use as a context manager: rows are committed every ``commit_every`` rows and when the
    block ends; a normal end also compacts and marks the run ``finished``, an exception keeps
    the committed rows but leaves the index unfinished (re-running resumes it).

    Raises:
        EmbeddingIndexError: the directory holds an index of another model, dimension or frame
            choice, or another process is writing it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model: dict[str, Any],
        dim: int,
        frame: str | int = "middle",
        num_frames: int = 10,
        shard: tuple[int, int] | None = None,
        commit_every: int = 64,
    ) -> None:
        self.path = Path(path)
        self.commit_every = max(1, int(commit_every))
        self._stack = contextlib.ExitStack()
        if self.path.exists() and not self.path.is_dir():
            raise EmbeddingIndexError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(locked(self.path))
        try:
            want: dict[str, Any] = {
                "dim": int(dim), "frame": parse_frame(frame), "num_frames": int(num_frames)
            }
            if is_index(self.path):
                self.meta = read_meta(self.path)
                check_compatible(self.meta, model, **want, where=self.path)
                _check_arrays(self.path, self.meta)  # never add rows to a damaged index
            else:
                check_new_index_dir(self.path)
                self.meta = new_meta(model, want, shard)
            self._clean_orphans()
            if int(self.meta["version"]) < FORMAT_VERSION:
                self._migrate()
            self.meta["finished"] = False
            self._save_meta()
            self._stores: dict[str, PartItems] = {}  # part prefix -> its lookups
            self._refresh_stores()
        except BaseException:
            self._stack.close()
            raise
        self._buffer: list[_Block] = []
        self._buffered: set[str] = set()  # path keys of the buffered rows
        self._closed = False

    # -- state ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def count(self) -> int:
        """Rows committed plus rows buffered."""
        return int(self.meta["count"]) + len(self._buffered)

    def __contains__(self, path: str | Path) -> bool:
        return self._has_key(path_key(path))

    def _has_key(self, key: str) -> bool:
        """Whether ``key`` is buffered or in a committed part (a binary search per part)."""
        return bool(self._has_keys([key])[0])

    def _has_keys(self, keys: list[str]) -> np.ndarray:
        """bool ``[len(keys)]``: which path keys are buffered or in a committed part (one
        vectorized binary search per part; a key that is not there reads no item)."""
        found = np.array([k in self._buffered for k in keys], dtype=bool)
        for store in self._stores.values():
            left = np.flatnonzero(~found)
            if not len(left):
                break
            found[left] = store.find_many([keys[int(j)] for j in left]) >= 0
        return found

    def contains_many(self, paths: Sequence[str | Path]) -> np.ndarray:
        """bool ``[len(paths)]``: ``p in writer`` for each of ``paths``, checked together."""
        return self._has_keys([path_key(p) for p in paths])

    def _refresh_stores(self) -> None:
        """Lookups for the parts index.json lists now (kept for parts that did not change)."""
        current = {p.prefix: p for p in parts(self.meta)}
        self._stores = {
            prefix: self._stores[prefix]
            if prefix in self._stores and self._stores[prefix].part == part
            else PartItems(self.path, part, sidecars=True)
            for prefix, part in current.items()
        }

    def _migrate(self) -> None:
        """Give a version-1 index the offsets and keys files of version 2 (one scan of its
        items, once; the embeddings are not touched)."""
        for part in parts(self.meta):
            store = PartItems(self.path, part, sidecars=False)
            with fsio.atomic_open(part.file(self.path, "offsets")) as f:
                np.save(f, store.offsets)
            with fsio.atomic_open(part.file(self.path, "keys")) as f:
                np.save(f, np.ascontiguousarray(store.keys))
        self.meta["version"] = FORMAT_VERSION
        self.meta.setdefault("uid", new_uid())
        log.info("%s: added row offsets and path keys (index format %d)", self.path,
                 FORMAT_VERSION)

    def _save_meta(self) -> None:
        self.meta["updated"] = round(time.time(), 3)
        fsio.write_json(self.path / META_NAME, self.meta, indent=1, ensure_ascii=False)

    def _clean_orphans(self) -> None:
        """Delete chunk and tmp files that index.json does not name (left by a killed run)."""
        listed = {c["name"] for c in self.meta.get("chunks", [])}
        # base files of an index whose base rows were merged into a chunk (killed before
        # their removal)
        base = set() if self.meta.get("base_count") else {
            Part("", 0, 0).file(self.path, what).name for what in _ALL_FILES
        }
        for child in self.path.iterdir():
            name = child.name
            if not child.is_file():
                continue
            orphan = name.endswith(".tmp") or name in base or (
                CHUNK_RE.match(name) is not None and name.rsplit("-", 1)[0] not in listed
            )
            if orphan:
                log.info("removing %s left by an interrupted run", child)
                child.unlink(missing_ok=True)

    # -- adding rows ------------------------------------------------------------------------
    def add(
        self,
        path: str | Path,
        audio: np.ndarray | None,
        visual: np.ndarray | None,
        *,
        duration: float | None = None,
        **extra: Any,
    ) -> int:
        """Append one clip's embeddings (``[D]`` each, ``None`` for a missing modality).

        Returns the row number. A path already in the index is an error (callers skip them).
        """
        a = None if audio is None else np.asarray(audio, dtype=np.float32).reshape(1, -1)
        v = None if visual is None else np.asarray(visual, dtype=np.float32).reshape(1, -1)
        return self.add_many([path], a, v, durations=[duration], extra=[extra])

    def add_many(
        self,
        paths: Sequence[str | Path],
        audio: np.ndarray | None,
        visual: np.ndarray | None,
        *,
        has_audio: np.ndarray | None = None,
        has_video: np.ndarray | None = None,
        durations: Sequence[float | None] | None = None,
        extra: Sequence[dict[str, Any]] | None = None,
    ) -> int:
        """Append ``n`` clips at once: ``audio``/``visual`` ``[n, D]`` (None: no row has it),
        ``has_audio``/``has_video`` ``[n]`` bool (default: all rows of a given array). Checks
        are vectorized, so bulk appends (merging shards, benchmarks) cost little per row.

        Returns the first row number. Nothing is added when any row is refused.
        """
        if self._closed:
            raise EmbeddingIndexError("this writer is closed")
        n = len(paths)
        keys = [path_key(p) for p in paths]
        there = np.flatnonzero(self._has_keys(keys))
        if len(there):
            raise EmbeddingIndexError(f"{keys[int(there[0])]} is already in the index")
        if len(set(keys)) != n:
            raise EmbeddingIndexError("the same path twice in one append")
        arrays, masks = [], []
        for name, arr, has in (("audio", audio, has_audio), ("visual", visual, has_video)):
            arr, has = self._checked_block(keys, name, arr, has)
            arrays.append(arr)
            masks.append(has)
        mask = np.stack(masks, axis=1)
        empty = np.flatnonzero(~mask.any(axis=1))
        if len(empty):
            raise EmbeddingIndexError(f"{keys[int(empty[0])]}: no embedding to add")
        first = self.count
        durations = durations if durations is not None else [None] * n
        extra = extra if extra is not None else [{}] * n
        items = [{"row": first + j, "path": keys[j], "duration": durations[j],
                  "has_audio": bool(mask[j, 0]), "has_video": bool(mask[j, 1]), **extra[j]}
                 for j in range(n)]
        self._buffer.append(_Block(items, arrays[0], arrays[1], mask))
        self._buffered.update(keys)
        if len(self._buffered) >= self.commit_every:
            self.commit()
        return first

    def _checked_block(
        self, keys: list[str], name: str, arr: np.ndarray | None, has: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``arr`` as float32 ``[n, D]`` with zeros where ``has`` is false, and ``has``; or an
        error naming the first clip whose embedding does not fit."""
        n = len(keys)
        if arr is None:
            return np.zeros((n, self.dim), dtype=np.float32), np.zeros(n, dtype=bool)
        out = np.array(arr, dtype=np.float32).reshape(n, -1)
        has = np.ones(n, dtype=bool) if has is None else np.asarray(has, dtype=bool).reshape(n)
        if out.shape[1] != self.dim:
            raise EmbeddingIndexError(
                f"{keys[0]}: {name} embedding has dimension {out.shape[1]}, the index {self.dim}"
            )
        out[~has] = 0.0
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if len(bad):
            raise EmbeddingIndexError(f"{keys[int(bad[0])]}: {name} embedding is not finite")
        return out, has

    def commit(self) -> None:
        """Write buffered rows as a new chunk, record it in index.json, merge a full tier."""
        if not self._buffer:
            return
        items = [item for block in self._buffer for item in block.items]
        n = len(items)
        name = self._next_chunk_name()
        part = Part(f"{name}-", int(self.meta["count"]), n)
        for what in ARRAYS:
            arr = np.concatenate([getattr(block, what) for block in self._buffer])
            with fsio.atomic_open(part.file(self.path, what)) as f:
                np.save(f, arr)
        lines = [item_line(item) for item in items]
        fsio.write_bytes(part.file(self.path, "items"), b"".join(lines))
        hashes = np.array([key_hash(item["path"]) for item in items], np.uint64)
        self._write_sidecars(part, line_offsets(lines), sorted_keys(hashes))
        self.meta["chunks"] = [*self.meta["chunks"], {"name": name, "count": n}]
        self.meta["count"] = int(self.meta["count"]) + n
        self._save_meta()
        self._buffer.clear()
        self._buffered.clear()
        self._refresh_stores()
        self._merge_tiers()

    def _next_chunk_name(self) -> str:
        name = f"chunk-{int(self.meta['next_chunk']):05d}"
        self.meta["next_chunk"] = int(self.meta["next_chunk"]) + 1
        return name

    def _write_sidecars(self, part: Part, offsets: np.ndarray, keys: np.ndarray) -> None:
        for what, arr in (("offsets", offsets), ("keys", keys)):
            with fsio.atomic_open(part.file(self.path, what)) as f:
                np.save(f, arr)

    def _merge_tiers(self) -> None:
        """Merge the tail parts while :data:`MERGE_FANOUT` of them share a size tier or less.

        For the smallest tier ``t`` whose tail (the last parts, all of tier <= ``t``) holds
        ``MERGE_FANOUT`` parts, that tail becomes one part; a short chunk left by an earlier run
        is taken along with the next tier's merge. The tails left have fewer parts than the
        fanout for every tier, so an index has fewer than ``F * (log_F(N) + 1)`` parts.
        """
        while True:
            listed = parts(self.meta)
            tiers = [_tier(p.count) for p in listed]
            for t in sorted(set(tiers)):
                j = len(listed)
                while j > 0 and tiers[j - 1] <= t:
                    j -= 1
                if len(listed) - j >= MERGE_FANOUT:
                    self._merge_parts(listed, j)
                    break
            else:
                return

    def compact(self) -> None:
        """Merge every part into one (fewest files; copies the whole index once)."""
        self.commit()
        listed = parts(self.meta)
        if len(listed) > 1:
            self._merge_parts(listed, 0)

    def _merge_parts(self, listed: list[Part], j: int) -> None:
        """Replace parts ``listed[j:]`` by one new chunk holding their rows (a new file name,
        so a kill leaves the old parts listed and the new files orphans)."""
        merged = listed[j:]
        total = sum(p.count for p in merged)
        name = self._next_chunk_name()
        out = Part(f"{name}-", merged[0].start, total)
        for what in ARRAYS:
            self._merge_array(what, merged, out)
        offsets = [np.zeros(1, dtype=np.int64)]
        hashes, shift = [], 0
        with fsio.atomic_open(out.file(self.path, "items")) as f:
            for p in merged:
                store = self._stores[p.prefix]
                size = int(store.offsets[-1])
                with open(store.file, "rb") as src:
                    _copy_bytes(src, f, size)
                offsets.append(np.asarray(store.offsets[1:]) + shift)
                keys = np.asarray(store.keys)
                h = np.empty(p.count, dtype=np.uint64)
                h[keys[1].astype(np.int64)] = keys[0]  # back to row order
                hashes.append(h)
                shift += size
        self._write_sidecars(out, np.concatenate(offsets), sorted_keys(np.concatenate(hashes)))
        old = [p for p in merged]
        if any(p.prefix == "" for p in old):
            self.meta["base_count"] = 0
        names = {p.prefix[:-1] for p in old if p.prefix}
        self.meta["chunks"] = [c for c in self.meta["chunks"] if c["name"] not in names]
        self.meta["chunks"].append({"name": name, "count": total})
        self._save_meta()
        for p in old:
            for what in _ALL_FILES:
                p.file(self.path, what).unlink(missing_ok=True)
        self._refresh_stores()

    def _merge_array(self, what: str, merged: list[Part], out: Part) -> None:
        """Write ``what`` of part ``out`` as the rows of ``merged``, in order."""
        row_shape, dtype = array_row_shape(what, self.dim)
        with fsio.atomic_path(out.file(self.path, what)) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(out.count, *row_shape))
            at = 0
            for p in merged:
                arr[at : at + p.count] = load_npy(p.file(self.path, what), p.count, row_shape, dtype)
                at += p.count
            arr.flush()
            del arr  # unmap before the fsync and rename

    def close(self, *, finished: bool = True, compact: bool = False) -> None:
        """Commit, optionally compact, record whether the run finished, release the lock."""
        if self._closed:
            return
        try:
            self.commit()
            if compact:
                self.compact()
            self.meta["finished"] = bool(finished)
            self._save_meta()
        finally:
            self._closed = True
            self._stack.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was embedded; the next run resumes
            self.close(finished=False)


def _tier(count: int) -> int:
    """``floor(log_F(count))`` for :data:`MERGE_FANOUT` ``F``: parts of one tier differ in
    size by less than a factor ``F``."""
    tier = 0
    while count >= MERGE_FANOUT:
        count //= MERGE_FANOUT
        tier += 1
    return tier


def _copy_bytes(src: IO[bytes], dst: IO[bytes], size: int, block: int = 1 << 20) -> None:
    """Copy the first ``size`` bytes of ``src`` (a base file may hold more) to ``dst``."""
    left = size
    while left:
        data = src.read(min(block, left))
        if not data:
            raise EmbeddingIndexError(f"{getattr(src, 'name', src)} is shorter than its offsets")
        dst.write(data)
        left -= len(data)
