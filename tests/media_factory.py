"""Generate small, odd media files with PyAV for tests.

Nothing here is committed as binary: every test builds the files it needs in a temporary folder.
The defaults make tiny files (64x48 pixels, 10 fps, 16 kHz mono) that encode in milliseconds.

Frames carry their own index as a flat colour (:func:`frame_color`), so a test can tell which
source frame a decoder picked, even after resizing and normalization (:func:`frame_index_of`).
Audio channels carry pure tones (``tones=(440.0, 1000.0)`` gives channel 0 a 440 Hz sine and
channel 1 a 1000 Hz sine), so a test can tell which channel was kept (:func:`dominant_frequency`).

Typical use::

    from media_factory import make_media  # tests/ is on sys.path under pytest
    path = make_media(tmp_path / "clip.mp4", duration=3.0, fps=10, audio_rate=8000, channels=2,
                      tones=(440.0, 1000.0))
    no_audio = make_media(tmp_path / "silent.mp4", with_audio=False)
    vfr = make_media(tmp_path / "vfr.mp4", frame_times=[0.0, 0.05, 0.3, 0.31, 1.0])
    broken = make_truncated(path, tmp_path / "cut.mp4", keep=0.5)
    text = make_text_file(tmp_path / "notes.mp4")
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = [
    "CHANNEL_LAYOUTS",
    "dominant_frequency",
    "frame_color",
    "frame_index_of",
    "make_empty_file",
    "make_media",
    "make_text_file",
    "make_truncated",
]

#: Channel count -> FFmpeg layout name used for the audio stream.
CHANNEL_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 8: "7.1"}

# Frame colours: index k -> (16 * (k % 16) + 8, 16 * ((k // 16) % 16) + 8, _BLUE). Levels 16 apart
# survive YUV 4:2:0 conversion and lossy coding of flat frames (errors of a few levels).
_STEP = 16
_BLUE = 128
_AUDIO_FRAME = 1024  # samples per encoded audio frame (AAC's fixed frame size)
_TIME_TICK = Fraction(1, 1000)  # video time base when explicit frame times are given


def frame_color(index: int) -> tuple[int, int, int]:
    """RGB colour of source frame ``index`` (unique for indices 0..255)."""
    return (
        _STEP * (index % 16) + _STEP // 2,
        _STEP * ((index // 16) % 16) + _STEP // 2,
        _BLUE,
    )


def frame_index_of(rgb: np.ndarray) -> int:
    """Source frame index of a decoded frame made by :func:`make_media`.

    ``rgb`` is ``[H, W, 3]`` with values in 0..255 (uint8 or float); only the mean colour of the
    centre region is used, so resized frames work too.
    """
    h, w = rgb.shape[:2]
    centre = np.asarray(rgb, dtype=np.float64)[h // 4 : h - h // 4 or h, w // 4 : w - w // 4 or w]
    r, g = centre[..., 0].mean(), centre[..., 1].mean()
    low = int(round((r - _STEP // 2) / _STEP))
    high = int(round((g - _STEP // 2) / _STEP))
    return high * 16 + low


def dominant_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    """Frequency (Hz) of the strongest FFT bin of a mono waveform."""
    x = np.asarray(waveform, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * sample_rate / len(x))


def _frame_image(index: int, width: int, height: int) -> np.ndarray:
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[...] = frame_color(index)
    return img


def make_media(
    path: str | Path,
    *,
    duration: float = 2.0,
    fps: float = 10.0,
    size: tuple[int, int] = (64, 48),
    with_video: bool = True,
    with_audio: bool = True,
    audio_rate: int = 16000,
    channels: int = 1,
    tones: Sequence[float] | None = None,
    amplitude: float = 0.5,
    frame_times: Sequence[float] | None = None,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    faststart: bool = False,
) -> Path:
    """Write a small media file and return its path.

    Args:
        path: output file; the container format follows the suffix (``.mp4``, ``.mkv``, ``.mov``,
            ``.wav`` for audio only ...).
        duration: seconds of audio, and of video when ``frame_times`` is not given.
        fps: constant frame rate (frame ``k`` at ``k / fps`` seconds).
        size: ``(width, height)`` of the video; keep both even (4:2:0 chroma).
        with_video / with_audio: which streams to write (at least one).
        audio_rate: audio sample rate in Hz.
        channels: audio channel count (see :data:`CHANNEL_LAYOUTS`).
        tones: sine frequency in Hz per channel; default 440 Hz * (channel + 1).
        amplitude: peak of each sine.
        frame_times: explicit presentation times in seconds (variable frame rate); frame ``k``
            still gets :func:`frame_color` ``(k)``. Overrides ``fps`` and ``duration`` for video.
        video_codec: ``libx264`` (B-frames, reordering) or e.g. ``mpeg4``.
        audio_codec: ``aac``, ``pcm_s16le`` (in ``.mov``/``.mkv``/``.wav``), ``libopus`` ...
        faststart: put the MP4 index first (then a truncated file still opens).
    """
    path = Path(path)
    if not (with_video or with_audio):
        raise ValueError("make_media needs at least one stream")
    options = {"movflags": "faststart"} if faststart else {}
    width, height = size
    with av.open(str(path), mode="w", options=options) as container:
        vstream = astream = None
        if with_video:
            if frame_times is None:
                rate = Fraction(fps).limit_denominator(1001)
                vstream = container.add_stream(video_codec, rate=rate)
                vstream.codec_context.time_base = 1 / rate
                n_frames = int(round(duration * fps))
                times = [None] * n_frames
            else:
                vstream = container.add_stream(video_codec)
                vstream.codec_context.time_base = _TIME_TICK
                times = list(frame_times)
                rate = None
            vstream.width, vstream.height = width, height
            vstream.pix_fmt = "yuv420p"
            if video_codec == "libx264":
                # Small GOP with B-frames, so decode order differs from presentation order.
                vstream.codec_context.options = {"preset": "ultrafast", "bf": "2", "g": "12"}
        if with_audio:
            layout = CHANNEL_LAYOUTS[channels]
            astream = container.add_stream(audio_codec, rate=audio_rate, layout=layout)
            if audio_codec == "aac":
                astream.codec_context.bit_rate = 32000 * channels

        if vstream is not None:
            for k, t in enumerate(times):
                frame = av.VideoFrame.from_ndarray(_frame_image(k, width, height), format="rgb24")
                frame = frame.reformat(format="yuv420p")
                if t is None:
                    frame.pts = k
                    frame.time_base = 1 / rate
                else:
                    frame.pts = int(round(Fraction(t) / _TIME_TICK))
                    frame.time_base = _TIME_TICK
                container.mux(vstream.encode(frame))
            container.mux(vstream.encode(None))

        if astream is not None:
            freqs = list(tones) if tones is not None else [440.0 * (c + 1) for c in range(channels)]
            if len(freqs) != channels:
                raise ValueError("tones needs one frequency per channel")
            n = int(round(duration * audio_rate))
            t = np.arange(n, dtype=np.float64) / audio_rate
            signal = np.stack([amplitude * np.sin(2 * np.pi * f * t) for f in freqs])
            signal = signal.astype(np.float32)
            fmt = astream.codec_context.format.name
            for start in range(0, n, _AUDIO_FRAME):
                chunk = signal[:, start : start + _AUDIO_FRAME]
                frame = _audio_frame(chunk, fmt, CHANNEL_LAYOUTS[channels])
                frame.sample_rate = audio_rate
                frame.pts = start
                frame.time_base = Fraction(1, audio_rate)
                container.mux(astream.encode(frame))
            container.mux(astream.encode(None))
    return path


def _audio_frame(chunk: np.ndarray, fmt: str, layout: str) -> av.AudioFrame:
    """An AudioFrame in the encoder's sample format from float32 ``[channels, n]`` samples."""
    planar = fmt.endswith("p")
    base = fmt.rstrip("p")
    if base == "s16":
        data = np.clip(np.round(chunk * 32767.0), -32768, 32767).astype(np.int16)
    elif base == "s32":
        data = np.clip(np.round(chunk * 2147483647.0), -(2**31), 2**31 - 1).astype(np.int32)
    elif base == "flt":
        data = chunk.astype(np.float32)
    elif base == "dbl":
        data = chunk.astype(np.float64)
    else:  # pragma: no cover - unusual encoder formats
        raise ValueError(f"unsupported encoder sample format {fmt}")
    if not planar:
        data = np.ascontiguousarray(data.T).reshape(1, -1)
    return av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)


def make_truncated(src: str | Path, dst: str | Path, keep: float = 0.5) -> Path:
    """Copy the first ``keep`` fraction of ``src``'s bytes to ``dst`` (a cut-off download)."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def make_text_file(path: str | Path, text: str = "this is not a video\n") -> Path:
    """A plain text file (often given a media suffix to look plausible)."""
    path = Path(path)
    path.write_text(text * 20)
    return path


def make_empty_file(path: str | Path) -> Path:
    """A zero-byte file."""
    path = Path(path)
    path.write_bytes(b"")
    return path
