"""Audio-visual embedding index on disk: memory-mapped, incremental, crash-safe, mergeable.

An index is a directory::

    INDEX/
      index.json                  metadata, the single source of truth (replaced atomically)
      audio.npy                   float32 [>= base_count, D] L2-normalized audio embeddings
      visual.npy                  float32 [>= base_count, D] L2-normalized visual embeddings
      mask.npy                    bool    [>= base_count, 2] has_audio, has_video per row
      items.jsonl                 one JSON object per row (>= base_count lines)
      chunk-00003-audio.npy       rows appended since the last compaction: the same four files
      chunk-00003-visual.npy      per chunk (``-audio.npy``, ``-visual.npy``, ``-mask.npy``,
      chunk-00003-mask.npy        ``-items.jsonl``), each holding ``count`` rows; index.json
      chunk-00003-items.jsonl     lists them in row order
      shard-0-of-2/               sub-indexes written by ``cavmae embed --shard i/n`` (same
      shard-1-of-2/               layout), combined into INDEX by :func:`merge_shards`
      .lock                       flock held by the one process writing this directory

``index.json``::

    {"format": "cavmae-embedding-index", "version": 1,
     "model": {"sha256", "name", "checkpoint", "ref", "model_kind", "model_config", "precision"},
     "dim": D, "frame": "middle" | "mean" | int, "num_frames": F,
     "count": N,            # rows in the index = base_count + sum of chunk counts
     "base_count": Nb,      # the first Nb rows of audio/visual/mask.npy and items.jsonl
     "chunks": [{"name": "chunk-00003", "count": 64}, ...],
     "next_chunk": 4, "shard": [i, n] | null, "finished": bool, "updated": unix time}

Rows are numbered globally: the ``base_count`` base rows, then each chunk's rows in order. An
item is ``{"row", "path", "duration", "has_audio", "has_video"}``; ``path`` is absolute and
resolved (:func:`path_key`), the key for incremental runs and de-duplication. A clip without an
audio (or video) stream has ``has_audio`` (``has_video``) false: its row in ``audio.npy``
(``visual.npy``) holds zeros only to keep the rows aligned; ``mask.npy`` marks it absent and
search never scores it.

Writing (:class:`IndexWriter`, one writer per directory, enforced by ``.lock``):

1. new rows are buffered and committed every ``commit_every`` rows as a chunk: the chunk's four
   files are written under ``.tmp`` names, fsynced and renamed, then index.json is rewritten
   (tmp + fsync + rename) listing the chunk. A process killed at any point leaves index.json
   naming only complete files; files it does not name (a chunk renamed just before the kill,
   ``.tmp`` files) are deleted when the next writer opens the directory.
2. closing compacts: ``audio.npy`` (etc.) is rewritten as base rows + chunk rows under a
   ``.tmp`` name and renamed, then index.json gets the new ``base_count`` and no chunks, then the
   chunk files are deleted. Compaction only ever appends rows behind the old ones, and readers
   use just the first ``base_count`` rows of the base files, so a kill between the renames still
   leaves a consistent index (the old index.json with its chunks, or the new one).

Readers (:class:`EmbeddingIndex`) map every part with ``np.load(mmap_mode="r")`` and never take
the lock; :meth:`EmbeddingIndex.search` is one matrix-vector product per part and an
``np.argpartition`` for the top k. Compaction copies the whole index once per ``embed`` run;
that is the price of keeping the base files plain ``.npy`` arrays.

Sharding: each process of a sharded job writes ``INDEX/shard-i-of-n/`` (marked ``finished``
when its run completes); :func:`merge_shards` checks that all ``n`` shards are present, finished
and made with the same model, appends their rows to INDEX (skipping paths already there),
compacts, and removes the shard directories. A merge interrupted before the removal can simply
be run again (the paths de-duplicate).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cavmae.errors import CavmaeError, MediaError

if TYPE_CHECKING:
    from cavmae.manifest import Manifest

    from .pipeline import Pipeline

log = logging.getLogger(__name__)

FORMAT = "cavmae-embedding-index"
FORMAT_VERSION = 1
META_NAME = "index.json"
LOCK_NAME = ".lock"
MODALITIES = ("audio", "visual")
_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")
_CHUNK_RE = re.compile(r"^chunk-\d{5,}-(audio|visual|mask)\.npy$|^chunk-\d{5,}-items\.jsonl$")


class EmbeddingIndexError(CavmaeError):
    """An index is missing, malformed, in use, or made with another model."""


# --------------------------------------------------------------------------------------------
# Small helpers


def path_key(path: str | Path) -> str:
    """The canonical form of a media path stored in an index (absolute, symlinks resolved)."""
    return str(Path(path).resolve())


def shard_dir(index: str | Path, shard: tuple[int, int]) -> Path:
    """``INDEX/shard-i-of-n`` for shard ``(i, n)``."""
    i, n = shard
    return Path(index) / f"shard-{i}-of-{n}"


def parse_frame(frame: str | int) -> str | int:
    """``"middle"``, ``"mean"`` or a frame index (``"3"`` -> 3)."""
    if isinstance(frame, int):
        return frame
    text = str(frame).strip().lower()
    if text in ("middle", "mean"):
        return text
    if text.isdigit():
        return int(text)
    raise EmbeddingIndexError(f"frame must be 'middle', 'mean' or a frame index, not {frame!r}")


def model_identity(manifest: Manifest, ref: str | None = None) -> dict[str, Any]:
    """What an index records about the model that made its embeddings.

    ``sha256`` of the source checkpoint identifies the weights; it comes from the export
    manifest, or is computed (and cached) from the checkpoint file when the manifest has none
    (the PyTorch engine running a checkpoint directly). ``ref`` is how to load the model again
    (a registry name or an absolute path), used by ``cavmae search`` when no model is given.
    """
    source = manifest.source or {}
    sha = source.get("sha256")
    checkpoint = source.get("checkpoint")
    if not sha and checkpoint and Path(checkpoint).is_file():
        from .loader import checkpoint_sha256

        sha = checkpoint_sha256(Path(checkpoint))
    return {
        "sha256": sha,
        "name": source.get("name"),
        "checkpoint": checkpoint,
        "ref": ref,
        "model_kind": manifest.model_kind,
        "model_config": manifest.model_config.to_dict(),
        "precision": manifest.precision,
    }


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two model identities (:func:`model_identity`) have the same weights.

    The checkpoint's sha256 decides when both have one; otherwise name, checkpoint path and
    architecture must all agree. Precision (fp32 / fp16 export of the same weights) is not
    compared: those embeddings are the same up to rounding.
    """
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    keys = ("name", "checkpoint", "model_kind", "model_config")
    return all(a.get(k) == b.get(k) for k in keys)


