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

A video given more than once (``a.mp4 ./a.mp4``, a folder and a file in it, a list naming it
twice) is one clip, identified by its resolved path as re-runs identify it; the repeats are
dropped with a warning.

Every output file is written to a temporary name and renamed, and the WAV last, so a clip
whose files all exist is complete. Bad files (corrupt, no audio or no video stream) are reported
and skipped; they never stop the job. Work runs in a process pool.

Re-runs into the same folder. A clip's id is its file stem (or the list's ``video_id``), so two
runs may see different videos under one id. ``{out}/.prepare-sources.json`` records which video
(resolved path, size, mtime) each id's files were extracted from:

- a clip is skipped (resume after an interruption) only when its files all exist *and* the
  record names this video with its current size and mtime; a replaced or edited video is
  extracted again;
- a video whose id already belongs to another video gets a new id (``{stem}-{8 hex of its
  path}``, as two same-named videos in one run do) with a warning, instead of overwriting the
  other's files, which an earlier dataset JSON still names; the record remembers the new id, so
  later runs reuse it;
- a video moved since (gone from its old path, and one of the same name, size and modification
  time, which ``mv`` keeps, at the new one) keeps its id and files;
- files with no record (made by an older version) are extracted again: nothing vouches for
  which video they came from.

An existing dataset JSON is added to, not replaced: its entries are kept in their order, an
entry whose id this run prepares is replaced by the new one (same id = same video, see above)
and new clips are appended. Delete the JSON to start a new list (the extracted files are
reused). The sampling weights are computed over the whole merged list, so they stay aligned
with it; without ``label_csv``, a run that would change the list of a folder that has weights
is refused rather than leaving them misaligned. Labels are checked against the label CSV before
anything is extracted. One run at a time per folder (a lock).

numpy / PyAV / OpenCV only (no torch).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from cavmae import fsio
from cavmae.config import DEFAULT_PREPROCESS, PreprocessConfig
from cavmae.data import (
    ClipRecord,
    balanced_sample_weights,
    encode_labels,
    read_clips,
    read_labels,
    write_dataset_json,
)
from cavmae.errors import CavmaeError, DatasetError, skipped_message
from cavmae.filetypes import VIDEO_SUFFIXES, input_key, is_media_file
from cavmae.labels import LabelSet
from cavmae.prepare_sources import (
    SOURCES_NAME,
    Sources,
    assign_ids,
    earlier_entries,
    is_plain_id,
    merge_entries,
    video_facts,
)
from cavmae.visual import resize_center_crop

__all__ = ["SOURCES_NAME", "PrepareReport", "clip_outputs", "extract_clip", "prepare_videos"]

log = logging.getLogger(__name__)

_LOCK_NAME = ".prepare.lock"


@dataclass
class PrepareReport:
    """What a prepare run did.

    ``clips``: the clips in the dataset JSON (earlier entries kept, then this run's new ones);
    ``extracted`` / ``skipped``: how many of this run's clips were written now / found complete
    from an earlier run; ``kept``: entries of the earlier dataset JSON this run did not touch;
    ``failed``: ``(video, reason)``; ``renamed``: ``(video, id)`` of videos that got a new id
    because theirs belongs to another video in this folder; ``duplicates``: inputs dropped as
    repeats of a video given earlier in the run (see :func:`_drop_repeats`).
    """

    output_dir: Path
    dataset_json: Path
    clips: list[ClipRecord] = field(default_factory=list)
    extracted: int = 0
    skipped: int = 0
    kept: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    weight_csv: Path | None = None


def clip_outputs(out_dir: Path, video_id: str, num_frames: int) -> tuple[Path, list[Path]]:
    """``(wav path, frame paths)`` of a clip in the layout."""
    wav = out_dir / "audio" / f"{video_id}.wav"
    frames = [out_dir / "frames" / f"frame_{i}" / f"{video_id}.jpg" for i in range(num_frames)]
    return wav, frames


def _complete(out_dir: Path, video_id: str, num_frames: int) -> bool:
    wav, frames = clip_outputs(out_dir, video_id, num_frames)
    return wav.is_file() and all(p.is_file() for p in frames)


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
    *,
    force: bool = False,
) -> str:
    """Extract one video into the layout. Returns ``"skipped"`` when its outputs all exist and
    are newer than the video (never with ``force``), else ``"extracted"``. Raises ``MediaError``
    for a file that cannot be used.

    The mtime test cannot tell which video the outputs came from; :func:`prepare_videos` uses
    its record of sources instead and passes ``force`` when the record does not vouch for them.
    """
    from cavmae.media import decode_audio, decode_frames

    out_dir = Path(out_dir)
    wav_path, frame_paths = clip_outputs(out_dir, video_id, config.num_frames)
    if not force and _complete(out_dir, video_id, config.num_frames) and _newer(wav_path, video):
        return "skipped"
    # decode everything before writing anything: a bad file leaves earlier outputs untouched
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


