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

Modules, one job each: :mod:`.layout` (file names, ``index.json``, parts), :mod:`.storage`
(durable writes, the lock), :mod:`.identity` (which model made the embeddings),
:mod:`.reader`, :mod:`.writer`, :mod:`.merge`, :mod:`.embed` (decode, embed, append).
"""

from __future__ import annotations

from .embed import FileResult, embed_files
from .identity import check_compatible, describe_model, model_identity, same_model
from .layout import (
    FORMAT,
    FORMAT_VERSION,
    LOCK_NAME,
    META_NAME,
    MODALITIES,
    EmbeddingIndexError,
    find_shards,
    is_index,
    parse_frame,
    path_key,
    shard_dir,
)
from .merge import MergeResult, merge_shards
from .reader import EmbeddingIndex, Hit
from .writer import IndexWriter

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "META_NAME",
    "MODALITIES",
    "EmbeddingIndex",
    "EmbeddingIndexError",
    "FileResult",
    "Hit",
    "IndexWriter",
    "MergeResult",
    "check_compatible",
    "describe_model",
    "embed_files",
    "find_shards",
    "is_index",
    "merge_shards",
    "model_identity",
    "parse_frame",
    "path_key",
    "same_model",
    "shard_dir",
]
