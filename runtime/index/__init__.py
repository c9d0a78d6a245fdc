"""Audio-visual embedding index on disk: memory-mapped, incremental, crash-safe, mergeable.

An index is a directory of *parts* (row ranges), each a set of files with one prefix::

    INDEX/
      index.json                  metadata, the single source of truth (replaced atomically)
      chunk-00003-audio.npy       float32 [count, D] L2-normalized audio embeddings
      chunk-00003-visual.npy      float32 [count, D] L2-normalized visual embeddings
      chunk-00003-mask.npy        bool    [count, 2] has_audio, has_video per row
      chunk-00003-items.jsonl     one JSON object per row
      chunk-00003-offsets.npy     int64   [count + 1] where each row's line starts
      chunk-00003-keys.npy        uint64  [2, count] path hashes sorted, and their local rows
      audio.npy, ..., keys.npy    the base part (prefix ""), made by version 1's compaction
      ann/                        the optional approximate index (:mod:`.ann`)
      shard-0-of-2/               sub-indexes written by ``cavmae embed --shard i/n`` (same
      shard-1-of-2/               layout), combined into INDEX by :func:`merge_shards`
      .lock                       flock held by the one process writing this directory

``index.json``::

    {"format": "cavmae-embedding-index", "version": 2, "uid": random hex,
     "model": {"sha256", "name", "checkpoint", "ref", "model_kind", "model_config", "precision"},
     "dim": D, "frame": "middle" | "mean" | int, "num_frames": F,
     "count": N,            # rows in the index = base_count + sum of chunk counts
     "base_count": Nb,      # the first Nb rows of the base files (0: no base part)
     "chunks": [{"name": "chunk-00003", "count": 64}, ...],
     "next_chunk": 4, "shard": [i, n] | null, "finished": bool, "updated": unix time}

Rows are numbered globally: the ``base_count`` base rows, then each chunk's rows in order; a
row keeps its number for the life of the index (a prune makes a new index, with a new uid). An item is ``{"row", "path", "duration",
"has_audio", "has_video"}``; ``path`` is absolute and resolved (:func:`path_key`), the key for
incremental runs and de-duplication. A clip without an audio (or video) stream has
``has_audio`` (``has_video``) false: its row in the audio (visual) file holds zeros only to keep
the rows aligned; the mask marks it absent and search never scores it.

Lookups are O(k): a search's ``k`` hits are read from ``items.jsonl`` at their offsets, and
whether a path is in the index is a binary search of each part's ``keys.npy`` (:mod:`.items`;
many paths at once with :meth:`EmbeddingIndex.rows_of` / :meth:`IndexWriter.contains_many`).
Version 1 (no offsets and keys files; written by earlier releases) still opens: its parts are
scanned once in memory when looked up, and the first writer to open it writes the two files
(one read of the items, no copy of the embeddings) and marks it version 2.

Writing (:class:`IndexWriter`, one writer per directory, enforced by ``.lock``): opening reads
``index.json`` only; new rows are buffered and committed every ``commit_every`` rows as a new
chunk (its files written under temporary names, fsynced and renamed, then index.json rewritten
to list it). Parts already there are not rewritten when rows are added: when
:data:`~.writer.MERGE_FANOUT` parts of one size tier pile up at the end they are merged into one
new chunk, which index.json then names instead of them. So each row is copied once per size
tier over its life and an index has O(log N) parts. A process killed at any point leaves
index.json naming only complete files; files it does not name are deleted by the next writer.

Readers (:class:`EmbeddingIndex`) map every part with ``np.load(mmap_mode="r")``, open its
items file, and never take the lock; :meth:`EmbeddingIndex.search` is one matrix-vector product
per part and an ``np.argpartition`` for the top k. :class:`~.ann.ApproximateIndex` searches the
faiss index beside it (``cavmae index build-ann``).

Sharding: each process of a sharded job writes ``INDEX/shard-i-of-n/`` (marked ``finished``
when its run completes), skipping the paths INDEX already has (:meth:`EmbeddingIndex.rows_of`:
looked up by their hashes, the items of INDEX are not read); :func:`merge_shards` checks that
all ``n`` shards are present, finished and made with the same model, appends their rows to INDEX
in blocks (:meth:`IndexWriter.add_many`, skipping paths already there), and removes the shard
directories. A merge interrupted before the removal can simply be run again (the paths
de-duplicate).

Modules, one job each: :mod:`.layout` (file names, ``index.json``, parts), :mod:`.storage`
(the lock), :mod:`.identity` (which model made the embeddings), :mod:`.items` (rows and paths
by offsets and hashes), :mod:`.reader`, :mod:`.writer`, :mod:`.merge`, :mod:`.embed` (decode,
embed, append), :mod:`.ann` (the approximate index, faiss), :mod:`.prune` (a copy without the
rows of deleted or changed files and of damaged rows, published over the index in one rename).
"""

from __future__ import annotations

from .ann import AnnParams, ApproximateIndex, build_ann
from .embed import FileResult, changed_files, embed_files, file_stamp
from .identity import check_compatible, describe_model, model_identity, same_model
from .layout import (
    FORMAT,
    FORMAT_VERSION,
    LOCK_NAME,
    META_NAME,
    MODALITIES,
    EmbeddingIndexError,
    check_new_index_dir,
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
    "AnnParams",
    "ApproximateIndex",
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
    "build_ann",
    "changed_files",
    "check_new_index_dir",
    "check_compatible",
    "describe_model",
    "embed_files",
    "file_stamp",
    "find_shards",
    "is_index",
    "merge_shards",
    "model_identity",
    "parse_frame",
    "path_key",
    "same_model",
    "shard_dir",
]
