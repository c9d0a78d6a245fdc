"""The FastAPI application of ``cavmae serve``: endpoints, error mapping, lifecycle (what
lives as long as the server, :class:`~.server.Runtime`, is in :mod:`.server`).

A model request goes: :class:`~.gate.Gate` (key, admission, upload limit) -> the upload is
written to a private temporary file -> decoding on the worker pool -> the dynamic batcher's
model thread -> the JSON answer. The temporary file is removed when the request ends, however
it ends. Errors are JSON ``{"error": message, "status": code}``: 4xx for what the client can
fix (bad media, bad parameters, too large, no key), 503 when busy, 504 past the timeout; a
traceback never reaches the client (it goes to the server's log).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from cavmae import __version__
from cavmae.errors import CavmaeError, MediaError
from cavmae.modes import AUTO, CLI_MODES

from .batcher import BatcherStopped, QueueFull
from .config import ServeConfig
from .gate import PUBLIC_PATHS, Gate, multipart_truncated, shutting_down
from .metrics import CONTENT_TYPE
from .server import ApiError, Media, Runtime
from .service import ClassifyPlan, ClassifyRequest, MediaTooLong, Service

log = logging.getLogger(__name__)

ClassifyMode = Literal[(AUTO, *CLI_MODES)]  # type: ignore[valid-type]  # from the mode table
Modality = Literal["audio", "visual", "both"]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


@contextlib.contextmanager
def _client_errors() -> Any:
    """Library errors -> HTTP answers with one clear message."""
    try:
        yield
    except MediaTooLong as e:
        raise ApiError(413, str(e)) from None
    except MediaError as e:
        raise ApiError(422, str(e)) from None
    except CavmaeError as e:
        raise ApiError(400, str(e)) from None
    except BatcherStopped:
        raise ApiError(503, shutting_down(), {"Retry-After": "5"}) from None


def _one_media(scope: Any, form: FormData) -> None:
    """Refuse a body that is not one whole media request: a multipart body cut short (no
    closing boundary: its parser keeps only the parts that ended, so the file would look
    missing) or one with more than one file (only one would be used)."""
    if multipart_truncated(scope):
        raise ApiError(400, "the multipart body is invalid or truncated (it does not end with its closing"
                       " boundary); send it again whole")
    files = len(form.getlist("file"))
    paths = len([p for p in form.getlist("path") if p])
    if files > 1 or paths > 1:
        raise ApiError(400, f"send one media file per request, not {max(files, paths)}: one field 'file'"
                       " (or 'path')")


async def _single_media(request: Request) -> None:
    """:func:`_one_media` as a dependency of the endpoints whose form FastAPI parses."""
    _one_media(request.scope, await request.form())


def create_app(service: Service, config: ServeConfig | None = None) -> FastAPI:
    """The application serving ``service`` under ``config``'s limits: the gate, the error
    handlers, then each group of endpoints (see the functions below, one per group)."""
    rt = Runtime(service, config or ServeConfig())
    app = FastAPI(
        title="cavmae serve", version=__version__, lifespan=_lifespan(rt),
        description="CAV-MAE audio-visual classification, embeddings, search and sound-source maps."
                    " Send media as a multipart field `file`; with `--api-key`, send"
                    " `Authorization: Bearer KEY`. This page (as `/redoc`) loads its scripts from"
                    " cdn.jsdelivr.net, so it needs internet access; the schema itself, `/openapi.json`,"
                    " is served by this server and works offline.",
    )
    app.state.runtime = rt
    known: set[str] = set()  # filled once every route exists; the gate reads it per request
    _add_gate(app, rt, lambda: frozenset(known))
    _add_error_handlers(app)
    _add_probe_routes(app, rt)
    _add_info_routes(app, rt)
    _add_classify_route(app, rt)
    _add_embed_route(app, rt)
    _add_search_route(app, rt)
    _add_localize_route(app, rt)
    known.update(r.path for r in app.routes if hasattr(r, "path"))
    return app


def _lifespan(rt: Runtime) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Start the runtime (pool, batcher, warm-up) with the server; stop it, off the event loop,
    when the server stops. A forced quit (a second Ctrl+C) skips the shutdown message and tears
    the event loop down, cancelling this task: it stops the runtime all the same and ends
    quietly (the cancellation would otherwise be logged as a failed shutdown, with a traceback)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        rt.start()
        try:
            yield
        except asyncio.CancelledError:
            # a second Ctrl+C (a forced quit) cancels the lifespan: not a failure worth a
            # traceback; the work is stopped and the temporary folder removed below all the same
            pass
        finally:
            await run_in_threadpool(rt.stop)

    return lifespan


def _add_gate(app: FastAPI, rt: Runtime, known_paths: Callable[[], frozenset[str]]) -> None:
    """The key check, admission, upload limit and request metrics, before any endpoint
    (:class:`~.gate.Gate`); ``known_paths`` bounds the metrics' endpoint label."""
    config = rt.config
    # the OpenAPI page and schema need no key: they hold no data, and a browser opening /docs
    # cannot send the header (the page's Authorize button sends it with the calls it makes)
    docs = frozenset(u for u in (app.docs_url, app.openapi_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if u)
    app.add_middleware(Gate, metrics=rt.metrics, admission=rt.admission, known_paths=known_paths,
                       api_key=config.api_key, max_upload=config.max_upload, timeout=config.timeout,
                       retry_after=rt.retry_after, public_paths=PUBLIC_PATHS | docs)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error", "status"}``; a bug is a 500 whose details stay in the log."""

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _first_problem(exc.errors()))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _add_probe_routes(app: FastAPI, rt: Runtime) -> None:
    """Liveness, readiness and the Prometheus metrics: no model call."""

    @app.get("/healthz", summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # load balancers probe with HEAD too (FastAPI answers 405 to a HEAD of a GET route)
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @app.get("/readyz", summary="Readiness: the model is loaded and warmed up.")
    async def readyz() -> Response:
        if rt.ready and rt.batcher.running:
            return JSONResponse({"status": "ready"})
        why = (shutting_down() if rt.halting.is_set() else f"warm-up failed: {rt.warmup_error}"
               if rt.warmup_error else "the model is warming up")
        return _error(503, why, {"Retry-After": "2"})

    app.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics", summary="Prometheus metrics (text format).", dependencies=rt.auth)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(rt.metrics.render(), media_type=CONTENT_TYPE)


def _add_info_routes(app: FastAPI, rt: Runtime) -> None:
    """What is loaded and under which limits (``/v1/model``), and the web page that uses it."""
    service, config = rt.service, rt.config

    @app.get("/v1/model", summary="What is loaded: kind, classes, precision, engine, modes, index.",
             dependencies=rt.auth)
    async def model() -> dict[str, Any]:
        return {
            **service.model_info(),
            "limits": {"max_upload_bytes": config.max_upload, "max_duration_s": config.max_duration,
                       "timeout_s": config.timeout, "max_windows": config.max_windows,
                       "reads_server_paths": config.allow_dir is not None},
            "batching": {"max_batch": config.max_batch, "max_wait_s": config.max_wait,
                         "max_queue": config.max_queue, "workers": config.workers},
        }

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"), headers=_PAGE_HEADERS)

    @app.get("/app.js", include_in_schema=False)
    async def page_script() -> Response:
        return Response(_static("app.js"), media_type="text/javascript", headers=_PAGE_HEADERS)


def _add_classify_route(app: FastAPI, rt: Runtime) -> None:
    """``POST /v1/classify``: the records of ``cavmae classify --json`` for one file."""
    service = rt.service

    @app.post("/v1/classify", summary="Top labels of a media file (the records of `cavmae classify --json`).",
              dependencies=[*rt.auth, Depends(_single_media)])
    async def classify(
        request: Request,
        file: Annotated[UploadFile | None, File(description="The media file.")] = None,
        path: Annotated[str | None, Form(description="A file inside --allow-dir instead of an upload.")] = None,
        top_k: Annotated[int, Form(ge=1, description="Labels per clip or window.")] = 5,
        mode: Annotated[ClassifyMode, Form(description="Modalities; auto: per file, audio-visual where the model"
                                           " and the file allow, else the stream the file has.")] = "auto",
        frames: Annotated[int | None, Form(ge=1, description="Frames aggregated per clip (must be the model's).")] = None,
        window: Annotated[float | None, Form(gt=0, le=10, allow_inf_nan=False,
                                             description="Sliding windows of this many seconds.")] = None,
        hop: Annotated[float | None, Form(gt=0, allow_inf_nan=False,
                                          description="Window hop in seconds [default window/2].")] = None,
        offset: Annotated[float, Form(ge=0, allow_inf_nan=False, description="Start of the clip (without window).")] = 0.0,
        all_scores: Annotated[bool, Form(description="Include every class's score.")] = False,
    ) -> Any:
        """One record `{path, mode, start, end, top[, scores]}`; with `window`, `{path, windows: [records]}`."""
        with _client_errors():
            if hop is not None and window is None:
                raise CavmaeError("hop needs window")
            if offset and window is not None:  # as `cavmae classify --offset --window`
                raise CavmaeError("offset picks one clip; window covers the whole file from 0 s (drop one)")
            service.check_frames(frames)
            req = ClassifyRequest(mode=service.choose_mode(mode), top_k=top_k, offset=offset, window=window,
                                  hop=hop, all_scores=all_scores)
            async with rt.media(file, path) as media:
                records = await rt.within_deadline(request, _classify(rt, request, media, req))
        if window is None:
            return records[0]
        return {"path": records[0]["path"], "windows": records}


async def _classify(rt: Runtime, request: Request, media: Media, req: ClassifyRequest) -> list[dict[str, Any]]:
    """The records of a classify request. Its windows are decoded and run a batch
    (``--max-batch`` windows) at a time, so a request holds at most one batch of decoded
    windows however long its file; the request's check (:meth:`Runtime.checker`) runs before
    each window, so a request that timed out, or a server that is stopping, stops decoding."""
    service, config = rt.service, rt.config
    check = rt.checker(request)
    plan: ClassifyPlan = await rt.in_pool(request, lambda: service.plan_classify(
        media.path, req, config.max_duration, config.max_windows))
    probs = []
    for at in range(0, len(plan.starts), config.max_batch):
        starts: Sequence[float] = plan.starts[at : at + config.max_batch]
        check()
        batch = await rt.in_pool(request, functools.partial(service.decode_windows, media.path, plan, starts, check))
        probs.append(await _queued(rt.model(("classify", plan.mode), batch, batch.size)))
        del batch  # the next batch is decoded without this one held
    return service.classify_records(media.name, req, plan, probs)


def _add_embed_route(app: FastAPI, rt: Runtime) -> None:
    """``POST /v1/embed``: a file's audio and visual embeddings."""
    service = rt.service

    @app.post("/v1/embed", summary="The audio and visual embeddings of a media file.",
              dependencies=[*rt.auth, Depends(_single_media)])
    async def embed(
        request: Request,
        file: Annotated[UploadFile | None, File(description="The media file.")] = None,
        path: Annotated[str | None, Form(description="A file inside --allow-dir instead of an upload.")] = None,
        modality: Annotated[Modality, Form(description="Which streams to embed (those the file has).")] = "both",
        frame: Annotated[str | None, Form(description="Visual embedding: middle, mean or a frame index"
                                 " [default: the index's choice, else middle].")] = None,
    ) -> dict[str, Any]:
        """`{path, dim, frame, audio: [D] | null, visual: [D] | null}`, L2-normalized."""
        with _client_errors():
            choice = service.parse_frame(frame)
            async with rt.media(file, path) as media:
                audio, visual = await rt.within_deadline(request, _embed(rt, request, media, modality, choice))
        return {"path": media.name, "dim": service.pipe.manifest.model_config.embed_dim, "frame": choice,
                "audio": None if audio is None else audio.tolist(),
                "visual": None if visual is None else visual.tolist()}


#: the two bodies ``/v1/search`` takes, for the OpenAPI page (the endpoint reads the body itself)
_SEARCH_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}, "path": {"type": "string"},
        "k": {"type": "integer", "default": 10}, "target": {"enum": ["audio", "visual", "both"]},
        "modality": {"enum": ["audio", "visual", "both"], "default": "both"}}}},
    "application/json": {"schema": {"type": "object", "required": ["embedding", "modality"], "properties": {
        "embedding": {"type": "array", "items": {"type": "number"}},
        "modality": {"enum": ["audio", "visual"]}, "k": {"type": "integer", "default": 10},
        "target": {"enum": ["audio", "visual", "both"]}}}},
}}}


