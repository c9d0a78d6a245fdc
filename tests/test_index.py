"""The embedding index format: writing, incremental appends, crash safety, search, merging.

No model here: rows are random unit vectors written straight through ``IndexWriter``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cavmae.runtime.index import (
    EmbeddingIndex,
    EmbeddingIndexError,
    IndexWriter,
    merge_shards,
    path_key,
    shard_dir,
)

D = 16
MODEL = {"sha256": "a" * 64, "name": "tiny", "checkpoint": "/x/tiny.pth", "ref": "/x/tiny.pth",
         "model_kind": "classifier", "model_config": {"embed_dim": D}, "precision": "fp32"}
OTHER = {**MODEL, "sha256": "b" * 64}


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(rng: np.random.Generator, n: int, start: int = 0, root: str = "/data"):
    """``n`` fake clips: (path, audio or None, visual or None); every 5th lacks audio, every 7th
    video (unless it lacks audio)."""
    a, v = unit(rng, n), unit(rng, n)
    out = []
    for j in range(n):
        k = start + j
        no_video = k % 7 == 6 and k % 5 != 4  # never neither
        out.append((f"{root}/clip{k:03d}.mp4", None if k % 5 == 4 else a[j], None if no_video else v[j]))
    return out


def write(path, data, commit_every=3, model=MODEL, **kw):
    with IndexWriter(path, model=model, dim=D, commit_every=commit_every, **kw) as w:
        for p, a, v in data:
            w.add(p, a, v, duration=10.0)
    return w


def check_contents(index: EmbeddingIndex, data) -> None:
    by_path = {it["path"]: it for it in index.items()}
    assert len(index) == len(data) == len(by_path)
    audio, visual = index.embeddings("audio"), index.embeddings("visual")
    has_a, has_v = index.has("audio"), index.has("visual")
    for p, a, v in data:
        it = by_path[path_key(p)]
        r = it["row"]
        assert it["has_audio"] == (a is not None) == has_a[r]
        assert it["has_video"] == (v is not None) == has_v[r]
        if a is not None:
            np.testing.assert_array_equal(audio[r], a)
        if v is not None:
            np.testing.assert_array_equal(visual[r], v)


def test_write_compact_reopen(tmp_path):
    rng = np.random.default_rng(0)
    data = rows(rng, 10)
    write(tmp_path / "idx", data)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["count"] == 10 and meta["finished"] and meta["version"] == 2
    assert [c["count"] for c in meta["chunks"]] == [3, 3, 3, 1]  # closing copies nothing
    check_contents(EmbeddingIndex.open(tmp_path / "idx"), data)
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D) as w:
        w.compact()  # on request: one part
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert [c["count"] for c in meta["chunks"]] == [10]
    assert len(list((tmp_path / "idx").glob("chunk-*"))) == 6  # the part's six files
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert isinstance(index.embeddings("audio"), np.memmap)
    assert [it["row"] for it in index.items()] == list(range(10))
    check_contents(index, data)


def test_incremental_append_keeps_rows(tmp_path):
    rng = np.random.default_rng(1)
    first, second = rows(rng, 6), rows(rng, 5, start=6)
    write(tmp_path / "idx", first)
    before = EmbeddingIndex.open(tmp_path / "idx").embeddings("visual").copy()
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D) as w:
        assert first[0][0] in w and second[0][0] not in w
        with pytest.raises(EmbeddingIndexError, match="already"):
            w.add(first[0][0], first[0][1], first[0][2])
        for p, a, v in second:
            w.add(p, a, v)
    index = EmbeddingIndex.open(tmp_path / "idx")
    np.testing.assert_array_equal(index.embeddings("visual")[:6], before)
    check_contents(index, first + second)


def test_a_damaged_part_is_named_by_readers_and_writers(tmp_path):
    write(tmp_path / "idx", rows(np.random.default_rng(5), 4))
    part = sorted((tmp_path / "idx").glob("chunk-*-audio.npy"))[0]
    for bad in (np.zeros((3, D * 2), np.float32), np.zeros((3, D), np.float64)):  # wrong width, type
        np.save(part, bad)
        with pytest.raises(EmbeddingIndexError, match="damaged"):
            EmbeddingIndex.open(tmp_path / "idx")
        with pytest.raises(EmbeddingIndexError, match="damaged"):  # no rows added to it either
            IndexWriter(tmp_path / "idx", model=MODEL, dim=D)
    write(tmp_path / "idx2", rows(np.random.default_rng(5), 4))
    items = sorted((tmp_path / "idx2").glob("chunk-*-items.jsonl"))[0]
    items.write_text("garbage\n")  # an items file cut short: readers fail at its rows, so writers refuse
    with pytest.raises(EmbeddingIndexError, match=f"{items.name} is damaged"):
        IndexWriter(tmp_path / "idx2", model=MODEL, dim=D)


def test_a_chunk_name_pointing_outside_the_index_is_damage(tmp_path):
    """index.json names its chunks; an edited name with a folder part must not make a reader
    (search, serve --index) read files outside the index."""
    import json
    import shutil

    write(tmp_path / "idx", rows(np.random.default_rng(6), 3))
    shutil.copytree(tmp_path / "idx", tmp_path / "elsewhere")
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["chunks"][0]["name"] = "../elsewhere/" + meta["chunks"][0]["name"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(EmbeddingIndexError, match="chunk named '../elsewhere/chunk-.*damaged"):
        EmbeddingIndex.open(tmp_path / "idx")


def test_refuses_other_model_frame_dim_and_second_writer(tmp_path):
    write(tmp_path / "idx", rows(np.random.default_rng(2), 2))
    with pytest.raises(EmbeddingIndexError, match="not of"):
        IndexWriter(tmp_path / "idx", model=OTHER, dim=D)
    with pytest.raises(EmbeddingIndexError, match="frame"):
        IndexWriter(tmp_path / "idx", model=MODEL, dim=D, frame="mean")
    with pytest.raises(EmbeddingIndexError, match="dimension"):
        IndexWriter(tmp_path / "idx", model=MODEL, dim=D + 1)
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D):
        with pytest.raises(EmbeddingIndexError, match="another process"):
            IndexWriter(tmp_path / "idx", model=MODEL, dim=D)
    with pytest.raises(EmbeddingIndexError, match="not an embedding index"):
        EmbeddingIndex.open(tmp_path)


def test_killed_writer_keeps_committed_chunks(tmp_path):
    """A process killed mid-run (no close, no compaction) leaves its committed rows readable;
    a half-written chunk and tmp files are cleaned up by the next writer."""
    idx = tmp_path / "idx"
    script = textwrap.dedent(f"""
        import os, numpy as np
        from cavmae.runtime.index import IndexWriter
        rng = np.random.default_rng(3)
        w = IndexWriter({str(idx)!r}, model={MODEL!r}, dim={D}, commit_every=4)
        for k in range(10):
            x = rng.standard_normal({D}).astype(np.float32)
            w.add(f"/data/c{{k}}.mp4", x / np.linalg.norm(x), None)
        os._exit(9)  # killed: 2 chunks of 4 committed, 2 rows only buffered
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    meta = json.loads((idx / "index.json").read_text())
    assert meta["count"] == 8 and len(meta["chunks"]) == 2 and not meta["finished"]
    index = EmbeddingIndex.open(idx)
    assert len(index) == 8 and index.has("audio").all() and not index.has("visual").any()
    # debris of a kill between a chunk's rename and index.json: must not be picked up
    np.save(idx / "chunk-00099-audio.npy", np.zeros((1, D), np.float32))
    (idx / "audio.npy.tmp").write_bytes(b"partial")
    rng = np.random.default_rng(4)
    more = rows(rng, 3, start=20)
    write(idx, more)
    assert not (idx / "chunk-00099-audio.npy").exists() and not (idx / "audio.npy.tmp").exists()
    index = EmbeddingIndex.open(idx)
    assert len(index) == 11
    assert sorted(it["path"] for it in index.items())[:3] == ["/data/c0.mp4", "/data/c1.mp4", "/data/c2.mp4"]