def describe_model(m: dict[str, Any]) -> str:
    what = m.get("name") or m.get("ref") or m.get("checkpoint") or "an unnamed model"
    sha = m.get("sha256")
    return f"{what} (sha256 {sha[:12]})" if sha else str(what)


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - directories cannot be fsynced there
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_bytes_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a tmp file, fsync, rename into place."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    _write_bytes_atomic(path, lambda f: f.write(data))
    _fsync_dir(path.parent)


def _item_line(item: dict[str, Any]) -> bytes:
    return (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META_NAME
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbeddingIndexError(f"{path} is not an embedding index (no {META_NAME})") from None
    except (OSError, ValueError) as e:
        raise EmbeddingIndexError(f"cannot read {file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EmbeddingIndexError(f"{file} is not a cavmae embedding index")
    if meta.get("version") != FORMAT_VERSION:
        raise EmbeddingIndexError(
            f"{path} has index format version {meta.get('version')!r}; this cavmae reads"
            f" version {FORMAT_VERSION}: build the index again"
        )
    return meta


def is_index(path: str | Path) -> bool:
    """True when ``path`` is a directory holding an index's ``index.json``."""
    return (Path(path) / META_NAME).is_file()


def find_shards(path: str | Path) -> list[tuple[int, int, Path]]:
    """Shard sub-directories of an index as ``(i, n, dir)``, sorted by ``(n, i)``."""
    root = Path(path)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _SHARD_RE.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), int(m.group(2)), child))
    return sorted(out, key=lambda t: (t[1], t[0]))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# Reading


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


@dataclass(frozen=True)
class _Part:
    """Rows ``[start, start + count)`` of the index, stored under file prefix ``prefix``."""

    prefix: str  # "" for the base files, "chunk-00003-" for a chunk
    start: int
    count: int

    def file(self, directory: Path, what: str) -> Path:
        ext = "jsonl" if what == "items" else "npy"
        return directory / f"{self.prefix}{what}.{ext}"


