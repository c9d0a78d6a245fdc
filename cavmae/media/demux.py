"""Demuxing one window: the packets a window needs, read once, after a seek when it helps.

Times are seconds relative to the container's start time (:func:`~.container.time_origin`).
"""

from __future__ import annotations

import logging
import math

import av
import av.error

from cavmae.errors import MediaError, MissingStreamError

from .container import (
    EPS,
    MediaInfo,
    check_offset,
    error_reason,
    media_errors,
    open_media,
    read_info,
    time_origin,
)

logger = logging.getLogger(__name__)

# Seek this far before the window so the audio decoder (MDCT overlap, priming) has settled and
# the video decoder starts from a keyframe at or before the window.
_SEEK_PREROLL = 1.0
# Audio packets beyond the window end still demuxed, so the resampler's filter sees real samples
# past the cut (its delay is a few milliseconds).
_AUDIO_TAIL = 0.2
# A stream whose packets stop more than max(this, 3 packet durations) before its indexed end is
# reported as truncated (valid files end a frame or two short of it, e.g. after an edit list).
_TRUNCATION_SLACK = 0.25


def packet_time(packet: av.Packet, origin: float, *, decode_order: bool = False) -> float | None:
    """Packet timestamp in seconds from the file start (dts first when ``decode_order``)."""
    first, second = (packet.dts, packet.pts) if decode_order else (packet.pts, packet.dts)
    ts = first if first is not None else second
    if ts is None or packet.time_base is None:
        return None
    return float(ts * packet.time_base) - origin


def _demux_window(
    container: av.container.InputContainer,
    streams: list[av.stream.Stream],
    start: float,
    end: float,
    path: str,
) -> dict[int, list[av.Packet]]:
    """Packets of ``streams`` needed to decode the window ``[start, end)``, in decode order.

    Seeks to ``start - _SEEK_PREROLL`` (the demuxer lands on a video keyframe at or before it),
    keeps every packet from there on, and stops once each stream has passed ``end``: video when
    its decode timestamp reaches ``end`` (decode timestamps never exceed presentation
    timestamps, so no later packet can still show a frame inside the window), audio
    ``_AUDIO_TAIL`` seconds later. Packets before the window are kept because decoding the
    window needs them (references, decoder warm-up); the decoders drop their output.
    """
    origin = time_origin(container)
    if start > _SEEK_PREROLL:
        target = int((start - _SEEK_PREROLL + origin) * av.time_base)
        try:
            container.seek(target, backward=True, any_frame=False)
        except av.error.FFmpegError as exc:  # unseekable: read on from the beginning instead
            logger.debug("%s: seek failed (%s); reading from the start", path, error_reason(exc))
    packets: dict[int, list[av.Packet]] = {s.index: [] for s in streams}
    limits = {s.index: end if s.type == "video" else end + _AUDIO_TAIL for s in streams}
    pending = set(packets)
    reached = dict.fromkeys(packets, -math.inf)  # end time of the last packet seen per stream
    longest = dict.fromkeys(packets, 0.0)  # longest packet duration per stream
    with media_errors(path, "reading"):
        for packet in container.demux(streams):
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            index = packet.stream.index
            if index not in pending:
                continue
            packets[index].append(packet)
            shown = packet_time(packet, origin)
            if shown is not None:
                length = float(packet.duration * packet.time_base) if packet.duration else 0.0
                reached[index] = max(reached[index], shown + length)
                longest[index] = max(longest[index], length)
            t = packet_time(packet, origin, decode_order=True)
            if t is not None and t >= limits[index] - EPS:
                pending.discard(index)
                if not pending:
                    break
        else:
            for stream in streams:
                if stream.index in pending:
                    _check_complete(
                        stream, reached[stream.index], 3 * longest[stream.index], end, origin, path
                    )
    return packets


def _check_complete(
    stream: av.stream.Stream, reached: float, slack: float, end: float, origin: float, path: str
) -> None:
    """Raise when a stream's packets stop well before its indexed duration (a cut-off file).

    Only streams whose header gives their own duration (MP4/MOV indexes) are checked; the
    container's overall duration is not used, since a sound track may end before the video.
    """
    if stream.duration is None or stream.time_base is None:
        return
    begin = stream.start_time if stream.start_time is not None else 0
    declared = float((begin + stream.duration) * stream.time_base) - origin
    expected = min(end, declared)
    if reached < expected - max(slack, _TRUNCATION_SLACK):
        got = "no packets" if reached == -math.inf else f"data up to {reached:.2f} s"
        raise MediaError(
            f"{path}: truncated file: the {stream.type} stream has {got} but its index says "
            f"{declared:.2f} s; re-download or re-encode it"
        )


def _first_time(packets: list[av.Packet], origin: float) -> float | None:
    times = [t for p in packets[:64] if (t := packet_time(p, origin)) is not None]
    return min(times) if times else None


def _pick_streams(
    container: av.container.InputContainer, audio: bool, video: bool
) -> dict[str, av.stream.Stream]:
    """The first audio and/or video stream, by kind, the video one set to decode in threads."""
    streams: dict[str, av.stream.Stream] = {}
    if audio:
        streams["audio"] = container.streams.audio[0]
    if video:
        first = container.streams.video[0]
        first.thread_type = "AUTO"  # frame + slice threads; decoding dominates the cost
        streams["video"] = first
    return streams


def read_window(
    path: str,
    want_audio: bool,
    want_video: bool,
    start: float,
    duration: float | None,
) -> tuple[
    MediaInfo, av.container.InputContainer, dict[str, av.stream.Stream], dict[int, list[av.Packet]]
]:
    """Open ``path``, check its streams and offset, and demux the window's packets.

    The returned container must be closed by the caller (it owns the codec contexts).
    """
    container = open_media(path)
    try:
        info = read_info(container, path)
        # Neutral hints: commands replace them with their own flags (MissingStreamError.with_hint).
        if want_audio and not info.has_audio:
            raise MissingStreamError.of(path, "audio", "a file with a sound track is needed")
        if want_video and not info.has_video:
            raise MissingStreamError.of(path, "video", "a file with a video track is needed")
        check_offset(path, start, info)
        streams = _pick_streams(container, want_audio, want_video)
        end = math.inf if duration is None else start + duration
        packets = _demux_window(container, list(streams.values()), start, end, path)
        origin = time_origin(container)
        late = [
            s
            for s in streams.values()
            if start > _SEEK_PREROLL
            and (t := _first_time(packets[s.index], origin)) is not None
            and t > start + EPS
        ]
        if late:
            # The seek overshot (imprecise index): read this window again from the beginning.
            logger.debug("%s: seek landed after %.3f s; re-reading from the start", path, start)
            container.close()
            container = open_media(path)
            streams = _pick_streams(container, "audio" in streams, "video" in streams)
            packets = _demux_window(container, list(streams.values()), 0.0, end, path)
        return info, container, streams, packets
    except BaseException:
        container.close()
        raise

