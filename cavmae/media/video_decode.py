"""Video: count a window's frames from its packets, pick the reference positions, decode once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np

from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import MediaError

from .container import EPS, media_errors, time_origin
from .demux import packet_time, read_window

logger = logging.getLogger(__name__)


def sample_frame_positions(total: int, num_frames: int) -> list[int]:
    """The reference frame rule: ``max(int(i * total / num_frames) - 1, 0)`` for each ``i``.

    Positions are 0-based indices into the ``total`` frames of the window, in presentation
    order. With fewer frames than ``num_frames`` some positions repeat.
    """
    if total < 1:
        raise ValueError(f"need at least one frame, got total={total}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [max(int(i * total / num_frames) - 1, 0) for i in range(num_frames)]


#: the largest frame decoded (8K UHD): a few KB of file can declare a frame of gigabytes
MAX_VIDEO_PIXELS = 7680 * 4320

# Decoders that read ``skip_frame`` for every packet, so it can be switched per packet: frames
# that are neither kept nor referenced by other frames are then not decoded at all.
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video"})


@dataclass(frozen=True)
class _WindowFrames:
    """The frames shown in a window, known from packets before decoding.

    ``total`` counts the frames; ``index_of`` maps a frame's pts to its 0-based display index in
    the window, or is ``None`` when some packet lacks a pts (then frames are counted as they
    come out of the decoder).
    """

    total: int
    index_of: dict[int, int] | None


def _window_frames(
    packets: list[av.Packet], origin: float, start: float, end: float
) -> _WindowFrames:
    """Count the frames shown in ``[start, end)`` from packets, without decoding.

    Each video packet holds one frame and carries that frame's presentation timestamp, so the
    count is right for variable frame rate and does not depend on B-frame reordering (packets
    come in decode order; membership in the window and display order only depend on pts).
    Packets flagged *discard* (the pre-roll before an MP4 edit list's start) are not shown by
    the decoder and are not counted. Stream metadata is not used: ``nb_frames`` counts
    discarded and out-of-window frames (400 for a sample clip that shows 299) and the average
    frame rate is only an average for VFR video.
    """
    total = 0
    shown: list[int] = []
    for packet in packets:
        if packet.is_discard:
            continue
        t = packet_time(packet, origin)
        if t is None or not start - EPS <= t < end - EPS:
            continue
        total += 1
        if packet.pts is not None:
            shown.append(packet.pts)
    unique = sorted(set(shown))
    if len(unique) != total:  # a packet without pts, or repeated pts
        return _WindowFrames(total, None)
    return _WindowFrames(total, {pts: i for i, pts in enumerate(unique)})


class _Picker:
    """Which decoded frames are kept: for each sampled position the first frame at or after it.

    ``pending`` lists the positions still to fill, in order; ``last`` is the last in-window frame
    decoded, the stand-in for positions past the last decodable frame.
    """

    def __init__(self, window: _WindowFrames, positions: list[int], start: float, end: float,
                 keep: Callable[[np.ndarray], np.ndarray]) -> None:
        self.window, self.positions, self.start, self.end, self.keep = window, positions, start, end, keep
        self.pending = sorted(set(positions))
        self.kept: dict[int, tuple[np.ndarray, float]] = {}
        self.counted = 0  # in-window frames decoded so far (used when index_of is None)
        self.last: tuple[av.VideoFrame, float] | None = None

    def _index(self, frame: av.VideoFrame, t: float) -> int | None:
        """The frame's display index in the window, or None when it is outside."""
        if self.window.index_of is not None:
            return None if frame.pts is None else self.window.index_of.get(frame.pts)
        if not self.start - EPS <= t < self.end - EPS:
            return None
        self.counted += 1
        return self.counted - 1

    def offer(self, frame: av.VideoFrame, t: float) -> None:
        """Take a decoded frame shown at ``t`` s; converted to RGB only when a position needs it."""
        index = self._index(frame, t)
        if index is None:
            return
        self.last = (frame, t)
        if self.pending and self.pending[0] <= index:
            rgb = self.keep(frame.to_ndarray(format="rgb24"))
            while self.pending and self.pending[0] <= index:
                self.kept[self.pending.pop(0)] = (rgb, t)

    def result(self, path: str) -> tuple[list[np.ndarray], np.ndarray]:
        """``(frames, times)`` at the positions; unfilled positions take the last frame."""
        if self.last is None:
            raise MediaError(
                f"{path}: no video frame could be decoded in the window "
                f"[{self.start:g}, {self.end:g}) s; the file may be corrupt"
            )
        if self.pending:
            logger.warning(
                "%s: %d video frames in the window but frames at positions %s did not decode; "
                "using the last decoded frame",
                path,
                self.window.total,
                self.pending,
            )
            rgb = self.keep(self.last[0].to_ndarray(format="rgb24"))
            for position in self.pending:
                self.kept[position] = (rgb, self.last[1])
        frames = [self.kept[p][0] for p in self.positions]
        times = np.array([self.kept[p][1] for p in self.positions], dtype=np.float64)
        return frames, times


class _Clock:
    """Presentation time of decoded frames in seconds from the file start.

    A frame without a timestamp is placed one nominal frame after the previous one.
    """

    def __init__(self, stream: av.video.stream.VideoStream, origin: float, start: float) -> None:
        self.stream, self.origin = stream, origin
        self.step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
        self.previous = start - self.step

    def time(self, frame: av.VideoFrame) -> float:
        time_base = frame.time_base or self.stream.time_base  # None when drained
        ts = frame.pts if frame.pts is not None else frame.dts
        if ts is None or time_base is None:
            t = self.previous + self.step  # no timestamp: assume the nominal rate
        else:
            t = float(ts * time_base) - self.origin
        self.previous = t
        return t


def _decode_only(window: _WindowFrames, codec_name: str, positions: list[int]) -> set[int] | None:
    """The pts of the frames to decode fully, or None when every frame must be decoded."""
    if window.index_of is None or codec_name not in _SKIP_NONREF_CODECS:
        return None
    wanted = set(positions)
    return {pts for pts, i in window.index_of.items() if i in wanted}


def decode_video_packets(
    stream: av.video.stream.VideoStream,
    packets: list[av.Packet],
    origin: float,
    start: float,
    end: float,
    num_frames: int,
    path: str,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode once, in order, converting to RGB only the frames at the sampled positions.

    Each position takes the first decoded frame at or after it (itself, unless that frame
    failed to decode); positions past the last decodable frame take the last one. Decoding
    stops as soon as every position is filled. For codecs in ``_SKIP_NONREF_CODECS``,
    non-reference frames that are not kept are skipped by the decoder. ``keep`` maps each
    picked RGB frame to what is kept of it (the model input: a large frame is then not held
    until the last one is decoded); default the RGB frame itself.
    """
    window = _window_frames(packets, origin, start, end)
    if window.total == 0:
        raise MediaError(f"{path}: no video frames in the window [{start:g}, {end:g}) s")
    codec = stream.codec_context
    if codec.width * codec.height > MAX_VIDEO_PIXELS:
        # the decoder holds a dozen reference frames of this size: refused before it allocates
        raise MediaError(f"{path}: video of {codec.width}x{codec.height} is larger than 8K"
                         f" ({MAX_VIDEO_PIXELS} pixels); scale it down first (e.g. ffmpeg -vf scale=1920:-2)")
    picker = _Picker(window, sample_frame_positions(window.total, num_frames), start, end,
                     keep or (lambda rgb: rgb))
    wanted_pts = _decode_only(window, codec.name, picker.pending)
    skip_mode: str = ""
    clock = _Clock(stream, origin, start)
    with media_errors(path, "decoding video"):
        for packet in [*packets, None]:
            if wanted_pts is not None and packet is not None:
                mode: Literal["DEFAULT", "NONREF"] = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
                if mode != skip_mode:
                    codec.skip_frame = skip_mode = mode
            for frame in codec.decode(packet):
                picker.offer(frame, clock.time(frame))
            if not picker.pending:
                break  # the rest of the window is not needed
    return picker.result(path)


def decode_frames(
    path: str | Path,
    num_frames: int = DEFAULT_PREPROCESS.num_frames,
    offset: float = 0.0,
    duration: float = DEFAULT_PREPROCESS.clip_seconds,
) -> tuple[list[np.ndarray], np.ndarray]:
    """``num_frames`` RGB frames of ``[offset, offset + duration)`` at the reference positions.

    ``total`` is the number of frames shown in the window (fewer when the file is shorter);
    frame ``max(int(i * total / num_frames) - 1, 0)`` of the window is taken for each ``i``.

    Returns:
        ``(frames, times)``: a list of ``[H, W, 3]`` uint8 RGB arrays at the source size and
        ``[num_frames]`` float64 presentation times in seconds from the file start.

    Raises:
        MissingStreamError: no video stream.
        MediaError: unreadable file, offset past the end, no decodable frame in the window.
    """
    path = str(path)
    info, container, streams, packets = read_window(
        path, False, True, offset, duration
    )
    with container:
        stream = streams["video"]
        assert isinstance(stream, av.video.stream.VideoStream)  # read_window picked by kind
        return decode_video_packets(
            stream,
            packets[stream.index],
            time_origin(container),
            offset,
            offset + duration,
            num_frames,
            path,
        )

