"""``cavmae serve`` endpoints against a real server on 127.0.0.1 with a tiny model: answers,
limits, the API key, the path guard, bad media and temporary files."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from cavmae.runtime.serve import ServeConfig, create_app  # noqa: E402
from conftest import AUDIOSET_CLIP, VGGSOUND_CLIP  # noqa: E402
from media_factory import make_empty_file, make_media, make_text_file, make_truncated  # noqa: E402
from serve_support import ServerThread, open_service, tiny_model, upload  # noqa: E402

CAVMAE_EXE = shutil.which("cavmae") or str(Path(sys.executable).with_name("cavmae"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The default configuration, with the index; uploads go to a folder the tests can watch."""
    tmp = tmp_path_factory.mktemp("serve-tmp")
    app = create_app(open_service(model), ServeConfig(tmp_dir=tmp))
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield {"client": client, "tmp": tmp, "app": app}


def private_tmp(server) -> Path:
    return server["app"].state.runtime.tmp


def test_health_ready_and_model(server):
    c = server["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 200
    info = c.get("/v1/model").json()
    assert info["kind"] == "classifier" and info["num_classes"] == 527 and info["classes"][0] == "Speech"
    assert info["modes"] == ["av", "audio", "visual"] and info["precision"] == "fp32"
    assert info["engine"].startswith("ort") and info["localize"] is True
    assert info["index"]["count"] == 2 and info["limits"]["max_upload_bytes"] == 200 * 2**20
    assert "/v1/classify" in c.get("/openapi.json").json()["paths"]


def test_classify_returns_the_cli_record(server, model):
    c = server["client"]
    got = c.post("/v1/classify", files=upload(AUDIOSET_CLIP), data={"top_k": 3, "all_scores": "true"})
    assert got.status_code == 200, got.text
    rec = got.json()
    env = {**os.environ, "CAVMAE_NO_PROGRESS": "1"}
    cli = subprocess.run([CAVMAE_EXE, "classify", str(AUDIOSET_CLIP), "-m", str(model["export"]), "--engine", "ort",
                          "--json", "-k", "3", "--all-scores"], capture_output=True, text=True, env=env, timeout=600)
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)
    assert rec["path"] == AUDIOSET_CLIP.name  # the upload's name, not a server path
    assert {k: v for k, v in rec.items() if k != "path"} == {k: v for k, v in want.items() if k != "path"}


def test_classify_windows_modes_and_parameter_errors(server):
    c = server["client"]
    r = c.post("/v1/classify", files=upload(AUDIOSET_CLIP), data={"window": 4, "hop": 3, "top_k": 2})
    assert r.status_code == 200, r.text
    windows = r.json()["windows"]
    assert [w["start"] for w in windows] == [0.0, 3.0, 6.0] and len(windows[0]["top"]) == 2
    r = c.post("/v1/classify", files=upload(VGGSOUND_CLIP), data={"mode": "audio"})
    assert r.status_code == 200 and len(r.json()["top"]) == 5
    for data, status, words in [
        ({"hop": 2}, 400, "hop needs window"),
        ({"frames": 4}, 400, "--frames 4"),
        ({"mode": "stereo"}, 422, "mode"),
        ({"top_k": 0}, 422, "top_k"),
        ({"window": 11}, 422, "window"),
        ({"window": 4, "hop": "inf"}, 422, "hop"),
        ({"window": "nan"}, 422, "finite number"),  # said so, not "less than or equal to 10"
        ({"offset": "nan"}, 422, "finite number"),
        # windows cover the file from 0 s: an offset with them is refused, as on the command line
        ({"window": 4, "offset": 2}, 400, "offset picks one clip"),
        ({"window": 4, "offset": 999}, 400, "offset picks one clip"),
    ]:
        r = c.post("/v1/classify", files=upload(AUDIOSET_CLIP), data=data)
        assert r.status_code == status and words in r.json()["error"], (data, r.text)
    r = c.post("/v1/classify", data={"top_k": 3})  # no file at all
    assert r.status_code == 400 and "'file'" in r.json()["error"]


