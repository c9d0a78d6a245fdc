"""Media decoding with PyAV: a video/audio file -> waveform, sampled RGB frames, model inputs.

One pass over the file: the packets of the wanted window are demuxed once (after a seek when an
offset is given), then the audio packets are decoded and resampled and the video packets are
decoded in order, converting to RGB only the frames that are kept (docs/model.md §1).

Times are seconds relative to the container's start time, so audio and video stay aligned and
a file whose timestamps start at e.g. 1.4 s still has its first frame at 0.

Every failure on a bad file (missing, empty, not media, truncated, no such stream, offset past
the end) is a :class:`~cavmae.errors.MediaError` whose one-line message names the file; PyAV's
own exceptions never escape. No zero-filled stand-ins are returned on a decode error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from cavmae.audio import prepare_audio
from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.errors import CavmaeError, MediaError, MissingStreamError
from cavmae.visual import preprocess_frames

__all__ = [
    "Clip",
    "MediaInfo",
    "decode_audio",
    "decode_frames",
    "load_clip",
    "probe",
    "sample_frame_positions",
    "window_offsets",
]

logger = logging.getLogger(__name__)

# Tolerance when comparing a timestamp with a window bound (timestamps are exact rationals; the
# bounds are user floats such as 0.1).
_EPS = 1e-6
# Seek this far before the window so the audio decoder (MDCT overlap, priming) has settled and
# the video decoder starts from a keyframe at or before the window.
_SEEK_PREROLL = 1.0
# Audio packets beyond the window end still demuxed, so the resampler's filter sees real samples
# past the cut (its delay is a few milliseconds).
_AUDIO_TAIL = 0.2
# A stream whose packets stop more than max(this, 3 packet durations) before its indexed end is
# reported as truncated (valid files end a frame or two short of it, e.g. after an edit list).
_TRUNCATION_SLACK = 0.25


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


@dataclass
class Clip:
    """A decoded, preprocessed window of a media file.

    Attributes:
        path: the source file.
        audio: ``[target_length, num_mel_bins]`` = ``[1024, 128]`` float32 normalized fbank, or
            ``None`` when audio was not asked for.
        frames: ``[F, 3, S, S]`` float32 normalized frames (``S = 224``), or ``None``.
        waveform: ``[n]`` float32 mono waveform at the config's sample rate (the source's first
            channel over the window), or ``None``.
        frame_times: ``[F]`` float64 seconds of the sampled frames, relative to the file start.
        duration: duration of the source in seconds.
        offset: start of the window in seconds.
    """

    path: str
    audio: np.ndarray | None
    frames: np.ndarray | None
    waveform: np.ndarray | None
    frame_times: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    duration: float = 0.0
    offset: float = 0.0


# --------------------------------------------------------------------------------------------
# Opening files and mapping errors


def _reason(exc: BaseException) -> str:
    """A short, single-line reason from an FFmpeg/OS error (without the repeated file name)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


@contextmanager
def _media_errors(path: str, doing: str) -> Iterator[None]:
    """Turn PyAV/OS errors raised while ``doing`` something with ``path`` into MediaError."""
    try:
        yield
    except CavmaeError:
        raise
    except (av.error.FFmpegError, OSError, EOFError) as exc:
        raise MediaError(
            f"{path}: {doing} failed ({_reason(exc)}); the file may be corrupt or truncated"
        ) from exc


def _open(path: str | Path) -> av.container.InputContainer:
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
        raise MediaError(f"{p}: not a readable audio/video file ({_reason(exc)})") from exc
    if not container.streams.audio and not container.streams.video:
        container.close()
        raise MediaError(f"{p}: contains no audio or video stream")
    return container


def _origin(container: av.container.InputContainer) -> float:
    """The container's start time in seconds (0 when unknown)."""
    start = container.start_time
    return 0.0 if start is None else start / av.time_base


def _info(container: av.container.InputContainer, path: str) -> MediaInfo:
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
    container = _open(path)
    with container:
        return _info(container, str(path))


