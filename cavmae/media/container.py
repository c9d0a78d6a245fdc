"""Opening a media file: clear errors for unusable files, the time origin, the headers (probe).

Every PyAV/OS failure is mapped to a one-line :class:`~cavmae.errors.MediaError` naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import av.error

from cavmae.errors import CavmaeError, MediaError

# Tolerance when comparing a timestamp with a window bound (timestamps are exact rationals; the
# bounds are user floats such as 0.1).
EPS = 1e-6


@dataclass(frozen=True)
class MediaInfo:
    """What a media file holds, from its headers (no decoding).

    ``fps`` is the stream's average frame rate (frames / duration; for variable frame rate
    video it is only an average). Fields of a missing stream are ``None``.
    """

    path: str
    duration: float
    has_audio: bool
    has_video: bool
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    sample_rate: int | None = None
    channels: int | None = None



def error_reason(exc: BaseException) -> str:
    """A short, single-line reason from an FFmpeg/OS error (without the repeated file name)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


@contextmanager
def media_errors(path: str, doing: str) -> Iterator[None]:
    """Turn PyAV/OS errors raised while ``doing`` something with ``path`` into MediaError."""
    try:
        yield
    except CavmaeError:
        raise
    except (av.error.FFmpegError, OSError, EOFError) as exc:
        raise MediaError(
            f"{path}: {doing} failed ({error_reason(exc)}); the file may be corrupt or truncated"
        ) from exc


def open_media(path: str | Path) -> av.container.InputContainer:
    """Open ``path`` for reading, with clear errors for the usual ways a file is unusable."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: no such file")
    if p.is_dir():
        raise MediaError(f"{p}: is a directory, not a media file")
    if p.stat().st_size == 0:
        raise MediaError(f"{p}: empty file (0 bytes)")
    try:
        container = av.open(str(p), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"{p}: not a readable audio/video file ({error_reason(exc)})") from exc
    if not container.streams.audio and not container.streams.video:
        container.close()
        raise MediaError(f"{p}: contains no audio or video stream")
    return container


def time_origin(container: av.container.InputContainer) -> float:
    """The container's start time in seconds (0 when unknown)."""
    start = container.start_time
    return 0.0 if start is None else start / av.time_base


def read_info(container: av.container.InputContainer, path: str) -> MediaInfo:
    audio = container.streams.audio[0] if container.streams.audio else None
    video = container.streams.video[0] if container.streams.video else None
    duration = 0.0
    if container.duration is not None and container.duration > 0:
        duration = container.duration / av.time_base
    else:
        for stream in (audio, video):
            if stream is not None and stream.duration and stream.time_base is not None:
                duration = max(duration, float(stream.duration * stream.time_base))
    fps = width = height = None
    if video is not None:
        rate = video.average_rate or video.guessed_rate or video.base_rate
        fps = float(rate) if rate else None
        width, height = video.codec_context.width, video.codec_context.height
    sample_rate = channels = None
    if audio is not None:
        sample_rate = audio.codec_context.sample_rate or None
        channels = audio.codec_context.layout.nb_channels or None
    return MediaInfo(
        path=path,
        duration=duration,
        has_audio=audio is not None,
        has_video=video is not None,
        fps=fps,
        width=width,
        height=height,
        sample_rate=sample_rate,
        channels=channels,
    )


def probe(path: str | Path) -> MediaInfo:
    """Read a file's headers: duration, streams, frame rate, size, sample rate, channels.

    Raises:
        MediaError: missing, empty or unreadable file.
    """
    container = open_media(path)
    with container:
        return read_info(container, str(path))


def check_offset(path: str, offset: float, info: MediaInfo) -> None:
    if not math.isfinite(offset) or offset < 0:
        raise MediaError(f"{path}: offset must be a finite number of seconds >= 0, got {offset}")
    if info.duration > 0 and offset >= info.duration:
        raise MediaError(
            f"{path}: offset {offset:g} s is beyond the end of the media "
            f"({info.duration:.3f} s long)"
        )

