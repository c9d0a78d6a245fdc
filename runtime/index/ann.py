"""An approximate nearest-neighbour index beside the exact one (faiss, the ``ann`` extra).

Exact search (:meth:`EmbeddingIndex.search`) reads every row of the target modality per query:
about 0.25 s at a million 768-d rows on two cores. :func:`build_ann` builds, per modality, a
faiss index of the rows that have that modality, into ``INDEX/ann/``::

    INDEX/ann/
      ann.json            kind, parameters, and which exact index (uid, count) it was built from
      audio.faiss         faiss index of the audio rows (8-bit scalar-quantized vectors)
      audio-rows.npy      int64: faiss id -> index row
      visual.faiss, visual-rows.npy

Two kinds: ``ivf`` (inverted lists, ``IndexIVFScalarQuantizer``: k-means cells, ``nprobe`` of
them scanned per query) and ``hnsw`` (a graph, ``IndexHNSWSQ``; slower to build, no training).
Both are opened memory-mapped (faiss ``IO_FLAG_MMAP`` maps IVF's inverted lists, and
``IO_FLAG_MMAP_IFC`` HNSW's vector codes), so an index larger than RAM can be searched; only the
pages a query touches are read.

A query asks faiss for a few times ``k`` candidates and re-scores them with the exact float32
embeddings (memory-mapped, so that reads only those rows): the scores returned are the exact
cosine similarities, and the 8-bit codes only decide which rows are looked at.

The approximate index is a snapshot: rows are only ever appended to an index, so the exact
index's ``uid`` and ``count`` identify what it was built from. When they differ, opening it
fails with one line saying to rebuild it (``cavmae index build-ann``) or search exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cavmae import fsio

from .layout import MODALITIES, EmbeddingIndexError, check_modality
from .reader import EmbeddingIndex, Hit

ANN_DIR = "ann"
ANN_META = "ann.json"
ANN_FORMAT = "cavmae-ann-index"
log = logging.getLogger(__name__)

KINDS = ("ivf", "hnsw")
_BLOCK = 65536  # rows handed to faiss at a time, so building never holds a modality in RAM


def _faiss() -> ModuleType:
    try:
        import faiss
    except ImportError:
        raise EmbeddingIndexError(
            "approximate search needs faiss: pip install 'cavmae[ann]' (faiss-cpu)"
        ) from None
    return faiss


@dataclass(frozen=True)
class AnnParams:
    """How an approximate index is built and searched (defaults scale with the row count)."""

    kind: str = "ivf"
    nlist: int | None = None  # ivf: k-means cells [default: about sqrt(rows), a power of 2]
    nprobe: int | None = None  # ivf: cells scanned per query [default: nlist / 128, >= 8]
    m: int = 32  # hnsw: links per node
    ef_construction: int = 80  # hnsw
    ef_search: int = 128  # hnsw: candidate list per query
    rerank: int = 4  # candidates re-scored exactly per query: rerank * k (at least 40)

    def resolved(self, rows: int) -> AnnParams:
        """These parameters with the defaults filled in for an index of ``rows`` rows."""
        if self.kind not in KINDS:
            raise EmbeddingIndexError(f"--kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        nlist = self.nlist or max(1, 2 ** round(math.log2(max(1.0, math.sqrt(rows)))))
        nlist = max(1, min(nlist, rows // 39 or 1))  # faiss wants >= 39 training rows per cell
        if self.nlist and nlist < self.nlist:
            log.warning("--nlist %d lowered to %d: %d rows train at most %d cells (39 rows each)",
                        self.nlist, nlist, rows, nlist)
        nprobe = self.nprobe or max(8, nlist // 128)  # 8 at 1M rows: see benchmarks/
        return AnnParams(self.kind, nlist, min(nprobe, nlist), self.m, self.ef_construction,
                         self.ef_search, self.rerank)


def ann_dir(index: str | Path) -> Path:
    """``INDEX/ann``."""
    return Path(index) / ANN_DIR


def _source(index: EmbeddingIndex) -> dict[str, Any]:
    """What identifies the exact index's content: rows are only appended, so uid and count."""
    return {"uid": index.meta.get("uid"), "count": len(index)}