def test_search_matches_brute_force_and_skips_missing_rows(tmp_path):
    rng = np.random.default_rng(6)
    data = rows(rng, 23)
    write(tmp_path / "idx", data, commit_every=5)
    # leave some rows in chunks (no compaction) to search across parts
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D, commit_every=2) as w:
        for p, a, v in rows(rng, 4, start=23):
            w.add(p, a, v)
        w.commit()
        index = EmbeddingIndex.open(tmp_path / "idx")
        assert len(index._parts) == 7  # 5, 5, 5, 5, 3, 2, 2: one tier short of a merge
        q = unit(rng, 1)[0]
        for target in ("audio", "visual"):
            emb, has = index.embeddings(target), index.has(target)
            hits = index.search(q * 3.0, target, k=7)  # the query is normalized
            want = sorted(np.flatnonzero(has), key=lambda r: -float(emb[r] @ q))[:7]
            assert [h.row for h in hits] == want
            assert [h.rank for h in hits] == list(range(1, 8))
            np.testing.assert_allclose([h.score for h in hits], [emb[r] @ q for r in want], atol=1e-6)
            assert all(h.item["has_audio" if target == "audio" else "has_video"] for h in hits)
            # k larger than the qualifying rows: only those come back
            assert len(index.search(q, target, k=100)) == int(has.sum())
        # a row's own embedding finds it first with score 1
        own = index.embeddings("visual")[3]
        top = index.search(own, "visual", k=1)[0]
        assert top.row == 3 and top.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(EmbeddingIndexError, match="dimension"):
        index.search(np.ones(D + 1), "audio")
    with pytest.raises(EmbeddingIndexError, match="modality"):
        index.search(q, "text")


