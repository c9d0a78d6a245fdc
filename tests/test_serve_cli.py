"""The real ``cavmae serve`` command: it starts, serves, takes the key from the environment,
stops cleanly on Ctrl+C, and a user mistake is one line and exit code 2."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from conftest import AUDIOSET_CLIP  # noqa: E402
from serve_support import tiny_model, upload  # noqa: E402

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.getbasetemp())


def start_serve(*args: str, env: dict[str, str] | None = None, tmp: Path) -> tuple[subprocess.Popen, str]:
    """Run ``cavmae serve ARGS --port 0``; return the process and its URL once it is ready."""
    environ = {**os.environ, "CAVMAE_NO_PROGRESS": "1", "TMPDIR": str(tmp), **(env or {})}
    log = open(tmp / "serve.log", "w+")
    proc = subprocess.Popen([CAVMAE_EXE, "serve", *args, "--port", "0"], stdout=log, stderr=subprocess.STDOUT,
                            env=environ, text=True)
    deadline = time.monotonic() + 120
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        log.seek(0)
        found = LISTENING.search(log.read())
        if found:
            url = found.group(1)
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    proc.kill()
    log.seek(0)
    raise AssertionError(f"cavmae serve did not become ready:\n{log.read()}")


def test_serve_command_end_to_end(model, tmp_path):
    proc, url = start_serve("-m", str(model["export"]), "--index", str(model["index"]), "--max-batch", "4",
                            "--max-windows", "2", env={"CAVMAE_API_KEY": "k3y"}, tmp=tmp_path)
    try:
        key = {"Authorization": "Bearer k3y"}
        assert httpx.get(url + "/v1/model", timeout=30).status_code == 401
        info = httpx.get(url + "/v1/model", headers=key, timeout=30).json()
        assert info["batching"]["max_batch"] == 4 and info["index"]["count"] == 2
        r = httpx.post(url + "/v1/classify", files=upload(AUDIOSET_CLIP), headers=key, timeout=120)
        assert r.status_code == 200 and r.json()["top"][0]["label"] and r.json()["mode"] == "av"
        assert info["limits"]["max_windows"] == 2
        r = httpx.post(url + "/v1/classify", files=upload(AUDIOSET_CLIP), data={"window": 4, "hop": 3},
                       headers=key, timeout=120)
        assert r.status_code == 400 and "at most 2" in r.json()["error"] and "--max-windows" in r.json()["error"]
        private = [p for p in tmp_path.iterdir() if p.name.startswith("cavmae-serve-")]
        assert len(private) == 1 and list(private[0].iterdir()) == []
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    assert rc == 0, (tmp_path / "serve.log").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("cavmae-serve-")]  # removed at shutdown


def run(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAVMAE_NO_PROGRESS": "1", "CAVMAE_HOME": str(tmp / "home")}
    return subprocess.run([CAVMAE_EXE, "serve", *args], capture_output=True, text=True, env=env, timeout=300)


def test_serve_user_mistakes_are_one_line_exit_2(model, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    cases = [
        (["-m", str(tmp_path / "nothing.pth")], "not found"),
        (["-m", str(model["export"]), "--port", port], "cannot listen"),
        (["-m", str(model["export"]), "--index", str(tmp_path / "no-index")], "index"),
        (["-m", str(model["export"]), "--allow-dir", str(tmp_path / "nowhere")], "nowhere"),
        # an infinite wait never forms a batch, an infinite upload limit is no limit, an empty
        # key would turn the check off: each is refused before the model loads
        (["-m", str(model["export"]), "--max-wait-ms", "inf"], "max wait must be"),
        (["-m", str(model["export"]), "--max-wait-ms", "1e9"], "at most the request timeout"),
        (["-m", str(model["export"]), "--max-upload-mb", "inf"], "finite number of MB"),
        (["-m", str(model["export"]), "--timeout", "nan"], "timeout must be"),
        (["-m", str(model["export"]), "--api-key", ""], "must not be empty"),
    ]
    try:
        for args, words in cases:
            out = run(*args, tmp=tmp_path) if "--port" in args else run(*args, "--port", "0", tmp=tmp_path)
            assert out.returncode == 2, (args, out.stdout, out.stderr)
            lines = [line for line in out.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and words in lines[0] and "Traceback" not in out.stderr, (args, out.stderr)
    finally:
        busy.close()


def test_sigterm_during_a_long_decode_stops_it_and_answers_503(model, tmp_path):
    """A stop signal halts the work in progress: the request decoding a long file's windows is
    answered with a JSON 503 (not uvicorn's plain-text 500 after the graceful timeout), the
    process exits 0 with its closing line and no traceback, and its temporary folder is gone."""
    from concurrent.futures import ThreadPoolExecutor

    from media_factory import make_media

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    make_media(allowed / "long.mp4", duration=120.0, fps=5, size=(32, 32))  # 221 windows below
    proc, url = start_serve("-m", str(model["export"]), "--allow-dir", str(allowed), "--max-batch", "2",
                            tmp=tmp_path)
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, url + "/v1/classify",
                                 data={"path": "long.mp4", "window": "10", "hop": "0.5"}, timeout=120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and "cavmae_requests_in_progress 1" not in httpx.get(
                    url + "/metrics", timeout=10).text:
                time.sleep(0.05)
            time.sleep(0.5)  # into the decode
            proc.send_signal(signal.SIGTERM)
            r = answer.result(120)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "serve.log").read_text()
    assert r.status_code == 503 and "shutting down" in r.json()["error"], r.text
    assert rc == 0 and "cavmae serve: stopped" in log and "Traceback" not in log, log
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("cavmae-serve-")]


def test_forced_quit_still_removes_the_temporary_folder(model, tmp_path):
    """A second Ctrl+C makes uvicorn skip its shutdown (the lifespan's cleanup too): the command
    still stops the runtime, removes its temporary folder and says it stopped."""
    proc, _ = start_serve("-m", str(model["export"]), tmp=tmp_path)
    try:
        assert [p for p in tmp_path.iterdir() if p.name.startswith("cavmae-serve-")]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)  # two signals, not one coalesced
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "serve.log").read_text()
    assert rc == 0 and "cavmae serve: stopped" in log and "Traceback" not in log, log
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("cavmae-serve-")]


def test_an_empty_api_key_variable_is_refused_not_read_as_unset(model, tmp_path):
    """click reads a set but empty variable as unset: CAVMAE_API_KEY=$MISSING_SECRET must not
    start a server without its key."""
    env = {**os.environ, "CAVMAE_NO_PROGRESS": "1", "CAVMAE_HOME": str(tmp_path / "home"), "CAVMAE_API_KEY": ""}
    out = subprocess.run([CAVMAE_EXE, "serve", "-m", str(model["export"]), "--port", "0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "must not be empty" in out.stderr, out.stderr