def _valid_rows(index: EmbeddingIndex, modality: str) -> np.ndarray:
    return np.flatnonzero(index.has(modality)).astype(np.int64)


def _blocks(index: EmbeddingIndex, modality: str, rows: np.ndarray) -> Any:
    """``rows``' embeddings in blocks of :data:`_BLOCK` rows (memory-mapped reads)."""
    for at in range(0, len(rows), _BLOCK):
        yield np.ascontiguousarray(index.checked_vectors(modality, rows[at : at + _BLOCK]))


def _new_faiss_index(faiss: ModuleType, dim: int, p: AnnParams) -> Any:
    qt = faiss.ScalarQuantizer.QT_8bit
    if p.kind == "hnsw":
        out = faiss.IndexHNSWSQ(dim, qt, p.m, faiss.METRIC_INNER_PRODUCT)
        out.hnsw.efConstruction = p.ef_construction
        return out
    quantizer = faiss.IndexFlatIP(dim)
    out = faiss.IndexIVFScalarQuantizer(quantizer, dim, p.nlist, qt, faiss.METRIC_INNER_PRODUCT)
    out.cp.niter = 10  # k-means iterations: the cells need not be optimal, only spread
    return out


def _build_one(
    index: EmbeddingIndex, modality: str, p: AnnParams, work: Path, seed: int
) -> dict[str, Any]:
    """Build and write one modality's faiss index into ``work``; its entry of ann.json."""
    faiss = _faiss()
    rows = _valid_rows(index, modality)
    entry: dict[str, Any] = {"file": f"{modality}.faiss", "rows": f"{modality}-rows.npy",
                             "count": int(len(rows))}
    np.save(work / entry["rows"], rows)
    if len(rows) == 0:
        return entry
    out = _new_faiss_index(faiss, index.dim, p)
    rng = np.random.default_rng(seed)
    want = len(rows) if p.kind == "hnsw" else min(len(rows), 40 * int(p.nlist or 1))
    want = min(want, 262144)  # enough for the 8-bit ranges and the cells, bounded memory
    sample = np.sort(rng.choice(rows, size=want, replace=False)) if want < len(rows) else rows
    out.train(np.ascontiguousarray(index.checked_vectors(modality, sample)))
    for block in _blocks(index, modality, rows):
        out.add(block)
    faiss.write_index(out, str(work / entry["file"]))
    return entry


def build_ann(index_path: str | Path, params: AnnParams | None = None, *,
              seed: int = 0) -> dict[str, Any]:
    """Build the approximate index of ``index_path`` into ``INDEX/ann`` (replacing one there).

    The new one is written in a temporary directory beside it and renamed into place whole, so
    a search meanwhile uses the old one or the new one. Returns its ``ann.json``.
    """
    _faiss()
    started = time.perf_counter()
    index = EmbeddingIndex.open(index_path)
    if len(index) == 0:
        raise EmbeddingIndexError(f"{index_path} is empty; add clips with cavmae embed first")
    p = (params or AnnParams()).resolved(len(index))
    with fsio.staged_dir(ann_dir(index_path)) as work:
        modalities = {m: _build_one(index, m, p, work, seed) for m in MODALITIES}
        meta = {"format": ANN_FORMAT, "version": 1, "kind": p.kind, "source": _source(index),
                "params": {"nlist": p.nlist, "nprobe": p.nprobe, "m": p.m,
                           "ef_construction": p.ef_construction, "ef_search": p.ef_search,
                           "rerank": p.rerank},
                "modalities": modalities, "built": round(time.time(), 3),
                "build_seconds": round(time.perf_counter() - started, 3)}
        fsio.write_json(work / ANN_META, meta)
    return meta


def read_ann_meta(index_path: str | Path) -> dict[str, Any] | None:
    """``INDEX/ann/ann.json``, or None where no approximate index was built."""
    import json

    file = ann_dir(index_path) / ANN_META
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EmbeddingIndexError(f"cannot read {file}: {e}; build it again") from None
    if not isinstance(meta, dict) or meta.get("format") != ANN_FORMAT:
        raise EmbeddingIndexError(f"{file} is not a cavmae approximate index; build it again")
    return meta


