"""Embedding-index benchmark: exact vs approximate search, recall@10, build time, disk size.

The index is written the way ``cavmae embed`` writes it (:class:`IndexWriter`: 768-d audio and
visual rows, a mask, items), then searched exactly and through ``cavmae index build-ann``'s
faiss index. The embeddings have cluster structure: the centres are real embeddings of the
sample clips (visual: each of the 10 frames; audio: 10-s windows at several offsets) from a
full-size CAV-MAE with random weights, mean removed; every row is a centre perturbed in three
nested levels ("clip", "window", "row"), so rows have near neighbours and far ones, as clips of
one scene, one source and different sources do. Queries are fresh draws (a new row of a known
window), not rows of the index.

    python benchmarks/index_benchmark.py --rows 1000000 --sizes 10000,100000 \\
        --work /tmp/index-bench --out benchmarks/results/index-1m.json

Exact search reads every row; its time at size N is what a query costs without an approximate
index. The approximate index is searched memory-mapped, hits re-scored with the exact rows.
Path lookups (``lookups`` in each run): which of ``--lookups`` paths an index of N rows has, by
the batched hash lookup, against reading every row's path.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLIPS = sorted((ROOT / "examples" / "media").glob("*.mp4"))
MODEL = {"sha256": None, "name": "benchmark (random weights)", "checkpoint": None, "ref": None,
         "model_kind": "pretrain", "model_config": {"embed_dim": 768}, "precision": "fp32"}
LEVELS = (0.55, 0.30, 0.12)  # norm of each nesting level's perturbation, relative to a centre


def real_centres(seed: int = 0) -> dict[str, np.ndarray]:
    """Embeddings of the sample clips' frames and audio windows, full-size random model."""
    import torch

    from cavmae.config import BASE, DEFAULT_PREPROCESS
    from cavmae.media import load_clip
    from cavmae.model import CAVMAEEncoder

    torch.manual_seed(seed)
    model = CAVMAEEncoder(BASE).eval()
    audio, visual = [], []
    with torch.inference_mode():
        for clip_path in CLIPS:
            for offset in (0.0, 1.0, 2.0, 3.0, 4.0):
                clip = load_clip(clip_path, offset=offset, config=DEFAULT_PREPROCESS,
                                 need_video=offset == 0.0)
                ea, _ = model.embed(torch.from_numpy(clip.audio)[None], None)
                audio.append(ea[0].numpy())
                if clip.frames is not None:
                    _, ev = model.embed(None, torch.from_numpy(clip.frames))
                    visual.extend(ev.numpy())
    out = {}
    for name, vecs in (("audio", audio), ("visual", visual)):
        x = np.asarray(vecs, dtype=np.float64)
        x -= x.mean(0)  # a random model's embeddings share a large common part
        out[name] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


class Clustered:
    """Rows ``centre + l1 + l2 + l3`` (nested perturbations, :data:`LEVELS`), L2-normalized.

    Row ``i`` belongs to group ``i * groups // rows`` at each of the two outer levels (their
    offsets drawn once), so any block of rows, and fresh queries, can be made on demand.
    """

    def __init__(self, centres: np.ndarray, rows: int, seed: int) -> None:
        self.c, self.rows = centres, rows
        self.dim = centres.shape[1]
        n1 = max(1, rows // 1000)  # "clips": ~1000 rows each
        self.groups = (n1, n1 * 20)  # "windows": ~50 rows each
        rng = np.random.default_rng(seed)
        self.offsets = [rng.standard_normal((n, self.dim), dtype=np.float32)
                        * np.float32(LEVELS[level] / np.sqrt(self.dim))
                        for level, n in enumerate(self.groups)]

    def make(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g1 = idx * self.groups[0] // self.rows
        g2 = idx * self.groups[1] // self.rows
        x = rng.standard_normal((len(idx), self.dim), dtype=np.float32)
        x *= np.float32(LEVELS[2] / np.sqrt(self.dim))
        x += self.c[g1 % len(self.c)]
        x += self.offsets[0][g1]
        x += self.offsets[1][g2]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def build_index(path: Path, rows: int, centres: dict[str, np.ndarray], seed: int) -> dict:
    """Write ``rows`` rows (every 20th without audio, every 50th without video) with the
    writer, in blocks; the time it took and the size on disk."""
    from cavmae.runtime.index import IndexWriter

    shutil.rmtree(path, ignore_errors=True)
    gens = {m: Clustered(c, rows, seed + k) for k, (m, c) in enumerate(centres.items())}
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    block = 65536
    with IndexWriter(path, model=MODEL, dim=768, commit_every=block) as w:
        for at in range(0, rows, block):
            idx = np.arange(at, min(rows, at + block))
            a, v = gens["audio"].make(idx, rng), gens["visual"].make(idx, rng)
            paths = [f"/clips/{i // 1000:06d}/window-{i % 1000:03d}.mp4" for i in idx]
            w.add_many(paths, a, v, has_audio=idx % 20 != 19, has_video=idx % 50 != 7,
                       durations=[10.0] * len(idx))
    return {"rows": rows, "write_s": round(time.perf_counter() - t0, 1),
            "disk_mb": round(_du(path, skip="ann") / 2**20, 1), "generators": gens}


def _du(path: Path, skip: str | None = None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and not (skip and skip in f.relative_to(path).parts))


def _timed(fn: Any, queries: np.ndarray) -> tuple[list[Any], list[float]]:
    out, times = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        times.append((time.perf_counter() - t) * 1000)
    return out, times


def _ms(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(times, 50)), 3),
            "p90_ms": round(float(np.percentile(times, 90)), 3), "n": len(times)}


