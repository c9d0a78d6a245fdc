"""Dataset descriptions -> clip records: the one reader for training, preparation and evaluation.

Formats read here:

- the **reference dataset JSON** ``{"data": [{"video_id", "wav", "video_path", "labels"}]}``:
  audio from ``wav``, frame ``i`` from ``{video_path}/frame_{i}/{video_id}.jpg``, ``labels``
  comma-separated label ids (mids); ``cavmae prepare`` writes this layout;
- **video lists**: a CSV with a header holding a ``video`` (or ``path``, ``video_file``,
  ``file``) column and optionally ``labels``, or a JSON list (bare or under ``"data"``) of such
  objects or of plain path strings; the media are decoded on the fly;
- a **labels file** for video files given on the command line, a CSV of ``file,labels`` rows::

      # lines starting with '#' are comments; the header row is optional
      file,labels
      dog_park.mp4,Dog;Bark
      cat_01,"/m/01yrx,/m/07qrkrw"
      clips/street.mkv,Vehicle

  The first column names a video by file name, by id (file name without its ending) or by a
  path relative to the labels file's folder (any key holding a ``/``).

Rules decided once, for every caller:

- **Paths**: a relative path in a dataset file is taken as given when it exists, else relative
  to the folder of the dataset file (so both the reference's working-directory paths and the
  file-relative paths ``cavmae prepare`` writes work).
- **Labels** are kept as written (:attr:`ClipRecord.labels`, one string per field) and split by
  :func:`split_labels`: a field that is itself a label of the label set (names may contain
  commas) is one label; otherwise it is split on ``;`` when it has one, else on ``,``.
- **A missing frame** fails the clip with a :class:`DatasetError` naming the file
  (:func:`frame_file`). The reference's training loader instead falls back to the nearest lower
  frame; :class:`cavmae.data.AVDataset` does that only when asked (``frame_fallback=True``),
  never silently, and evaluation never does.
- **Bad entries**: :func:`read_dataset_json` (evaluation) keeps going and marks the entry's
  :attr:`ClipRecord.problem`, reported when the clip is evaluated; :func:`read_clips`
  (training, preparation) refuses the whole file on the first bad entry.

Needs the standard library and numpy; media decoding is imported when a clip is loaded.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cavmae import fsio
from cavmae.config import PreprocessConfig
from cavmae.errors import DatasetError
from cavmae.labels import LabelSet

__all__ = [
    "ClipInputs",
    "ClipList",
    "ClipRecord",
    "encode_targets",
    "frame_file",
    "label_index",
    "load_inputs",
    "read_clips",
    "stack_inputs",
    "read_dataset_json",
    "read_labels_file",
    "read_video_files",
    "split_labels",
    "write_dataset_json",
]

log = logging.getLogger(__name__)

#: keys naming a media file in a video-list entry, in the order they are looked for
VIDEO_KEYS = ("video", "path", "video_file", "file")
_VIDEO_KEY_NAMES = "one of " + ", ".join(VIDEO_KEYS)
#: first-row cells that mark a labels-file header
_HEADER_KEYS = frozenset({"file", "path", "id", "video_id", "video", "name"})


# -- records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipRecord:
    """One clip of a dataset description.

    Reference layout: ``wav`` and ``frame_dir`` (the JSON's ``video_path``) are set; frame ``i``
    is ``frame_dir/frame_{i}/{video_id}.jpg``. Video files: ``video`` is set. ``labels`` holds
    the label fields as written (see :func:`split_labels`), ``None`` when the description gives
    none. ``problem`` says why an entry cannot be used (set only by :func:`read_dataset_json`).
    """

    video_id: str
    labels: tuple[str, ...] | None = None
    wav: str | None = None
    frame_dir: str | None = None
    video: str | None = None
    problem: str | None = None

    @property
    def source(self) -> str:
        """What to name in a report: the video file, or the wav of a reference clip."""
        return self.video or self.wav or self.video_id

    def label_tokens(self, index: dict[str, int] | None = None) -> list[str]:
        """The labels split into tokens (:func:`split_labels`); ``[]`` when there are none."""
        return split_labels(self.labels or (), index)

    def frame_path(self, i: int) -> str:
        """``{video_path}/frame_{i}/{video_id}.jpg`` (reference layout only)."""
        if self.frame_dir is None:
            raise DatasetError(f"clip {self.video_id}: the dataset entry has no 'video_path'")
        return f"{self.frame_dir}/frame_{i}/{self.video_id}.jpg"

    def to_json(self) -> dict[str, str]:
        """The clip as a reference dataset-JSON entry."""
        return {
            "video_id": self.video_id,
            "wav": self.wav or "",
            "video_path": self.frame_dir or "",
            "labels": ",".join(self.labels or ()),
        }


@dataclass(frozen=True)
class ClipList:
    """Records in order plus where they came from (``kind``: ``"reference-json"`` or
    ``"videos"``)."""

    clips: tuple[ClipRecord, ...]
    source: str
    kind: str

    @property
    def has_labels(self) -> bool:
        """True when any clip carries labels (classification is possible)."""
        return any(clip.labels is not None for clip in self.clips)

    def head(self, n: int) -> ClipList:
        """The first ``n`` clips."""
        return ClipList(clips=self.clips[:n], source=self.source, kind=self.kind)

    def __len__(self) -> int:
        return len(self.clips)


# -- reading dataset files ---------------------------------------------------------------------
def _resolve(value: str, base: Path, want_dir: bool = False) -> str:
    """A path as given when it exists, else relative to ``base`` (also when neither exists, so
    that a report names the place the documented rule looked last)."""
    path = Path(value).expanduser()
    exists = Path.is_dir if want_dir else Path.is_file
    if path.is_absolute() or exists(path):
        return str(path)
    return str(base / path)


def _label_fields(value: Any) -> tuple[str, ...] | None:
    """Label fields as written: a list gives one field per element, a string one field."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return (str(value),)


def _entry_record(entry: Any, n: int, base: Path) -> ClipRecord:
    """One dataset-file entry -> a record; what is wrong with it goes into ``problem``."""
    if isinstance(entry, str):
        entry = {"video": entry}
    if not isinstance(entry, dict):
        return ClipRecord(video_id=f"#{n}", problem="the entry is not an object")
    labels = _label_fields(entry.get("labels"))
    key = next((k for k in VIDEO_KEYS if entry.get(k)), None)
    if key is not None and not entry.get("wav"):
        video = _resolve(str(entry[key]), base)
        vid = str(entry.get("video_id") or Path(video).stem)
        return ClipRecord(video_id=vid, labels=labels, video=video)
    if not entry.get("video_id"):
        return ClipRecord(
            video_id=f"#{n}",
            labels=labels,
            problem=f"the entry has no video_id and no video path ({_VIDEO_KEY_NAMES})",
        )
    wav, frames = entry.get("wav"), entry.get("video_path")
    return ClipRecord(
        video_id=str(entry["video_id"]),
        labels=labels,
        wav=_resolve(str(wav), base) if wav else None,
        frame_dir=_resolve(str(frames), base, want_dir=True) if frames else None,
    )


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"cannot read dataset {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None


def read_dataset_json(path: str | Path) -> ClipList:
    """Read a reference dataset JSON ``{"data": [...]}`` for evaluation.

    Raises :class:`DatasetError` when the file is unreadable, not ``{"data": [...]}`` or empty.
    An unusable entry becomes a record with a ``problem`` (reported when it is evaluated); a
    missing ``wav`` / ``video_path`` / ``labels`` only matters when the evaluation needs it.
    Entries naming a video file (see :data:`VIDEO_KEYS`) are read as video clips.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DatasetError(
            f'{path} is not a reference dataset: expected {{"data": [{{"video_id", "wav",'
            ' "video_path", "labels"}, ...]}'
        )
    base = path.resolve().parent
    clips = tuple(_entry_record(entry, n, base) for n, entry in enumerate(data["data"]))
    if not clips:
        raise DatasetError(f"{path} lists no clips")
    return ClipList(clips=clips, source=str(path), kind="reference-json")


def _checked(clip: ClipRecord, where: str) -> ClipRecord:
    """A record fit for training: no problem, and a reference clip has wav and frames."""
    if clip.problem is not None:
        raise DatasetError(f"{where}: {clip.problem}")
    if clip.video is None and (clip.wav is None or clip.frame_dir is None):
        missing = [k for k, v in (("wav", clip.wav), ("video_path", clip.frame_dir)) if v is None]
        raise DatasetError(
            f"{where}: expected a video path ({_VIDEO_KEY_NAMES}) or a reference entry with"
            f" video_id, wav and video_path (missing {', '.join(missing)})"
        )
    return clip


def read_clips(path: str | Path) -> list[ClipRecord]:
    """Read a dataset file for training or preparation: a reference dataset JSON, or a CSV /
    JSON video list. Any bad entry raises :class:`DatasetError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    base = path.resolve().parent
    if path.suffix.lower() == ".csv":
        return _read_video_csv(path, base)
    obj = _load_json(path)
    entries = obj.get("data") if isinstance(obj, dict) else obj
    if not isinstance(entries, list):
        raise DatasetError(f'{path}: expected {{"data": [...]}} or a JSON list of clips')
    clips = [
        _checked(_entry_record(entry, n, base), f"{path}, entry {n}")
        for n, entry in enumerate(entries)
    ]
    if not clips:
        raise DatasetError(f"{path}: the dataset is empty")
    return clips


def _read_video_csv(path: Path, base: Path) -> list[ClipRecord]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [s.strip() for s in (reader.fieldnames or [])]
        if not any(k in fields for k in VIDEO_KEYS):
            raise DatasetError(
                f"{path}: a video-list CSV needs a header with a 'video' (or 'path') column and "
                f"optionally 'labels', got {fields}"
            )
        unknown = [k for k in fields if k and k not in (*VIDEO_KEYS, "labels", "video_id", "wav")]
        if unknown:  # a misnamed labels column would silently give unlabelled clips
            raise DatasetError(
                f"{path}: unknown column(s) {', '.join(unknown)}; a video-list CSV has a 'video' (or"
                " 'path') column and optionally 'labels' and 'video_id'"
            )
        rows = [{k.strip(): v for k, v in row.items() if k} for row in reader]
    clips = []
    for n, row in enumerate(rows, start=2):
        clip = _entry_record({k: v for k, v in row.items() if k != "wav"}, n, base)
        clips.append(_checked(clip, f"{path}, line {n}"))
    if not clips:
        raise DatasetError(f"{path}: the dataset is empty")
    return clips


def write_dataset_json(clips: Sequence[ClipRecord], path: str | Path) -> Path:
    """Write clips as a reference dataset JSON, atomically."""
    return fsio.write_json(path, {"data": [c.to_json() for c in clips]}, indent=1)


# -- video files and labels files -------------------------------------------------------------
def read_labels_file(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Read a labels file (see the module docstring): key -> label fields as written.

    Keys holding a ``/`` (or ``\\``) are resolved against the labels file's folder and stored as
    absolute paths; other keys are stored as written (a file name or id). Raises
    :class:`DatasetError` on an unreadable file, a row without labels, or a key given twice.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DatasetError(f"cannot read labels file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not a UTF-8 text CSV") from None
    base = path.resolve().parent
    out: dict[str, tuple[str, ...]] = {}
    first = True
    for line, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if first:
            first = False
            if cells[0].lower() in _HEADER_KEYS and len(cells) > 1 and cells[1].lower() == "labels":
                continue
        fields = tuple(c for c in cells[1:] if c)
        if not cells[0] or not fields:
            raise DatasetError(
                f"{path}, line {line}: expected 'file_or_id,labels' (e.g. dog.mp4,Dog;Bark)"
            )
        key = cells[0]
        if "/" in key or "\\" in key:
            key = str((base / Path(key).expanduser()).resolve())
        if key in out:
            raise DatasetError(f"{path}, line {line}: {cells[0]!r} is listed twice")
        out[key] = fields
    if not out:
        raise DatasetError(f"{path} has no label rows (expected 'file_or_id,labels')")
    return out


def read_video_files(
    paths: Sequence[str | Path], labels_file: str | Path | None = None
) -> ClipList:
    """Records for media files, labelled from ``labels_file`` when given.

    A video is looked up in the labels file by its path (keys with a ``/``), its file name, then
    its id (the file name without ending). A video missing from the labels file has no labels
    (reported and skipped when classifying); rows naming no given video are ignored.
    """
    if not paths:
        raise DatasetError("no video files to evaluate")
    table = read_labels_file(labels_file) if labels_file is not None else None
    clips: list[ClipRecord] = []
    for p in paths:
        video = Path(p)
        labels: tuple[str, ...] | None = None
        if table is not None:
            labels = (
                table.get(str(video.resolve())) or table.get(video.name) or table.get(video.stem)
            )
        clips.append(ClipRecord(video_id=video.stem, labels=labels, video=str(video)))
    if table is not None and not any(clip.labels is not None for clip in clips):
        raise DatasetError(
            f"none of the {len(clips)} videos is listed in {labels_file} (name a video by file"
            " name, by id = file name without ending, or by a path relative to the labels file)"
        )
    return ClipList(
        clips=tuple(clips),
        source=", ".join(str(p) for p in paths[:3])
        + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""),
        kind="videos",
    )


# -- labels -> targets ------------------------------------------------------------------------
def label_index(label_set: LabelSet) -> dict[str, int]:
    """Token -> class index: ids first, then display names, then lower-cased names."""
    index: dict[str, int] = {}
    for i, name in enumerate(label_set.names):
        index.setdefault(name.lower(), i)
    for i, name in enumerate(label_set.names):
        index[name] = i
    for i, mid in enumerate(label_set.ids):
        index[mid] = i
    return index


def split_labels(fields: Iterable[str], index: dict[str, int] | None = None) -> list[str]:
    """Split label fields into tokens (the rule is in the module docstring).

    ``index`` is the token -> class map of the label set (:func:`label_index`), used to keep a
    name containing a comma whole; without it every field is split.
    """
    tokens: list[str] = []
    for raw in fields:
        text = raw.strip()
        if not text:
            continue
        if index is not None and (text in index or text.lower() in index):
            tokens.append(text)
            continue
        sep = ";" if ";" in text else ","
        tokens.extend(t.strip() for t in text.split(sep) if t.strip())
    return tokens


def encode_targets(
    clips: Sequence[ClipRecord], label_set: LabelSet, task: str
) -> tuple[np.ndarray, dict[int, str]]:
    """Multi-hot targets ``[N, C]`` (uint8) of ``clips`` and the clips that cannot be scored.

    Labels match ids, display names or lower-cased display names. Returns
    ``(targets, problems)`` with ``problems`` mapping clip position -> reason: the record's
    ``problem``, unknown label, no labels, or (single-label task) not exactly one label.
    """
    index = label_index(label_set)
    targets = np.zeros((len(clips), len(label_set)), dtype=np.uint8)
    problems: dict[int, str] = {}
    for n, clip in enumerate(clips):
        if clip.problem is not None:
            problems[n] = clip.problem
            continue
        if clip.labels is None:
            problems[n] = (
                "no labels for this clip (add a row for it to the labels file)"
                if clip.video is not None
                else "the dataset entry has no 'labels'"
            )
            continue
        tokens = clip.label_tokens(index)
        unknown = [t for t in tokens if t not in index and t.lower() not in index]
        if unknown:
            problems[n] = f"unknown label {unknown[0]!r} (not in the label set)"
            continue
        classes = sorted({index[t] if t in index else index[t.lower()] for t in tokens})
        if task == "single-label" and len(classes) != 1:
            problems[n] = f"a single-label task needs exactly one label, got {len(classes)}"
            continue
        targets[n, classes] = 1
    return targets, problems


# -- loading a clip --------------------------------------------------------------------------
def frame_file(clip: ClipRecord, i: int, *, fallback: bool = False) -> str:
    """Path of frame ``i`` of a reference-layout clip, which must exist.

    A missing frame raises :class:`DatasetError`. With ``fallback`` (the reference's training
    loader) the nearest lower frame that exists is used instead, with a warning; none existing
    still raises.
    """
    path = clip.frame_path(i)
    if Path(path).is_file():
        return path
    if fallback:
        for j in range(i - 1, -1, -1):
            lower = clip.frame_path(j)
            if Path(lower).is_file():
                log.warning("clip %s: frame %d missing, using frame %d", clip.video_id, i, j)
                return lower
        raise DatasetError(
            f"clip {clip.video_id}: no frame at or below frame_{i} in {clip.frame_dir}; "
            "re-run `cavmae prepare` for this clip"
        )
    raise DatasetError(
        f"clip {clip.video_id}: frame {i} is missing ({path}); re-run `cavmae prepare` for this clip"
    )


@dataclass
class ClipInputs:
    """Model inputs of one clip: ``audio [T, F]`` and ``frames [K, 3, H, W]`` (either may be
    None)."""

    audio: np.ndarray | None
    frames: np.ndarray | None


def stack_inputs(arrays: Sequence[np.ndarray | None]) -> np.ndarray:
    """One input of several clips (``audio`` or ``frames``) as one batch ``[N, ...]``.

    The callers asked every clip for that input, so a missing one is a bug, not a user error.
    """
    present = [a for a in arrays if a is not None]
    if len(present) != len(arrays):
        raise AssertionError("a clip lacks an input that was loaded for all of them")
    return np.stack(present)


def load_inputs(
    clip: ClipRecord,
    *,
    need_audio: bool,
    frame_indices: Sequence[int] | None,
    num_frames: int,
    config: PreprocessConfig,
) -> ClipInputs:
    """Read and preprocess one clip for evaluation (no augmentation, no frame fallback).

    Reference clips: the wav's first channel at ``config.sample_rate`` (the ``audio_seconds``
    that fill the spectrogram) -> :func:`~cavmae.audio.prepare_audio`; the JPEGs of
    ``frame_indices`` -> :func:`~cavmae.visual.preprocess_frame`. Video clips:
    :func:`~cavmae.media.load_clip` with ``num_frames`` frames, of which ``frame_indices`` are
    kept. ``frame_indices=None`` loads no frames.

    Raises :class:`~cavmae.errors.CavmaeError` (a ``DatasetError`` or ``MediaError``) when
    something is missing or corrupt.
    """
    if clip.problem is not None:
        raise DatasetError(clip.problem)
    if clip.video is not None:
        from cavmae.media import load_clip

        loaded = load_clip(
            clip.video,
            num_frames=num_frames,
            config=config,
            need_audio=need_audio,
            need_video=frame_indices is not None,
        )
        frames = None
        if frame_indices is not None and loaded.frames is not None:
            frames = loaded.frames[list(frame_indices)]
        return ClipInputs(audio=loaded.audio, frames=frames)
    audio = frames = None
    if need_audio:
        from cavmae.audio import prepare_audio
        from cavmae.media import decode_audio

        if clip.wav is None:
            raise DatasetError(f"{clip.video_id}: the dataset entry has no 'wav'")
        if not Path(clip.wav).is_file():
            raise DatasetError(f"{clip.wav}: no such file")
        waveform = decode_audio(
            clip.wav, sample_rate=config.sample_rate, duration=config.audio_seconds
        )
        audio = prepare_audio(waveform, config)
    if frame_indices is not None:
        from cavmae.visual import load_image, preprocess_frame

        frames = np.stack(
            [preprocess_frame(load_image(frame_file(clip, i)), config) for i in frame_indices]
        )
    return ClipInputs(audio=audio, frames=frames)
