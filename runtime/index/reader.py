"""Reading an index: memory-mapped parts, items by row, cosine search."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cavmae.vectors import L2_EPS, l2_normalize

from .layout import (
    ARRAYS,
    META_NAME,
    MODALITIES,
    EmbeddingIndexError,
    check_modality,
    find_shards,
    is_index,
    load_npy,
    parts,
    read_item_lines,
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

    Arrays are memory-mapped when opened, so a writer compacting meanwhile does not disturb
    the view (an unlinked file stays readable while mapped).
    """

    def __init__(
        self, path: Path, meta: dict[str, Any], arrays: dict[str, list[np.ndarray]]
    ) -> None:
        self.path = path
        self.meta = meta
        self._arrays = arrays  # "audio"/"visual"/"mask" -> one array per part
        self._parts = parts(meta)

    @classmethod
    def open(cls, path: str | Path) -> EmbeddingIndex:
        """Open an index for reading (a few retries if a writer compacts at that moment)."""
        path = Path(path)
        _check_openable(path)
        for attempt in range(5):
            meta = read_meta(path)
            try:
                arrays: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
                for part in parts(meta):
                    for what in arrays:
                        arrays[what].append(load_npy(part.file(path, what), part.count))
                return cls(path, meta, arrays)
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

        A memory-mapped view when the index is compacted, else a concatenated copy.
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
        """Items of ``rows`` (all rows when None), in the order asked."""
        wanted = None if rows is None else [int(r) for r in rows]
        for attempt in range(3):
            try:
                found = self._read_items(None if wanted is None else set(wanted))
                break
            except FileNotFoundError:  # compacted since opened: rows keep their numbers
                if attempt == 2:
                    raise EmbeddingIndexError(
                        f"{self.path} changed while reading; try again"
                    ) from None
                self.meta = read_meta(self.path)
                self._parts = parts(self.meta)
        if wanted is None:
            return [found[r] for r in range(len(self))]
        missing = [r for r in wanted if r not in found]
        if missing:
            raise EmbeddingIndexError(
                f"{self.path}: no rows {missing[:5]} (the index has {len(self)})"
            )
        return [found[r] for r in wanted]

    def _read_items(self, wanted: set[int] | None) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        for part in self._parts:
            end = part.start + part.count
            if wanted is not None and not any(part.start <= r < end for r in wanted):
                continue
            for row, line in read_item_lines(self.path, part):
                if wanted is None or row in wanted:
                    item = json.loads(line)
                    item["row"] = row
                    found[row] = item
        return found

    def paths(self) -> set[str]:
        """Paths of all rows (for incremental runs)."""
        return {it["path"] for it in self.items()}

    # -- search -----------------------------------------------------------------------------
    def scores(self, query: np.ndarray, target: str) -> np.ndarray:
        """Cosine similarity ``[N]`` of ``query [D]`` with every ``target`` row; -inf where a
        row has no ``target`` embedding."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise EmbeddingIndexError(f"query has dimension {q.shape[0]}, the index {self.dim}")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm < L2_EPS:  # below the floor it cannot be made unit
            raise EmbeddingIndexError("query embedding is zero or not finite")
        q = l2_normalize(q)
        col = MODALITIES.index(check_modality(target))
        out = np.empty(len(self), dtype=np.float32)
        rows = zip(self._parts, self._arrays[target], self._arrays["mask"], strict=True)
        for part, emb, mask in rows:
            s = out[part.start : part.start + part.count]
            np.matmul(emb, q, out=s)
            s[~np.asarray(mask[:, col], dtype=bool)] = -np.inf
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
        top = top[np.isfinite(scores[top])]
        top = top[np.lexsort((top, -scores[top]))]
        items = self.items(top.tolist())
        return [
            Hit(rank=r + 1, score=float(scores[row]), row=int(row), item=item)
            for r, (row, item) in enumerate(zip(top, items, strict=True))
        ]
