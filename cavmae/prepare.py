"""``cavmae prepare``: videos -> the reference dataset layout (docs/model.md §8).

For every video this writes

- ``{out}/audio/{video_id}.wav``: the first audio channel at 16 kHz, 16-bit PCM, the first
  ``PreprocessConfig.audio_seconds`` seconds (exactly what fills the 1024 fbank frames);
- ``{out}/frames/frame_{i}/{video_id}.jpg`` for ``i = 0..9``: the frames at the reference
  positions of the first 10 s, resized (shorter side 224) and centre-cropped to 224 x 224;

and at the end ``{out}/{json_name}`` (``{"data": [{"video_id", "wav", "video_path",
"labels"}]}``, paths absolute unless asked otherwise) plus ``{out}/failed.txt`` listing the files
that could not be used and why (and, given a label CSV, ``{json stem}_weight.csv`` with
class-balanced sampling weights).

Every output file is written to a temporary name and renamed, so a clip whose files all exist
is complete: a re-run skips it (resume after an interruption). Bad files (corrupt, no audio or
no video stream) are reported and skipped; they never stop the job. Work runs in a process pool.

numpy / PyAV / OpenCV only (no torch).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import multiprocessing
import wave
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cavmae import fsio
from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.data import (
    ClipRecord,
    balanced_sample_weights,
    read_clips,
    read_labels,
    write_dataset_json,
)
from cavmae.errors import CavmaeError, DatasetError, skipped_message
from cavmae.filetypes import VIDEO_SUFFIXES, is_media_file
from cavmae.visual import resize_center_crop

__all__ = ["PrepareReport", "clip_outputs", "extract_clip", "prepare_videos"]

log = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    """What a prepare run did.

    ``clips``: the clips in the dataset JSON (input order); ``extracted`` / ``skipped``: how
    many were written now / found complete from an earlier run; ``failed``: ``(video, reason)``.
    """

    output_dir: Path
    dataset_json: Path
    clips: list[ClipRecord] = field(default_factory=list)
    extracted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    weight_csv: Path | None = None


def clip_outputs(out_dir: Path, video_id: str, num_frames: int) -> tuple[Path, list[Path]]:
    """``(wav path, frame paths)`` of a clip in the layout."""
    wav = out_dir / "audio" / f"{video_id}.wav"
    frames = [out_dir / "frames" / f"frame_{i}" / f"{video_id}.jpg" for i in range(num_frames)]
    return wav, frames


def _write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> None:
    pcm = np.clip(np.round(waveform * 32768.0), -32768, 32767).astype("<i2")
    with fsio.atomic_open(path) as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def extract_clip(
    video: str,
    video_id: str,
    out_dir: str | Path,
    config: PreprocessConfig = DEFAULT_PREPROCESS,
    jpeg_quality: int = 95,
) -> str:
    """Extract one video into the layout. Returns ``"skipped"`` when its outputs all exist and
    are newer than the video, else ``"extracted"``. Raises ``MediaError`` for a file that
    cannot be used."""
    from cavmae.media import decode_audio, decode_frames

    out_dir = Path(out_dir)
    wav_path, frame_paths = clip_outputs(out_dir, video_id, config.num_frames)
    if wav_path.is_file() and all(p.is_file() for p in frame_paths) and _newer(wav_path, video):
        return "skipped"
    waveform = decode_audio(video, config.sample_rate, 0.0, config.audio_seconds)
    frames, _ = decode_frames(video, config.num_frames, 0.0, config.clip_seconds)
    for rgb, path in zip(frames, frame_paths, strict=True):
        crop = resize_center_crop(rgb, config.image_size)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        )
        if not ok:
            raise DatasetError(f"{video}: JPEG encoding failed")
        fsio.write_bytes(path, buf.tobytes())
    _write_wav(wav_path, waveform, config.sample_rate)
    return "extracted"


def _newer(output: Path, video: str | Path) -> bool:
    """The output (the WAV, written last) is at least as new as the video: a video replaced
    since it was extracted is extracted again."""
    try:
        return output.stat().st_mtime_ns >= Path(video).stat().st_mtime_ns
    except OSError:  # the video is gone: its extraction stands
        return True


#: one pool task: (video, video id, output dir, preprocessing, JPEG quality)
_Task = tuple[str, str, str, PreprocessConfig, int]


def _work(args: _Task) -> tuple[str, str | None]:
    """Pool task: ``(status, None)`` or ``("failed", reason)``; never raises for a bad file."""
    video, video_id, out_dir, config, quality = args
    try:
        return extract_clip(video, video_id, out_dir, config, quality), None
    except CavmaeError as e:
        return "failed", str(e)
    except Exception as e:  # a decoder bug on one odd file must not stop a 2M-clip job
        return "failed", f"{type(e).__name__}: {e}"


def _unique_ids(clips: Sequence[ClipRecord]) -> list[ClipRecord]:
    """Give clips whose ids collide (same file stem in different folders) a path-hash suffix."""
    counts = Counter(c.video_id for c in clips)
    out = []
    for c in clips:
        if counts[c.video_id] > 1:
            digest = hashlib.sha1(str(Path(c.video or "").resolve()).encode()).hexdigest()[:8]
            c = ClipRecord(video_id=f"{c.video_id}-{digest}", labels=c.labels, video=c.video)
        out.append(c)
    return out


def _collect(videos: Sequence[str | Path], list_file: str | Path | None) -> list[ClipRecord]:
    clips: list[ClipRecord] = []
    if list_file is not None:
        listed = read_clips(list_file)
        if any(c.video is None for c in listed):
            raise DatasetError(f"{list_file} is a prepared dataset, not a list of videos")
        clips.extend(listed)
    for v in videos:
        p = Path(v)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if is_media_file(q.name, VIDEO_SUFFIXES))
            if not found:
                raise DatasetError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) under {p}")
            clips.extend(ClipRecord(video_id=q.stem, video=str(q)) for q in found)
        else:
            clips.append(ClipRecord(video_id=p.stem, video=str(p)))
    if not clips:
        raise DatasetError("no videos given; pass video files, folders, or --list FILE")
    return _unique_ids(clips)


def _run_tasks(
    tasks: list[_Task], jobs: int, progress: bool, on_clip: Callable[[str, str], None] | None
) -> list[tuple[str, str | None]]:
    """Run the extraction tasks in this process or a pool of ``jobs``; results in task order."""
    from cavmae.progress import bar_paused, progress_bar

    results: list[tuple[str, str | None]] = [("failed", "not run")] * len(tasks)
    bar = progress_bar(total=len(tasks), desc="prepare", unit="clip", enabled=progress)

    def done(i: int, result: tuple[str, str | None]) -> None:
        results[i] = result
        bar.update(1)
        if result[0] == "failed":
            with bar_paused():  # the warning gets its own line, not the end of the bar's
                log.warning("%s", skipped_message(tasks[i][0], result[1] or ""))
        if on_clip is not None:
            on_clip(tasks[i][0], result[0])

    try:
        if jobs <= 1:
            for i, t in enumerate(tasks):
                done(i, _work(t))
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                pending: dict[cf.Future, int] = {}
                next_task = 0
                while next_task < len(tasks) or pending:
                    while next_task < len(tasks) and len(pending) < 4 * jobs:
                        pending[pool.submit(_work, tasks[next_task])] = next_task
                        next_task += 1
                    finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        done(pending.pop(fut), fut.result())
    finally:
        bar.close()
    return results


def _report(
    out: Path,
    json_name: str,
    clips: list[ClipRecord],
    results: list[tuple[str, str | None]],
    num_frames: int,
    relative_paths: bool,
) -> PrepareReport:
    """The run's report: counts, failures, and the dataset records of the usable clips."""
    report = PrepareReport(output_dir=out, dataset_json=out / json_name)
    for clip, (status, reason) in zip(clips, results, strict=True):
        if status == "failed":
            report.failed.append((str(clip.video), reason or ""))
            continue
        report.extracted += status == "extracted"
        report.skipped += status == "skipped"
        wav, _ = clip_outputs(out, clip.video_id, num_frames)
        frame_dir = out / "frames"
        if relative_paths:
            wav, frame_dir = wav.relative_to(out), frame_dir.relative_to(out)
        report.clips.append(
            ClipRecord(video_id=clip.video_id, labels=clip.labels, wav=str(wav), frame_dir=str(frame_dir))
        )
    return report