def _add_search_route(app: FastAPI, rt: Runtime) -> None:
    """``POST /v1/search``: the loaded index's nearest clips to an upload or an embedding."""
    service = rt.service

    @app.post("/v1/search", summary="Nearest clips of the loaded index to an upload or an embedding.",
              openapi_extra=_SEARCH_BODY, dependencies=rt.auth)
    async def search(request: Request) -> dict[str, Any]:
        """An upload searches with each of its streams (each against its own modality unless
        `target` says otherwise); an embedding of `modality` searches the other modality by
        default. Hits are those of `cavmae search --json`."""
        if service.index is None:
            raise ApiError(400, "this server has no index loaded; start it with --index INDEX to search")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        with _client_errors():
            if kind == "application/json":
                q = _parse(SearchByEmbedding, await _json(request))
                emb = service.check_embedding(q.embedding)
                results = await rt.in_pool(request,
                                           lambda: service.search({q.modality: emb}, "embedding", q.target, q.k))
                return {"index": service.index_path, "query": {"kind": "embedding", "modality": q.modality},
                        "k": q.k, "search": "exact", "results": results}
            if kind != "multipart/form-data":
                raise ApiError(415, "send multipart/form-data with a media 'file', or JSON with an 'embedding'")
            async with request.form(max_files=2, max_fields=16) as form:  # 2: so that 2 are refused as elsewhere
                _one_media(request.scope, form)
                upload = form.get("file")
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                q = _parse(SearchByMedia, fields)
                if upload is not None and isinstance(upload, str):
                    raise ApiError(400, "the field 'file' must be a file upload")
                async with rt.media(upload, q.path) as media:
                    frame = service.default_frame

                    async def work() -> list[dict[str, Any]]:
                        audio, visual = await _embed(rt, request, media, q.modality, frame)
                        queries = {k: v for k, v in (("audio", audio), ("visual", visual)) if v is not None}
                        return await rt.in_pool(request, lambda: service.search(queries, "video", q.target, q.k))

                    results = await rt.within_deadline(request, work())
            return {"index": service.index_path, "query": {"kind": "video", "path": media.name,
                                                           "modality": q.modality},
                    "k": q.k, "search": "exact", "results": results}


