"""The settings of one ``cavmae serve`` process: limits, batching, security."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cavmae.errors import CavmaeError

MB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """What the service allows and how it batches.

    Attributes:
        max_batch: clips per model call; 1 turns dynamic batching off.
        max_wait: seconds the first request of a batch waits for more to join it (Triton's
            ``max_queue_delay``); the batch runs earlier once it is full.
        max_queue: requests admitted at once (uploading, decoding, waiting or running); one
            more is answered 503 with ``Retry-After`` before its body is read.
        workers: decoding threads, apart from the one thread that runs the model.
        max_upload: bytes of one request body.
        max_duration: seconds of media one request may send.
        timeout: seconds from admission to the answer (body upload included).
        max_windows: sliding windows one classify request may ask for.
        api_key: when set, every endpoint but health, readiness and the page needs
            ``Authorization: Bearer <api_key>``.
        allow_dir: the only folder whose files requests may name by path; ``None``: none.
        tmp_dir: where uploads are written while they are decoded (a private folder made
            inside it, removed at shutdown); ``None``: the system's temporary folder.
    """

    max_batch: int = 8
    max_wait: float = 0.01
    max_queue: int = 64
    workers: int = 2
    max_upload: int = 200 * MB
    max_duration: float = 600.0
    timeout: float = 120.0
    max_windows: int = 256
    api_key: str | None = None
    allow_dir: Path | None = None
    tmp_dir: Path | None = None

    def __post_init__(self) -> None:
        checks = [
            (0 < self.timeout < math.inf, "timeout must be a positive number of seconds"),
            (self.max_batch >= 1, "max batch must be at least 1"),
            (0 <= self.max_wait <= self.timeout, "max wait must be 0 or more, and at most the request timeout"),
            (self.max_queue >= 1, "max queue must be at least 1"),
            (self.workers >= 1, "workers must be at least 1"),
            (self.max_upload >= 1, "max upload size must be positive"),
            (0 < self.max_duration < math.inf, "max duration must be a positive number of seconds"),
            (self.max_windows >= 1, "max windows must be at least 1"),
            (self.api_key is None or len(self.api_key) > 0, "the API key must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise CavmaeError(message)
        if self.allow_dir is not None and not Path(self.allow_dir).is_dir():
            raise CavmaeError(f"--allow-dir {self.allow_dir}: no such folder")
