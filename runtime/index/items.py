"""The items of one part, by row and by path, without reading the whole ``items.jsonl``.

Since format version 2 each part has two small files beside its ``items.jsonl``:

- ``offsets.npy``: int64 ``[count + 1]``, where each row's line starts, then where the last
  one ends. Looking up ``k`` rows reads ``k`` lines (one ``pread`` each).
- ``keys.npy``: uint64 ``[2, count]``, the 64-bit hashes of the rows' paths sorted (row 0)
  and the local row of each (row 1). Whether a path is in the part is a binary search of the
  memory-mapped hashes and one line read to rule out a collision (:meth:`PartItems.find_many`
  does it for many paths in one vectorized search; a path that is not there reads nothing).

A version-1 part has neither; it is scanned once, on first use, to build both in memory (the
writer writes them when it first opens such an index, so this happens only for indexes that
are read and never written again by this version).
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .layout import (
    EmbeddingIndexError,
    Part,
    key_hash,
    line_offsets,
    load_npy,
    read_item_lines,
    sorted_keys,
)


class PartItems:
    """Row and path lookups in one part's ``items.jsonl``.

    The file is opened when this object is made and stays open, so a writer that merges parts
    and unlinks this one meanwhile does not disturb the lookups (rows keep their numbers).
    """

    def __init__(self, directory: Path, part: Part, *, sidecars: bool) -> None:
        self.part = part
        self.file = part.file(directory, "items")
        self._offsets: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        if sidecars:
            self._offsets = load_npy(part.file(directory, "offsets"), part.count + 1)
            keys = np.load(part.file(directory, "keys"), mmap_mode="r")
            if keys.shape != (2, part.count):
                raise EmbeddingIndexError(
                    f"{part.file(directory, 'keys')} has shape {keys.shape}, the index expects"
                    f" (2, {part.count}); it is damaged"
                )
            self._keys = keys
        self._fd = os.open(self.file, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    # -- the two tables, built by a scan for a version-1 part ----------------------------------
    def _scan(self) -> None:
        lines = [line for _, line in read_item_lines(self.file.parent, self.part)]
        if len(lines) < self.part.count:
            raise EmbeddingIndexError(
                f"{self.file} holds {len(lines)} rows, the index expects {self.part.count};"
                " it is damaged"
            )
        self._offsets = line_offsets(lines)
        self._keys = sorted_keys(np.array([key_hash(json.loads(x)["path"]) for x in lines],
                                          dtype=np.uint64))

    @property
    def offsets(self) -> np.ndarray:
        """int64 ``[count + 1]`` line offsets."""
        if self._offsets is None:
            self._scan()
        assert self._offsets is not None
        return self._offsets

    @property
    def keys(self) -> np.ndarray:
        """uint64 ``[2, count]`` sorted path hashes and their local rows."""
        if self._keys is None:
            self._scan()
        assert self._keys is not None
        return self._keys

    # -- lookups ------------------------------------------------------------------------------
    def lines(self, local: list[int]) -> list[bytes]:
        """The raw lines of local rows ``local`` (one read each)."""
        offsets = self.offsets
        out = []
        for r in local:
            start, end = int(offsets[r]), int(offsets[r + 1])
            line = os.pread(self._fd, end - start, start)
            if len(line) != end - start or not line.endswith(b"\n"):
                raise EmbeddingIndexError(f"{self.file} is damaged at row {self.part.start + r}")
            out.append(line)
        return out

    def all_lines(self) -> list[bytes]:
        """Every row's line, in order (one read of the part's bytes)."""
        offsets = self.offsets
        data = os.pread(self._fd, int(offsets[-1]), 0)
        if len(data) != int(offsets[-1]):
            raise EmbeddingIndexError(f"{self.file} is shorter than the index expects; damaged")
        return [data[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def items(self, local: list[int]) -> list[dict[str, Any]]:
        """Items of local rows ``local``, each with its global ``row``."""
        out = []
        for r, line in zip(local, self.lines(local), strict=True):
            item = json.loads(line)
            item["row"] = self.part.start + r
            out.append(item)
        return out

    def range_lines(self, lo: int, hi: int) -> list[bytes]:
        """The lines of local rows ``lo .. hi - 1``, in order (one read of their bytes)."""
        offsets = self.offsets
        start, end = int(offsets[lo]), int(offsets[hi])
        data = os.pread(self._fd, end - start, start)
        if len(data) != end - start:
            raise EmbeddingIndexError(f"{self.file} is shorter than the index expects; damaged")
        cuts = np.asarray(offsets[lo : hi + 1]) - start
        return [data[int(a):int(b)] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def find(self, key: str) -> int | None:
        """The global row whose path is ``key`` (a :func:`~.layout.path_key`), or None."""
        row = int(self.find_many([key])[0])
        return None if row < 0 else row

    def find_many(self, keys: list[str]) -> np.ndarray:
        """int64 ``[len(keys)]``: the global row of each path key, -1 where it is not here.

        One vectorized binary search of the sorted hashes for all keys; only keys whose hash
        is present cost a line read (to rule out a collision), so a miss reads nothing.
        """
        out = np.full(len(keys), -1, dtype=np.int64)
        if not keys or self.part.count == 0:
            return out
        table = self.keys
        hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
        lo = np.searchsorted(table[0], hashes, "left")
        hi = np.searchsorted(table[0], hashes, "right")
        for j in np.flatnonzero(hi > lo):
            for local in table[1, lo[j]:hi[j]]:
                if json.loads(self.lines([int(local)])[0])["path"] == keys[j]:
                    out[j] = self.part.start + int(local)
                    break
        return out
