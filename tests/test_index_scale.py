"""The index at scale: O(k) item lookups, writers that neither read nor copy the index, a
bounded number of parts, and indexes of the version-1 layout still opening (and migrating).

Behaviour only, no timing: reads are counted, files are garbled where they must not be read,
and the files of existing parts are checked to be the same files after an append.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_index import MODEL, D, check_contents, rows, unit  # noqa: I001

from cavmae.runtime.index import EmbeddingIndex, IndexWriter, path_key
from cavmae.runtime.index import items as items_mod
from cavmae.runtime.index.writer import MERGE_FANOUT, _tier


def bulk(path, data, commit_every):
    """Write ``data`` ((path, audio, visual) rows) through ``add_many`` in one block per commit."""
    with IndexWriter(path, model=MODEL, dim=D, commit_every=commit_every) as w:
        for at in range(0, len(data), commit_every):
            block = data[at : at + commit_every]
            a = np.stack([x if x is not None else np.zeros(D, np.float32) for _, x, _ in block])
            v = np.stack([x if x is not None else np.zeros(D, np.float32) for _, _, x in block])
            w.add_many([p for p, _, _ in block], a, v,
                       has_audio=np.array([x is not None for _, x, _ in block]),
                       has_video=np.array([x is not None for _, _, x in block]),
                       durations=[1.0] * len(block))


def garble(file, keep: list[tuple[int, int]]) -> None:
    """Overwrite ``file`` with ``#`` (no newlines, so no line can be found by scanning), except
    the byte ranges ``keep``."""
    data = bytearray(file.read_bytes())
    out = bytearray(b"#" * len(data))
    for a, b in keep:
        out[a:b] = data[a:b]
    file.write_bytes(bytes(out))


def part_files(idx, prefix):
    return sorted(idx.glob(f"{prefix}*"))


def fingerprint(files):
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size) for f in files}


def test_hits_are_read_at_their_offsets_not_by_a_scan(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = rows(rng, 3000)
    bulk(tmp_path / "idx", data, commit_every=1000)
    index = EmbeddingIndex.open(tmp_path / "idx")
    q = unit(rng, 1)[0]
    want = [(h.row, h.path) for h in index.search(q, "visual", k=5)]
    # count what the lookups read
    read: list[int] = []
    real = os.pread

    def counting(fd, n, offset):
        read.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(items_mod.os, "pread", counting)
    index = EmbeddingIndex.open(tmp_path / "idx")
    hits = index.search(q, "visual", k=5)
    assert [(h.row, h.path) for h in hits] == want
    assert len(read) == 5  # one read per hit
    assert sum(read) < 5 * 200  # the hits' lines only, not the part's ~100 kB
    monkeypatch.undo()
    # every other line unreadable: the lookups still find the hits (a scan could not)
    for store in index._items:
        offs = store.offsets
        keep = [(int(offs[h.row - store.part.start]), int(offs[h.row - store.part.start + 1]))
                for h in hits if store.part.start <= h.row < store.part.start + store.part.count]
        garble(store.file, keep)
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert [(h.row, h.path) for h in index.search(q, "visual", k=5)] == want
    assert index.items([want[2][0]])[0]["path"] == want[2][1]


def test_opening_a_writer_and_appending_neither_reads_nor_copies_the_index(tmp_path):
    rng = np.random.default_rng(1)
    idx = tmp_path / "idx"
    data = rows(rng, 2000)
    bulk(idx, data, commit_every=2000)
    meta = json.loads((idx / "index.json").read_text())
    assert len(meta["chunks"]) == 1
    prefix = meta["chunks"][0]["name"] + "-"
    probe = data[1234][0]
    index = EmbeddingIndex.open(idx)
    row = index.row_of(probe)
    keep = (int(index._items[0].offsets[row]), int(index._items[0].offsets[row + 1]))
    garble(idx / f"{prefix}items.jsonl", [keep])  # only the probed path's line stays readable
    before = fingerprint(part_files(idx, prefix))
    more = rows(rng, 40, start=5000)
    with IndexWriter(idx, model=MODEL, dim=D, commit_every=16) as w:
        assert probe in w and more[0][0] not in w
        for p, a, v in more:
            w.add(p, a, v)
    assert fingerprint(part_files(idx, prefix)) == before  # the same files, untouched
    index = EmbeddingIndex.open(idx)
    assert len(index) == 2040 and index.row_of(more[-1][0]) == 2039
    check_contents_rows(index, more, start=2000)


def check_contents_rows(index, data, start):
    items = index.items(range(start, start + len(data)))
    audio, visual = index.embeddings("audio"), index.embeddings("visual")
    for it, (p, a, v) in zip(items, data, strict=True):
        assert it["path"] == path_key(p)
        if a is not None:
            np.testing.assert_array_equal(audio[it["row"]], a)
        if v is not None:
            np.testing.assert_array_equal(visual[it["row"]], v)


def test_parts_stay_few_and_rows_keep_their_numbers(tmp_path):
    rng = np.random.default_rng(2)
    data = rows(rng, 700)
    idx = tmp_path / "idx"
    for at in range(0, 700, 100):  # seven runs, each ending in a short chunk
        with IndexWriter(idx, model=MODEL, dim=D, commit_every=3) as w:
            for p, a, v in data[at : at + 100]:
                w.add(p, a, v)
    index = EmbeddingIndex.open(idx)
    counts = [p.count for p in index._parts]
    assert sum(counts) == 700
    assert len(counts) < MERGE_FANOUT * (_tier(700) + 1)
    check_contents(index, data)
    assert [it["path"] for it in index.items()] == [path_key(p) for p, _, _ in data]
    names = {f.name.rsplit("-", 1)[0] for f in idx.glob("chunk-*")}
    assert len(names) == len(counts)  # merged parts' files are gone


def test_add_many_refuses_a_bad_block_whole(tmp_path):
    rng = np.random.default_rng(3)
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D) as w:
        w.add("/data/a.mp4", unit(rng, 1)[0], None)
        bad = unit(rng, 3)
        bad[2, 0] = np.nan
        with pytest.raises(Exception, match="c.mp4: audio embedding is not finite"):
            w.add_many(["/data/x.mp4", "/data/b.mp4", "/data/c.mp4"], bad, None)
        with pytest.raises(Exception, match="already in the index"):
            w.add_many(["/data/y.mp4", "/data/a.mp4"], unit(rng, 2), None)
        assert w.count == 1 and "/data/x.mp4" not in w


def test_rows_of_looks_up_many_paths_without_reading_the_items(tmp_path, monkeypatch):
    """A batch of paths is checked by their hashes: each path that is there costs one line read
    (the collision check), each one that is not costs none."""
    rng = np.random.default_rng(6)
    data = rows(rng, 3000)
    bulk(tmp_path / "idx", data, commit_every=1000)
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert len(index._parts) == 3
    present = [17, 1234, 2999, 1000, 5]  # in every part
    absent = [f"/elsewhere/clip{k}.mp4" for k in range(300)]
    queries = absent[:150] + [data[r][0] for r in present] + absent[150:]
    read: list[int] = []
    real = os.pread

    def counting(fd, n, offset):
        read.append(n)
        return real(fd, n, offset)

    monkeypatch.setattr(items_mod.os, "pread", counting)
    got = index.rows_of(queries)
    assert got.tolist() == [-1] * 150 + present + [-1] * 150
    assert len(read) == len(present)
    monkeypatch.undo()
    # every line but the present ones' unreadable: the lookups still answer (a scan could not)
    for store in index._items:
        offs, lo = store.offsets, store.part.start
        garble(store.file, [(int(offs[r - lo]), int(offs[r - lo + 1])) for r in present
                            if lo <= r < lo + store.part.count])
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert index.rows_of(queries).tolist() == got.tolist()
    with IndexWriter(tmp_path / "idx", model=MODEL, dim=D) as w:
        assert w.contains_many(queries).tolist() == [r >= 0 for r in got.tolist()]


# -- the version-1 layout -----------------------------------------------------------------------
def write_v1(path, data, base_rows: int) -> None:
    """An index as version 1 wrote it: base files (holding 2 stray rows more than base_count,
    as a compaction killed before index.json leaves them) and one chunk, no offsets or keys."""
    path.mkdir()

    def save(prefix, block, extra=0):
        a = np.stack([x if x is not None else np.zeros(D, np.float32) for _, _, x, _ in block])
        v = np.stack([x if x is not None else np.zeros(D, np.float32) for _, _, _, x in block])
        m = np.array([[x is not None, y is not None] for _, _, x, y in block])
        junk = unit(np.random.default_rng(9), extra)
        np.save(path / f"{prefix}audio.npy", np.concatenate([a, junk]))
        np.save(path / f"{prefix}visual.npy", np.concatenate([v, junk]))
        np.save(path / f"{prefix}mask.npy", np.concatenate([m, np.ones((extra, 2), bool)]))
        lines = [json.dumps({"row": r, "path": path_key(p), "duration": 1.0,
                             "has_audio": x is not None, "has_video": y is not None}) + "\n"
                 for r, p, x, y in block]
        lines += [json.dumps({"row": -1, "path": f"/junk/{k}"}) + "\n" for k in range(extra)]
        (path / f"{prefix}items.jsonl").write_text("".join(lines))

    numbered = [(r, *x) for r, x in enumerate(data)]
    save("", numbered[:base_rows], extra=2)
    save("chunk-00002-", numbered[base_rows:])
    meta = {"format": "cavmae-embedding-index", "version": 1, "model": MODEL, "dim": D,
            "frame": "middle", "num_frames": 10, "count": len(data), "base_count": base_rows,
            "chunks": [{"name": "chunk-00002", "count": len(data) - base_rows}],
            "next_chunk": 3, "shard": None, "finished": True, "updated": 0.0}
    (path / "index.json").write_text(json.dumps(meta))


def test_version_1_index_opens_as_it_is(tmp_path):
    rng = np.random.default_rng(4)
    data = rows(rng, 30)
    idx = tmp_path / "old"
    write_v1(idx, data, base_rows=20)
    index = EmbeddingIndex.open(idx)
    assert len(index) == 30 and index.embeddings("audio").shape == (30, D)
    check_contents(index, data)  # the base files' stray rows are not read
    assert index.row_of(data[25][0]) == 25 and "/junk/0" not in index
    assert index.rows_of([data[3][0], "/junk/1", data[29][0]]).tolist() == [3, -1, 29]
    q = unit(rng, 1)[0]
    emb, has = index.embeddings("visual"), index.has("visual")
    want = sorted(np.flatnonzero(has), key=lambda r: -float(emb[r] @ q))[:4]
    assert [h.row for h in index.search(q, "visual", k=4)] == want
    assert not (idx / "offsets.npy").exists()  # reading changes nothing


def test_version_1_index_is_migrated_by_its_first_writer_without_a_copy(tmp_path):
    rng = np.random.default_rng(5)
    data, more = rows(rng, 30), rows(rng, 5, start=30)
    idx = tmp_path / "old"
    write_v1(idx, data, base_rows=20)
    arrays = [idx / f"{w}.npy" for w in ("audio", "visual", "mask")]
    arrays += [idx / f"chunk-00002-{w}.npy" for w in ("audio", "visual", "mask")]
    before = fingerprint(arrays)
    with IndexWriter(idx, model=MODEL, dim=D, commit_every=2) as w:
        assert data[3][0] in w and data[27][0] in w and more[0][0] not in w
        for p, a, v in more:
            w.add(p, a, v)
    meta = json.loads((idx / "index.json").read_text())
    assert meta["version"] == 2 and meta["uid"] and meta["base_count"] == 20
    assert (idx / "offsets.npy").is_file() and (idx / "chunk-00002-keys.npy").is_file()
    assert fingerprint(arrays) == before  # embeddings neither copied nor rewritten
    index = EmbeddingIndex.open(idx)
    check_contents(index, data + more)
    assert index.row_of(data[19][0]) == 19 and index.row_of(more[4][0]) == 34
