"""The whole clip: one demux, both modalities decoded and preprocessed; sliding windows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from cavmae.audio import prepare_audio
from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.errors import MediaError
from cavmae.visual import preprocess_frame

from .audio_decode import decode_audio_packets
from .container import EPS, time_origin
from .demux import read_window
from .video_decode import decode_video_packets


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


def load_clip(
    path: str | Path,
    num_frames: int | None = None,
    offset: float = 0.0,
    config: PreprocessConfig = DEFAULT_PREPROCESS,
    need_audio: bool = True,
    need_video: bool = True,
    duration: float | None = None,
) -> Clip:
    """Decode and preprocess the window ``[offset, offset + config.clip_seconds)`` of a file.

    ``num_frames`` defaults to ``config.num_frames`` (an export's manifest holds its own);
    :meth:`cavmae.runtime.Pipeline.load_clip` calls this with a model's settings.

    ``duration`` (at most the model's span) takes a shorter window for both modalities, e.g.
    for sliding-window predictions; the spectrogram is then padded like a short clip's.

    Audio: the ``config.audio_seconds`` (10.255 s) from ``offset`` that fill the spectrogram's
    1024 rows, as the reference's whole-track fbank cut to 1024 rows does; first channel, resampled to ``config.sample_rate``, then
    :func:`cavmae.audio.prepare_audio` (``[1024, 128]``; shorter audio is padded). Video:
    ``num_frames`` frames at the reference positions, then
    :func:`cavmae.visual.preprocess_frame` on each (``[F, 3, 224, 224]``); a video larger than 8K is refused.

    Raises:
        MissingStreamError: ``need_audio`` and no audio stream, or ``need_video`` and no video.
        MediaError: missing/empty/non-media/truncated file, offset past the end, decode failure.
    """
    if not (need_audio or need_video):
        raise ValueError("load_clip needs need_audio or need_video")
    if num_frames is None:
        num_frames = config.num_frames
    path = str(path)
    window = config.clip_seconds  # frames are sampled from the clip's first 10 s
    audio_window = config.audio_seconds  # the audio the 1024 fbank rows cover (10.255 s)
    if duration is not None:
        if not 0 < duration <= window:
            raise MediaError(f"duration must be in (0, {window:g}] s, got {duration}")
        window = audio_window = float(duration)
    span = max(window if need_video else 0.0, audio_window if need_audio else 0.0)
    info, container, streams, packets = read_window(path, need_audio, need_video, offset, span)
    waveform = audio = frames = None
    times = np.zeros(0, dtype=np.float64)
    with container:
        origin = time_origin(container)
        if need_audio:
            stream = streams["audio"]
            assert isinstance(stream, av.audio.stream.AudioStream)  # read_window picked by kind
            waveform = decode_audio_packets(
                stream, packets[stream.index], origin, offset, audio_window, config.sample_rate, path
            )
        if need_video:
            video = streams["video"]
            assert isinstance(video, av.video.stream.VideoStream)
            # each picked frame becomes the model input at once: a large frame is not held on
            rgb, times = decode_video_packets(
                video, packets[video.index], origin, offset, offset + window, num_frames, path,
                keep=lambda image: preprocess_frame(image, config),
            )
    if waveform is not None:
        audio = prepare_audio(waveform, config)
    if need_video:
        frames = np.stack(rgb)
    return Clip(
        path=path,
        audio=audio,
        frames=frames,
        waveform=waveform,
        frame_times=times,
        duration=info.duration,
        offset=float(offset),
    )



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
    if duration <= window + EPS:
        return [0.0]
    last = math.floor((duration - window) / hop + EPS)  # the last k with k*hop + window <= duration
    offsets = [round(float(k * hop), 6) for k in range(last + 1)]
    tail = duration - (offsets[-1] + window)
    if tail > hop / 2 + EPS:
        offsets.append(round(float(duration - window), 6))
    return offsets