# --- collecting videos and earlier entries ---------------------------------------------------


def _collect(videos: Sequence[str | Path], list_file: str | Path | None) -> list[ClipRecord]:
    """The run's clips in order, ids as wanted (file stem or the list's ``video_id``); where two
    collide is settled by :func:`~cavmae.prepare_sources.assign_ids`."""
    return _gather(videos, list_file)[0]


def _gather(
    videos: Sequence[str | Path], list_file: str | Path | None
) -> tuple[list[ClipRecord], list[str]]:
    """:func:`_collect`, and where each clip was given, for messages: the list's line (CSV,
    counted as ``read_clips`` counts them) or entry (JSON) and the video, else the video."""
    clips: list[ClipRecord] = []
    places: list[str] = []
    if list_file is not None:
        listed = read_clips(list_file)
        if any(c.video is None for c in listed):
            raise DatasetError(f"{list_file} is a prepared dataset, not a list of videos")
        clips.extend(listed)
        csv_list = Path(list_file).suffix.lower() == ".csv"
        places.extend(f"{list_file}, line {n + 2}: {c.video}" if csv_list
                      else f"{list_file}, entry {n}: {c.video}" for n, c in enumerate(listed))
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
    places.extend(str(c.video) for c in clips[len(places):])
    for clip, place in zip(clips, places, strict=True):
        if not is_plain_id(clip.video_id):  # its files would land outside the output folder
            raise DatasetError(f"video_id {clip.video_id!r} ({place}) must be a plain name, without"
                               " a folder part or '..'")
    return clips, places


def _drop_repeats(
    clips: Sequence[ClipRecord], places: Sequence[str], keys: Sequence[str]
) -> tuple[list[ClipRecord], list[str], list[str], int]:
    """One clip per video: ``clips``, ``places`` and ``keys`` (resolved paths, the identity
    :func:`~cavmae.filetypes.input_key` gives) without the repeats of a video given earlier in
    the run, and how many were dropped.

    A video given twice (``a.mp4 ./a.mp4``, a folder and a file in it, a list naming it twice)
    is one clip: two entries would weigh it twice in training, and a later run naming it once
    would collapse them (see :func:`~cavmae.prepare_sources.merge_entries`), so the list would
    depend on how often a run happened to name the video. The first keeps its place and id; a repeat without labels adds
    nothing, one with labels lends them to a first without (as a re-run keeps an earlier
    entry's labels), and labels that contradict the first's refuse the run: which is meant
    cannot be guessed.
    """
    first: dict[str, int] = {}  # resolved path -> its clip's index in ``out``
    out: list[ClipRecord] = []
    out_places: list[str] = []
    example = ""
    for clip, place, key in zip(clips, places, keys, strict=True):
        at = first.get(key)
        if at is None:
            first[key] = len(out)
            out.append(clip)
            out_places.append(place)
            continue
        if not example:
            example = (f"{place} given more than once" if place == out_places[at]
                       else f"{place}, the same file as {out_places[at]}")
        given, kept = set(clip.label_tokens()), set(out[at].label_tokens())
        if given and not kept:
            out[at] = replace(out[at], labels=clip.labels)
        elif given and given != kept:
            raise DatasetError(f"{out_places[at]} and {place} are one video with different labels;"
                               " give it once")
    dropped = len(clips) - len(out)
    if dropped:
        log.warning("%d input(s) dropped as repeats of a video given earlier in this run (%s%s):"
                    " each video is one clip", dropped, "e.g. " if dropped > 1 else "", example)
    return out, out_places, list(first), dropped


def _check_labels(clips: Sequence[ClipRecord], places: Sequence[str], labels: LabelSet) -> None:
    """Every label of ``clips`` is in the label CSV, as the sampling weights will need, checked
    before any extraction so a typo does not cost the whole run."""
    for clip, place in zip(clips, places, strict=True):
        encode_labels(labels, clip.label_tokens(), place)


def _as_written(path: str | None, out: Path, relative: bool) -> str | None:
    """A path of a kept entry in this run's convention (relative to ``out`` or absolute); one
    outside ``out`` stays absolute."""
    if path is None:
        return None
    p = Path(path).resolve()
    if relative and p.is_relative_to(out):
        return str(p.relative_to(out))
    return str(p)


