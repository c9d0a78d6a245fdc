"""Media decoding (cavmae.media): real sample clips and odd media generated with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from cavmae.config import DEFAULT_PREPROCESS
from cavmae.errors import MediaError, MissingStreamError
from cavmae.media import (
    Clip,
    MediaInfo,
    decode_audio,
    decode_frames,
    load_clip,
    probe,
    sample_frame_positions,
    window_offsets,
)
from conftest import MEDIA as MEDIA_DIR
from media_factory import (
    dominant_frequency,
    frame_index_of,
    make_empty_file,
    make_media,
    make_text_file,
    make_truncated,
)

CFG = DEFAULT_PREPROCESS
SR = CFG.sample_rate
MEDIA = MEDIA_DIR
SMALL = MEDIA / "00W1lcxW-WU_40.000.mp4"  # 256x144, 12.5 fps, stereo 44.1 kHz, 10.0 s
HD = MEDIA / "KlsG1EnBEjc_000361.mp4"  # 1280x720, 29.97 fps (see below), stereo 44.1 kHz
PADDED = (0.0 - CFG.fbank_mean) / CFG.fbank_std  # value of a zero-padded fbank row
FRAMES_10S = 1 + (int(CFG.clip_seconds * SR) - 400) // 160  # 998 fbank frames in 10 s

needs_samples = pytest.mark.skipif(not SMALL.exists(), reason="sample media not available")


def _positions(total: int, n: int = CFG.num_frames) -> list[int]:
    """The reference rule written out independently of the library."""
    return [max(int(i * total / n) - 1, 0) for i in range(n)]


def _rgb(frame: np.ndarray) -> np.ndarray:
    """Undo normalization: [3, S, S] -> [S, S, 3] in 0..255."""
    std = np.asarray(CFG.image_std)[:, None, None]
    mean = np.asarray(CFG.image_mean)[:, None, None]
    return ((frame * std + mean) * 255.0).transpose(1, 2, 0)


def _aac_frame(rate: int) -> int:
    """One AAC frame (1024 source samples) in output samples, plus resampler slack."""
    return 1024 * SR // rate + 32


def _indices(clip: Clip) -> list[int]:
    assert clip.frames is not None
    return [frame_index_of(_rgb(f)) for f in clip.frames]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def three_seconds(media_dir: Path) -> Path:
    """3 s, 10 fps (30 frames), 64x48 H.264 with B-frames, stereo 8 kHz AAC (440 / 1000 Hz)."""
    return make_media(
        media_dir / "three.mp4",
        duration=3.0,
        fps=10,
        audio_rate=8000,
        channels=2,
        tones=(440.0, 1000.0),
    )


@pytest.fixture(scope="module")
def fourteen_seconds(media_dir: Path) -> Path:
    """14 s at 5 fps (70 frames), mono 16 kHz."""
    return make_media(media_dir / "fourteen.mp4", duration=14.0, fps=5, tones=(330.0,))


# --------------------------------------------------------------------------------------------
# The reference frame rule


def test_sample_frame_positions() -> None:
    assert sample_frame_positions(125, 10) == [0, 11, 24, 36, 49, 61, 74, 86, 99, 111]
    assert sample_frame_positions(299, 10) == [0, 28, 58, 88, 118, 148, 178, 208, 238, 268]
    assert sample_frame_positions(5, 10) == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert sample_frame_positions(1, 3) == [0, 0, 0]
    for total in range(1, 400, 7):
        assert sample_frame_positions(total, 10) == _positions(total)
    with pytest.raises(ValueError):
        sample_frame_positions(0, 10)
    with pytest.raises(ValueError):
        sample_frame_positions(10, 0)


# --------------------------------------------------------------------------------------------
# Real sample clips


@pytest.fixture(scope="module")
def small_clip() -> Clip:
    return load_clip(SMALL)


@pytest.fixture(scope="module")
def hd_clip() -> Clip:
    return load_clip(HD)


def _check_clip(clip: Clip) -> None:
    assert clip.audio is not None and clip.frames is not None and clip.waveform is not None
    assert clip.audio.shape == (CFG.target_length, CFG.num_mel_bins)
    assert clip.frames.shape == (CFG.num_frames, 3, CFG.image_size, CFG.image_size)
    assert clip.audio.dtype == clip.frames.dtype == clip.waveform.dtype == np.float32
    assert clip.frames.flags.c_contiguous and clip.audio.flags.c_contiguous
    for array in (clip.audio, clip.frames, clip.waveform):
        assert np.all(np.isfinite(array))
    # The sample clips hold a little over 10 s of audio (all of it is used, up to the 10.255 s
    # that fill 1024 rows, as the reference's whole-track fbank does): 999 real rows, then padding.
    n = clip.waveform.shape[0]
    assert int(CFG.clip_seconds * SR) <= n <= int(CFG.audio_seconds * SR)
    rows = 1 + (n - 400) // 160
    assert rows >= FRAMES_10S
    np.testing.assert_allclose(clip.audio[rows:], PADDED, rtol=1e-6)
    assert np.abs(clip.audio[rows - 1] - PADDED).max() > 1e-3
    assert 0.0 < np.abs(clip.waveform).max() <= 1.0
    assert clip.frame_times.dtype == np.float64 and clip.offset == 0.0


@needs_samples
def test_small_sample_clip(small_clip: Clip) -> None:
    _check_clip(small_clip)
    assert small_clip.duration == pytest.approx(10.0)
    # 12.5 fps over 10 s: total = min(125 frames, int(12.5 * 10)) = 125.
    expected = [max(int(i * 125 / 10) - 1, 0) for i in range(10)]
    assert expected == [0, 11, 24, 36, 49, 61, 74, 86, 99, 111]
    np.testing.assert_allclose(small_clip.frame_times, np.array(expected) / 12.5, atol=1e-9)


@needs_samples
def test_hd_sample_clip(hd_clip: Clip) -> None:
    """The 1280x720 clip: 400 packets, but an MP4 edit list hides the first 101 (pre-roll).

    It shows 299 frames at 30000/1001 fps from 0 to 9.94 s (OpenCV agrees: fps 29.97, and
    total = min(400, int(29.97 * 10)) = 299), so its frames sit at i * 1001 / 30000 s.
    """
    _check_clip(hd_clip)
    assert hd_clip.duration == pytest.approx(10.037)
    fps = 30000 / 1001
    total = min(400, int(fps * 10))
    assert total == 299
    expected = [max(int(i * total / 10) - 1, 0) for i in range(10)]
    np.testing.assert_allclose(hd_clip.frame_times, np.array(expected) / fps, atol=1e-9)


@needs_samples
def test_frames_match_reference_opencv_tool() -> None:
    """The reference extractor: OpenCV fps and frame count, seek to idx - 1, read."""
    cv2 = pytest.importorskip("cv2")
    cap = cv2.VideoCapture(str(SMALL))
    if not cap.isOpened():  # pragma: no cover - OpenCV built without FFmpeg
        pytest.skip("OpenCV cannot read video here")
    fps = cap.get(cv2.CAP_PROP_FPS)
    total = min(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), int(fps * 10))
    frames, _ = decode_frames(SMALL)
    for i, ours in enumerate(frames):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i * total / 10) - 1)
        ok, bgr = cap.read()
        assert ok
        theirs = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 1.0, i


@needs_samples
def test_window_after_seek_matches_full_decode() -> None:
    """offset=5: the seek path gives the very frames and samples a decode from 0 gives."""
    with av.open(str(SMALL)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames, times = decode_frames(SMALL, offset=5.0)
    first = int(np.ceil(5.0 * 12.5))  # first frame at or after 5 s: 63 (5.04 s)
    picks = [first + p for p in _positions(len(every) - first)]
    np.testing.assert_allclose(times, np.array(picks) / 12.5, atol=1e-9)
    for ours, index in zip(frames, picks, strict=True):
        np.testing.assert_array_equal(ours, every[index])

    full = decode_audio(SMALL)
    assert full.shape[0] == pytest.approx(10.0 * SR, abs=200)
    part = decode_audio(SMALL, offset=5.0, duration=2.0)
    assert part.shape == (2 * SR,)
    np.testing.assert_allclose(part, full[5 * SR : 7 * SR], atol=1e-4)


@needs_samples
def test_probe_sample() -> None:
    info = probe(SMALL)
    assert isinstance(info, MediaInfo)
    assert info.has_audio and info.has_video
    assert (info.width, info.height) == (256, 144)
    assert info.fps == pytest.approx(12.5)
    assert info.sample_rate == 44100 and info.channels == 2
    assert info.duration == pytest.approx(10.0)


# --------------------------------------------------------------------------------------------
# Generated media: which frames, which channel


def test_picks_reference_frames(three_seconds: Path) -> None:
    clip = load_clip(three_seconds)
    expected = _positions(30)
    assert _indices(clip) == expected
    np.testing.assert_allclose(clip.frame_times, np.array(expected) / 10, atol=1e-9)
    frames, times = decode_frames(three_seconds, num_frames=4)
    assert [frame_index_of(f) for f in frames] == _positions(30, 4)
    assert frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8


def test_short_clip_pads_audio_and_spreads_frames(three_seconds: Path) -> None:
    clip = load_clip(three_seconds)
    assert clip.waveform is not None and clip.audio is not None
    # AAC codes whole 1024-sample frames, so the stream may run up to one frame long.
    assert 3 * SR <= clip.waveform.shape[0] <= 3 * SR + _aac_frame(8000)
    rows = 1 + (clip.waveform.shape[0] - 400) // 160
    np.testing.assert_allclose(clip.audio[rows:], PADDED, rtol=1e-6)
    assert clip.duration == pytest.approx(3.0, abs=0.1)


def test_fewer_frames_than_requested(media_dir: Path) -> None:
    path = make_media(media_dir / "half.mp4", duration=0.5, fps=10)  # 5 frames
    clip = load_clip(path)
    assert _indices(clip) == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert clip.frames is not None and clip.frames.shape[0] == CFG.num_frames


def test_first_channel_not_downmix(three_seconds: Path) -> None:
    waveform = decode_audio(three_seconds)
    assert waveform.dtype == np.float32
    assert dominant_frequency(waveform, SR) == pytest.approx(440.0, abs=3)
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    bin_hz = SR / len(waveform)
    at = {
        f: spectrum[int(round(f / bin_hz)) - 2 : int(round(f / bin_hz)) + 3].max()
        for f in (440.0, 1000.0)
    }
    assert at[1000.0] < 0.01 * at[440.0]  # a down-mix would carry channel 1's 1000 Hz tone


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (22050, 2), (44100, 2), (48000, 6)])
def test_any_rate_and_channel_count(media_dir: Path, rate: int, channels: int) -> None:
    tones = [300.0 + 400.0 * c for c in range(channels)]
    path = make_media(
        media_dir / f"a{rate}_{channels}.mp4",
        duration=1.0,
        with_video=False,
        audio_rate=rate,
        channels=channels,
        tones=tones,
    )
    info = probe(path)
    assert (info.sample_rate, info.channels, info.has_video) == (rate, channels, False)
    clip = load_clip(path, need_video=False)
    assert clip.waveform is not None and clip.audio is not None and clip.frames is None
    assert SR - 160 <= clip.waveform.shape[0] <= SR + _aac_frame(rate)
    assert dominant_frequency(clip.waveform, SR) == pytest.approx(tones[0], abs=4)
    assert clip.audio.shape == (CFG.target_length, CFG.num_mel_bins)


def test_pcm_wav_audio(media_dir: Path) -> None:
    path = make_media(
        media_dir / "pcm.wav",
        duration=1.0,
        with_video=False,
        audio_rate=22050,
        channels=2,
        tones=(500.0, 2000.0),
        audio_codec="pcm_s16le",
    )
    waveform = decode_audio(path)
    assert waveform.shape[0] == pytest.approx(SR, abs=2)
    assert dominant_frequency(waveform, SR) == pytest.approx(500.0, abs=3)
    assert np.abs(waveform).max() == pytest.approx(0.5, abs=0.01)  # int16 / 32768 scale
    part = decode_audio(path, offset=0.25, duration=0.5)
    np.testing.assert_allclose(part, waveform[SR // 4 : 3 * SR // 4], atol=1e-6)


@pytest.mark.parametrize(
    ("name", "size"), [("portrait", (48, 64)), ("tiny", (32, 24)), ("wide", (128, 32))]
)
def test_any_frame_size(media_dir: Path, name: str, size: tuple[int, int]) -> None:
    path = make_media(media_dir / f"{name}.mp4", duration=2.0, fps=10, size=size, with_audio=False)
    assert (probe(path).width, probe(path).height) == size
    clip = load_clip(path, need_audio=False)
    assert clip.frames is not None
    assert clip.frames.shape == (CFG.num_frames, 3, CFG.image_size, CFG.image_size)
    assert _indices(clip) == _positions(20)


def test_longer_clip_first_window_and_offset(fourteen_seconds: Path) -> None:
    clip = load_clip(fourteen_seconds)
    assert clip.duration == pytest.approx(14.0, abs=0.1)
    # audio: the 10.255 s that fill all 1024 rows (no padding); frames: the first 10 s
    assert clip.waveform is not None and clip.waveform.shape == (int(CFG.audio_seconds * SR),)
    assert _indices(clip) == _positions(50)  # 10 s at 5 fps

    later = load_clip(fourteen_seconds, offset=3.0)
    assert later.offset == 3.0
    assert later.waveform is not None and later.waveform.shape == (int(CFG.audio_seconds * SR),)
    expected = [15 + p for p in _positions(50)]  # frames 15..64 lie in [3, 13)
    assert _indices(later) == expected
    np.testing.assert_allclose(later.frame_times, np.array(expected) / 5, atol=1e-9)

    tail = load_clip(fourteen_seconds, offset=9.0)  # [9, 19): 5 s left, audio padded
    assert tail.waveform is not None
    assert 5 * SR <= tail.waveform.shape[0] <= 5 * SR + _aac_frame(SR)
    assert _indices(tail) == [45 + p for p in _positions(25)]

    full = decode_audio(fourteen_seconds)
    part = decode_audio(fourteen_seconds, offset=6.5, duration=1.0)
    np.testing.assert_allclose(part, full[int(6.5 * SR) : int(7.5 * SR)], atol=2e-3)


def test_variable_frame_rate(media_dir: Path) -> None:
    times = [0.0, 0.05, 0.1, 0.5, 0.55, 1.5, 1.6, 2.9, 3.0, 3.05, 4.2, 4.25]
    path = make_media(media_dir / "vfr.mp4", duration=5.0, frame_times=times)
    clip = load_clip(path)
    expected = _positions(len(times))
    assert _indices(clip) == expected
    np.testing.assert_allclose(clip.frame_times, [times[p] for p in expected], atol=1e-3)


def test_mpeg4_in_matroska(media_dir: Path) -> None:
    path = make_media(
        media_dir / "clip.mkv",
        duration=2.0,
        fps=10,
        video_codec="mpeg4",
        audio_codec="libopus",
        audio_rate=48000,
    )
    clip = load_clip(path)
    assert _indices(clip) == _positions(20)
    assert clip.waveform is not None
    assert clip.waveform.shape[0] == pytest.approx(2 * SR, abs=SR * 0.02)


# --------------------------------------------------------------------------------------------
# Missing streams and bad files


def test_missing_audio_stream(media_dir: Path) -> None:
    path = make_media(media_dir / "silent_film.mp4", with_audio=False)
    with pytest.raises(MissingStreamError) as info:
        load_clip(path)
    message = str(info.value)
    # the decoder names no command-line flag: each command supplies its own hint
    assert "silent_film.mp4" in message and "has no audio stream" in message and "--" not in message
    assert (info.value.path, info.value.stream) == (str(path), "audio")
    assert str(info.value.with_hint("try X")).endswith("has no audio stream; try X")
    with pytest.raises(MissingStreamError):
        decode_audio(path)
    clip = load_clip(path, need_audio=False)
    assert clip.audio is None and clip.waveform is None and clip.frames is not None


def test_missing_video_stream(media_dir: Path) -> None:
    path = make_media(media_dir / "podcast.mp4", with_video=False)
    with pytest.raises(MissingStreamError) as info:
        load_clip(path)
    message = str(info.value)
    assert "podcast.mp4" in message and "has no video stream" in message and "--" not in message
    assert (info.value.path, info.value.stream) == (str(path), "video")
    with pytest.raises(MissingStreamError):
        decode_frames(path, 10)
    clip = load_clip(path, need_video=False)
    assert clip.frames is None and clip.frame_times.shape == (0,) and clip.audio is not None


def _bad_file(kind: str, folder: Path, good: Path) -> Path:
    if kind == "missing":
        return folder / "does_not_exist.mp4"
    if kind == "empty":
        return make_empty_file(folder / "empty.mp4")
    if kind == "text":
        return make_text_file(folder / "notes.mp4")
    if kind == "directory":
        (folder / "a_folder.mp4").mkdir(exist_ok=True)
        return folder / "a_folder.mp4"
    if kind == "truncated":  # index (moov) at the end: cut off
        return make_truncated(good, folder / "cut.mp4", keep=0.6)
    if kind == "truncated_faststart":  # index first: it promises data that is not there
        whole = make_media(folder / "fast.mp4", duration=3.0, faststart=True)
        return make_truncated(whole, folder / "cut_fast.mp4", keep=0.6)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "text", "directory", "truncated", "truncated_faststart"]
)
def test_bad_files_raise_media_error(media_dir: Path, three_seconds: Path, kind: str) -> None:
    path = _bad_file(kind, media_dir, three_seconds)
    for call in (load_clip, decode_audio, lambda p: decode_frames(p, 10)):
        with pytest.raises(MediaError) as info:
            call(path)
        message = str(info.value)
        assert path.name in message and "\n" not in message
        assert not isinstance(info.value, MissingStreamError)
    if kind in ("missing", "empty", "text", "directory", "truncated"):
        with pytest.raises(MediaError):
            probe(path)


def test_offset_outside_the_file(three_seconds: Path) -> None:
    with pytest.raises(MediaError, match="beyond the end"):
        load_clip(three_seconds, offset=3.5)
    with pytest.raises(MediaError, match="beyond the end"):
        decode_audio(three_seconds, offset=100.0)
    with pytest.raises(MediaError, match=">= 0"):
        load_clip(three_seconds, offset=-1.0)


def test_needs_at_least_one_modality(three_seconds: Path) -> None:
    with pytest.raises(ValueError):
        load_clip(three_seconds, need_audio=False, need_video=False)


# --------------------------------------------------------------------------------------------
# Sliding windows


@pytest.mark.parametrize(
    ("duration", "window", "hop", "expected"),
    [
        (30.02, 10, 5, [0, 5, 10, 15, 20]),  # a 0.02 s tail adds no window at 20.02
        (30.0, 10, 5, [0, 5, 10, 15, 20]),
        (32.4, 10, 5, [0, 5, 10, 15, 20]),  # tail 2.4 s <= hop/2: left out
        (32.6, 10, 5, [0, 5, 10, 15, 20, 22.6]),  # tail 2.6 s > hop/2: one window ending at the end
        (10.0, 4, 3, [0, 3, 6]),
        (10.0, 10, 5, [0]),
        (3.0, 10, 5, [0]),  # shorter than a window
        (0.0, 10, 5, [0]),  # an image
        (30.0, 4, 10, [0, 10, 20, 26]),  # hop > window: gaps, the 6 s tail gets its window
        (1.0, 0.3, 0.1, [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),  # float steps do not drift
    ],
)
def test_window_offsets(duration: float, window: float, hop: float, expected: list[float]) -> None:
    got = window_offsets(duration, window, hop)
    assert got == pytest.approx(expected)
    assert all(isinstance(t, float) for t in got)
    assert all(t + window <= max(duration, window) + 1e-6 for t in got)  # every window fits


def test_window_offsets_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        window_offsets(10.0, 5.0, 0.0)


def test_video_larger_than_the_limit_is_refused(media_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few KB of file can declare frames of gigabytes: refused before decoding (the limit is
    8K; lowered here so a small file stands in for a huge one)."""
    from cavmae.media import video_decode

    path = make_media(media_dir / "big.mp4", duration=1.0, fps=5, size=(64, 48), with_audio=False)
    monkeypatch.setattr(video_decode, "MAX_VIDEO_PIXELS", 64 * 48 - 1)
    with pytest.raises(MediaError, match="64x48 is larger than 8K"):
        load_clip(path, need_audio=False)
    monkeypatch.setattr(video_decode, "MAX_VIDEO_PIXELS", 64 * 48)
    assert load_clip(path, need_audio=False).frames is not None
