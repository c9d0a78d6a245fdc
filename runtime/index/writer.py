"""Writing an index: buffered rows committed as chunks, compaction into the base files.

One writer per directory (``.lock``). A chunk's files are written under ``.tmp`` names, fsynced
and renamed before ``index.json`` (itself replaced atomically) lists the chunk, so a process
killed at any point leaves ``index.json`` naming only complete files; what it does not name is
deleted when the next writer opens the directory. Compaction appends rows behind the old base
rows and readers use only the first ``base_count`` of them, so it is safe to kill as well.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cavmae import fsio

from .identity import check_compatible
from .layout import (
    ARRAYS,
    CHUNK_RE,
    META_NAME,
    EmbeddingIndexError,
    Part,
    is_index,
    item_line,
    load_npy,
    new_meta,
    parse_frame,
    parts,
    path_key,
    read_item_lines,
    read_meta,
)
from .reader import EmbeddingIndex
from .storage import locked

log = logging.getLogger(__name__)

_Row = tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]  # item, audio [D], visual [D]


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
            want = {"dim": int(dim), "frame": parse_frame(frame), "num_frames": int(num_frames)}
            if is_index(self.path):
                self.meta = read_meta(self.path)
                check_compatible(self.meta, model, **want, where=self.path)
            else:
                self.meta = new_meta(model, want, shard)
            self._clean_orphans()
            self.meta["finished"] = False
            self._save_meta()
            self._paths = {it["path"] for it in EmbeddingIndex.open(self.path).items()}
        except BaseException:
            self._stack.close()
            raise
        self._buffer: list[_Row] = []
        self._closed = False

    # -- state ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def count(self) -> int:
        """Rows committed plus rows buffered."""
        return int(self.meta["count"]) + len(self._buffer)

    def __contains__(self, path: str | Path) -> bool:
        return path_key(path) in self._paths

    def _save_meta(self) -> None:
        self.meta["updated"] = round(time.time(), 3)
        fsio.write_json(self.path / META_NAME, self.meta, indent=1, ensure_ascii=False)

    def _clean_orphans(self) -> None:
        """Delete chunk and tmp files that index.json does not name (left by a killed run)."""
        listed = {c["name"] for c in self.meta.get("chunks", [])}
        for child in self.path.iterdir():
            name = child.name
            if not child.is_file():
                continue
            orphan = name.endswith(".tmp") or (
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
        if self._closed:
            raise EmbeddingIndexError("this writer is closed")
        key = path_key(path)
        if key in self._paths:
            raise EmbeddingIndexError(f"{key} is already in the index")
        if audio is None and visual is None:
            raise EmbeddingIndexError(f"{key}: no embedding to add")
        a, v = self._checked(key, "audio", audio), self._checked(key, "visual", visual)
        row = self.count
        item = {"row": row, "path": key, "duration": duration,
                "has_audio": audio is not None, "has_video": visual is not None, **extra}
        self._buffer.append((item, a, v))
        self._paths.add(key)
        if len(self._buffer) >= self.commit_every:
            self.commit()
        return row

    def _checked(self, key: str, name: str, vec: np.ndarray | None) -> np.ndarray | None:
        """``vec`` as float32 ``[D]``, or an error naming the clip when it does not fit."""
        if vec is None:
            return None
        v = np.asarray(vec, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise EmbeddingIndexError(
                f"{key}: {name} embedding has dimension {v.shape[0]}, the index {self.dim}"
            )
        if not np.all(np.isfinite(v)):
            raise EmbeddingIndexError(f"{key}: {name} embedding is not finite")
        return v

    def commit(self) -> None:
        """Write buffered rows as a new chunk and record it in index.json."""
        if not self._buffer:
            return
        n = len(self._buffer)
        name = f"chunk-{int(self.meta['next_chunk']):05d}"
        part = Part(f"{name}-", int(self.meta["count"]), n)
        for what, arr in _stack_rows(self._buffer, self.dim).items():
            with fsio.atomic_open(part.file(self.path, what)) as f:
                np.save(f, arr)
        lines = b"".join(item_line(item) for item, _, _ in self._buffer)
        fsio.write_bytes(part.file(self.path, "items"), lines)
        self.meta["chunks"] = [*self.meta["chunks"], {"name": name, "count": n}]
        self.meta["next_chunk"] = int(self.meta["next_chunk"]) + 1
        self.meta["count"] = int(self.meta["count"]) + n
        self._save_meta()
        self._buffer.clear()

    def compact(self) -> None:
        """Fold the chunks into the base files (see the module docstring for why it is safe)."""
        self.commit()
        chunks = list(self.meta["chunks"])
        if not chunks:
            return
        listed, total = parts(self.meta), int(self.meta["count"])
        for what in ARRAYS:
            self._compact_array(what, listed, total)

        def write_items(f: BinaryIO) -> None:
            for part in listed:
                for _, line in read_item_lines(self.path, part):
                    f.write(line if line.endswith(b"\n") else line + b"\n")

        with fsio.atomic_open(self.path / "items.jsonl") as f:
            write_items(f)
        self.meta["base_count"] = total
        self.meta["chunks"] = []
        self._save_meta()
        for chunk in chunks:
            for what in (*ARRAYS, "items"):
                Part(f"{chunk['name']}-", 0, 0).file(self.path, what).unlink(missing_ok=True)

    def _compact_array(self, what: str, listed: list[Part], total: int) -> None:
        """Rewrite ``what.npy`` as the rows of all ``listed`` parts, then rename it in place."""
        shape = (total, self.dim) if what != "mask" else (total, 2)
        dtype = np.float32 if what != "mask" else np.bool_
        with fsio.atomic_path(self.path / f"{what}.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            for part in listed:
                end = part.start + part.count
                out[part.start : end] = load_npy(part.file(self.path, what), part.count)
            out.flush()
            del out  # unmap before the fsync and rename

    def close(self, *, finished: bool = True, compact: bool = True) -> None:
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
        else:  # keep what was embedded; compaction can wait for the next run
            self.close(finished=False, compact=False)


def _stack_rows(rows: list[_Row], dim: int) -> dict[str, np.ndarray]:
    """``audio``/``visual`` ``[n, D]`` (zeros where absent) and ``mask`` ``[n, 2]`` of ``rows``."""
    n = len(rows)
    audio = np.zeros((n, dim), dtype=np.float32)
    visual = np.zeros((n, dim), dtype=np.float32)
    mask = np.zeros((n, 2), dtype=bool)
    for j, (_, a, v) in enumerate(rows):
        if a is not None:
            audio[j], mask[j, 0] = a, True
        if v is not None:
            visual[j], mask[j, 1] = v, True
    return {"audio": audio, "visual": visual, "mask": mask}