def _check_offset(path: str, offset: float, info: MediaInfo) -> None:
    if not math.isfinite(offset) or offset < 0:
        raise MediaError(f"{path}: offset must be a finite number of seconds >= 0, got {offset}")
    if info.duration > 0 and offset >= info.duration:
        raise MediaError(
            f"{path}: offset {offset:g} s is beyond the end of the media "
            f"({info.duration:.3f} s long)"
        )


# --------------------------------------------------------------------------------------------
# Demuxing one window


def _packet_time(packet: av.Packet, origin: float, *, decode_order: bool = False) -> float | None:
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
    origin = _origin(container)
    if start > _SEEK_PREROLL:
        target = int((start - _SEEK_PREROLL + origin) * av.time_base)
        try:
            container.seek(target, backward=True, any_frame=False)
        except av.error.FFmpegError as exc:  # unseekable: read on from the beginning instead
            logger.debug("%s: seek failed (%s); reading from the start", path, _reason(exc))
    packets: dict[int, list[av.Packet]] = {s.index: [] for s in streams}
    limits = {s.index: end if s.type == "video" else end + _AUDIO_TAIL for s in streams}
    pending = set(packets)
    reached = dict.fromkeys(packets, -math.inf)  # end time of the last packet seen per stream
    longest = dict.fromkeys(packets, 0.0)  # longest packet duration per stream
    with _media_errors(path, "reading"):
        for packet in container.demux(streams):
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            index = packet.stream.index
            if index not in pending:
                continue
            packets[index].append(packet)
            shown = _packet_time(packet, origin)
            if shown is not None:
                length = float(packet.duration * packet.time_base) if packet.duration else 0.0
                reached[index] = max(reached[index], shown + length)
                longest[index] = max(longest[index], length)
            t = _packet_time(packet, origin, decode_order=True)
            if t is not None and t >= limits[index] - _EPS:
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
    times = [t for p in packets[:64] if (t := _packet_time(p, origin)) is not None]
    return min(times) if times else None


