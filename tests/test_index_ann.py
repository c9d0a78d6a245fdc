"""The approximate index (faiss): recall on clustered data, exact scores, refusal when the
exact index changed since it was built, and ``cavmae index build-ann`` / ``search --ann``
through the real console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_index import MODEL  # noqa: I001

from cavmae.runtime.index import EmbeddingIndex, EmbeddingIndexError, IndexWriter
from cavmae.runtime.index.ann import AnnParams, ApproximateIndex, ann_dir, build_ann

pytest.importorskip("faiss")

D = 16
N = 4000


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """Unit rows around ``centres`` (40 clusters, each with 10 sub-clusters)."""
    sub = centres[:, None, :] + 0.35 * rng.standard_normal((*centres.shape[:1], 10, D))
    pick = rng.integers(0, sub.shape[0] * sub.shape[1], n)
    x = sub.reshape(-1, D)[pick] + 0.12 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, D))
    return centres, clustered(rng, N, centres), clustered(rng, N, centres)


def write(path: Path, audio: np.ndarray, visual: np.ndarray, start: int = 0) -> None:
    n = len(audio)
    has_a = (np.arange(start, start + n) % 10) != 3  # some rows lack a modality
    with IndexWriter(path, model=MODEL, dim=D, commit_every=1000) as w:
        w.add_many([f"/clips/{start + j}.mp4" for j in range(n)], audio, visual,
                   has_audio=has_a, durations=[1.0] * n)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ann") / "idx"
    write(path, data[1], data[2])
    return path


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_recall_at_10_on_clustered_data(index_dir, data, kind):
    build_ann(index_dir, AnnParams(kind=kind))
    index = EmbeddingIndex.open(index_dir)
    ann = ApproximateIndex.open(index)
    assert ann.kind == kind
    queries = clustered(np.random.default_rng(1), 40, data[0])
    recall = []
    for q in queries:
        for target in ("audio", "visual"):
            exact = index.search(q, target, k=10)
            approx = ann.search(q, target, k=10)
            assert len(approx) == 10
            recall.append(len({h.row for h in exact} & {h.row for h in approx}) / 10)
            # re-scored exactly: the same scores as exact search for the same rows
            emb = index.embeddings(target)
            qn = q / np.linalg.norm(q)
            np.testing.assert_allclose([h.score for h in approx],
                                       [emb[h.row] @ qn for h in approx], atol=1e-5)
            assert all(h.item["has_audio"] for h in approx if target == "audio")
    assert np.mean(recall) >= 0.95, np.mean(recall)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_a_k_past_the_row_count_asks_faiss_for_no_more_than_the_rows(tmp_path, data, kind):
    """k = 10**12 returns every row (faiss would allocate k results per query otherwise)."""
    write(tmp_path / "idx", data[1][:60], data[2][:60])
    build_ann(tmp_path / "idx", AnnParams(kind=kind, nlist=1))
    index = EmbeddingIndex.open(tmp_path / "idx")
    hits = ApproximateIndex.open(index).search(data[1][0], "visual", k=10**12)
    assert len(hits) == 60 and hits[0].row == index.search(data[1][0], "visual", k=1)[0].row


def test_outdated_approximate_index_is_refused(tmp_path, data):
    path = tmp_path / "idx"
    write(path, data[1][:1000], data[2][:1000])
    with pytest.raises(EmbeddingIndexError, match="no approximate index"):
        ApproximateIndex.open(path)
    build_ann(path, AnnParams(nlist=8))
    ApproximateIndex.open(path)
    write(path, data[1][1000:1010], data[2][1000:1010], start=1000)
    with pytest.raises(EmbeddingIndexError, match=r"changed since .*1000 rows then, 1010 now"):
        ApproximateIndex.open(path)
    build_ann(path, AnnParams(nlist=8))
    assert len(ApproximateIndex.open(path).search(data[1][0], "audio", k=3)) == 3
    # another index of the same size in its place: not the one it was built from
    other = tmp_path / "other"
    write(other, data[1][:1010], data[2][:1010])
    shutil.rmtree(ann_dir(other), ignore_errors=True)
    shutil.copytree(ann_dir(path), ann_dir(other))
    with pytest.raises(EmbeddingIndexError, match="another index"):
        ApproximateIndex.open(other)


def test_damaged_approximate_index_says_rebuild(tmp_path, data):
    path = tmp_path / "idx"
    write(path, data[1][:1000], data[2][:1000])
    build_ann(path, AnnParams(nlist=8))
    faiss_file = next(ann_dir(path).glob("audio*.faiss"))
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])  # truncated
    with pytest.raises(EmbeddingIndexError, match="damaged.*cavmae index build-ann"):
        ApproximateIndex.open(path).search(data[1][0], "audio", k=3)
    faiss_file.write_bytes(b"junk" * 64)
    with pytest.raises(EmbeddingIndexError, match="damaged.*cavmae index build-ann"):
        ApproximateIndex.open(path).search(data[1][0], "audio", k=3)


# -- the console script ----------------------------------------------------------------------
def cavmae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("cavmae")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cavmae.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_build_ann_and_search_refusing_an_outdated_one(tmp_path, data):
    path = tmp_path / "idx"
    write(path, data[1][:1200], data[2][:1200])
    query = tmp_path / "query.wav"
    query.write_bytes(b"not read: the refusal comes before the model and the query")
    proc = cavmae("search", str(path), "--audio", str(query), "--ann", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cavmae index build-ann" in proc.stderr
    proc = cavmae("index", "build-ann", str(path), "--kind", "ivf", "--nlist", "16", "--json",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    built = json.loads(proc.stdout)
    assert built["kind"] == "ivf" and built["params"]["nlist"] == 16
    assert built["modalities"]["audio"]["count"] == 1080  # every 10th row has no audio
    assert (ann_dir(path) / "visual.faiss").is_file()
    write(path, data[1][1200:1201], data[2][1200:1201], start=1200)
    proc = cavmae("search", str(path), "--audio", str(query), "--ann", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1
    assert "changed since its approximate index was built (1200 rows then, 1201 now)" in proc.stderr
    assert "--exact" in proc.stderr
    proc = cavmae("index", "build-ann", str(tmp_path / "missing"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: no such index")
    proc = cavmae("index", "build-ann", str(path), "--kind", "lsh", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
