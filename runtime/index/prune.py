"""Dropping the rows of files that are gone (or changed) from an index, and damaged rows.

Rows are never removed in place: a row keeps its number for the life of an index, and the
approximate index refers to rows by number. :func:`prune_index` instead copies the rows it
keeps, a block at a time, into a new index beside the old one (same model and settings, rows
renumbered, a new ``uid``) and publishes it over the old directory in one rename
(:func:`cavmae.fsio.publish_dir`): a reader sees the old index or the new one, and an interrupted
prune leaves the old one as it was. The approximate index (``ann/``) is not carried over, since
its row numbers no longer hold; ``cavmae index build-ann`` makes it again.

A row whose embedding is not finite is damage on disk (the writer never writes one, and
searches refuse it, see :meth:`EmbeddingIndex.damage`): a prune drops it whatever its file's
state, so that a later ``cavmae embed`` embeds the file again. Finding such rows reads every
embedding once more (the copy reads them anyway), a block at a time.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cavmae import fsio
from cavmae.filetypes import is_remote
from cavmae.progress import progress_bar

from .embed import file_stamp
from .layout import MODALITIES, EmbeddingIndexError, find_shards, is_index
from .merge import copy_items
from .reader import EmbeddingIndex
from .storage import locked
from .writer import IndexWriter

log = logging.getLogger(__name__)

#: why a row is dropped
MISSING, CHANGED, DAMAGED = "missing", "changed", "damaged"


@dataclass
class PruneResult:
    """What a prune found and did: rows kept, rows dropped (by reason, with up to ``shown``
    of their paths), whether the index was rewritten and its approximate index removed."""

    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    rewritten: bool = False
    ann_removed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept, "dropped": sum(self.dropped.values()),
            "missing": self.dropped[MISSING], "changed": self.dropped[CHANGED],
            "damaged": self.dropped[DAMAGED],
            "examples": [{"path": p, "reason": r} for p, r in self.examples],
            "rewritten": self.rewritten, "ann_removed": self.ann_removed,
        }


def stale_reason(item: dict[str, Any], *, changed: bool) -> str | None:
    """``"missing"`` when the row's file is gone, ``"changed"`` (with ``changed``) when its size
    or modification time differ from what the row remembers, else None. Rows written before
    rows kept a stamp are judged by presence only."""
    if is_remote(item["path"]):
        return None  # a remote file (read with --ray) is not looked at from here
    try:
        now = file_stamp(item["path"])
    except OSError:
        return MISSING
    if changed and "size" in item and "mtime_ns" in item:
        if now != {"size": item["size"], "mtime_ns": item["mtime_ns"]}:
            return CHANGED
    return None


def _damaged(idx: EmbeddingIndex, items: list[dict[str, Any]], flags: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """bool per item: its row has an embedding that is not finite (damage on disk)."""
    rows = np.array([it["row"] for it in items], dtype=np.int64)
    bad = np.zeros(len(rows), dtype=bool)
    for modality, has in zip(MODALITIES, flags, strict=True):
        bad |= has[rows] & ~np.isfinite(idx.vectors(modality, rows)).all(axis=1)
    return bad


def _judge(items: list[dict[str, Any]], changed: bool, result: PruneResult, shown: int,
           damaged: np.ndarray) -> list[dict[str, Any]]:
    """The ``items`` to keep; the others are counted into ``result``. ``damaged``: per item,
    whether its row is damaged (:func:`_damaged`)."""
    keep = []
    for item, bad in zip(items, damaged, strict=True):
        reason = DAMAGED if bad else stale_reason(item, changed=changed)
        if reason is None:
            keep.append(item)
            continue
        result.dropped[reason] += 1
        if len(result.examples) < shown:
            result.examples.append((item["path"], reason))
    result.kept += len(keep)
    return keep


def prune_index(
    path: str | Path, *, changed: bool = True, dry_run: bool = False, block: int = 4096,
    shown: int = 20, progress: bool = False,
) -> PruneResult:
    """Drop the rows of ``path`` whose files are gone (and, with ``changed``, whose files changed
    since they were embedded; a later ``cavmae embed`` embeds those again), and rows whose
    embeddings are not finite (damage; embedded again the same way). ``dry_run``: count,
    change nothing. ``progress``: a bar per pass (checking, copying) on stderr. Holds the
    index's lock throughout, so no writer runs meanwhile.

    Raises:
        EmbeddingIndexError: no index there, unmerged shards in it, or another process writing it.
    """
    given = Path(path)
    if given.is_file():
        raise EmbeddingIndexError(f"{given} is a file, not an index folder")
    if not is_index(given):
        raise EmbeddingIndexError(f"no index at {given} (made by `cavmae embed -o {given}`)")
    if find_shards(given):
        raise EmbeddingIndexError(f"{given} holds shards not merged yet; run `cavmae index merge {given}` first")
    root = given.resolve()  # a link to the index: the index it names is replaced, not the link
    result = PruneResult()
    with locked(root):
        for leftover in fsio.temp_siblings(root):  # a prune killed mid-copy (we hold the lock)
            log.info("removing %s, left by an interrupted prune", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        idx = EmbeddingIndex.open(root)
        flags = (idx.has("audio"), idx.has("visual"))
        with progress_bar(total=len(idx), desc="prune: checking", unit="row", enabled=progress) as bar:
            for items in idx.item_blocks(block):  # first pass: only counts, nothing held per row
                _judge(items, changed, result, shown, _damaged(idx, items, flags))
                bar.update(len(items))
        if dry_run or not result.dropped:
            return result
        result = PruneResult()  # judged again while copying: a file may change meanwhile
        with fsio.staged_dir(root) as work:
            shard = idx.meta.get("shard")
            writer = IndexWriter(work, model=idx.model, dim=idx.dim, frame=idx.frame, num_frames=idx.num_frames,
                                 shard=tuple(shard) if shard else None, commit_every=block)
            with writer, progress_bar(total=len(idx), desc="prune: copying", unit="row", enabled=progress) as bar:
                for items in idx.item_blocks(block):
                    kept = _judge(items, changed, result, shown, _damaged(idx, items, flags))
                    copy_items(writer, idx, kept, flags)
                    bar.update(len(items))
                # an unfinished index (a killed shard) stays unfinished: merge must still refuse it
                writer.close(finished=bool(idx.meta.get("finished")), compact=True)
            result.ann_removed = (root / "ann").exists()
        result.rewritten = True
    return result
