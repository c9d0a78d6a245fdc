"""Resumable, verified, atomic downloads with the standard library.

``download(url, dest)`` guarantees that a file under ``dest`` is complete and verified:

- bytes stream into ``dest.name + ".part"`` beside ``dest``; only after the body is complete, its
  length matches, the SHA-256 matches (when given) and ``verify`` accepts it, is the ``.part``
  file fsynced and renamed to ``dest`` (``cavmae.fsio.publish_file``);
- a failed network transfer keeps the ``.part`` file, and the next call resumes it with an HTTP
  ``Range: bytes=N-`` request (206 appends; 200 means the server ignored the range, so start
  over; 416 means the part is already complete, or stale, which is checked);
- a file that fails the hash or ``verify`` is deleted: downloading it again would give the same
  bytes, so keeping it would only hide the problem.

Concurrency: two processes (or threads) downloading the same ``dest`` take the exclusive lock
``dest.name + ".lock"`` (``cavmae.fsio.exclusive_lock``) for the whole transfer, so they never
write the same ``.part`` at once; a crashed download never leaves a stale lock. A waiter that gets the lock after another
process created ``dest`` returns that file instead of downloading it again.

No torch, no numpy: the torch-free runtime downloads through this module.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from cavmae import fsio
from cavmae.errors import DownloadError

log = logging.getLogger(__name__)

USER_AGENT = "cavmae-downloader/1"
DEFAULT_HINT = (
    "check the network; if the host cannot be reached from here, serve the file from a "
    "reachable mirror and pass --mirror URL or set CAVMAE_MIRROR"
)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


def part_path(dest: Path) -> Path:
    """Where the bytes of ``dest`` collect while downloading."""
    return dest.with_name(dest.name + ".part")


def lock_path(dest: Path) -> Path:
    """The lock file that serializes downloads of ``dest``."""
    return dest.with_name(dest.name + ".lock")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    verify: Callable[[Path], None] | None = None,
    progress: bool = True,
    timeout: float = 60,
    chunk_size: int = 1 << 20,
    hint: str | None = None,
    lock_timeout: float | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` (see the module docstring for the guarantees); return ``dest``.

    ``sha256``: expected hex digest of the whole file (resumed bytes included).
    ``verify(part_path)``: raises on a bad file; called on the complete ``.part`` file before it
    is renamed to ``dest``.
    ``timeout``: seconds for connecting and for each read.
    ``hint``: what to suggest in a network error message (defaults to the mirror tip).
    ``lock_timeout``: seconds to wait for another process downloading the same file (None:
    wait as long as it takes).

    Raises ``DownloadError`` with a one-line message on network errors (the ``.part`` file is
    kept for resuming) and on hash/verify failures (the ``.part`` file is deleted).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    existed = dest.exists()
    with contextlib.ExitStack() as held:
        lock = lock_path(dest)
        try:
            held.enter_context(fsio.exclusive_lock(lock, timeout=lock_timeout))
        except fsio.LockBusyError:
            raise DownloadError(
                f"another process is still downloading {url} (lock {lock} held); wait for it "
                "or stop it, then run again"
            ) from None
        except OSError as e:
            raise DownloadError(f"cannot lock {lock} to download {url}: {e}") from e
        if dest.exists() and not existed:
            # Another process finished this download while we waited for the lock.
            log.info("%s was downloaded by another process", dest)
            return dest
        part = part_path(dest)
        _fetch(
            url,
            part,
            progress=progress,
            timeout=timeout,
            chunk_size=chunk_size,
            hint=hint or DEFAULT_HINT,
            desc=dest.name,
        )
        _check(url, part, sha256=sha256, verify=verify)
        fsio.publish_file(part, dest)
    return dest


# --- transfer --------------------------------------------------------------------------------


def _fetch(
    url: str, part: Path, *, progress: bool, timeout: float, chunk_size: int, hint: str, desc: str
) -> None:
    """Make ``part`` hold the complete body of ``url``, resuming what is there."""
    # Two attempts at most: a resume the server cannot honour (stale part) restarts once
    # from zero; anything else finishes or raises on the first attempt.
    for _ in range(2):
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                e.close()
                total = _unsatisfied_total(e.headers.get("Content-Range"))
                if total == offset:
                    return  # the part file already holds the whole body
                log.info("discarding stale partial download %s (%d bytes)", part, offset)
                part.unlink(missing_ok=True)
                continue
            raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}; {hint}") from e
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise DownloadError(f"cannot download {url}: {reason}; {hint}") from e

        with response:
            status = getattr(response, "status", None) or 200
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != offset:
                    # A range we did not ask for: trusting it would corrupt the file.
                    part.unlink(missing_ok=True)
                    continue
                mode = "ab"
            else:
                # 200 (or file://): the full body from byte 0; the server ignored the range.
                if offset:
                    log.info("server ignored the resume request for %s; starting over", url)
                offset = 0
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                mode = "wb"
            with open(part, mode) as f:
                _stream(
                    response,
                    f,
                    url=url,
                    offset=offset,
                    total=total,
                    chunk_size=chunk_size,
                    progress=progress,
                    desc=desc,
                    timeout=timeout,
                )
        size = part.stat().st_size
        if total is not None and size != total:
            # Connection closed early without an exception (http.client may do that).
            raise DownloadError(
                f"download of {url} stopped at {size} of {total} bytes; run again to resume"
            )
        return
    raise DownloadError(
        f"cannot download {url}: the server does not honour resume requests; "
        f"delete {part} and run again"
    )


def _stream(
    response: IO[bytes],
    f: IO[bytes],
    *,
    url: str,
    offset: int,
    total: int | None,
    chunk_size: int,
    progress: bool,
    desc: str,
    timeout: float,
) -> None:
    from cavmae.progress import progress_bar

    with progress_bar(
        enabled=progress,
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        leave=False,
    ) as bar:
        try:
            while chunk := response.read(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
        except TimeoutError as e:
            raise DownloadError(
                f"download of {url} timed out (no data for {timeout:g} s); run again to resume"
            ) from e
        except (OSError, http.client.HTTPException) as e:
            # The bytes written so far stay in the .part file for the next attempt.
            raise DownloadError(
                f"download of {url} was interrupted ({type(e).__name__}: {e}); run again to resume"
            ) from e


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length or None) of a 206 ``Content-Range`` header."""
    m = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(3) == "*" else int(m.group(3)))


def _unsatisfied_total(value: str | None) -> int | None:
    """The total length in a 416 ``Content-Range: bytes */N`` header."""
    m = _CONTENT_RANGE_UNSATISFIED.fullmatch(value.strip()) if value else None
    return int(m.group(1)) if m else None


# --- verification ----------------------------------------------------------------------------


def _check(
    url: str, part: Path, *, sha256: str | None, verify: Callable[[Path], None] | None
) -> None:
    """Hash and verify the complete ``part``; delete it and raise ``DownloadError`` on failure."""
    if sha256 is not None:
        actual = fsio.sha256_file(part)
        if actual.lower() != sha256.strip().lower():
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} has SHA-256 {actual}, expected {sha256}; the file was deleted. The "
                "server or mirror holds a different file: fix it, then run again"
            )
    if verify is not None:
        try:
            verify(part)
        except Exception as e:  # any failure means the file must not be cached
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} was downloaded but did not verify ({e}); the file was deleted. The "
                "server or mirror holds a wrong or damaged file: fix it, then run again"
            ) from e