def test_classify_auto_mode_per_file_as_the_cli(server, tmp_path):
    """``mode=auto`` decides per file, from its streams, as ``cavmae classify --mode auto``."""
    c = server["client"]
    silent = make_media(tmp_path / "silent.mp4", duration=2.0, with_audio=False)
    tone = make_media(tmp_path / "tone.wav", duration=2.0, with_video=False, audio_codec="pcm_s16le")
    for media, mode in [(AUDIOSET_CLIP, "av"), (silent, "visual"), (tone, "audio")]:
        r = c.post("/v1/classify", files=upload(media))
        assert r.status_code == 200 and r.json()["mode"] == mode, (media.name, r.text)
    r = c.post("/v1/classify", files=upload(silent), data={"mode": "av"})
    assert r.status_code == 422
    assert r.json()["error"] == "silent.mp4: has no audio stream; classify it with mode=visual (or mode=auto)"


def test_embed_matches_the_index_rows(server, model):
    from cavmae.runtime.index import EmbeddingIndex

    r = server["client"].post("/v1/embed", files=upload(VGGSOUND_CLIP))
    assert r.status_code == 200, r.text
    body = r.json()
    a, v = np.asarray(body["audio"]), np.asarray(body["visual"])
    assert body["dim"] == 64 == a.shape[0] == v.shape[0] and body["frame"] == "middle"
    assert np.linalg.norm(a) == pytest.approx(1, abs=1e-4)
    index = EmbeddingIndex.open(model["index"])
    row = [it["row"] for it in index.items() if it["path"].endswith(VGGSOUND_CLIP.name)][0]
    np.testing.assert_allclose(a, index.embeddings("audio")[row], atol=1e-5)
    np.testing.assert_allclose(v, index.embeddings("visual")[row], atol=1e-5)
    r = server["client"].post("/v1/embed", files=upload(VGGSOUND_CLIP), data={"modality": "audio", "frame": "mean"})
    assert r.json()["visual"] is None and r.json()["audio"] is not None


