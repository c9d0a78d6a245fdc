"""``cavmae serve``: the HTTP service (FastAPI + uvicorn, the ``serve`` extra)."""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from cavmae.errors import CavmaeError
from cavmae.heap import steady_heap
from cavmae.runtime.serve.config import MB, ServeConfig

from .common import FRAMES, default_model, model_options

log = logging.getLogger(__name__)
#: the defaults of the flags are the configuration's (the config needs no FastAPI)
_D = ServeConfig()
#: seconds uvicorn waits for requests in progress once told to stop
GRACEFUL_S = 10


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails at once with one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CavmaeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@model_options(precision=True)
@click.option("--index", default=None, metavar="INDEX", help="Embedding index for /v1/search (cavmae embed -o).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 listens on all.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--frames", default=None, type=FRAMES,
              help="Frames aggregated per clip [default: 10; an export directory's own].")
@click.option("--max-batch", default=_D.max_batch, show_default=True, type=click.IntRange(1),
              help="Clips per model call (1: no dynamic batching).")
@click.option("--max-wait-ms", default=_D.max_wait * 1000, show_default=True, type=click.FloatRange(0),
              help="How long a request waits for others to join its batch.")
@click.option("--max-queue", default=_D.max_queue, show_default=True, type=click.IntRange(1),
              help="Requests in progress at once; more get 503 with Retry-After.")
@click.option("--workers", default=_D.workers, show_default=True, type=click.IntRange(1), help="Decoding threads.")
@click.option("--max-upload-mb", default=_D.max_upload / MB, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Largest request body.")
@click.option("--max-duration", default=_D.max_duration, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Longest media one request may send, in seconds.")
@click.option("--timeout", default=_D.timeout, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds for one request, upload included (past it: 408 while uploading, 504 after).")
@click.option("--max-windows", default=_D.max_windows, show_default=True, type=click.IntRange(1),
              help="Sliding windows one classify request may ask for (window/hop).")
@click.option("--api-key", envvar="CAVMAE_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' (env CAVMAE_API_KEY); health checks, the page and the API docs are open.")
@click.option("--allow-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Let requests name files inside this folder (field 'path') instead of uploading them.")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None,
              help="Label CSV (index,mid,display_name) naming the classes of your own model.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Server log level.")
def serve(model, engine, device, mirror, precision, index, host, port, frames, max_batch, max_wait_ms, max_queue, workers,
          max_upload_mb, max_duration, timeout, max_windows, api_key, allow_dir, labels_csv, log_level) -> None:
    """Serve a model over HTTP: classify, embed, search and localize uploaded videos.

    Endpoints are under /v1 (OpenAPI page at /docs), with /healthz, /readyz and /metrics;
    GET / is a page to try a video in the browser. Concurrent requests are batched.

    \b
    Examples:
      cavmae serve -m as-full-51.2
      cavmae serve -m exports/as-full --index my-index --port 8080
      curl -F file=@video.mp4 -F top_k=3 http://127.0.0.1:8000/v1/classify
    """
    try:
        import uvicorn  # noqa: F401  # checked here, used by _run_until_stopped

        from cavmae.runtime.serve import create_app
        from cavmae.runtime.serve.service import Service
    except ImportError as e:
        raise CavmaeError(f"cavmae serve needs the serve extra ({e.name} is missing):"
                          ' pip install -e ".[serve]"') from None

    if not math.isfinite(max_upload_mb):
        raise CavmaeError(f"--max-upload-mb must be a finite number of MB, not {max_upload_mb}")
    if api_key is None and os.environ.get("CAVMAE_API_KEY") is not None:
        api_key = os.environ["CAVMAE_API_KEY"]  # click reads a set but empty variable as unset
    if api_key is not None and not api_key.strip():  # an empty key must not turn the check off
        raise CavmaeError("the API key (--api-key or CAVMAE_API_KEY) must not be empty; unset it to serve without one")
    steady_heap()  # before the engine and the worker threads start
    config = ServeConfig(
        max_batch=max_batch, max_wait=max_wait_ms / 1000.0, max_queue=max_queue, workers=workers,
        max_upload=int(max_upload_mb * MB), max_duration=max_duration, timeout=timeout, max_windows=max_windows,
        api_key=api_key, allow_dir=allow_dir,
    )
    if not _is_loopback(host) and config.api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it may use it",
                   err=True)
    sock = _listen(host, port)
    try:
        service = Service.open(model or default_model(), engine=engine, device=device, index=index,
                               mirror=mirror, num_frames=frames, precision=precision, labels=labels_csv,
                               progress=True)
        app = create_app(service, config)
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"cavmae serve: {service.pipe.describe()}; listening on http://{shown}:{bound_port}"
                   " (Ctrl+C stops)", err=True)
        _run_until_stopped(app, sock, log_level)
    finally:
        sock.close()


def _run_until_stopped(app: Any, sock: socket.socket, log_level: str) -> None:
    """Serve until Ctrl+C or SIGTERM. The first signal halts the work in progress (its
    requests get 503 at their next step) before uvicorn waits, at most its graceful timeout,
    for them; the temporary folder goes even when a second Ctrl+C skips uvicorn's shutdown."""
    import uvicorn

    runtime = app.state.runtime

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            runtime.halt()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_S,
                                   access_log=log_level == "debug"))
    # uvicorn raises the signal it caught again once it has shut down: SIGTERM's default would
    # kill the process there, before this cleanup and the closing line
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has shut down gracefully and re-raises the Ctrl+C it caught: a normal stop
        click.echo("cavmae serve: stopped", err=True)
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        runtime.stop()  # done already unless a forced quit skipped the lifespan's shutdown


def _interrupt(sig: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
