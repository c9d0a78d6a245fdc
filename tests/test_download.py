"""Downloads against a local HTTP server: resume, atomicity, hashing, verify hook, mirrors, locks."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cavmae import fsio
from cavmae.errors import DownloadError, EngineUnavailableError
from cavmae.hub import registry
from cavmae.hub.download import download, lock_path, part_path

PAYLOAD = os.urandom(50_000) + b"end"  # odd size, so chunks never line up by accident
CHUNK = 4096


class ServerState:
    """What the test tells the server to do, and what the server saw."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        # "normal" | "cut" (close after cut_at body bytes) | "ignore_range" | "404" | "500"
        self.mode = "normal"
        self.cut_at = 10_000
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the requests for ``path``."""
        with self.lock:
            return [r for p, r in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: the connection closes after each response, so "cut" really ends the body.
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state = self.server.state
        path = urlsplit(self.path).path
        range_header = self.headers.get("Range")
        with state.lock:
            state.requests.append((path, range_header))
        if state.mode in ("404", "500"):
            self.send_error(int(state.mode))
            return
        data = state.files.get(path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if range_header and state.mode != "ignore_range":
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if state.mode == "cut":
            # Promise the whole body, send part of it, hang up.
            self.wfile.write(body[: state.cut_at])
            self.wfile.flush()
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


@pytest.fixture
def server() -> Iterator[tuple[str, ServerState]]:
    httpd = _Server(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield f"http://{host}:{port}", httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _get(dest: Path, url: str, **kwargs: object) -> Path:
    return download(url, dest, progress=False, chunk_size=CHUNK, timeout=10, **kwargs)  # type: ignore[arg-type]


# --- plain transfers -------------------------------------------------------------------------


def test_download_plain(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "sub" / "f.bin"
    assert _get(dest, f"{base}/f.bin") == dest
    assert dest.read_bytes() == PAYLOAD
    assert not part_path(dest).exists()
    assert not lock_path(dest).exists()
    assert state.gets("/f.bin") == [None]


def test_cut_connection_then_resume(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    state.mode = "cut"
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="resume"):
        _get(dest, f"{base}/f.bin")
    assert not dest.exists()  # never a half file under the final name
    assert part_path(dest).read_bytes() == PAYLOAD[: state.cut_at]

    state.mode = "normal"
    _get(dest, f"{base}/f.bin")
    assert dest.read_bytes() == PAYLOAD
    assert not part_path(dest).exists()
    assert state.gets("/f.bin") == [None, f"bytes={state.cut_at}-"]


def test_resume_hashes_the_whole_file(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    state.mode = "cut"
    dest = tmp_path / "f.bin"
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.raises(DownloadError):
        _get(dest, f"{base}/f.bin", sha256=digest)
    state.mode = "normal"
    _get(dest, f"{base}/f.bin", sha256=digest.upper())
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_from_zero(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    state.mode = "ignore_range"
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"x" * 1000)  # garbage that must not survive
    _get(dest, f"{base}/f.bin")
    assert dest.read_bytes() == PAYLOAD
    assert state.gets("/f.bin") == ["bytes=1000-"]


def test_416_complete_part_is_used(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD)  # e.g. a crash between the last byte and the rename
    _get(dest, f"{base}/f.bin")
    assert dest.read_bytes() == PAYLOAD
    assert state.gets("/f.bin") == [f"bytes={len(PAYLOAD)}-"]


def test_416_stale_part_restarts(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"y" * (len(PAYLOAD) + 10))  # longer than the file: stale
    _get(dest, f"{base}/f.bin")
    assert dest.read_bytes() == PAYLOAD
    assert state.gets("/f.bin") == [f"bytes={len(PAYLOAD) + 10}-", None]


@pytest.mark.parametrize("code", ["404", "500"])
def test_http_errors(server, tmp_path: Path, code: str) -> None:
    base, state = server
    state.mode = code
    dest = tmp_path / "f.bin"
    url = f"{base}/f.bin"
    with pytest.raises(DownloadError) as info:
        _get(dest, url)
    message = str(info.value)
    assert url in message and f"HTTP {code}" in message and "CAVMAE_MIRROR" in message
    assert "\n" not in message
    assert not dest.exists()


def test_unreachable_host(tmp_path: Path) -> None:
    # Bind a port and close it again: nothing listens there.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/f.bin"
    with pytest.raises(DownloadError, match="--mirror") as info:
        _get(tmp_path / "f.bin", url, hint="try --mirror")
    assert url in str(info.value)
    assert not (tmp_path / "f.bin").exists()


# --- verification ----------------------------------------------------------------------------


def test_sha256_mismatch_deletes(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="SHA-256"):
        _get(dest, f"{base}/f.bin", sha256="0" * 64)
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_verify_hook(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    seen: list[Path] = []

    def reject(path: Path) -> None:
        seen.append(path)
        assert path.read_bytes() == PAYLOAD  # called on the complete file
        raise ValueError("not a checkpoint")

    with pytest.raises(DownloadError, match="not a checkpoint"):
        _get(dest, f"{base}/f.bin", verify=reject)
    assert seen == [part_path(dest)]  # before the rename
    assert not dest.exists() and not part_path(dest).exists()

    _get(dest, f"{base}/f.bin", verify=lambda p: None)
    assert dest.read_bytes() == PAYLOAD


# --- locking ---------------------------------------------------------------------------------


def test_waiter_reuses_file_made_by_lock_holder(server, tmp_path: Path) -> None:
    base, state = server
    state.files["/f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    result: list[object] = []
    with fsio.exclusive_lock(lock_path(dest)):
        waiter = threading.Thread(target=lambda: result.append(_get(dest, f"{base}/f.bin")))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and state.gets("/f.bin") == []  # blocked on the lock
        dest.write_bytes(PAYLOAD)  # what the "other process" produced
    waiter.join(timeout=10)
    assert result == [dest]
    assert state.gets("/f.bin") == []  # it did not download again


def test_lock_timeout(tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    with fsio.exclusive_lock(lock_path(dest)):
        with pytest.raises(DownloadError, match="another process"):
            download("http://127.0.0.1:9/f.bin", dest, progress=False, lock_timeout=0.2)


# --- registry end to end -----------------------------------------------------------------------


def _labels_csv(n: int) -> bytes:
    rows = ["index,mid,display_name"] + [
        f'{i},/m/{i:05d},"Class {i}, number {i}"' for i in range(n)
    ]
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAVMAE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CAVMAE_MIRROR", raising=False)
    return tmp_path / "home"


def test_ensure_model_through_mirror(server, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, state = server
    state.files["/mirror/vgg_65.5.pth"] = PAYLOAD
    state.files["/mirror/class_labels_indices_vgg.csv"] = _labels_csv(309)
    monkeypatch.setenv("CAVMAE_MIRROR", f"{base}/mirror/")

    def verify(path: Path) -> None:
        if path.read_bytes() != PAYLOAD:
            raise ValueError("wrong bytes")

    path = registry.ensure_model("vgg-65.5", progress=False, verify=verify)
    assert path == home / "checkpoints" / "vgg-65.5.pth"
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in state.requests] == ["/mirror/vgg_65.5.pth"]  # labels only when asked
    labels = registry.ensure_labels("vgg-65.5", progress=False)
    assert labels == home / "checkpoints" / "vggsound_labels.csv"
    assert labels.read_bytes() == _labels_csv(309)
    assert registry.cached_path("vgg-65.5") == path
    n_requests = len(state.requests)
    assert n_requests == 2

    # Cached: no network at all, and no verifier needed; a cached label file is not fetched again.
    assert registry.ensure_model("vgg-65.5", progress=False) == path
    assert registry.ensure_labels("vgg-65.5", progress=False) == labels
    assert len(state.requests) == n_requests


def test_packaged_labels_are_never_downloaded(server, home: Path) -> None:
    """AudioSet's label CSV ships in cavmae/assets: asking for it reaches no server."""
    base, state = server
    labels = registry.ensure_labels("as-full-51.2", mirror=base, progress=False)
    assert labels is not None and labels.parent.name == "assets"
    assert state.requests == []
    assert not (home / "checkpoints").exists()