def test_search_by_upload_and_by_embedding(server):
    c = server["client"]
    r = c.post("/v1/search", files=upload(AUDIOSET_CLIP), data={"k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["search"] == "exact"  # the fields of `cavmae search --json`
    assert [(x["query"], x["target"]) for x in body["results"]] == [("audio", "audio"), ("visual", "visual")]
    for res in body["results"]:  # the clip itself is in the index: it is its own nearest neighbour
        assert res["hits"][0]["path"].endswith(AUDIOSET_CLIP.name)
        assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    emb = c.post("/v1/embed", files=upload(AUDIOSET_CLIP)).json()["audio"]
    r = c.post("/v1/search", json={"embedding": emb, "modality": "audio", "k": 1})
    assert r.status_code == 200 and r.json()["results"][0]["target"] == "visual"  # across modalities
    r = c.post("/v1/search", json={"embedding": emb, "modality": "audio", "target": "audio"})
    assert r.json()["results"][0]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    for body, words in [({"embedding": emb[:10], "modality": "audio"}, "64 numbers"),
                        ({"embedding": [0.0] * 64, "modality": "audio"}, "not all zero"),
                        ({"embedding": emb, "modality": "smell"}, "modality")]:
        r = c.post("/v1/search", json=body)
        assert 400 <= r.status_code < 500 and words in r.json()["error"], r.text
    for bad in (b"{not json", b"[" * 100000 + b"]" * 100000):  # the second nests past the parser's depth
        r = c.post("/v1/search", content=bad, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "the body is not valid JSON", r.text
    r = c.post("/v1/search", content=b"k=3", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_localize_returns_map_and_overlay(server):
    r = server["client"].post("/v1/localize", files=upload(AUDIOSET_CLIP))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grid"] == [14, 14] and body["frame"] == 5 and len(body["map"]) == 14
    assert body["min"] <= body["max"]
    png = base64.b64decode(body["image"].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_media_gets_one_clear_4xx_and_leaves_no_temporary_file(server, tmp_path):
    c = server["client"]
    bad = {
        "notes.mp4": make_text_file(tmp_path / "notes.mp4"),
        "empty.mp4": make_empty_file(tmp_path / "empty.mp4"),
        "broken.mp4": make_truncated(AUDIOSET_CLIP, tmp_path / "broken.mp4"),
        "silent.mp4": make_media(tmp_path / "silent.mp4", duration=2.0, with_audio=False),
    }
    for name, path in bad.items():
        # a video without sound can still be classified (mode auto), embedded and searched by its
        # frames; the heat map needs the sound (mode=av on it: test_classify_auto_mode_per_file_as_the_cli)
        endpoints = ("/v1/localize",) if name == "silent.mp4" else ("/v1/classify", "/v1/embed", "/v1/search")
        for endpoint in endpoints:
            r = c.post(endpoint, files=upload(path, name))
            assert r.status_code == 422, (name, endpoint, r.text)
            message = r.json()["error"]
            assert name in message and "\n" not in message and "Traceback" not in r.text
            assert str(private_tmp(server)) not in message  # the temporary path is not shown
    assert list(private_tmp(server).iterdir()) == []
    # the server keeps serving after all that
    assert c.post("/v1/classify", files=upload(AUDIOSET_CLIP)).status_code == 200
    assert list(private_tmp(server).iterdir()) == []


def test_one_whole_media_file_per_request(server):
    """Two files are refused on every endpoint that takes media (only one would be used), and a
    multipart body cut before its closing boundary is named as such, not as a missing file."""
    c = server["client"]
    two = [("file", ("a.mp4", AUDIOSET_CLIP.read_bytes(), "video/mp4")),
           ("file", ("b.mp4", VGGSOUND_CLIP.read_bytes(), "video/mp4"))]
    for endpoint in ("/v1/classify", "/v1/embed", "/v1/search", "/v1/localize"):
        r = c.post(endpoint, files=two)
        assert r.status_code == 400 and "one media file per request, not 2" in r.json()["error"], (endpoint, r.text)
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n\r\n'
    for endpoint in ("/v1/classify", "/v1/embed", "/v1/search", "/v1/localize"):
        r = c.post(endpoint, content=head + AUDIOSET_CLIP.read_bytes()[:5000],
                   headers={"content-type": "multipart/form-data; boundary=B"})
        assert r.status_code == 400 and "truncated" in r.json()["error"], (endpoint, r.text)
    # the closing boundary may arrive in a chunk of its own (and a quoted boundary is one too)
    chunks = [head, AUDIOSET_CLIP.read_bytes(), b"\r\n--B", b"--\r\n"]
    r = c.post("/v1/classify", content=iter(chunks), headers={"content-type": 'multipart/form-data; boundary="B"'})
    assert r.status_code == 200 and r.json()["path"] == "a.mp4", r.text
    assert list(private_tmp(server).iterdir()) == []


def test_probes_answer_head(server):
    """Load balancers probe with HEAD: 200 (no body), as GET."""
    c = server["client"]
    for path in ("/healthz", "/readyz", "/"):
        r = c.head(path)
        assert r.status_code == 200 and r.content == b"", path
    assert "needs internet" in c.get("/openapi.json").json()["info"]["description"]  # what /docs loads


def test_metrics_are_prometheus_text(server):
    c = server["client"]
    c.post("/v1/classify", files=upload(AUDIOSET_CLIP))
    c.post("/v1/classify", files={"file": ("x.mp4", b"junk")})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? -?[0-9.e+Inf-]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert re.search(r'cavmae_requests_total\{endpoint="/v1/classify",status="200"\} [1-9]', text)
    assert re.search(r'cavmae_requests_total\{endpoint="/v1/classify",status="422"\} [1-9]', text)
    assert 'cavmae_request_duration_seconds_bucket{endpoint="/v1/classify",le="+Inf"}' in text
    assert re.search(r"cavmae_batch_size_count [1-9]", text)
    assert "cavmae_queue_depth 0" in text and "cavmae_ready 1" in text
    c.get("/no/such/page")
    assert 'endpoint="other",status="404"' in c.get("/metrics").text


def test_page_is_served(server):
    r = server["client"].get("/")
    assert r.status_code == 200 and "<title>cavmae serve</title>" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "fetch(" in server["client"].get("/app.js").text


# -- limits ---------------------------------------------------------------------------------------


@pytest.fixture()
def start(model, tmp_path):
    """Start a server with a configuration of the test's own."""
    servers = []

    def run(**settings):
        settings.setdefault("tmp_dir", tmp_path)
        app = create_app(open_service(model, with_index=False), ServeConfig(**settings))
        srv = ServerThread(app)
        url = srv.__enter__()
        servers.append(srv)
        return httpx.Client(base_url=url, timeout=60), app

    yield run
    for srv in servers:
        srv.__exit__()


def test_upload_size_limit_declared_and_chunked(start):
    size = AUDIOSET_CLIP.stat().st_size
    client, app = start(max_upload=size // 2)
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP))
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while the body arrives
        data = AUDIOSET_CLIP.read_bytes()
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.mp4"\r\n\r\n'
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]
        yield b"\r\n--B--\r\n"

    r = client.post("/v1/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert list(app.state.runtime.tmp.iterdir()) == []
    assert client.get("/readyz").status_code == 200


def test_media_duration_limit(start):
    client, _ = start(max_duration=5.0)
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP))
    assert r.status_code == 413 and "at most 5 s" in r.json()["error"]


def test_window_count_limit(start):
    client, _ = start(max_windows=3)
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP), data={"window": 2, "hop": 1})
    assert r.status_code == 400 and "at most 3" in r.json()["error"]
    # refused before the windows are listed: this hop would make ten billion of them
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP), data={"window": 1, "hop": 1e-9})
    assert r.status_code == 400 and "at most 3" in r.json()["error"]
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP), data={"window": 4, "hop": 3})
    assert r.status_code == 200 and len(r.json()["windows"]) == 3  # 0, 3, 6: exactly the limit