def _shards(root, n, data, model=MODEL, finished=True):
    for i in range(n):
        part = [r for k, r in enumerate(data) if k % n == i]
        w = IndexWriter(shard_dir(root, (i, n)), model=model, dim=D, shard=(i, n), commit_every=2)
        for p, a, v in part:
            w.add(p, a, v, duration=1.0)
        w.close(finished=finished or i > 0)


def test_merge_shards(tmp_path):
    rng = np.random.default_rng(7)
    data = rows(rng, 9)
    root = tmp_path / "idx"
    _shards(root, 3, data)
    res = merge_shards(root)
    assert (res.shards, res.added, res.duplicates, res.count) == (3, 9, 0, 9)
    assert not list(root.glob("shard-*"))
    check_contents(EmbeddingIndex.open(root), data)
    # a second job over more files: duplicates skipped, new rows appended
    more = rows(rng, 4, start=9)
    _shards(root, 2, data[:3] + more)
    res = merge_shards(root)
    assert (res.added, res.duplicates, res.count) == (4, 3, 13)
    check_contents(EmbeddingIndex.open(root), data + more)


def test_merge_appends_in_blocks_and_keeps_extra_fields(tmp_path, monkeypatch):
    """Shard rows go in through add_many, a block at a time (never row by row)."""
    rng = np.random.default_rng(11)
    data = rows(rng, 23)
    root = tmp_path / "idx"
    for i in range(2):
        with IndexWriter(shard_dir(root, (i, 2)), model=MODEL, dim=D, shard=(i, 2)) as w:
            for k, (p, a, v) in enumerate(data):
                if k % 2 == i:
                    w.add(p, a, v, duration=1.0, label=f"c{k}")
    write(root, data[:4])  # the main index has 4 of them already
    blocks: list[int] = []
    real = IndexWriter.add_many

    def counted(self, paths, *args, **kw):
        blocks.append(len(paths))
        return real(self, paths, *args, **kw)

    monkeypatch.setattr(IndexWriter, "add", lambda *a, **k: pytest.fail("row-by-row add"))
    monkeypatch.setattr(IndexWriter, "add_many", counted)
    res = merge_shards(root, commit_every=5)
    assert (res.added, res.duplicates, res.count) == (19, 4, 23)
    assert sum(blocks) == 19 and max(blocks) <= 5 and len(blocks) <= 6
    index = EmbeddingIndex.open(root)
    check_contents(index, data)
    labels = {it["path"]: it.get("label") for it in index.items()}
    assert labels[path_key(data[4][0])] == "c4" and labels[path_key(data[0][0])] is None


