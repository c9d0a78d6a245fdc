"""Audio: decode a window's packets, resample to the model's rate, keep the first channel."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt

from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import MediaError

from .container import media_errors, time_origin
from .demux import read_window


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
    kept: npt.NDArray[Any] = np.ascontiguousarray(data[:, drop * width :])  # the frame's dtype
    trimmed = av.AudioFrame.from_ndarray(kept, format=frame.format.name, layout=frame.layout)
    trimmed.sample_rate = rate
    trimmed.time_base = frame.time_base
    trimmed.pts = frame.pts + round(Fraction(drop, rate) / frame.time_base)
    return trimmed


def decode_audio_packets(
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

    with media_errors(path, "decoding audio"):
        for packet in [*packets, None]:
            for frame in codec.decode(packet):
                if frame.time_base is None:  # frames drained by decode(None) lack it
                    frame.time_base = stream.time_base
                if resampler is None:
                    aligned = _align_to_output_grid(frame, anchor, origin, sample_rate)
                    if aligned is None:
                        continue
                    frame = aligned
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
    first = 0.0 if first_time is None else first_time
    return _cut(np.concatenate(chunks), first, start, duration, sample_rate, path)


def _cut(
    waveform: np.ndarray, first_time: float, start: float, duration: float | None,
    sample_rate: int, path: str,
) -> np.ndarray:
    """The samples of ``[start, start + duration)`` of a waveform whose first sample is at
    ``first_time`` s, checked to be non-empty and finite."""
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
    info, container, streams, packets = read_window(
        path, True, False, offset, duration
    )
    with container:
        stream = streams["audio"]
        assert isinstance(stream, av.audio.stream.AudioStream)  # read_window picked by kind
        return decode_audio_packets(
            stream, packets[stream.index], time_origin(container), offset, duration, sample_rate, path
        )