def _read_window(
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
    container = _open(path)
    try:
        info = _info(container, path)
        # Neutral hints: commands replace them with their own flags (MissingStreamError.with_hint).
        if want_audio and not info.has_audio:
            raise MissingStreamError.of(path, "audio", "a file with a sound track is needed")
        if want_video and not info.has_video:
            raise MissingStreamError.of(path, "video", "a file with a video track is needed")
        _check_offset(path, start, info)
        streams: dict[str, av.stream.Stream] = {}
        if want_audio:
            streams["audio"] = container.streams.audio[0]
        if want_video:
            video = container.streams.video[0]
            video.thread_type = "AUTO"  # frame + slice threads; decoding dominates the cost
            streams["video"] = video
        end = math.inf if duration is None else start + duration
        packets = _demux_window(container, list(streams.values()), start, end, path)
        origin = _origin(container)
        late = [
            s
            for s in streams.values()
            if start > _SEEK_PREROLL
            and (t := _first_time(packets[s.index], origin)) is not None
            and t > start + _EPS
        ]
        if late:
            # The seek overshot (imprecise index): read this window again from the beginning.
            logger.debug("%s: seek landed after %.3f s; re-reading from the start", path, start)
            container.close()
            container = _open(path)
            streams = {kind: getattr(container.streams, kind)[0] for kind in streams}
            if "video" in streams:
                streams["video"].thread_type = "AUTO"
            packets = _demux_window(container, list(streams.values()), 0.0, end, path)
        return info, container, streams, packets
    except BaseException:
        container.close()
        raise


# --------------------------------------------------------------------------------------------
# Audio


def _align_to_output_grid(
    frame: av.AudioFrame, anchor: float, origin: float, out_rate: int
) -> av.AudioFrame | None:
    """Drop leading samples so the frame starts where input and output sample clocks meet.

    Input and output samples coincide every ``period = rate / gcd(rate, out_rate)`` input
    samples (441 for 44.1 kHz -> 16 kHz), counted from the stream's first sample (``anchor``).
    Starting the resampler on such a sample makes a decode that began after a seek produce the
    very samples a decode from the start of the file produces, instead of ones shifted by a
    fraction of a sample. Returns ``None`` when the whole frame lies before the next meeting
    point. Decodes from the start of the stream are untouched (their first sample is one).
    """
    rate = frame.sample_rate
    if frame.pts is None or frame.time_base is None or not rate:
        return frame
    period = rate // math.gcd(rate, out_rate)
    first = round((float(frame.pts * frame.time_base) - origin - anchor) * rate)
    drop = (-first) % period
    if drop == 0:
        return frame
    if drop >= frame.samples:
        return None
    data = frame.to_ndarray()
    # Planar: [channels, samples]; packed: [1, samples * channels], interleaved.
    width = 1 if frame.format.is_planar else frame.layout.nb_channels
    data = np.ascontiguousarray(data[:, drop * width :])
    trimmed = av.AudioFrame.from_ndarray(data, format=frame.format.name, layout=frame.layout)
    trimmed.sample_rate = rate
    trimmed.time_base = frame.time_base
    trimmed.pts = frame.pts + round(Fraction(drop, rate) / frame.time_base)
    return trimmed


def _decode_audio_packets(
    stream: av.audio.stream.AudioStream,
    packets: list[av.Packet],
    origin: float,
    start: float,
    duration: float | None,
    sample_rate: int,
    path: str,
) -> np.ndarray:
    """Decode, resample to ``sample_rate`` and cut ``[start, start + duration)``; channel 0.

    The resampler's output format is planar float (``fltp``) with the *source's own channel
    layout*: keeping the layout means libswresample does no channel mixing (each channel is
    resampled on its own), and planar output puts channel 0 in its own plane, so taking row 0
    of ``to_ndarray()`` is exactly the first channel resampled, as the reference keeps it
    (``ffmpeg -ar 16000`` then ``sox ... remix 1``). A mono layout would instead down-mix all
    channels. Integer PCM becomes float in [-1, 1) (int16 / 32768), as ``torchaudio.load``.
    """
    resampler: av.AudioResampler | None = None
    chunks: list[np.ndarray] = []
    first_time: float | None = None
    codec = stream.codec_context
    anchor = 0.0
    if stream.start_time is not None and stream.time_base is not None:
        anchor = float(stream.start_time * stream.time_base) - origin

    def take(frames: list[av.AudioFrame]) -> None:
        for out in frames:
            chunks.append(out.to_ndarray()[0])

    with _media_errors(path, "decoding audio"):
        for packet in [*packets, None]:
            for frame in codec.decode(packet):
                if frame.time_base is None:  # frames drained by decode(None) lack it
                    frame.time_base = stream.time_base
                if resampler is None:
                    frame = _align_to_output_grid(frame, anchor, origin, sample_rate)
                    if frame is None:
                        continue
                    if frame.pts is not None and frame.time_base is not None:
                        first_time = float(frame.pts * frame.time_base) - origin
                    resampler = av.AudioResampler(
                        format="fltp", layout=frame.layout, rate=sample_rate
                    )
                take(resampler.resample(frame))
        if resampler is not None:
            take(resampler.resample(None))
    if not chunks:
        raise MediaError(
            f"{path}: the audio stream decoded to no samples in the window starting at {start:g} s"
        )
    waveform = np.concatenate(chunks)
    if first_time is None:
        first_time = 0.0
    begin = max(0, int(round((start - first_time) * sample_rate)))
    stop = len(waveform) if duration is None else begin + int(round(duration * sample_rate))
    waveform = waveform[begin:stop]
    if waveform.size == 0:
        raise MediaError(
            f"{path}: no audio samples at or after {start:g} s (the audio stream ends earlier)"
        )
    if not np.all(np.isfinite(waveform)):
        raise MediaError(f"{path}: the decoded audio contains NaN or infinite samples")
    return np.ascontiguousarray(waveform, dtype=np.float32)


def decode_audio(
    path: str | Path,
    sample_rate: int = DEFAULT_PREPROCESS.sample_rate,
    offset: float = 0.0,
    duration: float | None = None,
) -> np.ndarray:
    """The first audio channel of ``[offset, offset + duration)`` as float32 at ``sample_rate``.

    Args:
        path: any file FFmpeg reads (video with sound, WAV, MP3, FLAC ...).
        sample_rate: output rate in Hz; any source rate is resampled.
        offset: window start in seconds from the file start.
        duration: window length in seconds; ``None`` reads to the end.

    Returns:
        ``[n]`` float32 in [-1, 1]; shorter than ``duration * sample_rate`` when the file ends
        first.

    Raises:
        MissingStreamError: no audio stream.
        MediaError: unreadable file, offset past the end, decode failure.
    """
    path = str(path)
    info, container, streams, packets = _read_window(
        path, True, False, offset, duration
    )
    with container:
        stream = streams["audio"]
        return _decode_audio_packets(
            stream, packets[stream.index], _origin(container), offset, duration, sample_rate, path
        )


# --------------------------------------------------------------------------------------------
# Video


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
        t = _packet_time(packet, origin)
        if t is None or not start - _EPS <= t < end - _EPS:
            continue
        total += 1
        if packet.pts is not None:
            shown.append(packet.pts)
    unique = sorted(set(shown))
    if len(unique) != total:  # a packet without pts, or repeated pts
        return _WindowFrames(total, None)
    return _WindowFrames(total, {pts: i for i, pts in enumerate(unique)})


def _decode_video_packets(
    stream: av.video.stream.VideoStream,
    packets: list[av.Packet],
    origin: float,
    start: float,
    end: float,
    num_frames: int,
    path: str,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode once, in order, converting to RGB only the frames at the sampled positions.

    Each position takes the first decoded frame at or after it (itself, unless that frame
    failed to decode); positions past the last decodable frame take the last one. Decoding
    stops as soon as every position is filled. For codecs in ``_SKIP_NONREF_CODECS``,
    non-reference frames that are not kept are skipped by the decoder.
    """
    window = _window_frames(packets, origin, start, end)
    if window.total == 0:
        raise MediaError(f"{path}: no video frames in the window [{start:g}, {end:g}) s")
    positions = sample_frame_positions(window.total, num_frames)
    pending = sorted(set(positions))
    kept: dict[int, tuple[np.ndarray, float]] = {}
    codec = stream.codec_context
    wanted_pts: set[int] | None = None
    if window.index_of is not None and codec.name in _SKIP_NONREF_CODECS:
        wanted = set(pending)
        wanted_pts = {pts for pts, i in window.index_of.items() if i in wanted}
    skip_mode = ""
    step = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0
    previous_time = start - step
    counted = 0  # in-window frames decoded so far (used when index_of is None)
    last: tuple[av.VideoFrame, float] | None = None

    with _media_errors(path, "decoding video"):
        for packet in [*packets, None]:
            if wanted_pts is not None and packet is not None:
                mode = "DEFAULT" if packet.pts in wanted_pts else "NONREF"
                if mode != skip_mode:
                    codec.skip_frame = skip_mode = mode
            for frame in codec.decode(packet):
                time_base = frame.time_base or stream.time_base  # None when drained
                ts = frame.pts if frame.pts is not None else frame.dts
                if ts is None or time_base is None:
                    t = previous_time + step  # no timestamp: assume the nominal rate
                else:
                    t = float(ts * time_base) - origin
                previous_time = t
                if window.index_of is not None:
                    index = window.index_of.get(frame.pts)
                    if index is None:
                        continue
                else:
                    if not start - _EPS <= t < end - _EPS:
                        continue
                    index = counted
                    counted += 1
                last = (frame, t)
                if pending and pending[0] <= index:
                    rgb = frame.to_ndarray(format="rgb24")
                    while pending and pending[0] <= index:
                        kept[pending.pop(0)] = (rgb, t)
            if not pending:
                break  # the rest of the window is not needed
    if last is None:
        raise MediaError(
            f"{path}: no video frame could be decoded in the window "
            f"[{start:g}, {end:g}) s; the file may be corrupt"
        )
    if pending:
        logger.warning(
            "%s: %d video frames in the window but frames at positions %s did not decode; "
            "using the last decoded frame",
            path,
            window.total,
            pending,
        )
        rgb = last[0].to_ndarray(format="rgb24")
        for position in pending:
            kept[position] = (rgb, last[1])
    frames = [kept[p][0] for p in positions]
    times = np.array([kept[p][1] for p in positions], dtype=np.float64)
    return frames, times


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
    info, container, streams, packets = _read_window(
        path, False, True, offset, duration
    )
    with container:
        stream = streams["video"]
        return _decode_video_packets(
            stream,
            packets[stream.index],
            _origin(container),
            offset,
            offset + duration,
            num_frames,
            path,
        )


# --------------------------------------------------------------------------------------------
# The whole clip


def load_clip(
    path: str | Path,
    num_frames: int = DEFAULT_PREPROCESS.num_frames,
    offset: float = 0.0,
    config: PreprocessConfig = DEFAULT_PREPROCESS,
    need_audio: bool = True,
    need_video: bool = True,
    duration: float | None = None,
) -> Clip:
    """Decode and preprocess the window ``[offset, offset + config.clip_seconds)`` of a file.

    ``duration`` (at most the model's span) takes a shorter window for both modalities, e.g.
    for sliding-window predictions; the spectrogram is then padded like a short clip's.

    Audio: the ``config.audio_seconds`` (10.255 s) from ``offset`` that fill the spectrogram's
    1024 rows, as the reference's whole-track fbank cut to 1024 rows does; first channel, resampled to ``config.sample_rate``, then
    :func:`cavmae.audio.prepare_audio` (``[1024, 128]``; shorter audio is padded). Video:
    ``num_frames`` frames at the reference positions, then
    :func:`cavmae.visual.preprocess_frames` (``[F, 3, 224, 224]``).

    Raises:
        MissingStreamError: ``need_audio`` and no audio stream, or ``need_video`` and no video.
        MediaError: missing/empty/non-media/truncated file, offset past the end, decode failure.
    """
    if not (need_audio or need_video):
        raise ValueError("load_clip needs need_audio or need_video")
    path = str(path)
    window = config.clip_seconds  # frames are sampled from the clip's first 10 s
    audio_window = config.audio_seconds  # the audio the 1024 fbank rows cover (10.255 s)
    if duration is not None:
        if not 0 < duration <= window:
            raise ValueError(f"duration must be in (0, {window:g}] s, got {duration}")
        window = audio_window = float(duration)
    span = max(window if need_video else 0.0, audio_window if need_audio else 0.0)
    info, container, streams, packets = _read_window(path, need_audio, need_video, offset, span)
    waveform = audio = frames = None
    times = np.zeros(0, dtype=np.float64)
    with container:
        origin = _origin(container)
        if need_audio:
            stream = streams["audio"]
            waveform = _decode_audio_packets(
                stream, packets[stream.index], origin, offset, audio_window, config.sample_rate, path
            )
        if need_video:
            stream = streams["video"]
            rgb, times = _decode_video_packets(
                stream, packets[stream.index], origin, offset, offset + window, num_frames, path
            )
    if waveform is not None:
        audio = prepare_audio(waveform, config)
    if need_video:
        frames = preprocess_frames(rgb, config)
    return Clip(
        path=path,
        audio=audio,
        frames=frames,
        waveform=waveform,
        frame_times=times,
        duration=info.duration,
        offset=float(offset),
    )


# --------------------------------------------------------------------------------------------
# Sliding windows


def window_offsets(duration: float, window: float, hop: float) -> list[float]:
    """Start times (seconds) of the sliding windows that tile ``duration`` seconds of media.

    Windows start at 0, ``hop``, ``2 * hop``, ... as long as they fit (``start + window <=
    duration``). The tail left after the last of them gets one more window, aligned to end at
    ``duration``, only when that tail is longer than ``hop / 2``: a shorter one would add a
    window nearly equal to the last (30.02 s, 10 s windows every 5 s: 0, 5, 10, 15, 20 -- not
    also 20.02). Media no longer than one window gets the single window 0.
    """
    if not (window > 0 and hop > 0):
        raise ValueError(f"window and hop must be > 0, got {window} and {hop}")
    if duration <= window + _EPS:
        return [0.0]
    last = math.floor((duration - window) / hop + _EPS)  # the last k with k*hop + window <= duration
    offsets = [round(float(k * hop), 6) for k in range(last + 1)]
    tail = duration - (offsets[-1] + window)
    if tail > hop / 2 + _EPS:
        offsets.append(round(float(duration - window), 6))
    return offsets
