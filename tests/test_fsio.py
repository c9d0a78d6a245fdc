"""cavmae.fsio: atomic writes, directory publishing, hashes and locks (the one implementation)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cavmae import fsio

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file semantics")


def _py(code: str, *args: str, wait: bool = True) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (another process, as a second writer would be)."""
    cmd = [sys.executable, "-c", textwrap.dedent(code), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- writing ---------------------------------------------------------------------------------


def test_writes_bytes_text_json_with_parents_and_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        b = fsio.write_bytes(tmp_path / "a" / "b" / "x.bin", b"\x00\x01")
        t = fsio.write_text(tmp_path / "t.txt", "grüße")
        j = fsio.write_json(tmp_path / "j.json", {"k": [1, 2]}, indent=1)
    finally:
        os.umask(umask)
    assert b.read_bytes() == b"\x00\x01"
    assert t.read_bytes() == "grüße".encode()
    assert j.read_text().endswith("\n") and json.loads(j.read_text()) == {"k": [1, 2]}
    assert b.stat().st_mode & 0o777 == 0o644  # umask, not mkstemp's 0600
    assert _hidden(tmp_path) == [] and _hidden(b.parent) == []


def test_temp_names_are_unique_hidden_siblings_and_map_back(tmp_path: Path) -> None:
    dest = tmp_path / "hashes.json"
    names = {fsio.temp_sibling(dest) for _ in range(200)}
    assert len(names) == 200  # never a fixed name like hashes.tmp
    for n in names:
        assert n.parent == tmp_path and n.name.startswith(".hashes.json.") and n.name.endswith(".tmp")
        assert str(os.getpid()) in n.name
        assert fsio.temp_owner(n.name) == "hashes.json"
    assert fsio.temp_owner(fsio.temp_sibling(dest, "old").name) == "hashes.json"
    assert fsio.temp_owner("hashes.json") is None and fsio.temp_owner(".hashes.json.tmp") is None


def test_fsync_before_rename_then_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    dirs: set[int] = set()
    real_open = os.open

    def fake_open(path, flags, *a):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *a)
        if os.path.isdir(path):
            dirs.add(fd)
        return fd

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("dir" if fd in dirs else "file"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    fsio.write_bytes(tmp_path / "f", b"x")
    assert events[0] == "file" and "rename" in events
    assert events.index("rename") > events.index("file") and events[-1] == "dir"


def test_an_error_in_the_block_keeps_the_old_file(tmp_path: Path) -> None:
    dest = fsio.write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError), fsio.atomic_open(dest, "w") as f:
        f.write("new, half")
        raise RuntimeError("writer failed")
    assert dest.read_text() == "old" and _hidden(tmp_path) == []
    with pytest.raises(RuntimeError), fsio.atomic_path(dest) as tmp:
        tmp.write_text("new")
        raise RuntimeError("writer failed")
    assert dest.read_text() == "old" and _hidden(tmp_path) == []


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    dest = fsio.write_text(tmp_path / "state.json", '{"step": 1}')
    code = """
        import os, signal, sys
        from cavmae import fsio
        with fsio.atomic_open(sys.argv[1], "wb") as f:
            f.write(b'{"step": 2, "half')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs, as in a real crash
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(dest)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert dest.read_text() == '{"step": 1}'
    (stray,) = _hidden(tmp_path)  # the killed writer's temporary, which names its target
    assert fsio.temp_owner(stray) == "state.json"


def test_concurrent_writers_never_show_a_partial_file(tmp_path: Path) -> None:
    dest = tmp_path / "shared.bin"
    size = 1 << 18
    fsio.write_bytes(dest, b"0" * size)
    code = """
        import sys
        from cavmae import fsio
        dest, tag = sys.argv[1], sys.argv[2].encode()
        for _ in range(40):
            fsio.write_bytes(dest, tag * (1 << 18))
    """
    writers = [_py(code, str(dest), str(k), wait=False) for k in range(1, 4)]
    while any(w.poll() is None for w in writers):  # type: ignore[union-attr]
        data = dest.read_bytes()
        assert len(data) == size and data == data[:1] * size, "a reader saw a mixed file"
    assert all(w.wait() == 0 for w in writers)  # type: ignore[union-attr]
    assert dest.read_bytes()[:1] in {b"1", b"2", b"3"} and _hidden(tmp_path) == []


# --- directories -----------------------------------------------------------------------------


def test_staged_dir_publishes_replaces_and_cleans_up(tmp_path: Path) -> None:
    dest = tmp_path / "export"
    with fsio.staged_dir(dest) as work:
        assert work.parent == tmp_path and work.name.startswith(".export.")
        (work / "a.txt").write_text("one")
    assert (dest / "a.txt").read_text() == "one"
    assert dest.stat().st_mode & 0o777 == 0o777 & ~_umask()  # shared, not mkdtemp's 0700
    with fsio.staged_dir(dest) as work:
        (work / "b.txt").write_text("two")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # replaced whole
    with pytest.raises(RuntimeError), fsio.staged_dir(dest) as work:
        (work / "c.txt").write_text("half")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert _hidden(tmp_path) == []


def test_publish_dir_puts_the_old_one_back_when_the_move_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old").write_text("x")
    work = fsio.make_temp_dir(dest)
    real = os.replace

    def failing(a, b):  # type: ignore[no-untyped-def]
        if Path(a) == work:
            raise PermissionError("no")
        return real(a, b)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(PermissionError):
        fsio.publish_dir(work, dest)
    assert (dest / "old").read_text() == "x"


def test_publish_dir_replaces_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    dest = tmp_path / "link"
    dest.symlink_to(tmp_path / "target")
    work = fsio.make_temp_dir(dest)
    (work / "f").write_text("new")
    fsio.publish_dir(work, dest)
    assert not dest.is_symlink() and (dest / "f").read_text() == "new"
    assert (tmp_path / "target").is_dir()  # what the link pointed at is not touched


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writable_dir(tmp_path: Path) -> None:
    assert fsio.writable_dir(tmp_path / "new" / "dir")
    (tmp_path / "squat").write_text("a file")
    assert not fsio.writable_dir(tmp_path / "squat")
    assert _hidden(tmp_path / "new" / "dir") == []


# --- hashes ----------------------------------------------------------------------------------


def test_sha256_file_and_hash_into(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 5)
    p = fsio.write_bytes(tmp_path / "f", data)
    assert fsio.sha256_file(p, chunk_size=1000) == hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    fsio.hash_file_into(h, p)
    fsio.hash_file_into(h, p)
    assert h.hexdigest() == hashlib.sha256(data + data).hexdigest()


def test_memo_hashes_once_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = fsio.sha256_file
    monkeypatch.setattr(fsio, "sha256_file", lambda p, *a: (calls.append(Path(p)), real(p))[1])
    f = fsio.write_bytes(tmp_path / "ckpt.pth", b"weights")
    memo = tmp_path / "home" / "hashes.json"
    assert fsio.memo_sha256(f, memo) == hashlib.sha256(b"weights").hexdigest()
    assert fsio.memo_sha256(f, memo) == hashlib.sha256(b"weights").hexdigest()
    assert len(calls) == 1 and memo.is_file()
    f.write_bytes(b"other weights")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fsio.memo_sha256(f, memo) == hashlib.sha256(b"other weights").hexdigest()
    assert len(calls) == 2
    memo.write_text("not json")  # a damaged memo is advice ignored, then rewritten
    assert fsio.memo_sha256(f, memo) == hashlib.sha256(b"other weights").hexdigest()
    assert isinstance(json.loads(memo.read_text()), dict) and _hidden(memo.parent) == []


# --- locks -----------------------------------------------------------------------------------

_HOLD = """
    import sys, time
    from cavmae import fsio
    with fsio.exclusive_lock(sys.argv[1], remove=sys.argv[2] == "1"):
        print("locked", flush=True)
        time.sleep(60)