def test_request_timeout_while_running_and_while_uploading(start):
    client, app = start(timeout=1.0)
    rt = app.state.runtime
    original = rt.service.run_batch

    def slow(key, payloads):
        time.sleep(2.0)
        return original(key, payloads)

    rt.service.run_batch = slow
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP))
    assert r.status_code == 504 and "timeout" in r.json()["error"]
    rt.service.run_batch = original
    # an upload that stalls: 408 once the deadline passes
    with socket.create_connection(("127.0.0.1", int(str(client.base_url).rsplit(":", 1)[1].strip("/"))), 10) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                  b"Content-Length: 100000\r\n\r\n--B\r\n")
        s.settimeout(10)
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 408"), head
    # the abandoned work finishes in the background and frees its slot; no file is left behind
    deadline = time.monotonic() + 60
    while rt.admission.in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.admission.in_use == 0 and list(rt.tmp.iterdir()) == []
    assert client.get("/readyz").status_code == 200  # (a full request could exceed the 1 s limit here)


@pytest.fixture()
def slow_decode(monkeypatch):
    """Each window's decode takes 0.3 s more; returns the list of the offsets decoded."""
    import cavmae.media

    calls = []
    original = cavmae.media.load_clip

    def slow(*args, **kwargs):
        calls.append(kwargs.get("offset"))
        time.sleep(0.3)
        return original(*args, **kwargs)

    monkeypatch.setattr(cavmae.media, "load_clip", slow)
    return calls


def test_windows_are_decoded_and_run_a_batch_at_a_time(start):
    """A request's sliding windows are decoded and sent to the model --max-batch at a time, so
    it never holds every window of a long file at once; the records are those of one pass."""
    client, app = start(max_batch=2)
    service = app.state.runtime.service
    sizes = []
    original = service.run_batch

    def record(key, payloads):
        if key[0] == "classify":
            sizes.extend(p.size for p in payloads)
        return original(key, payloads)

    service.run_batch = record
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP), data={"window": 2, "hop": 1})
    assert r.status_code == 200, r.text
    assert [w["start"] for w in r.json()["windows"]] == [float(k) for k in range(9)]
    assert sum(sizes) == 9 and max(sizes) <= 2, sizes