def check_fresh(index: EmbeddingIndex, meta: dict[str, Any] | None) -> dict[str, Any]:
    """``meta`` when it describes an approximate index built from ``index`` as it is now."""
    where = index.path
    if meta is None:
        raise EmbeddingIndexError(
            f"{where} has no approximate index; build it with `cavmae index build-ann {where}`"
            " (or search without --ann)"
        )
    was, now = meta.get("source", {}), _source(index)
    if was != now:
        what = (f"{was.get('count')} rows then, {now['count']} now"
                if was.get("uid") == now["uid"] else "another index then")
        raise EmbeddingIndexError(
            f"{where} has changed since its approximate index was built ({what}); rebuild it"
            f" with `cavmae index build-ann {where}`, or search with --exact"
        )
    return meta


class ApproximateIndex:
    """Approximate search over an :class:`EmbeddingIndex`, faiss indexes memory-mapped."""

    def __init__(self, index: EmbeddingIndex, meta: dict[str, Any]) -> None:
        self.index = index
        self.meta = meta
        self._faiss: dict[str, Any] = {}
        self._rows: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, index: EmbeddingIndex | str | Path) -> ApproximateIndex:
        """The approximate index of ``index``; fails (one line) when there is none or when the
        exact index changed since it was built."""
        idx = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex.open(index)
        return cls(idx, check_fresh(idx, read_ann_meta(idx.path)))

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    def _load(self, modality: str) -> tuple[Any, np.ndarray]:
        if modality not in self._faiss:
            faiss = _faiss()
            entry = self.meta["modalities"][modality]
            d = ann_dir(self.index.path)
            try:
                rows = np.load(d / entry["rows"], mmap_mode="r")
                fi = None
                if entry["count"] != 0:
                    flags = faiss.IO_FLAG_MMAP if self.kind == "ivf" else faiss.IO_FLAG_MMAP_IFC
                    fi = faiss.read_index(str(d / entry["file"]), flags | faiss.IO_FLAG_READ_ONLY)
            except (OSError, ValueError, RuntimeError) as e:  # faiss reports a bad file as RuntimeError
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EmbeddingIndexError(
                    f"the approximate index of {self.index.path} is damaged ({first[:160]});"
                    f" rebuild it with `cavmae index build-ann {self.index.path}`"
                ) from None
            if fi is not None and (rows.ndim != 1 or rows.shape[0] != fi.ntotal):
                raise EmbeddingIndexError(
                    f"the approximate index of {self.index.path} is damaged (its row map does not fit);"
                    f" rebuild it with `cavmae index build-ann {self.index.path}`"
                )
            self._rows[modality], self._faiss[modality] = rows, fi
        return self._faiss[modality], self._rows[modality]

    def candidates(self, query: np.ndarray, target: str, n: int, *,
                   nprobe: int | None = None, ef_search: int | None = None) -> np.ndarray:
        """Index rows of the ``n`` approximate nearest ``target`` rows to ``query``."""
        fi, rowmap = self._load(check_modality(target))
        if fi is None:
            return np.zeros(0, dtype=np.int64)
        n = min(n, int(fi.ntotal))  # faiss allocates n results per query: never more than rows
        if n < 1:
            return np.zeros(0, dtype=np.int64)
        params = self.meta["params"]
        if self.kind == "ivf":
            fi.nprobe = int(nprobe or params["nprobe"])
        else:
            fi.hnsw.efSearch = max(int(ef_search or params["ef_search"]), n)
        q = self.index.unit_query(query)[None]
        _, ids = fi.search(q, n)
        ids = ids[0][ids[0] >= 0]
        return np.asarray(rowmap[ids], dtype=np.int64)

    def search(self, query: np.ndarray, target: str, k: int = 10, *,
               nprobe: int | None = None, ef_search: int | None = None) -> list[Hit]:
        """The ``k`` approximately nearest ``target`` rows, best first, with exact scores."""
        if k < 1:
            raise EmbeddingIndexError(f"k must be at least 1, not {k}")
        n = max(40, int(self.meta["params"].get("rerank", 4)) * k)
        rows = self.candidates(query, target, n, nprobe=nprobe, ef_search=ef_search)
        if len(rows) == 0:
            return []
        scores = self.index.checked_vectors(target, rows) @ self.index.unit_query(query)
        return self.index.ranked(rows, scores, k)