def test_no_network_message_says_what_works_offline(home: Path) -> None:
    """Nothing listens on the port: the error names the local-file way and the mirror's files."""
    import socket

    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DownloadError) as info:
        registry.ensure_model("vgg-65.5", mirror=dead, progress=False, verify=lambda p: None)
    message = str(info.value)
    assert "-m FILE.pth" in message
    assert "vgg_65.5.pth and class_labels_indices_vgg.csv" in message  # the label CSV too
    assert "\n" not in message


def test_ensure_model_rejected_file_is_not_cached(server, home: Path) -> None:
    base, state = server
    state.files["/cav-mae-base.pth"] = b"not a checkpoint"

    def verify(path: Path) -> None:
        raise ValueError("bad magic")

    with pytest.raises(DownloadError, match="bad magic"):
        registry.ensure_model("cav-mae-base", mirror=base, progress=False, verify=verify)
    assert registry.cached_path("cav-mae-base") is None
    assert list((home / "checkpoints").iterdir()) == []


def test_ensure_model_missing_on_mirror(server, home: Path) -> None:
    base, _ = server
    with pytest.raises(DownloadError) as info:
        registry.ensure_model("vgg-65.5", mirror=base, progress=False, verify=lambda p: None)
    message = str(info.value)
    assert f"{base}/vgg_65.5.pth" in message and "HTTP 404" in message
    assert "mirror" in message and "vgg_65.5.pth" in message


def test_ensure_labels_wrong_row_count(server, home: Path) -> None:
    base, state = server
    state.files["/class_labels_indices_vgg.csv"] = _labels_csv(10)
    with pytest.raises(DownloadError, match="309"):
        registry.ensure_labels("vgg-66.0", mirror=base, progress=False)
    assert not (home / "checkpoints" / "vggsound_labels.csv").exists()


def test_pretrain_has_no_labels(server, home: Path) -> None:
    base, state = server
    state.files["/audio_model.21.pth"] = PAYLOAD
    registry.ensure_model("cav-mae-scale++", mirror=base, progress=False, verify=lambda p: None)
    assert [p for p, _ in state.requests] == ["/audio_model.21.pth"]
    assert registry.ensure_labels("cav-mae-scale++") is None


def test_default_verifier_uses_core_checkpoint(
    server, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = server
    state.files["/as_46.6.pth"] = PAYLOAD
    calls: list[tuple[Path, dict[str, object]]] = []
    fake = types.ModuleType("cavmae.checkpoint")
    fake.verify_checkpoint_file = lambda path, **kw: calls.append((Path(path), kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cavmae.checkpoint", fake)
    registry.ensure_model("as-46.6-audio", mirror=base, progress=False)
    assert len(calls) == 1
    assert calls[0][0].name == "as-46.6-audio.pth.part"
    assert calls[0][1] == {"kind": "classifier", "num_classes": 527}


def test_default_verifier_without_torch_fails_before_download(
    server, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, state = server
    state.files["/as_46.6.pth"] = PAYLOAD
    monkeypatch.setitem(sys.modules, "cavmae.checkpoint", None)  # import fails
    with pytest.raises(EngineUnavailableError, match="PyTorch"):
        registry.ensure_model("as-46.6-audio", mirror=base, progress=False)
    assert state.requests == []