def test_merge_refuses_incomplete_or_mixed_shards(tmp_path):
    rng = np.random.default_rng(8)
    data = rows(rng, 6)
    root = tmp_path / "a"
    _shards(root, 2, data, finished=False)
    with pytest.raises(EmbeddingIndexError, match="did not finish"):
        merge_shards(root)
    root = tmp_path / "b"
    _shards(root, 3, data)
    shutil.rmtree(root / "shard-1-of-3")
    with pytest.raises(EmbeddingIndexError, match="missing"):
        merge_shards(root)
    root = tmp_path / "c"
    _shards(root, 2, data)
    w = IndexWriter(shard_dir(root, (0, 3)), model=MODEL, dim=D)
    w.close()
    with pytest.raises(EmbeddingIndexError, match="different jobs"):
        merge_shards(root)
    root = tmp_path / "d"
    _shards(root, 2, data)
    shutil.rmtree(root / "shard-1-of-2")
    w = IndexWriter(shard_dir(root, (1, 2)), model=OTHER, dim=D)
    w.add("/data/z.mp4", unit(rng, 1)[0], None)
    w.close()
    with pytest.raises(EmbeddingIndexError, match="not of"):
        merge_shards(root)
    with pytest.raises(EmbeddingIndexError, match="--merge"):
        EmbeddingIndex.open(root)  # only shards: say how to combine them
    with pytest.raises(EmbeddingIndexError, match="no such index"):
        merge_shards(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingIndexError, match="no shard"):
        merge_shards(tmp_path / "empty")


class _FakePipeline:
    """Embeds by summing: audio [B, T, F] -> [B, D], frames [B, F, ...] -> [B, D]."""

    num_frames = 2

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []

    def embed_audio(self, audio: np.ndarray) -> np.ndarray:
        self.batches.append(("audio", len(audio)))
        return np.repeat(audio.reshape(len(audio), -1).sum(1, keepdims=True), D, 1)

    def embed_frames(self, frames: np.ndarray, frame: str | int) -> np.ndarray:
        assert frame == "middle"
        self.batches.append(("visual", len(frames)))
        return np.repeat(frames.reshape(len(frames), -1).sum(1, keepdims=True), D, 1)


def test_embed_files_decodes_through_the_shared_prefetch(tmp_path, monkeypatch):
    """The embed driver: decoding via cavmae.prefetch, results in input order, a file that
    fails yields its one-line reason and the job goes on, batches of ``batch`` clips."""
    from cavmae.errors import MediaError
    from cavmae.prefetch import prefetch
    from cavmae.runtime.index import embed as embed_mod
    from cavmae.runtime.index import embed_files

    used: list[dict] = []

    def spy(fn, items, **kw):
        used.append(kw)
        return prefetch(fn, items, **kw)

    def fake_decode(path, pipeline):
        k = int(path.stem[1:])
        if k == 2:
            raise MediaError(f"{path}: cannot decode")
        if k == 4:
            raise ValueError("odd\nsecond line")
        audio = None if k == 5 else np.full((3, 2), k + 1, dtype=np.float32)
        frames = np.full((2, 1), k + 1, dtype=np.float32)
        return embed_mod._Decoded(path, audio, frames, float(k), {"size": k, "mtime_ns": k})

    monkeypatch.setattr(embed_mod, "prefetch", spy)
    monkeypatch.setattr(embed_mod, "_decode", fake_decode)
    paths = [tmp_path / f"c{k}.mp4" for k in range(7)]
    pipe = _FakePipeline()
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D, commit_every=2) as w:
        results = list(embed_files(pipe, paths, w, batch=2, workers=2))
    assert used == [{"workers": 2, "thread_name": "cavmae-decode"}]
    # one result per path; a failure is reported at once, good clips when their batch is done
    by_path = {r.path: r for r in results}
    assert len(results) == len(by_path) == len(paths) and set(by_path) == set(paths)
    assert by_path[paths[2]].error == f"{paths[2]}: cannot decode"
    assert by_path[paths[2]].row is None
    assert by_path[paths[4]].error == f"{paths[4]}: ValueError: odd"
    good = [r for r in results if r.error is None]
    assert [r.path for r in good] == [paths[k] for k in (0, 1, 3, 5, 6)]  # input order
    assert [r.row for r in good] == [0, 1, 2, 3, 4]
    assert not by_path[paths[5]].has_audio and by_path[paths[5]].has_video
    # batches [c0, c1], [c3, c5 (no audio)], [c6]
    assert pipe.batches == [("audio", 2), ("visual", 2), ("audio", 1), ("visual", 2),
                            ("audio", 1), ("visual", 1)]
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert [it["path"] for it in index.items()] == [path_key(r.path) for r in good]
    np.testing.assert_allclose(index.embeddings("visual")[:, 0], [2, 4, 8, 12, 14])
    assert [it["duration"] for it in index.items()] == [0.0, 1.0, 3.0, 5.0, 6.0]