def measure(path: Path, gens: dict[str, Clustered], n_queries: int, n_exact: int,
            kind: str, seed: int, nprobes: list[int]) -> dict:
    """Exact and approximate query times, recall@10, ANN build time and disk size; for ivf
    also at each of ``nprobes`` (cells scanned per query) on the same index."""
    from cavmae.runtime.index import EmbeddingIndex
    from cavmae.runtime.index.ann import AnnParams, ApproximateIndex, ann_dir, build_ann

    t0 = time.perf_counter()
    build_ann(path, AnnParams(kind=kind))
    build_s = time.perf_counter() - t0
    index = EmbeddingIndex.open(path)
    ann = ApproximateIndex.open(index)
    rng = np.random.default_rng(seed + 99)
    res: dict[str, Any] = {"kind": kind, "ann_build_s": round(build_s, 1),
                           "ann_disk_mb": round(_du(ann_dir(path)) / 2**20, 1),
                           "params": ann.meta["params"], "targets": {}}
    settings = [None] + (nprobes if kind == "ivf" else [])
    for target in ("audio", "visual"):
        g = gens[target]
        q = g.make(rng.integers(0, g.rows, n_queries), rng)
        exact, t_exact = _timed(lambda x, t=target: index.search(x, t, 10), q[:n_exact])
        out: dict[str, Any] = {"exact": _ms(t_exact)}
        for nprobe in settings:
            ann.search(q[0], target, 10, nprobe=nprobe)  # warm-up: header and centroids
            approx, t_ann = _timed(lambda x, t=target, n=nprobe: ann.search(x, t, 10, nprobe=n), q)
            recall = [len({h.row for h in a} & {h.row for h in e}) / 10
                      for a, e in zip(approx, exact, strict=False)]
            out["ann" if nprobe is None else f"ann_nprobe_{nprobe}"] = {
                **_ms(t_ann), "recall_at_10": round(float(np.mean(recall)), 4),
                "recall_queries": len(recall)}
        res["targets"][target] = out
    return res


def lookups(path: Path, rows: int, n: int, seed: int) -> dict:
    """Which of ``n`` paths (half in the index, half not) the index has: the batched hash
    lookup a sharded ``cavmae embed`` makes (``rows_of``) against reading every item's path
    (what it did before), and the writer's ``contains_many`` (opening a writer included)."""
    from cavmae.runtime.index import EmbeddingIndex, IndexWriter

    rng = np.random.default_rng(seed + 7)
    have = rng.integers(0, rows, n // 2)
    paths = [f"/clips/{i // 1000:06d}/window-{i % 1000:03d}.mp4" for i in have]
    paths += [f"/new/{k:06d}.mp4" for k in range(n - len(paths))]
    index = EmbeddingIndex.open(path)
    t0 = time.perf_counter()
    found = index.rows_of(paths)
    t_rows = time.perf_counter() - t0
    assert int((found >= 0).sum()) == len(have)
    t0 = time.perf_counter()
    with IndexWriter(path, model=MODEL, dim=768) as w:
        there = w.contains_many(paths)
    t_writer = time.perf_counter() - t0
    assert there.tolist() == (found >= 0).tolist()
    t0 = time.perf_counter()
    every = EmbeddingIndex.open(path).paths()
    t_all = time.perf_counter() - t0
    assert sum(p in every for p in paths) == len(have)
    return {"paths": n, "rows_of_ms": round(t_rows * 1000, 1),
            "rows_of_us_per_path": round(t_rows / n * 1e6, 2),
            "writer_contains_many_ms": round(t_writer * 1000, 1),
            "read_all_paths_ms": round(t_all * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sizes", default="10000,100000", help="smaller indexes, for the cross-over")
    ap.add_argument("--kinds", default="ivf", help="ANN kinds at --rows (hnsw builds slowly)")
    ap.add_argument("--small-kinds", default="ivf,hnsw", help="ANN kinds at --sizes")
    ap.add_argument("--nprobes", default="4,8,16,32", help="ivf: also search with these nprobe")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=30)
    ap.add_argument("--lookups", type=int, default=10000,
                    help="paths looked up per index (half of them in it)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cavmae-index-bench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the indexes under --work")
    args = ap.parse_args()

    import faiss

    t0 = time.perf_counter()
    cached = args.work / "centres.npz"  # the model run is the slow part on a busy machine
    if cached.is_file():
        centres = dict(np.load(cached))
    else:
        centres = real_centres()
        args.work.mkdir(parents=True, exist_ok=True)
        np.savez(cached, **centres)
    record: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "numpy": np.__version__, "faiss": faiss.__version__,
                    "faiss_threads": faiss.omp_get_max_threads()},
        "centres": {m: len(c) for m, c in centres.items()},
        "centres_s": round(time.perf_counter() - t0, 1), "levels": LEVELS, "runs": []}
    sizes = [int(s) for s in args.sizes.split(",") if s] + [args.rows]
    for size in sizes:
        kinds = (args.kinds if size == args.rows else args.small_kinds).split(",")
        path = args.work / f"index-{size}"
        built = build_index(path, size, centres, seed=1)
        gens = built.pop("generators")
        built["lookups"] = lookups(path, size, args.lookups, seed=1)
        for kind in kinds:
            nprobes = [int(x) for x in args.nprobes.split(",") if x]
            run = {**built, **measure(path, gens, args.queries, args.exact_queries, kind, 1,
                                      nprobes)}
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    record["total_s"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}))


if __name__ == "__main__":
    main()