def test_a_timed_out_request_stops_decoding(start, slow_decode, tmp_path):
    """Past the timeout the client gets 504 and the request's decode stops before its next
    window, instead of going on through every window and holding a decoding thread. (A file
    named by path: an upload's file is removed at the 504, which happens to end its decode.)"""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(AUDIOSET_CLIP, allowed / "clip.mp4")
    client, app = start(timeout=1.0, max_batch=1, allow_dir=allowed)
    rt = app.state.runtime
    r = client.post("/v1/classify", data={"path": "clip.mp4", "window": 1, "hop": 0.5})  # 19 windows
    assert r.status_code == 504, r.text
    deadline = time.monotonic() + 30
    while rt.admission.in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.admission.in_use == 0
    decoded = len(slow_decode)
    time.sleep(0.5)
    assert len(slow_decode) == decoded < 19, slow_decode  # stopped, well before the last window
    assert list(rt.tmp.iterdir()) == []


def test_halt_answers_work_in_progress_503(start, slow_decode):
    """When the server is told to stop (``cavmae serve``'s first Ctrl+C or SIGTERM), a request
    in progress stops at its next window and gets a JSON 503, so shutdown does not wait for it."""
    client, app = start(max_batch=1)
    rt = app.state.runtime
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.post, "/v1/classify", files=upload(AUDIOSET_CLIP),
                             data={"window": 1, "hop": 0.5})
        deadline = time.monotonic() + 30
        while not slow_decode and time.monotonic() < deadline:
            time.sleep(0.02)
        rt.halt()
        r = answer.result(60)
    assert r.status_code == 503 and "shutting down" in r.json()["error"] and r.headers["retry-after"]
    assert len(slow_decode) < 19
    assert client.get("/readyz").status_code == 503


def test_request_cut_by_the_graceful_shutdown_timeout_gets_json_503(model, tmp_path):
    """A request still running when uvicorn's graceful shutdown runs out (here a model call that
    does not end) is cancelled by uvicorn: the client gets a JSON 503, not a plain-text 500."""
    app = create_app(open_service(model, with_index=False), ServeConfig(tmp_dir=tmp_path))
    service = app.state.runtime.service
    release, entered = threading.Event(), threading.Event()
    original = service.run_batch

    def stuck(key, payloads):
        entered.set()
        release.wait(60)
        return original(key, payloads)

    srv = ServerThread(app)
    url = srv.__enter__()
    try:
        service.run_batch = stuck
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, url + "/v1/classify", files=upload(AUDIOSET_CLIP), timeout=60)
            assert entered.wait(30)
            srv.server.should_exit = True  # a stop without the halt: uvicorn waits 5 s, then cancels
            r = answer.result(60)
    finally:
        release.set()
        srv.__exit__()
    assert r.status_code == 503 and r.json()["error"].startswith("the server is shutting down"), r.text
    assert not tmp_path.joinpath(app.state.runtime.tmp.name).exists()


def test_full_server_answers_503_with_retry_after(start):
    client, app = start(max_queue=1)
    port = int(str(client.base_url).rsplit(":", 1)[1].strip("/"))
    # the first request is admitted and holds its slot while its upload trickles in
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
                  b"Content-Length: 100000\r\n\r\n--B\r\n")
        deadline = time.monotonic() + 10
        while app.state.runtime.admission.in_use < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP))
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["error"]
    # the held request went away: the slot is free again
    deadline = time.monotonic() + 10
    while app.state.runtime.admission.in_use and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.post("/v1/classify", files=upload(AUDIOSET_CLIP)).status_code == 200
    assert 'status="503"' in client.get("/metrics").text