def test_changed_files_compares_each_rows_file_stamp(tmp_path, monkeypatch):
    from cavmae.runtime.index import changed_files, file_stamp
    from cavmae.runtime.index import embed as embed_mod

    files = [tmp_path / f"c{k}.mp4" for k in range(5)]
    for f in files:
        f.write_bytes(b"clip")
    rng = np.random.default_rng(7)
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D) as w:
        for f, a in zip(files[:4], unit(rng, 4), strict=True):  # the fifth is not indexed
            w.add(f, a, None, duration=1.0, **file_stamp(f))
        w.add(tmp_path / "old.mp4", unit(rng, 1)[0], None)  # a row without a stamp: not judged
    files[1].write_bytes(b"another clip")  # size changed
    t = files[3].stat().st_mtime_ns + 10**9
    os.utime(files[3], ns=(t, t))  # time changed
    (tmp_path / "old.mp4").write_bytes(b"x")
    monkeypatch.setattr(embed_mod, "_STAMP_BLOCK", 2)  # several blocks
    index = EmbeddingIndex.open(tmp_path / "idx")
    got = changed_files(index, [*files, tmp_path / "old.mp4", tmp_path / "gone.mp4"])
    assert got == [files[1], files[3]]


def test_prune_drops_deleted_and_changed_files_and_keeps_the_rest(tmp_path):
    from cavmae.runtime.index import file_stamp
    from cavmae.runtime.index.prune import prune_index

    files = [tmp_path / "media" / f"c{k}.mp4" for k in range(9)]
    files[0].parent.mkdir()
    for f in files:
        f.write_bytes(b"clip")
    rng = np.random.default_rng(3)
    data = [(str(f), a, v) for f, (_, a, v) in zip(files, rows(rng, 9), strict=True)]
    root = tmp_path / "idx"
    with IndexWriter(root, model=MODEL, dim=D, commit_every=2) as w:
        for p, a, v in data:
            w.add(p, a, v, duration=1.0, **file_stamp(p), note=Path(p).name)
        w.add(tmp_path / "media" / "old.mp4", unit(rng, 1)[0], None)  # unstamped: judged by presence
    (tmp_path / "media" / "old.mp4").write_bytes(b"x")
    (root / "ann").mkdir()  # stands in for an approximate index: its row numbers would go stale
    before = EmbeddingIndex.open(root).meta["uid"]
    files[2].unlink()
    files[5].unlink()
    files[7].write_bytes(b"another clip")  # changed since it was embedded

    dry = prune_index(root, dry_run=True)
    assert (dry.kept, dry.dropped["missing"], dry.dropped["changed"], dry.rewritten) == (7, 2, 1, False)
    assert EmbeddingIndex.open(root).meta["uid"] == before and len(EmbeddingIndex.open(root)) == 10
    only_missing = prune_index(root, changed=False, dry_run=True)
    assert (only_missing.kept, sum(only_missing.dropped.values())) == (8, 2)

    result = prune_index(root, block=3)  # several blocks
    assert (result.kept, result.dropped["missing"], result.dropped["changed"]) == (7, 2, 1)
    assert result.rewritten and result.ann_removed and not (root / "ann").exists()
    assert {p for p, _ in result.examples} == {path_key(files[k]) for k in (2, 5, 7)}
    index = EmbeddingIndex.open(root)
    assert index.meta["uid"] != before and index.meta["finished"]
    kept = [d for k, d in enumerate(data) if k not in (2, 5, 7)]
    by_path = {it["path"]: it for it in index.items()}
    assert len(index) == 7 and path_key(tmp_path / "media" / "old.mp4") in by_path
    check_contents_subset(index, kept)
    assert by_path[path_key(files[0])]["note"] == "c0.mp4" and "mtime_ns" in by_path[path_key(files[0])]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]  # no staging left
    again = prune_index(root)
    assert not again.rewritten and sum(again.dropped.values()) == 0 and again.kept == 7
    # a writer still opens it, and adds to it
    with IndexWriter(root, model=MODEL, dim=D) as w:
        w.add(files[2], unit(rng, 1)[0], None)
    assert len(EmbeddingIndex.open(root)) == 8