def prepare_videos(
    videos: Sequence[str | Path] = (),
    output_dir: str | Path = "prepared",
    *,
    list_file: str | Path | None = None,
    jobs: int = 1,
    json_name: str = "data.json",
    relative_paths: bool = False,
    config: PreprocessConfig = DEFAULT_PREPROCESS,
    jpeg_quality: int = 95,
    progress: bool = True,
    label_csv: str | Path | None = None,
    on_clip: Callable[[str, str], None] | None = None,
) -> PrepareReport:
    """Extract videos into the reference layout under ``output_dir`` and write the dataset JSON.

    Args:
        videos: video files, or folders searched recursively for video files.
        list_file: a CSV/JSON video list with labels (see :func:`cavmae.data.read_clips`); its
            clips come first and keep their labels.
        jobs: worker processes (1 = in this process).
        json_name: name of the dataset JSON inside ``output_dir``.
        relative_paths: write paths relative to ``output_dir`` (the dataset loader resolves them
            against the JSON's folder; the reference loader needs absolute paths, the default).
        progress: show progress: a bar on a terminal, a line per step in a log.
        label_csv: with labeled clips, also write class-balanced sampling weights
            (``{json stem}_weight.csv``, the reference naming) for these classes.
        on_clip: called with ``(video, status)`` after each clip (status ``extracted``,
            ``skipped`` or ``failed``).
    """
    if not json_name.lower().endswith(".json") or Path(json_name).name != json_name:
        raise CavmaeError(f"the dataset JSON's name must be a file name ending in .json (it is"
                          f" written inside the output folder), not {json_name!r}")
    out = Path(output_dir).resolve()
    fsio.probe_writable(out / json_name)  # a file in the way or a read-only folder fails first
    clips = _collect(videos, list_file)
    if label_csv is not None and not any(c.labels for c in clips):
        raise CavmaeError("sampling weights (--label-csv) need labelled clips: give them with --list"
                          " (a 'labels' column), or drop --label-csv")
    tasks: list[_Task] = [(str(c.video), c.video_id, str(out), config, jpeg_quality) for c in clips]
    results = _run_tasks(tasks, jobs, progress, on_clip)
    report = _report(out, json_name, clips, results, config.num_frames, relative_paths)
    write_dataset_json(report.clips, report.dataset_json)
    if label_csv is not None:
        weights = balanced_sample_weights(report.clips, read_labels(label_csv))
        report.weight_csv = out / f"{Path(json_name).stem}_weight.csv"
        fsio.write_text(report.weight_csv, "".join(f"{w:.6g}\n" for w in weights))
    failed_txt = out / "failed.txt"
    if report.failed:
        fsio.write_text(failed_txt, "".join(f"{v}\t{r}\n" for v, r in report.failed))
    elif failed_txt.exists():
        failed_txt.unlink()
    return report