def test_api_key(start, monkeypatch):
    client, _ = start(api_key="s3cret")
    for path in ("/v1/model", "/metrics"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
    for path in ("/v1/classify", "/v1/embed", "/v1/search", "/v1/localize"):
        assert client.post(path, files=upload(AUDIOSET_CLIP)).status_code == 401, path
    r = client.post("/v1/classify", files=upload(AUDIOSET_CLIP), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/v1/model", headers=good).status_code == 200
    assert client.post("/v1/classify", files=upload(AUDIOSET_CLIP), headers=good).status_code == 200
    for path in ("/healthz", "/readyz", "/"):  # probes and the static page stay open
        assert client.get(path).status_code == 200


def test_api_docs_open_without_the_key_and_offer_it(start):
    """With --api-key the OpenAPI page and schema open in a browser (they hold no data) and
    declare the key as a Bearer scheme on exactly the endpoints that need it, so the page has an
    Authorize button and its calls carry the header; without a key nothing is declared."""
    client, _ = start(api_key="s3cret")
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    spec = schema.json()
    (name, scheme), = spec["components"]["securitySchemes"].items()
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    secured = {(path, method) for path, ops in spec["paths"].items() for method, op in ops.items()
               if op.get("security") == [{name: []}]}
    assert secured == {("/v1/model", "get"), ("/metrics", "get"), ("/v1/classify", "post"), ("/v1/embed", "post"),
                       ("/v1/search", "post"), ("/v1/localize", "post")}
    assert client.get("/v1/model").status_code == 401  # declaring it changed no check
    open_client, _ = start()
    assert "securitySchemes" not in open_client.get("/openapi.json").json().get("components", {})


def test_path_guard(start, tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    shutil.copy(AUDIOSET_CLIP, allowed / "sub" / "clip.mp4")
    outside = tmp_path / "outside.mp4"
    shutil.copy(AUDIOSET_CLIP, outside)
    (allowed / "escape.mp4").symlink_to(outside)
    (allowed / "linkdir").symlink_to(tmp_path)
    (allowed / "inside.mp4").symlink_to(allowed / "sub" / "clip.mp4")
    client, _ = start(allow_dir=allowed)
    r = client.post("/v1/classify", data={"path": "sub/clip.mp4"})
    assert r.status_code == 200 and r.json()["path"] == "sub/clip.mp4"
    assert client.post("/v1/classify", data={"path": str(allowed / "inside.mp4")}).status_code == 200
    for bad in ("../outside.mp4", "sub/../../outside.mp4", str(outside), "escape.mp4", "linkdir/outside.mp4",
                "/etc/passwd"):
        r = client.post("/v1/classify", data={"path": bad})
        assert r.status_code == 403 and "outside" in r.json()["error"], (bad, r.text)
    r = client.post("/v1/embed", data={"path": "missing.mp4"})
    assert r.status_code == 404
    # errors name the file as the client did, never by where the allowed folder is
    make_text_file(allowed / "sub" / "notvideo.mp4")
    (allowed / "text.mp4").symlink_to(allowed / "sub" / "notvideo.mp4")
    for sent in ("sub/notvideo.mp4", "text.mp4", str(allowed / "sub" / "notvideo.mp4")):
        for endpoint in ("/v1/classify", "/v1/embed", "/v1/localize"):
            r = client.post(endpoint, data={"path": sent})
            assert r.status_code == 422 and r.json()["error"].startswith(sent + ":"), (sent, endpoint, r.text)
            assert str(tmp_path) not in r.json()["error"] or sent.startswith(str(tmp_path))
    # paths the system cannot look up are the client's mistake, not a 500
    (allowed / "loop.mp4").symlink_to(allowed / "loop.mp4")
    for bad, why in [("loop.mp4", "symlink loop"), ("sub/a\x00b.mp4", "NUL"), ("x" * 5000, "too long")]:
        r = client.post("/v1/classify", data={"path": bad})
        assert r.status_code == 400 and why in r.json()["error"], (bad[:20], r.text[:300])
    r = client.post("/v1/classify", data={"path": "sub/clip.mp4"}, files=upload(AUDIOSET_CLIP))
    assert r.status_code == 400  # one source at a time
    assert outside.exists() and (allowed / "sub" / "clip.mp4").exists()  # a path is never removed


def test_no_index_loaded(start):
    client, _ = start()
    r = client.post("/v1/search", files=upload(AUDIOSET_CLIP))
    assert r.status_code == 400 and "--index" in r.json()["error"]


def test_labels_name_the_classes_of_a_users_model(model, tmp_path):
    from cavmae.runtime.serve.service import Service

    csv = tmp_path / "mine.csv"
    csv.write_text("index,mid,display_name\n" + "".join(f"{i},/m/x{i},mine {i}\n" for i in range(527)))
    service = Service.open(str(model["checkpoint"]), engine="ort", device="cpu", labels=str(csv))
    try:
        assert service.pipe.labels[:2] == ("mine 0", "mine 1")
    finally:
        service.pipe.close()