def _entry(out: Path, clip: ClipRecord, num_frames: int, relative: bool) -> ClipRecord:
    wav, _ = clip_outputs(out, clip.video_id, num_frames)
    frame_dir = out / "frames"
    if relative:
        wav, frame_dir = wav.relative_to(out), frame_dir.relative_to(out)
    return ClipRecord(video_id=clip.video_id, labels=clip.labels, wav=str(wav), frame_dir=str(frame_dir))


# --- running -----------------------------------------------------------------------------------

#: one pool task: (video, video id, output dir, preprocessing, JPEG quality, the record vouches
#: for existing outputs)
_Task = tuple[str, str, str, PreprocessConfig, int, bool]


def _work(args: _Task) -> tuple[str, str | None]:
    """Pool task: ``(status, None)`` or ``("failed", reason)``; never raises for a bad file."""
    video, video_id, out_dir, config, quality, vouched = args
    try:
        if vouched and _complete(Path(out_dir), video_id, config.num_frames):
            return "skipped", None
        return extract_clip(video, video_id, out_dir, config, quality, force=True), None
    except CavmaeError as e:
        return "failed", str(e)
    except Exception as e:  # a decoder bug on one odd file must not stop a 2M-clip job
        return "failed", f"{type(e).__name__}: {e}"


def _run_tasks(
    tasks: list[_Task],
    jobs: int,
    progress: bool,
    on_clip: Callable[[str, str], None] | None,
    on_result: Callable[[int, str], None] | None = None,
) -> list[tuple[str, str | None]]:
    """Run the extraction tasks in this process or a pool of ``jobs``; results in task order.
    ``on_result(task index, status)`` is called as each finishes."""
    from cavmae.progress import bar_paused, progress_bar

    results: list[tuple[str, str | None]] = [("failed", "not run")] * len(tasks)
    bar = progress_bar(total=len(tasks), desc="prepare", unit="clip", enabled=progress)

    def done(i: int, result: tuple[str, str | None]) -> None:
        results[i] = result
        bar.update(1)
        if result[0] == "failed":
            with bar_paused():  # the warning gets its own line, not the end of the bar's
                log.warning("%s", skipped_message(tasks[i][0], result[1] or ""))
        if on_result is not None:
            on_result(i, result[0])
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


def _weights_text(weights: np.ndarray) -> str:
    return "".join(f"{w:.6g}\n" for w in weights)


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

    An existing dataset JSON of that name is added to (see the module docstring for re-runs).

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
    if json_name == SOURCES_NAME:
        raise CavmaeError(f"{SOURCES_NAME} is prepare's record of sources; choose another --json-name")
    out = Path(output_dir).resolve()
    fsio.probe_writable(out / json_name)  # a file in the way or a read-only folder fails first
    try:
        with fsio.exclusive_lock(out / _LOCK_NAME, timeout=0):
            return _prepare(videos, out, list_file, jobs, json_name, relative_paths, config,
                            jpeg_quality, progress, label_csv, on_clip)
    except fsio.LockBusyError:
        raise CavmaeError(f"another cavmae prepare is writing into {out}; wait for it to finish"
                          " (two runs would each rewrite the dataset JSON without the other's clips)"
                          ) from None


def _check_before_extracting(
    clips: Sequence[ClipRecord], places: Sequence[str], earlier: Sequence[ClipRecord], dataset_json: Path,
    weight_csv: Path, label_csv: str | Path | None, entry: Callable[[ClipRecord], ClipRecord],
) -> LabelSet | None:
    """Refuse the run before any extraction: labels missing from the label CSV (of this run's
    clips and of the earlier entries kept), or sampling weights that the run would leave
    misaligned with the list. Returns the label set of ``label_csv``."""
    label_set = None
    new_ids = {c.video_id for c in clips}
    untouched = [(n, c) for n, c in enumerate(earlier) if c.video_id not in new_ids]
    if label_csv is not None:
        if not any(c.label_tokens() for c in [*clips, *earlier]):
            raise CavmaeError("sampling weights (--label-csv) need labelled clips: give them with"
                              " --list (a 'labels' column), or drop --label-csv")
        label_set = read_labels(label_csv)
        # as the merge will write them: a clip given without labels keeps its earlier entry's
        earlier_labels = {c.video_id: c.labels for c in earlier}
        as_merged = [c if c.labels is not None else replace(c, labels=earlier_labels.get(c.video_id)) for c in clips]
        _check_labels(as_merged, places, label_set)
        unlabelled = [c for c in [*as_merged, *(c for _, c in untouched)] if not c.label_tokens()]
        if unlabelled:  # allowed (a folder may mix), but never drawn in training: say so
            log.warning("%d clip(s) have no labels (%s%s): their sampling weight is 0", len(unlabelled),
                        unlabelled[0].video or unlabelled[0].video_id, ", ..." if len(unlabelled) > 1 else "")
        # an earlier entry this run replaces is checked in its new form only (a relabelled clip)
        _check_labels([c for _, c in untouched],
                      [f"{dataset_json}, entry {n}: {c.video_id}" for n, c in untouched],
                      label_set)
    elif weight_csv.exists():
        planned = merge_entries(earlier, [entry(c) for c in clips])

        def listing(entries: Sequence[ClipRecord]) -> list[tuple[str, str]]:
            return [(e.video_id, e.to_json()["labels"]) for e in entries]

        if listing(planned) != listing(earlier):
            raise CavmaeError(f"{weight_csv} holds sampling weights for the clips of"
                              f" {dataset_json}, which this run changes: pass --label-csv"
                              " to write them again, or delete it")
    return label_set


