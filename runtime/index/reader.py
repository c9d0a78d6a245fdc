"""Reading an index: memory-mapped parts, items by row (O(k) reads), cosine search."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cavmae.vectors import L2_EPS, l2_normalize

from .items import PartItems
from .layout import (
    ARRAYS,
    META_NAME,
    MODALITIES,
    EmbeddingIndexError,
    array_row_shape,
    check_modality,
    find_shards,
    is_index,
    load_npy,
    parts,
    path_key,
    read_meta,
)


@dataclass(frozen=True)
class Hit:
    """One search result: ``rank`` from 1, cosine ``score``, the row and its item."""

    rank: int
    score: float
    row: int
    item: dict[str, Any]

    @property
    def path(self) -> str:
        return str(self.item.get("path"))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, **self.item, "row": self.row}


def _check_openable(path: Path) -> None:
    if path.is_file():
        raise EmbeddingIndexError(f"{path} is a file, not an embedding index (a folder made by cavmae embed -o)")
    if not path.is_dir():
        raise EmbeddingIndexError(f"no such index: {path}")
    if not is_index(path):
        if find_shards(path):
            raise EmbeddingIndexError(
                f"{path} holds only shards; combine them first with `cavmae embed --merge {path}`"
            )
        raise EmbeddingIndexError(f"{path} is not an embedding index (no {META_NAME})")


class EmbeddingIndex:
    """A read-only view of an index directory (a snapshot of its ``index.json``).

    Arrays are memory-mapped and item files opened when the view is made, so a writer merging
    parts meanwhile does not disturb it (an unlinked file stays readable while mapped or open).
    """

    def __init__(
        self, path: Path, meta: dict[str, Any], arrays: dict[str, list[np.ndarray]],
        items: list[PartItems],
    ) -> None:
        self.path = path
        self.meta = meta
        self._arrays = arrays  # "audio"/"visual"/"mask" -> one array per part
        self._parts = parts(meta)
        self._items = items  # one per part
        self._starts = np.array([p.start for p in self._parts], dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path) -> EmbeddingIndex:
        """Open an index for reading (a few retries if a writer merges parts at that moment)."""
        path = Path(path)
        _check_openable(path)
        for attempt in range(5):
            meta = read_meta(path)
            try:
                arrays: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
                items = []
                sidecars = int(meta["version"]) >= 2  # version 1 parts are scanned on use
                for part in parts(meta):
                    for what in arrays:
                        shape, dtype = array_row_shape(what, int(meta["dim"]))
                        arrays[what].append(load_npy(part.file(path, what), part.count, shape, dtype))
                    items.append(PartItems(path, part, sidecars=sidecars))
                return cls(path, meta, arrays, items)
            except FileNotFoundError:
                if attempt == 4:
                    raise EmbeddingIndexError(
                        f"{path} is damaged: files listed in {META_NAME} are missing"
                    ) from None
                time.sleep(0.05 * (attempt + 1))
            except ValueError as e:
                raise EmbeddingIndexError(f"{path} is damaged: {e}") from None
        raise AssertionError("unreachable")

    # -- metadata ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.meta["model"])

    @property
    def frame(self) -> str | int:
        frame: str | int = self.meta["frame"]
        return frame

    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    # -- rows -------------------------------------------------------------------------------
    def embeddings(self, modality: str) -> np.ndarray:
        """``[N, D]`` float32 embeddings of ``"audio"`` or ``"visual"`` (zeros where missing).

        A memory-mapped view when the index has one part, else a concatenated copy.
        """
        arrays = self._arrays[check_modality(modality)]
        if len(arrays) == 1:
            return arrays[0]
        if not arrays:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(arrays)

    def has(self, modality: str) -> np.ndarray:
        """``[N]`` bool: which rows have an embedding of ``modality``."""
        col = MODALITIES.index(check_modality(modality))
        cols = [m[:, col] for m in self._arrays["mask"]]
        return np.concatenate(cols) if cols else np.zeros(0, dtype=bool)

    def items(self, rows: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Items of ``rows`` (all rows when None), in the order asked; ``k`` rows cost ``k``
        reads, whatever the size of the index."""
        if rows is None:
            out = []
            for part, store in zip(self._parts, self._items, strict=True):
                for j, line in enumerate(store.all_lines()):
                    item = json.loads(line)
                    item["row"] = part.start + j
                    out.append(item)
            return out
        wanted = [int(r) for r in rows]
        missing = [r for r in wanted if not 0 <= r < len(self)]
        if missing:
            raise EmbeddingIndexError(
                f"{self.path}: no rows {missing[:5]} (the index has {len(self)})"
            )
        which = np.searchsorted(self._starts, wanted, side="right") - 1
        found: dict[int, dict[str, Any]] = {}
        for p in np.unique(which):
            store = self._items[int(p)]
            local = [r - store.part.start for r, w in zip(wanted, which, strict=True) if w == p]
            for item in store.items(local):
                found[item["row"]] = item
        return [found[r] for r in wanted]

    def row_of(self, path: str | Path) -> int | None:
        """The row of media file ``path``, or None when it is not in the index (a binary
        search per part; nothing is scanned)."""
        key = path_key(path)
        for store in self._items:
            row = store.find(key)
            if row is not None:
                return row
        return None

    def rows_of(self, paths: Sequence[str | Path]) -> np.ndarray:
        """int64 ``[len(paths)]``: the row of each media file, -1 where it is not in the index.

        One vectorized binary search per part for all paths; a path that is not there reads
        no item, so checking a batch of new files against a large index costs
        ``O(len(paths) * parts * log N)`` and never loads the index's items.
        """
        keys = [path_key(p) for p in paths]
        out = np.full(len(keys), -1, dtype=np.int64)
        for store in self._items:
            left = np.flatnonzero(out < 0)
            if not len(left):
                break
            out[left] = store.find_many([keys[int(j)] for j in left])
        return out

    def __contains__(self, path: str | Path) -> bool:
        return self.row_of(path) is not None

    def paths(self) -> set[str]:
        """Paths of all rows (reads every item; :meth:`rows_of` checks many without that)."""
        return {it["path"] for it in self.items()}

    def item_blocks(self, size: int = 1024) -> Iterator[list[dict[str, Any]]]:
        """Every row's item in row order, ``size`` at a time (one read per block, so the
        items of a large index are never all in memory)."""
        for part, store in zip(self._parts, self._items, strict=True):
            for lo in range(0, part.count, size):
                hi = min(part.count, lo + size)
                block = [json.loads(line) for line in store.range_lines(lo, hi)]
                for j, item in enumerate(block):
                    item["row"] = part.start + lo + j
                yield block

    # -- search -----------------------------------------------------------------------------
    def unit_query(self, query: np.ndarray) -> np.ndarray:
        """``query`` as a float32 unit vector of the index's dimension, or a one-line error."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise EmbeddingIndexError(f"query has dimension {q.shape[0]}, the index {self.dim}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm < L2_EPS:  # below the floor it cannot be made unit
            raise EmbeddingIndexError("query embedding is zero or not finite")
        return l2_normalize(q)

    def vectors(self, modality: str, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), D]`` embeddings of ``modality`` at ``rows`` (reads those rows only),
        as stored: damaged rows too (:meth:`checked_vectors` refuses them)."""
        rows = np.asarray(rows, dtype=np.int64)
        arrays = self._arrays[check_modality(modality)]
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for p in np.unique(which):
            sel = np.flatnonzero(which == p)
            out[sel] = arrays[int(p)][rows[sel] - self._parts[int(p)].start]
        return out

    def checked_vectors(self, modality: str, rows: np.ndarray) -> np.ndarray:
        """:meth:`vectors` of rows that have a ``modality`` embedding, refused
        (:meth:`damage`) when one of them is not finite."""
        rows = np.asarray(rows, dtype=np.int64)
        out = self.vectors(modality, rows)
        bad = ~np.isfinite(out).all(axis=1)  # one pass over what was read anyway
        if bad.any():
            raise self.damage(modality, rows[bad])
        return out

    def damage(self, modality: str, rows: np.ndarray) -> EmbeddingIndexError:
        """The error for ``rows`` whose ``modality`` embeddings are not finite, naming the
        file of the first and how to repair it.

        The writer refuses non-finite embeddings, so such a row is damage on disk, like a
        truncated chunk (which :meth:`open` refuses). Reads refuse it rather than skip it: a
        search that left it out would answer without what may be its best hit and still look
        complete, and a file damaged there may hold wrong finite values too. ``cavmae index
        prune`` drops these rows (:mod:`.prune`), and ``cavmae embed`` then embeds their files
        again."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        part = self._parts[int(np.searchsorted(self._starts, rows[0], side="right") - 1)]
        in_part = int(((rows >= part.start) & (rows < part.start + part.count)).sum())
        return EmbeddingIndexError(
            f"{part.file(self.path, modality)} is damaged: {in_part} row(s) hold {modality}"
            f" embeddings that are not finite (the first: row {int(rows[0])}); drop them with"
            f" `cavmae index prune {self.path}`, then embed their files again with `cavmae"
            f" embed FILES -o {self.path}`"
        )

    def ranked(self, rows: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
        """Hits for the best ``k`` of ``rows`` by ``scores`` (finite ones only), ties in row
        order, each with its item."""
        rows, scores = np.asarray(rows, dtype=np.int64), np.asarray(scores, dtype=np.float32)
        keep = np.isfinite(scores)
        rows, scores = rows[keep], scores[keep]
        order = np.lexsort((rows, -scores))[:k]
        top = rows[order]
        items = self.items(top.tolist())
        return [
            Hit(rank=r + 1, score=float(scores[j]), row=int(row), item=item)
            for r, (j, row, item) in enumerate(zip(order, top, items, strict=True))
        ]

    def scores(self, query: np.ndarray, target: str) -> np.ndarray:
        """Cosine similarity ``[N]`` of ``query [D]`` with every ``target`` row; -inf where a
        row has no ``target`` embedding. A row whose embedding is not finite is refused as
        damage (:meth:`damage`)."""
        q = self.unit_query(query)
        col = MODALITIES.index(check_modality(target))
        out = np.empty(len(self), dtype=np.float32)
        rows = zip(self._parts, self._arrays[target], self._arrays["mask"], strict=True)
        for part, emb, mask in rows:
            s = out[part.start : part.start + part.count]
            np.matmul(emb, q, out=s)
            has = np.asarray(mask[:, col], dtype=bool)
            # a NaN or infinite value anywhere in a row makes its score NaN or infinite (q is
            # finite), so checking the scores finds damage at O(rows), not O(rows * D)
            bad = has & ~np.isfinite(s)
            if bad.any():
                raise self.damage(target, part.start + np.flatnonzero(bad))
            s[~has] = -np.inf
        return out

    def search(self, query: np.ndarray, target: str, k: int = 10) -> list[Hit]:
        """The ``k`` rows whose ``target`` embedding is closest to ``query [D]``, best first.

        Rows without a ``target`` embedding are never returned, so fewer than ``k`` hits come
        back when fewer rows qualify. Ties keep row order.
        """
        if k < 1:
            raise EmbeddingIndexError(f"k must be at least 1, not {k}")
        scores = self.scores(query, target)
        valid = int(np.isfinite(scores).sum())
        k = min(k, valid)
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        return self.ranked(top, scores[top], k)
