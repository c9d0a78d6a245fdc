"""Merging the shards of a sharded ``cavmae embed`` job into their parent index.

Each process of a sharded job writes ``INDEX/shard-i-of-n/`` (marked ``finished`` when its
run completes). :func:`merge_shards` checks that all ``n`` shards are present, finished and
made with the same model, appends their rows to INDEX in blocks (:meth:`IndexWriter.add_many`;
paths already there are skipped, checked a block at a time) and removes the shard directories.
A merge interrupted before the removal can simply be run again (the paths de-duplicate).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .identity import check_compatible
from .layout import ITEM_KEYS, EmbeddingIndexError, find_shards, is_index
from .reader import EmbeddingIndex
from .storage import locked
from .writer import IndexWriter


@dataclass(frozen=True)
class MergeResult:
    """Shards merged, rows added, rows skipped as already present, rows in the index now."""

    shards: int
    added: int
    duplicates: int
    count: int


def _complete_set(root: Path) -> list[tuple[int, int, Path]]:
    """The shards under ``root``, checked to be all ``n`` shards of one job."""
    if not root.is_dir():
        raise EmbeddingIndexError(f"no such index: {root}")
    shards = find_shards(root)
    if not shards:
        raise EmbeddingIndexError(f"no shard directories (shard-i-of-n) in {root}")
    counts = sorted({n for _, n, _ in shards})
    if len(counts) > 1:
        raise EmbeddingIndexError(
            f"{root} holds shards of different jobs (n = {', '.join(map(str, counts))});"
            " remove the stale ones"
        )
    n = counts[0]
    missing = sorted(set(range(n)) - {i for i, _, _ in shards})
    if missing:
        raise EmbeddingIndexError(
            f"{root}: shard(s) {', '.join(map(str, missing))} of {n} are missing; run them first"
        )
    return shards


def _open_finished(
    shards: list[tuple[int, int, Path]], stack: contextlib.ExitStack
) -> list[EmbeddingIndex]:
    """Lock and open each shard; all must be finished and made with the same model."""
    opened: list[EmbeddingIndex] = []
    for i, n, d in shards:
        stack.enter_context(locked(d))  # fails if that shard is still being written
        if not is_index(d):
            raise EmbeddingIndexError(f"{d} is not a complete shard; run shard {i}/{n} again")
        idx = EmbeddingIndex.open(d)
        if not idx.meta.get("finished"):
            raise EmbeddingIndexError(
                f"shard {i}/{n} did not finish; run it again (it resumes) before merging"
            )
        opened.append(idx)
    first = opened[0].meta
    for idx in opened[1:]:
        check_compatible(idx.meta, first["model"], dim=first["dim"], frame=first["frame"],
                         num_frames=first["num_frames"], where=idx.path)
    return opened


def copy_items(
    writer: IndexWriter, idx: EmbeddingIndex, items: list[dict[str, Any]], flags: tuple[np.ndarray, np.ndarray]
) -> None:
    """Add the rows of ``idx`` that ``items`` (from :meth:`EmbeddingIndex.item_blocks`) name to
    ``writer`` in one :meth:`IndexWriter.add_many`: embeddings, stream flags, duration and every
    other key a row keeps (its file's stamp). ``flags``: ``idx.has("audio"), idx.has("visual")``,
    read once by the caller (each is a pass over the whole index)."""
    if not items:
        return
    rows = np.array([it["row"] for it in items], dtype=np.int64)
    has_a, has_v = flags
    writer.add_many(
        [it["path"] for it in items], idx.vectors("audio", rows), idx.vectors("visual", rows),
        has_audio=has_a[rows], has_video=has_v[rows],
        durations=[it.get("duration") for it in items],
        extra=[{k: v for k, v in it.items() if k not in ITEM_KEYS} for it in items],
    )


def _append(writer: IndexWriter, idx: EmbeddingIndex, block: int) -> tuple[int, int]:
    """Add the rows of ``idx`` whose path ``writer`` lacks, ``block`` rows per
    :meth:`IndexWriter.add_many`; ``(added, duplicates)``."""
    added = duplicates = 0
    flags = (idx.has("audio"), idx.has("visual"))
    for items in idx.item_blocks(block):
        known = writer.contains_many([it["path"] for it in items])
        duplicates += int(known.sum())
        new = [it for it, k in zip(items, known, strict=True) if not k]
        copy_items(writer, idx, new, flags)
        added += len(new)
    return added, duplicates


def merge_shards(
    path: str | Path, *, remove: bool = True, commit_every: int = 1024
) -> MergeResult:
    """Combine ``INDEX/shard-*-of-n`` into ``INDEX`` (see the module docstring).

    Raises:
        EmbeddingIndexError: no shards, shards of different ``n``, a shard missing, unfinished
            or still being written, or made with a different model than the others or INDEX.
    """
    root = Path(path)
    shards = _complete_set(root)
    with contextlib.ExitStack() as stack:
        opened = _open_finished(shards, stack)
        first = opened[0].meta
        added = duplicates = 0
        writer = IndexWriter(root, model=first["model"], dim=first["dim"], frame=first["frame"],
                             num_frames=first["num_frames"], commit_every=commit_every)
        with writer:
            for idx in opened:
                a, d = _append(writer, idx, commit_every)
                added, duplicates = added + a, duplicates + d
        count = writer.count
    if remove:
        for _, _, folder in shards:
            shutil.rmtree(folder, ignore_errors=True)
    return MergeResult(shards=shards[0][1], added=added, duplicates=duplicates, count=count)
