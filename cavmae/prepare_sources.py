"""Which video each clip id of a ``cavmae prepare`` output folder belongs to, and the dataset
JSON an earlier run left there (see :mod:`cavmae.prepare`, "Re-runs into the same folder").

``{out}/.prepare-sources.json`` records the video (resolved path, size, mtime) each id's files
were extracted from; :func:`assign_ids` gives a video an id that names only it in the folder;
:func:`merge_entries` adds a run's entries to the earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cavmae import fsio
from cavmae.data import ClipRecord, read_clips
from cavmae.errors import CavmaeError, DatasetError

log = logging.getLogger(__name__)

#: the output folder's record of the video each clip id was extracted from
SOURCES_NAME = ".prepare-sources.json"


def is_plain_id(video_id: str) -> bool:
    """A clip id names files inside the output folder (``audio/{id}.wav``): no folder part, no
    ``..``, nothing a path would read as leaving the folder."""
    return bool(video_id) and video_id not in (".", "..") and not any(c in video_id for c in "/\\\0")

# --- the record of sources -------------------------------------------------------------------

#: ``(size, mtime in ns)`` of a video file, or None when it cannot be read
Facts = tuple[int, int] | None


def video_facts(video: str) -> Facts:
    try:
        st = Path(video).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class Sources:
    """``{out}/.prepare-sources.json``: clip id -> ``[video path, size, mtime_ns]``.

    An entry with a video claims the id for that video (so no other video is extracted over
    its files); size and mtime are those of the version whose extraction completed, ``null``
    until one has. They are taken *before* extracting, so a video changed meanwhile differs
    from them next time and is extracted again; and a re-extraction cut short leaves the old
    facts, which no longer match the changed video either. Rewritten atomically now and then
    during a run (a crash redoes at most the clips since) and at its end.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clips: dict[str, list] = {}
        self.existed = path.exists()
        if self.existed:
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
                clips = obj["clips"]
                if not isinstance(clips, dict) or not all(
                    isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) for v in clips.values()
                ) or not all(is_plain_id(k) for k in clips):
                    raise ValueError("bad entries")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CavmaeError(f"cannot read {path} ({e}); delete it to extract every clip of"
                                  " this folder again") from None
            self.clips = clips
        self.ids_of: dict[str, list[str]] = defaultdict(list)
        for vid, (video, _, _) in self.clips.items():
            self.ids_of[video].append(vid)
        self._dirty = False
        self._by_facts: dict[tuple[str, int, int], list[str]] | None = None
        self._last_save = time.monotonic()
        self._save_cost = 0.0

    def owner(self, video_id: str) -> str | None:
        entry = self.clips.get(video_id)
        return entry[0] if entry else None

    def vouches(self, video_id: str, video: str, facts: Facts) -> bool:
        """The id's files were extracted from this video as it is now."""
        entry = self.clips.get(video_id)
        return facts is not None and entry == [video, *facts]

    def claim(self, video_id: str, video: str) -> None:
        if self.owner(video_id) != video:
            self.clips[video_id] = [video, None, None]
            self.ids_of[video].append(video_id)
            self._dirty = True

    def moved_here(self, video: str) -> str | None:
        """The id of a clip extracted from a video that is gone now and had this video's file
        name, size and modification time (``mv`` keeps both): the same video, moved. None when
        there is none, or more than one."""
        facts = video_facts(video)
        if facts is None or video in self.ids_of:
            return None
        if self._by_facts is None:  # built once: a run may bring many new videos
            self._by_facts = defaultdict(list)
            for vid, (path, size, mtime) in self.clips.items():
                if size is not None:
                    self._by_facts[(Path(path).name, size, mtime)].append(vid)
        found = [vid for vid in self._by_facts.get((Path(video).name, *facts), ())
                 if not Path(self.clips[vid][0]).exists()]
        return found[0] if len(found) == 1 else None

    def move(self, video_id: str, video: str) -> None:
        """``video_id``'s video now lives at ``video`` (its facts, so its extraction, stand)."""
        old = self.clips[video_id][0]
        self.clips[video_id][0] = video
        self.ids_of[old].remove(video_id)
        self.ids_of[video].append(video_id)
        self._dirty = True

    def extracted(self, video_id: str, facts: Facts) -> None:
        entry = self.clips[video_id]
        entry[1], entry[2] = facts if facts is not None else (None, None)
        self._dirty = True

    def save(self, *, now: bool = True) -> None:
        """Write the record if it changed; unless ``now``, only when the last write is long
        enough ago that rewriting a large record does not dominate the run."""
        if not self._dirty:
            return
        if not now and time.monotonic() - self._last_save < max(10.0, 20 * self._save_cost):
            return
        start = time.monotonic()
        fsio.write_json(self.path, {"version": 1, "clips": self.clips}, indent=None)
        self._last_save = time.monotonic()
        self._save_cost = self._last_save - start
        self._dirty = False


