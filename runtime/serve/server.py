"""What lives as long as ``cavmae serve``'s server: :class:`Runtime` (the service, the decoding
pool, the batcher, the temporary folder, the stop signal) and the media of a request.

A request's work runs on the decoding pool (:meth:`Runtime.in_pool`) and the batcher's model
thread (:meth:`Runtime.model`), within its deadline (:meth:`Runtime.within_deadline`); work the
request no longer waits for (timed out, or the server is stopping) stops at its next step
(:meth:`Runtime.checker`). :meth:`Runtime.media` gives the request's file as a local path: an
upload in a private temporary file, or a file inside ``--allow-dir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request, Security
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as AnyUpload
from starlette.exceptions import HTTPException

from cavmae.errors import CavmaeError

from .batcher import DynamicBatcher
from .config import ServeConfig
from .gate import Admission, deadline_of, shutting_down, slot_of
from .metrics import Metrics
from .service import Service

log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(HTTPException):
    """An answer for the client: status, one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)


@dataclass
class Media:
    """The file a request is about: where it is here, and the name to report it under."""

    path: Path
    name: str


class Runtime:
    """What lives as long as the server: the service, decoding pool, batcher, temporary folder."""

    def __init__(self, service: Service, config: ServeConfig) -> None:
        self.service, self.config = service, config
        self.metrics = Metrics(config.max_batch)
        self.admission = Admission(config.max_queue)
        self.batcher = DynamicBatcher(self._run, max_batch=config.max_batch,
                                      max_wait=config.max_wait, max_queue=config.max_queue,
                                      on_batch=self._on_batch)
        self.pool: ThreadPoolExecutor | None = None
        self.tmp: Path | None = None
        self.ready = False
        self.warmup_error: str | None = None
        #: set once the server is stopping: work in progress stops at its next step (503)
        self.halting = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        #: the API key as the OpenAPI page knows it, on every endpoint that needs it (an
        #: Authorize button on /docs then sends the header); the gate checks it, not this
        self.auth: list[Any] = [Security(HTTPBearer(
            auto_error=False, scheme_name="APIKey",
            description="The server's --api-key, sent as `Authorization: Bearer KEY`."))] if config.api_key else []
        self.metrics.gauge("cavmae_requests_in_progress", "Model requests admitted and not finished.",
                           lambda: self.admission.in_use)
        self.metrics.gauge("cavmae_queue_depth", "Decoded requests waiting for the model.",
                           lambda: self.batcher.depth)
        self.metrics.gauge("cavmae_ready", "1 once the model is loaded and warmed up.", lambda: float(self.ready))

    def _run(self, key: Hashable, payloads: Any) -> Any:
        if key == ("warmup",):
            self.service.warmup()
            return [None for _ in payloads]
        return self.service.run_batch(key, payloads)

    def _on_batch(self, key: Hashable, size: int, seconds: float) -> None:
        if key != ("warmup",):
            self.metrics.batch_size.observe(size)
            self.metrics.model_seconds.observe(seconds, task=str(key[0]))  # type: ignore[index]

    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="cavmae-serve-", dir=self.config.tmp_dir))
        self.pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="cavmae-decode")
        self.batcher.start()
        warm = self.batcher.submit(("warmup",), None)
        warm.add_done_callback(self._warmed)

    def _warmed(self, future: Any) -> None:
        error = future.exception()
        if error is None:
            self.ready = True
            log.info("model warmed up; ready")
        else:
            self.warmup_error = f"{type(error).__name__}: {error}"
            log.error("warm-up failed: %s", self.warmup_error)

    def halt(self) -> None:
        """Tell the work in progress to stop: a decode stops before its next window and its
        request is answered 503. ``cavmae serve`` calls this at the first stop signal, before
        uvicorn waits (at most its graceful timeout) for the requests in progress."""
        self.ready = False
        self.halting.set()

    def stop(self) -> None:
        """Halt, then stop the batcher and the pool and remove the temporary folder; once, from
        the lifespan or, when a forced quit skipped that, from the command's own cleanup."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.halt()
        try:
            self.batcher.stop()
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.service.close()
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def retry_after(self) -> int:
        """Seconds a turned-away client should wait: about the time to clear the queue."""
        per_batch = self.metrics.model_seconds.mean(task="classify") or 1.0
        batches = math.ceil(max(self.admission.in_use, 1) / self.config.max_batch)
        return int(min(60, max(1, math.ceil(per_batch * batches + self.config.max_wait))))

    # -- running one request --------------------------------------------------------------
    def deadline(self, request: Request) -> float:
        return deadline_of(request.scope) or (time.monotonic() + self.config.timeout)

    def checker(self, request: Request) -> Callable[[], None]:
        """A check for work done on ``request``'s behalf, called between its steps (before
        each window it decodes): it raises 503 once the server is stopping and 504 past the
        request's deadline, so work nobody waits for any more stops instead of holding a
        decoding thread."""
        deadline = self.deadline(request)

        def check() -> None:
            if self.halting.is_set():
                raise ApiError(503, shutting_down(), {"Retry-After": "5"})
            if time.monotonic() > deadline:
                raise self._timed_out()

        return check

    def _timed_out(self) -> ApiError:
        return ApiError(504, f"the request took longer than the server's timeout of {self.config.timeout:g} s"
                        " (--timeout)")

    async def in_pool(self, request: Request | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the decoding pool for ``request`` (if it has not given up by the time a
        thread is free: see :meth:`checker`); the request's slot stays taken until ``fn``
        finishes, even when the request gave up (timeout), so the admission bound counts that
        work."""
        assert self.pool is not None, "the server is not started"
        slot = None if request is None else slot_of(request.scope)
        check = (lambda: None) if request is None else self.checker(request)

        def run() -> T:
            check()
            return fn()

        check()  # nothing is queued for a request that has given up or a server that is stopping
        if slot is not None:
            slot.hold()
        future = self.pool.submit(run)
        if slot is not None:
            future.add_done_callback(lambda _: slot.release())
        return await asyncio.wrap_future(future)

    async def model(self, key: Hashable, payload: Any, size: int = 1) -> Any:
        return await asyncio.wrap_future(self.batcher.submit(key, payload, size))

    async def within_deadline(self, request: Request, work: Any) -> Any:
        """Await ``work`` until the request's deadline; past it, 504."""
        deadline = self.deadline(request)
        try:
            return await asyncio.wait_for(work, max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            raise self._timed_out() from None

    # -- media of a request ---------------------------------------------------------------
    def allowed_path(self, text: str) -> Path:
        """A file the request names by path: only inside ``--allow-dir``, symlinks resolved.

        403 outside the folder (``..``, absolute paths, symlinks leading out), 404 for no such
        file, 400 for a path the system cannot look up (a NUL byte, a symlink loop, a name too
        long): a client's path never makes a 500."""
        root = self.config.allow_dir
        if root is None:
            raise ApiError(403, "this server reads no files from its disk; upload the file instead"
                           " (or start the server with --allow-dir DIR)")
        root = Path(root).resolve()
        candidate = Path(text)
        try:
            real = (candidate if candidate.is_absolute() else root / candidate).resolve()
            inside = real.is_relative_to(root)
            found = inside and real.is_file()
        except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: pathlib's symlink loop
            why = "a symlink loop" if isinstance(e, RuntimeError) else (
                "a NUL byte" if isinstance(e, ValueError) else (e.strerror or "not readable").lower())
            raise ApiError(400, f"{text!r} cannot be looked up as a file path ({why})") from None
        if not inside:
            raise ApiError(403, f"{text!r} is outside the folder this server may read")
        if not found:
            raise ApiError(404, f"no such file in the allowed folder: {text!r}")
        return real

    @contextlib.asynccontextmanager
    async def media(self, file: AnyUpload | None, path: str | None) -> AsyncIterator[Media]:
        """The request's media as a local file; an upload is written to a temporary file that
        is removed on the way out (success, error, timeout or a client that went away)."""
        if (file is None) == (path is None or path == ""):
            raise ApiError(400, "send one media file: a multipart field 'file' (or, where the server"
                           " allows it, a field 'path')")
        tmp: Path | None = None
        try:
            if file is None:
                assert path is not None
                local, name = self.allowed_path(path), path
            else:
                assert self.tmp is not None, "the server is not started"
                name = _safe_name(file.filename)
                fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix="upload-", suffix=Path(name).suffix[:16])
                local = tmp = Path(tmp_name)
                with open(fd, "wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, file.file, out, 1 << 20)
            try:
                yield Media(local, name)
            except CavmaeError as e:
                # messages name the file: name it as the client did, not by the temporary path
                # or the server's own path of it (where --allow-dir is, is not the client's business)
                raise type(e)(str(e).replace(str(local), name)) from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def _safe_name(filename: str | None) -> str:
    """The client's file name without folders or control characters (it appears in answers)."""
    name = Path((filename or "").replace("\\", "/")).name
    name = re.sub(r"[\x00-\x1f\x7f]", "", name)[:200]
    return name or "upload"
