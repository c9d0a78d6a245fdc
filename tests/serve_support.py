"""Helpers of the ``cavmae serve`` tests: a tiny exported model and index, and a real server
on 127.0.0.1 in a thread (the same uvicorn the command runs, so limits and streaming behave
as in production)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from conftest import AUDIOSET_CLIP, AUDIOSET_LABELS, VGGSOUND_CLIP

CLIPS = [AUDIOSET_CLIP, VGGSOUND_CLIP]


def tiny_model(root: Path) -> dict[str, Path]:
    """A tiny random-weight AudioSet classifier exported to ONNX, its checkpoint, and an index
    of the two sample clips, built once under ``root`` (a session's base temp folder)."""
    out = {"export": root / "serve-tiny-export", "index": root / "serve-tiny-index",
           "checkpoint": root / "serve-tiny.pth"}
    if (out["index"] / "index.json").is_file():
        return out
    import torch

    from cavmae import CAVMAEFT, TINY, save_checkpoint
    from cavmae.export import export_model
    from cavmae.runtime import index as ix
    from cavmae.runtime import load

    torch.manual_seed(0)
    save_checkpoint(CAVMAEFT(TINY.replace(num_classes=527)), out["checkpoint"])
    export_model(out["checkpoint"], out["export"], labels=AUDIOSET_LABELS, overwrite=True)
    pipe = load(out["export"], engine="ort", device="cpu")
    try:
        identity = ix.model_identity(pipe.manifest, str(out["export"]))
        with ix.IndexWriter(out["index"], model=identity, dim=pipe.manifest.model_config.embed_dim,
                            frame="middle", num_frames=pipe.num_frames) as writer:
            for result in ix.embed_files(pipe, CLIPS, writer, batch=2, workers=1):
                assert result.error is None, result.error
    finally:
        pipe.close()
    return out


def open_service(model: dict[str, Path], with_index: bool = True) -> Any:
    from cavmae.runtime.serve.service import Service

    return Service.open(str(model["export"]), engine="ort", device="cpu",
                        index=str(model["index"]) if with_index else None)


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on a free 127.0.0.1 port until the end
    of the block, and waits (bounded) until ``/readyz`` answers 200."""

    def __init__(self, app: Any, ready_timeout: float = 120.0) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.ready_timeout = ready_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.server.started:
                try:
                    if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                        return self.url
                except httpx.HTTPError:
                    pass
            if not self.thread.is_alive():
                raise RuntimeError("the test server stopped during start-up")
            time.sleep(0.05)
        self.__exit__()
        raise TimeoutError("the test server did not become ready")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def upload(path: Path, name: str | None = None) -> dict[str, Any]:
    """The ``files=`` argument of an httpx upload of ``path``."""
    return {"file": (name or path.name, path.read_bytes(), "video/mp4")}