def _hashed_id(base: str, video: str, attempt: int) -> str:
    digest = hashlib.sha1(video.encode()).hexdigest()[:8]
    return f"{base}-{digest}" if attempt == 1 else f"{base}-{digest}-{attempt}"


def assign_ids(
    clips: Sequence[ClipRecord], keys: Sequence[str], sources: Sources
) -> tuple[list[ClipRecord], list[tuple[str, str]]]:
    """Give every clip an id that names only its video in this output folder.

    ``clips`` carry their wanted id (file stem or the list's ``video_id``); ``keys`` are their
    resolved video paths. A video keeps the id the record gives it (or gives a video of its
    name, size and modification time that is gone: the same video, moved); else it gets its wanted id
    when that is free and no other video of this run wants it; else a path-hash suffix
    (deterministic, so a later run of the same video finds it again through the record).
    Returns the clips and ``(video, new id)`` for those renamed because a video of an earlier
    run holds their id.
    """
    wanted: dict[str, set[str]] = defaultdict(set)
    for c, key in zip(clips, keys, strict=True):
        wanted[c.video_id].add(key)
    taken: dict[str, str] = {}  # id -> video, this run
    chosen: dict[tuple[str, str], str] = {}
    renamed: list[tuple[str, str]] = []

    def free(video_id: str, video: str) -> bool:
        return sources.owner(video_id) in (None, video) and taken.get(video_id, video) == video

    out = []
    for c, video in zip(clips, keys, strict=True):
        base = c.video_id
        vid = chosen.get((base, video))
        if vid is None:
            known = [i for i in sources.ids_of.get(video, ()) if i == base or i.startswith(base + "-")]
            moved = None if known else sources.moved_here(video)
            if moved is not None and taken.get(moved, video) == video:  # keeps its id and files
                sources.move(moved, video)
                vid = moved
            elif sources.owner(base) == video and free(base, video):
                vid = base
            elif known and free(known[0], video):
                vid = known[0]
            elif len(wanted[base]) == 1 and free(base, video):
                vid = base
            else:
                attempt = 1
                while not free(hashed := _hashed_id(base, video, attempt), video):
                    attempt += 1
                vid = hashed
                owner = sources.owner(base)
                if owner not in (None, video):
                    renamed.append((str(c.video), vid))
                    log.warning("%s gets the id %r: %r is %s's, extracted into this folder earlier",
                                c.video, vid, base, owner)
            chosen[(base, video)] = vid
            taken[vid] = video
        out.append(replace(c, video_id=vid))
    return out, renamed



def earlier_entries(path: Path) -> list[ClipRecord]:
    """The entries of the dataset JSON an earlier run left at ``path`` (none when absent)."""
    if not path.exists():
        return []
    hint = ("cavmae prepare adds to the dataset JSON in the output folder: move it away or choose"
            " another --json-name")
    try:
        if json.loads(path.read_text(encoding="utf-8")) == {"data": []}:
            return []
        clips = read_clips(path)
    except DatasetError as e:  # names the file
        raise CavmaeError(f"{e}; {hint}") from None
    except (OSError, ValueError) as e:
        raise CavmaeError(f"cannot read {path} as a dataset JSON ({e}); {hint}") from None
    if any(c.video is not None for c in clips):
        raise CavmaeError(f"{path} is a list of videos, not a prepared dataset; cavmae prepare adds"
                          " to the dataset JSON in the output folder: move it away or choose"
                          " another --json-name")
    return clips


def merge_entries(earlier: Sequence[ClipRecord], new: Sequence[ClipRecord]) -> list[ClipRecord]:
    """Earlier entries in order, each replaced by this run's entries of its id (an id names one
    video, so they describe the same video); then this run's new ids in input order. A new
    entry without labels (none given, e.g. a video named on the command line) keeps the earlier
    entry's: re-running over the videos of a labelled list must not strip its labels."""
    by_id: dict[str, list[ClipRecord]] = defaultdict(list)
    for c in new:
        by_id[c.video_id].append(c)
    merged: list[ClipRecord] = []
    placed: set[str] = set()
    for c in earlier:
        if c.video_id not in by_id:
            merged.append(c)
        elif c.video_id not in placed:
            merged.extend(n if n.labels is not None else replace(n, labels=c.labels)
                          for n in by_id[c.video_id])
            placed.add(c.video_id)
    merged.extend(c for vid, entries in by_id.items() if vid not in placed for c in entries)
    return merged