"""


def test_lock_excludes_another_process_and_dies_with_it(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = _py(_HOLD, str(lock), "0", wait=False)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"  # type: ignore[union-attr]
    try:
        with pytest.raises(fsio.LockBusyError), fsio.exclusive_lock(lock, timeout=0):
            pass
        started = time.monotonic()
        with pytest.raises(fsio.LockBusyError), fsio.exclusive_lock(lock, timeout=0.3):
            pass
        assert time.monotonic() - started >= 0.3
    finally:
        holder.kill()  # type: ignore[union-attr]
        holder.wait()  # type: ignore[union-attr]
    with fsio.exclusive_lock(lock, timeout=5, remove=False):  # the kernel dropped it
        pass
    assert lock.exists()  # remove=False keeps the file


def test_lock_serializes_read_modify_write_across_processes(tmp_path: Path) -> None:
    counter = fsio.write_text(tmp_path / "n", "0")
    code = """
        import sys
        from pathlib import Path
        from cavmae import fsio
        n = Path(sys.argv[1])
        for _ in range(25):
            with fsio.exclusive_lock(sys.argv[2]):
                fsio.write_text(n, str(int(n.read_text()) + 1))
    """
    procs = [_py(code, str(counter), str(tmp_path / "n.lock"), wait=False) for _ in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)  # type: ignore[union-attr]
    assert counter.read_text() == "75"
    assert not (tmp_path / "n.lock").exists()  # removed by the last holder


def test_a_waiter_blocks_until_release_in_this_process(tmp_path: Path) -> None:
    import threading

    lock = tmp_path / "t.lock"
    order: list[str] = []
    def waiter() -> None:
        with fsio.exclusive_lock(lock):
            order.append("waiter")

    with fsio.exclusive_lock(lock):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.2)
        order.append("holder")
    t.join(timeout=10)
    assert order == ["holder", "waiter"]


def test_json_sha256_names_facts_whatever_their_order():
    a = fsio.json_sha256({"b": [1, 2], "a": {"y": 1, "x": Path("p")}})
    assert a == fsio.json_sha256({"a": {"x": "p", "y": 1}, "b": [1, 2]})  # key order, str() of a Path
    assert a == hashlib.sha256(b'{"a": {"x": "p", "y": 1}, "b": [1, 2]}').hexdigest()  # cache keys stay put
    assert a != fsio.json_sha256({"a": {"x": "p", "y": 1}, "b": [2, 1]})


def test_probe_dir_leaves_no_folder_it_made(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    fsio.probe_dir(target)
    assert list(tmp_path.iterdir()) == []  # the three folders it made are gone again
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "x.txt").write_text("x")
    fsio.probe_dir(tmp_path / "kept")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["x.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        fsio.probe_dir(tmp_path / "file" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept"]