def check_contents_subset(index: EmbeddingIndex, data) -> None:
    """Each of ``data``'s clips is in ``index`` with its embeddings and stream flags."""
    rows_of = index.rows_of([p for p, _, _ in data])
    audio, visual = index.embeddings("audio"), index.embeddings("visual")
    has_a, has_v = index.has("audio"), index.has("visual")
    for (_, a, v), r in zip(data, rows_of, strict=True):
        assert r >= 0
        assert has_a[r] == (a is not None) and has_v[r] == (v is not None)
        if a is not None:
            np.testing.assert_array_equal(audio[r], a)
        if v is not None:
            np.testing.assert_array_equal(visual[r], v)


def test_prune_refuses_what_it_cannot_prune(tmp_path):
    from cavmae.runtime.index.prune import prune_index

    with pytest.raises(EmbeddingIndexError, match="no index at"):
        prune_index(tmp_path / "nothing")
    rng = np.random.default_rng(4)
    _shards(tmp_path / "sharded", 2, rows(rng, 4))
    write(tmp_path / "sharded", rows(rng, 2, start=10))
    with pytest.raises(EmbeddingIndexError, match="not merged"):
        prune_index(tmp_path / "sharded")
    write(tmp_path / "busy", rows(rng, 2))
    with IndexWriter(tmp_path / "busy", model=MODEL, dim=D), pytest.raises(EmbeddingIndexError, match="another process"):
        prune_index(tmp_path / "busy")


def test_a_file_name_that_is_not_utf8_is_stored_and_found(tmp_path):
    """A name of bytes that are not UTF-8 (Python's surrogate escapes) is written, looked up and
    read back as the same name, beside an ordinary non-ASCII one."""
    rng = np.random.default_rng(5)
    latin1 = os.fsdecode(b"/data/caf\xe9.mp4")
    names = [latin1, "/data/café.mp4", "/data/plain.mp4"]
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D, commit_every=2) as w:
        for name, a in zip(names, unit(rng, 3), strict=True):
            w.add(name, a, None, duration=1.0)
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert [it["path"] for it in index.items()] == [path_key(n) for n in names]
    assert list(index.rows_of(names)) == [0, 1, 2] and latin1 in index
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D) as w:
        assert w.contains_many(names).all()


def test_prune_through_a_link_of_an_unfinished_shard_after_a_killed_prune(tmp_path):
    """A link to the index: the index is pruned, the link kept. A shard that did not finish
    stays unfinished (merge must still refuse it). A copy a killed prune left is removed."""
    from cavmae.fsio import temp_sibling
    from cavmae.runtime.index.prune import prune_index

    rng = np.random.default_rng(6)
    files = [tmp_path / f"c{k}.mp4" for k in range(3)]
    for f in files:
        f.write_bytes(b"clip")
    shard = shard_dir(tmp_path / "idx", (0, 2))
    w = IndexWriter(shard, model=MODEL, dim=D, shard=(0, 2))
    for f, a in zip(files, unit(rng, 3), strict=True):
        w.add(f, a, None, duration=1.0)
    w.close(finished=False)  # killed before it finished
    files[1].unlink()
    (tmp_path / "link").symlink_to(shard)
    leftover = temp_sibling(shard)
    (leftover / "sub").mkdir(parents=True)  # what a prune killed mid-copy leaves
    result = prune_index(tmp_path / "link")
    assert result.rewritten and (tmp_path / "link").is_symlink() and not leftover.exists()
    pruned = EmbeddingIndex.open(shard)
    assert len(pruned) == 2 and pruned.meta["shard"] == [0, 2] and not pruned.meta["finished"]
    with pytest.raises(EmbeddingIndexError, match="is a file"):
        prune_index(files[0])
