"""``cavmae serve``: an HTTP service over a loaded model, with dynamic batching and a web page.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart); importing ``cavmae.runtime``
does not import this package. Layout: :mod:`.config` (limits), :mod:`.service` (the only
module calling the runtime), :mod:`.batcher` (dynamic batching), :mod:`.gate` (key, admission,
upload limit), :mod:`.metrics` (Prometheus text), :mod:`.server` (what lives as long as the
server: pool, batcher, temporary folder, stop signal; a request's media), :mod:`.app`
(endpoints), ``static/`` (page).
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):  # FastAPI is imported when the app is built, not with the config
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