def _add_localize_route(app: FastAPI, rt: Runtime) -> None:
    """``POST /v1/localize``: the sound-source heat map over one frame."""
    service, config = rt.service, rt.config

    @app.post("/v1/localize", summary="Sound-source heat map over one frame (default the middle one).",
              dependencies=[*rt.auth, Depends(_single_media)])
    async def localize(
        request: Request,
        file: Annotated[UploadFile | None, File(description="The media file (audio and video).")] = None,
        path: Annotated[str | None, Form(description="A file inside --allow-dir instead of an upload.")] = None,
        frame: Annotated[int | None, Form(ge=0, description="Frame index [default: the middle frame].")] = None,
    ) -> dict[str, Any]:
        """`{path, frame, frame_time, grid, min, max, peak, map, image}`; `image` is the map
        blended over the frame, a PNG data URL."""
        if not service.can_localize:
            raise ApiError(400, "this model has no embedding graphs, so it cannot draw heat maps")
        with _client_errors():
            async with rt.media(file, path) as media:

                async def work() -> dict[str, Any]:
                    inp = await rt.in_pool(request,
                                           lambda: service.decode_localize(media.path, frame, config.max_duration))
                    heat = await _queued(rt.model(("localize",), (inp.audio, inp.image)))
                    return await rt.in_pool(None, lambda: service.localize_response(media.name, inp, heat))

                return await rt.within_deadline(request, work())