def _parts(meta: dict[str, Any]) -> list[_Part]:
    parts = []
    start = int(meta.get("base_count", 0))
    if start:
        parts.append(_Part("", 0, start))
    for chunk in meta.get("chunks", []):
        parts.append(_Part(f"{chunk['name']}-", start, int(chunk["count"])))
        start += int(chunk["count"])
    return parts


def _load_npy(path: Path, rows: int) -> np.ndarray:
    arr = np.load(path, mmap_mode="r")
    if arr.shape[0] < rows:
        raise EmbeddingIndexError(f"{path} holds {arr.shape[0]} rows, the index expects {rows}; it is damaged")
    return arr[:rows]


class EmbeddingIndex:
    """A read-only view of an index directory (a snapshot of its ``index.json``).

    Arrays are memory-mapped when opened, so a writer compacting meanwhile does not disturb
    the view (an unlinked file stays readable while mapped).
    """

    def __init__(self, path: Path, meta: dict[str, Any], arrays: dict[str, list[np.ndarray]]) -> None:
        self.path = path
        self.meta = meta
        self._arrays = arrays  # "audio"/"visual"/"mask" -> one array per part
        self._parts = _parts(meta)

    @classmethod
    def open(cls, path: str | Path) -> EmbeddingIndex:
        """Open an index for reading (a few retries if a writer compacts at that moment)."""
        path = Path(path)
        if not path.is_dir():
            raise EmbeddingIndexError(f"no such index: {path}")
        if not is_index(path):
            if find_shards(path):
                raise EmbeddingIndexError(
                    f"{path} holds only shards; combine them first with `cavmae embed --merge {path}`"
                )
            raise EmbeddingIndexError(f"{path} is not an embedding index (no {META_NAME})")
        for attempt in range(5):
            meta = _read_meta(path)
            try:
                arrays: dict[str, list[np.ndarray]] = {k: [] for k in (*MODALITIES, "mask")}
                for part in _parts(meta):
                    for what in arrays:
                        arrays[what].append(_load_npy(part.file(path, what), part.count))
                return cls(path, meta, arrays)
            except FileNotFoundError:
                if attempt == 4:
                    raise EmbeddingIndexError(f"{path} is damaged: files listed in {META_NAME} are missing") from None
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
        return self.meta["frame"]

    @property
    def num_frames(self) -> int:
        return int(self.meta["num_frames"])

    # -- rows -------------------------------------------------------------------------------
    def embeddings(self, modality: str) -> np.ndarray:
        """``[N, D]`` float32 embeddings of ``"audio"`` or ``"visual"`` (zeros where missing).

        A memory-mapped view when the index is compacted, else a concatenated copy.
        """
        parts = self._arrays[_check_modality(modality)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts)

    def has(self, modality: str) -> np.ndarray:
        """``[N]`` bool: which rows have an embedding of ``modality``."""
        col = MODALITIES.index(_check_modality(modality))
        parts = [m[:, col] for m in self._arrays["mask"]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def items(self, rows: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Items of ``rows`` (all rows when None), in the order asked."""
        wanted = None if rows is None else [int(r) for r in rows]
        for attempt in range(3):
            try:
                found = self._read_items(None if wanted is None else set(wanted))
                break
            except FileNotFoundError:  # compacted since opened: rows keep their numbers
                if attempt == 2:
                    raise EmbeddingIndexError(f"{self.path} changed while reading; try again") from None
                self.meta = _read_meta(self.path)
                self._parts = _parts(self.meta)
        if wanted is None:
            return [found[r] for r in range(len(self))]
        missing = [r for r in wanted if r not in found]
        if missing:
            raise EmbeddingIndexError(f"{self.path}: no rows {missing[:5]} (the index has {len(self)})")
        return [found[r] for r in wanted]

    def _read_items(self, wanted: set[int] | None) -> dict[int, dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        for part in self._parts:
            if wanted is not None and not any(part.start <= r < part.start + part.count for r in wanted):
                continue
            with open(part.file(self.path, "items"), "rb") as f:
                for k, line in enumerate(f):
                    if k >= part.count:
                        break
                    row = part.start + k
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
        if not np.isfinite(norm) or norm == 0.0:
            raise EmbeddingIndexError("query embedding is zero or not finite")
        q = q / norm
        col = MODALITIES.index(_check_modality(target))
        out = np.empty(len(self), dtype=np.float32)
        for part, emb, mask in zip(self._parts, self._arrays[target], self._arrays["mask"], strict=True):
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
        return [Hit(rank=r + 1, score=float(scores[row]), row=int(row), item=item)
                for r, (row, item) in enumerate(zip(top, items, strict=True))]


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise EmbeddingIndexError(f"modality must be 'audio' or 'visual', not {modality!r}")
    return modality


# --------------------------------------------------------------------------------------------
# Writing


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
        self._stack.enter_context(_locked(self.path))
        try:
            want = {"dim": int(dim), "frame": parse_frame(frame), "num_frames": int(num_frames)}
            if is_index(self.path):
                self.meta = _read_meta(self.path)
                check_compatible(self.meta, model, **want, where=self.path)
            else:
                self.meta = {
                    "format": FORMAT, "version": FORMAT_VERSION, "model": dict(model), **want,
                    "count": 0, "base_count": 0, "chunks": [], "next_chunk": 1,
                    "shard": list(shard) if shard else None, "finished": False,
                }
            self._clean_orphans()
            self.meta["finished"] = False
            self._save_meta()
            self._paths = {it["path"] for it in EmbeddingIndex.open(self.path).items()}
        except BaseException:
            self._stack.close()
            raise
        self._buffer: list[tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]] = []
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
        _write_json_atomic(self.path / META_NAME, self.meta)

    def _clean_orphans(self) -> None:
        """Delete chunk and tmp files that index.json does not name (left by a killed run)."""
        listed = {c["name"] for c in self.meta.get("chunks", [])}
        for child in self.path.iterdir():
            name = child.name
            if not child.is_file():
                continue
            orphan = name.endswith(".tmp") or (
                _CHUNK_RE.match(name) is not None and name.rsplit("-", 1)[0] not in listed
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
        vecs = []
        for name, v in (("audio", audio), ("visual", visual)):
            if v is not None:
                v = np.asarray(v, dtype=np.float32).reshape(-1)
                if v.shape[0] != self.dim:
                    raise EmbeddingIndexError(f"{key}: {name} embedding has dimension {v.shape[0]}, the index {self.dim}")
                if not np.all(np.isfinite(v)):
                    raise EmbeddingIndexError(f"{key}: {name} embedding is not finite")
            vecs.append(v)
        row = self.count
        item = {"row": row, "path": key, "duration": duration,
                "has_audio": audio is not None, "has_video": visual is not None, **extra}
        self._buffer.append((item, vecs[0], vecs[1]))
        self._paths.add(key)
        if len(self._buffer) >= self.commit_every:
            self.commit()
        return row

    def commit(self) -> None:
        """Write buffered rows as a new chunk and record it in index.json."""
        if not self._buffer:
            return
        n, d = len(self._buffer), self.dim
        audio = np.zeros((n, d), dtype=np.float32)
        visual = np.zeros((n, d), dtype=np.float32)
        mask = np.zeros((n, 2), dtype=bool)
        for j, (_, a, v) in enumerate(self._buffer):
            if a is not None:
                audio[j], mask[j, 0] = a, True
            if v is not None:
                visual[j], mask[j, 1] = v, True
        name = f"chunk-{int(self.meta['next_chunk']):05d}"
        part = _Part(f"{name}-", int(self.meta["count"]), n)
        for what, arr in (("audio", audio), ("visual", visual), ("mask", mask)):
            _write_bytes_atomic(part.file(self.path, what), lambda f, a=arr: np.save(f, a))
        lines = b"".join(_item_line(item) for item, _, _ in self._buffer)
        _write_bytes_atomic(part.file(self.path, "items"), lambda f: f.write(lines))
        _fsync_dir(self.path)
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
        parts = _parts(self.meta)
        total, d = int(self.meta["count"]), self.dim
        for what in ("audio", "visual", "mask"):
            dest = self.path / f"{what}.npy"
            tmp = _tmp(dest)
            shape = (total, d) if what != "mask" else (total, 2)
            dtype = np.float32 if what != "mask" else np.bool_
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            for part in parts:
                out[part.start : part.start + part.count] = _load_npy(part.file(self.path, what), part.count)
            out.flush()
            del out
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)

        def write_items(f: Any) -> None:
            for part in parts:
                with open(part.file(self.path, "items"), "rb") as src:
                    for k, line in enumerate(src):
                        if k >= part.count:
                            break
                        f.write(line if line.endswith(b"\n") else line + b"\n")

        _write_bytes_atomic(self.path / "items.jsonl", write_items)
        _fsync_dir(self.path)
        self.meta["base_count"] = total
        self.meta["chunks"] = []
        self._save_meta()
        for chunk in chunks:
            for what in ("audio", "visual", "mask", "items"):
                _Part(f"{chunk['name']}-", 0, 0).file(self.path, what).unlink(missing_ok=True)

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


def check_compatible(
    meta: dict[str, Any],
    model: dict[str, Any],
    *,
    dim: int | None = None,
    frame: str | int | None = None,
    num_frames: int | None = None,
    where: str | Path = "the index",
) -> None:
    """Raise :class:`EmbeddingIndexError` unless an index's ``meta`` fits these settings."""
    if not same_model(meta["model"], model):
        raise EmbeddingIndexError(
            f"{where} holds embeddings of {describe_model(meta['model'])}, not of"
            f" {describe_model(model)}; use the same --model, or write a new index with -o"
        )
    if dim is not None and int(meta["dim"]) != dim:
        raise EmbeddingIndexError(f"{where} has embedding dimension {meta['dim']}, this model {dim}")
    if frame is not None and meta["frame"] != parse_frame(frame):
        raise EmbeddingIndexError(
            f"{where} was built with --frame {meta['frame']}, not {frame}; use the same frame choice"
        )
    if num_frames is not None and int(meta["num_frames"]) != num_frames:
        raise EmbeddingIndexError(
            f"{where} was built from {meta['num_frames']} frames per clip, this model export uses {num_frames}"
        )


# --------------------------------------------------------------------------------------------
# Merging shards


@dataclass(frozen=True)
class MergeResult:
    shards: int
    added: int
    duplicates: int
    count: int


def merge_shards(path: str | Path, *, remove: bool = True, commit_every: int = 1024) -> MergeResult:
    """Combine ``INDEX/shard-*-of-n`` into ``INDEX`` (see the module docstring).

    Raises:
        EmbeddingIndexError: no shards, shards of different ``n``, a shard missing, unfinished
            or still being written, or made with a different model than the others or INDEX.
    """
    root = Path(path)
    shards = find_shards(root)
    if not shards:
        raise EmbeddingIndexError(f"no shard directories (shard-i-of-n) in {root}")
    counts = sorted({n for _, n, _ in shards})
    if len(counts) > 1:
        raise EmbeddingIndexError(
            f"{root} holds shards of different jobs (n = {', '.join(map(str, counts))}); remove the stale ones"
        )
    n = counts[0]
    present = {i for i, _, _ in shards}
    missing = sorted(set(range(n)) - present)
    if missing:
        raise EmbeddingIndexError(f"{root}: shard(s) {', '.join(map(str, missing))} of {n} are missing; run them first")
    with contextlib.ExitStack() as stack:
        opened: list[EmbeddingIndex] = []
        for i, _, d in shards:
            stack.enter_context(_locked(d))  # fails if that shard is still being written
            if not is_index(d):
                raise EmbeddingIndexError(f"{d} is not a complete shard; run shard {i}/{n} again")
            idx = EmbeddingIndex.open(d)
            if not idx.meta.get("finished"):
                raise EmbeddingIndexError(f"shard {i}/{n} did not finish; run it again (it resumes) before merging")
            opened.append(idx)
        first = opened[0].meta
        for idx in opened[1:]:
            check_compatible(idx.meta, first["model"], dim=first["dim"], frame=first["frame"],
                             num_frames=first["num_frames"], where=idx.path)
        added = duplicates = 0
        writer = IndexWriter(root, model=first["model"], dim=first["dim"], frame=first["frame"],
                             num_frames=first["num_frames"], commit_every=commit_every)
        with writer:
            for idx in opened:
                audio, visual = idx.embeddings("audio"), idx.embeddings("visual")
                has_a, has_v = idx.has("audio"), idx.has("visual")
                for item in idx.items():
                    row = item["row"]
                    if item["path"] in writer:
                        duplicates += 1
                        continue
                    extra = {k: v for k, v in item.items()
                             if k not in ("row", "path", "duration", "has_audio", "has_video")}
                    writer.add(item["path"], np.array(audio[row]) if has_a[row] else None,
                               np.array(visual[row]) if has_v[row] else None,
                               duration=item.get("duration"), **extra)
                    added += 1
        count = writer.count
    if remove:
        for _, _, d in shards:
            shutil.rmtree(d, ignore_errors=True)
    return MergeResult(shards=n, added=added, duplicates=duplicates, count=count)


# --------------------------------------------------------------------------------------------
# Embedding files into an index


@dataclass(frozen=True)
class FileResult:
    """What happened to one input: its row, or why it failed."""

    path: Path
    row: int | None = None
    error: str | None = None
    has_audio: bool = False
    has_video: bool = False


@dataclass
class _Decoded:
    path: Path
    audio: np.ndarray | None  # [T, F]
    frames: np.ndarray | None  # [F, 3, H, W]
    duration: float


def _decode(path: Path, pipeline: Pipeline) -> _Decoded:
    from cavmae.media import load_clip, probe

    info = probe(path)
    if not (info.has_audio or info.has_video):
        raise MediaError(f"{path}: no audio or video stream")
    clip = load_clip(
        path, num_frames=pipeline.num_frames, config=pipeline.manifest.preprocess,
        need_audio=info.has_audio, need_video=info.has_video,
    )
    return _Decoded(path, clip.audio, clip.frames, float(clip.duration))


def _try(fn: Callable[[Path], _Decoded], path: Path) -> _Decoded | str:
    """``fn(path)``, or a one-line reason when the file cannot be used."""
    try:
        return fn(path)
    except MediaError as e:
        return str(e)
    except Exception as e:  # an odd file must not stop a batch job; the reason is reported
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{path}: {type(e).__name__}: {first}"


def _prefetch(
    fn: Callable[[Path], _Decoded], paths: Sequence[Path], workers: int
) -> Iterator[tuple[Path, _Decoded | str]]:
    """``(path, fn(path) or reason)`` in input order, decoding up to ``2 * workers`` ahead."""
    if workers <= 0:
        for p in paths:
            yield p, _try(fn, p)
        return
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cavmae-decode")
    try:
        pending: deque[tuple[Path, Future[_Decoded | str]]] = deque()
        it = iter(paths)
        for p in it:
            pending.append((p, ex.submit(_try, fn, p)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(_try, fn, nxt)))
            yield p, fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def embed_files(
    pipeline: Pipeline,
    paths: Sequence[str | Path],
    writer: IndexWriter,
    *,
    batch: int = 8,
    workers: int = 2,
) -> Iterator[FileResult]:
    """Decode, embed and append ``paths`` to ``writer``; one :class:`FileResult` per path.

    Files are decoded ``workers`` at a time in threads while the model runs; clips are embedded
    ``batch`` at a time (``embed_audio`` over the clips with audio, ``embed_frames`` with the
    index's frame choice over those with video). A file that cannot be decoded yields a result
    with ``error`` and the job goes on; model errors propagate (rows committed so far stay).
    Paths already in the index are skipped silently (no result).
    """
    frame = writer.meta["frame"]
    todo = [Path(p) for p in paths if p not in writer]
    pending: list[_Decoded] = []

    def flush() -> Iterator[FileResult]:
        if not pending:
            return
        with_a = [c for c in pending if c.audio is not None]
        with_v = [c for c in pending if c.frames is not None]
        ea = pipeline.embed_audio(np.stack([c.audio for c in with_a])) if with_a else None
        ev = pipeline.embed_frames(np.stack([c.frames for c in with_v]), frame) if with_v else None
        a_of = {id(c): ea[j] for j, c in enumerate(with_a)} if ea is not None else {}
        v_of = {id(c): ev[j] for j, c in enumerate(with_v)} if ev is not None else {}
        for c in pending:
            a, v = a_of.get(id(c)), v_of.get(id(c))
            row = writer.add(c.path, a, v, duration=c.duration)
            yield FileResult(c.path, row=row, has_audio=a is not None, has_video=v is not None)
        pending.clear()

    for path, got in _prefetch(lambda p: _decode(p, pipeline), todo, workers):
        if isinstance(got, str):
            yield FileResult(path, error=got)
            continue
        pending.append(got)
        if len(pending) >= batch:
            yield from flush()
    yield from flush()