def _prepare(
    videos: Sequence[str | Path], out: Path, list_file: str | Path | None, jobs: int,
    json_name: str, relative_paths: bool, config: PreprocessConfig, jpeg_quality: int,
    progress: bool, label_csv: str | Path | None, on_clip: Callable[[str, str], None] | None,
) -> PrepareReport:
    report = PrepareReport(output_dir=out, dataset_json=out / json_name)
    weight_csv = out / f"{Path(json_name).stem}_weight.csv"
    collected, places = _gather(videos, list_file)
    # identity is the resolved path; messages and workers keep the path as given
    keys = [input_key(c.video or "") for c in collected]
    collected, places, keys, report.duplicates = _drop_repeats(collected, places, keys)
    sources = Sources(out / SOURCES_NAME)
    if not sources.existed and (out / "audio").is_dir() and any((out / "audio").iterdir()):
        log.warning("%s holds clips but no record of which videos they came from (an older cavmae"
                    " made them): clips are extracted again", out)
    clips, report.renamed = assign_ids(collected, keys, sources)
    earlier = earlier_entries(report.dataset_json)

    # everything that can refuse the run does so before any extraction
    label_set = _check_before_extracting(clips, places, earlier, report.dataset_json, weight_csv,
                                         label_csv, lambda c: _entry(out, c, config.num_frames, relative_paths))

    key_of = {c.video_id: key for c, key in zip(clips, keys, strict=True)}
    for vid, key in key_of.items():
        sources.claim(vid, key)
    sources.save()  # the claims are on disk before any file of theirs is written
    order = list(key_of)  # one task per id: a video given twice is extracted once
    video_of = {c.video_id: str(c.video) for c in clips}
    facts = {vid: video_facts(key_of[vid]) for vid in order}
    tasks: list[_Task] = [
        (video_of[vid], vid, str(out), config, jpeg_quality, sources.vouches(vid, key_of[vid], facts[vid]))
        for vid in order
    ]

    def on_result(i: int, status: str) -> None:
        if status == "extracted":
            sources.extracted(order[i], facts[order[i]])
            sources.save(now=False)

    try:
        results = _run_tasks(tasks, jobs, progress, on_clip, on_result)
    finally:
        sources.save()  # also when interrupted: a resumed run skips what is done
    status = dict(zip(order, results, strict=True))

    for vid, (state, reason) in status.items():
        if state == "failed":
            report.failed.append((video_of[vid], reason or ""))
        report.extracted += state == "extracted"
        report.skipped += state == "skipped"
    new = [_entry(out, c, config.num_frames, relative_paths)
           for c in clips if status[c.video_id][0] != "failed"]
    kept = [
        replace(c, wav=_as_written(c.wav, out, relative_paths),
                frame_dir=_as_written(c.frame_dir, out, relative_paths))
        for c in earlier
    ]
    report.clips = merge_entries(kept, new)
    report.kept = len(report.clips) - len(new)
    if label_set is not None:
        # computed before either file is written: a failure leaves the earlier pair as it was
        weights = balanced_sample_weights(report.clips, label_set)
        report.weight_csv = fsio.write_text(weight_csv, _weights_text(weights))
    write_dataset_json(report.clips, report.dataset_json)
    failed_txt = out / "failed.txt"
    if report.failed:
        fsio.write_text(failed_txt, "".join(f"{v}\t{r}\n" for v, r in report.failed))
    elif failed_txt.exists():
        failed_txt.unlink()
    return report