async def _embed(rt: Runtime, request: Request, media: Media, modality: str, frame: str | int) -> Any:
    service, config = rt.service, rt.config
    inp = await rt.in_pool(request, lambda: service.decode_embed(media.path, modality, config.max_duration))
    return await _queued(rt.model(("embed", frame), inp))


async def _queued(work: Any) -> Any:
    """Await a batcher job; a full batch queue is a 503 like a full server."""
    try:
        return await work
    except QueueFull:
        raise ApiError(503, "the model queue is full; retry later", {"Retry-After": "1"}) from None


class SearchByEmbedding(BaseModel):
    embedding: list[float]
    modality: Literal["audio", "visual"]
    k: int = Field(10, ge=1, le=1000)
    target: Modality | None = None


class SearchByMedia(BaseModel):
    path: str | None = None
    k: int = Field(10, ge=1, le=1000)
    target: Modality | None = None
    modality: Modality = "both"


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ApiError(400, "the body is not valid JSON") from None


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, _first_problem(e.errors())) from None


def _first_problem(errors: Any) -> str:
    """One clear message from pydantic's list: the first problem and where it is."""
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))


_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';"
                               " script-src 'self'; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
}


def _static(name: str) -> str:
    return resources.files("cavmae.runtime.serve").joinpath("static", name).read_text(encoding="utf-8")
