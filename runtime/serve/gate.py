"""What every request passes before an endpoint sees it: metrics, the API key, admission, limits.

One pure ASGI middleware (:class:`Gate`), so these checks happen before the request body is
read: a request without the key, one that declares a body over the upload limit, or one that
finds the server full is answered at once, without receiving its upload. For admitted model
requests it wraps ``receive`` to count body bytes (a chunked upload has no length to check up
front), to enforce the request deadline while the upload arrives and to note whether a
multipart body ends with its closing boundary (:func:`multipart_truncated`: the multipart
parser keeps the parts that ended and drops a cut-off one without a word).

A request still running when the server's graceful shutdown runs out of time is cancelled by
uvicorn; the gate answers it with a JSON 503 instead of uvicorn's bare 500 and traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

#: endpoints that need no API key: liveness and readiness probes, and the static page (a
#: browser cannot add a header to a page load; the page sends the key with its API calls);
#: the app adds its OpenAPI page and schema (``Gate(public_paths=)``)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/app.js"})
#: endpoints that take media and run the model: admitted against the queue bound
MODEL_PATHS = frozenset({"/v1/classify", "/v1/embed", "/v1/search", "/v1/localize"})
#: scope["state"] keys set for admitted requests
SLOT_KEY, DEADLINE_KEY, CLOSED_KEY = "cavmae_slot", "cavmae_deadline", "cavmae_multipart_closed"
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def shutting_down() -> str:
    return "the server is shutting down; retry later"


class Slot:
    """One admitted request. The endpoint may :meth:`hold` it for work that outlives the
    response (a decode still running after a timeout); it is freed when the last holder
    releases it, so the bound counts all work in progress."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._holders = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            done = self._holders == 0
        if done:
            self._admission._free()


class Admission:
    """At most ``limit`` model requests at once; the rest are turned away, never queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._used

    def try_acquire(self) -> Slot | None:
        with self._lock:
            if self._used >= self.limit:
                return None
            self._used += 1
        return Slot(self)

    def _free(self) -> None:
        with self._lock:
            self._used -= 1


class BodyLimitError(HTTPException):
    """Raised from ``receive`` inside body parsing; an ``HTTPException`` so FastAPI's form
    parser passes it on (it turns other exceptions into a generic 400)."""


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error ``{"error": message, "status": status}``, sent straight from the middleware."""
    body = json.dumps({"error": message, "status": status}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """The middleware; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        admission: Admission,
        known_paths: Callable[[], frozenset[str]],
        api_key: str | None,
        max_upload: int,
        timeout: float,
        retry_after: Callable[[], int],
        public_paths: frozenset[str] = PUBLIC_PATHS,
    ) -> None:
        self.app = app
        self.public_paths = public_paths
        self.metrics, self.admission = metrics, admission
        self.known_paths = known_paths
        self.api_key = api_key.encode() if api_key else None
        self.max_upload, self.timeout = max_upload, timeout
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = path if path in self.known_paths() else "other"  # bounded label values
        start = time.monotonic()
        status = {"code": 500, "started": 0}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], 1
            await send(message)

        try:
            await self._handle(scope, receive, send_status, path)
        except asyncio.CancelledError:
            # uvicorn's graceful shutdown ran out of time: answer (a JSON 503, as the halted work
            # does) rather than let uvicorn log a traceback and send a plain-text 500; the task
            # ends here either way
            if not status["started"]:
                await send_error(send_status, 503, shutting_down(), {"Retry-After": "5"})
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=str(status["code"]))
            self.metrics.latency.observe(time.monotonic() - start, endpoint=endpoint)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and path not in self.public_paths and not self._authorized(headers):
            await send_error(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                             {"WWW-Authenticate": "Bearer"})
            return
        if path not in MODEL_PATHS or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_upload:
            await send_error(send, 413, self._too_large())
            return
        slot = self.admission.try_acquire()
        if slot is None:
            await send_error(send, 503, f"the server is busy ({self.admission.limit} requests in progress);"
                             " retry later", {"Retry-After": str(self.retry_after())})
            return
        deadline = time.monotonic() + self.timeout
        state = scope.setdefault("state", {})
        state[SLOT_KEY], state[DEADLINE_KEY] = slot, deadline
        received = 0
        closing = _closing_delimiter(headers.get("content-type", ""))
        if closing is not None:
            state[CLOSED_KEY] = False
        tail = b"\r\n"  # the body's last bytes, to find the delimiter across chunks

        async def limited_receive() -> Message:
            nonlocal received, tail
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except TimeoutError:
                raise BodyLimitError(408, f"the upload did not arrive within the server's timeout of"
                                     f" {self.timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_upload:
                    raise BodyLimitError(413, self._too_large())
                if closing is not None and not state[CLOSED_KEY]:
                    tail += message.get("body", b"")
                    state[CLOSED_KEY] = closing in tail
                    tail = tail[-len(closing):]
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            slot.release()

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key or b"")

    def _too_large(self) -> str:
        return (f"the upload is larger than this server's limit of {self.max_upload / 2**20:g} MB"
                " (--max-upload-mb)")


def _closing_delimiter(content_type: str) -> bytes | None:
    """The bytes that close a multipart body of this content type (RFC 2046: CRLF, two dashes,
    the boundary, two dashes); None for another type."""
    if not content_type.lower().startswith("multipart/"):
        return None
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    return b"\r\n--" + (found.group(1) or found.group(2)).encode("latin-1") + b"--"


def multipart_truncated(scope: Scope) -> bool:
    """Whether the request's multipart body, read whole, ended before its closing boundary."""
    return scope.get("state", {}).get(CLOSED_KEY) is False


def deadline_of(scope: Scope) -> float | None:
    return scope.get("state", {}).get(DEADLINE_KEY)


def slot_of(scope: Scope) -> Slot | None:
    return scope.get("state", {}).get(SLOT_KEY)
