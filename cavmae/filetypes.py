"""Which files a job takes: media endings for folder searches, and the expansion of the inputs
a user names (files, folders, globs, lists of paths) into files. One home for the CLI,
``prepare`` and the Ray reader.

Plain Python (no av, numpy or torch), so the command line can import it at start-up. A file
named explicitly is used whatever its ending; the endings decide only what a folder search
picks up.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import CavmaeError

logger = logging.getLogger(__name__)

#: containers with a video stream (``prepare`` needs frames, so it searches for these)
VIDEO_SUFFIXES: tuple[str, ...] = (
    ".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg",
)

#: audio-only files
AUDIO_SUFFIXES: tuple[str, ...] = (".wav", ".mp3", ".flac", ".m4a", ".ogg")

#: everything a folder search for clips picks up (classify, embed, evaluate)
MEDIA_SUFFIXES: tuple[str, ...] = VIDEO_SUFFIXES + AUDIO_SUFFIXES


def is_media_file(name: str, suffixes: tuple[str, ...] = MEDIA_SUFFIXES) -> bool:
    """True when ``name`` ends in one of ``suffixes``, in any case (``CLIP.MP4`` counts)."""
    return name.lower().endswith(suffixes)


#: endings of a text file that lists inputs, one path a line (where lists are accepted)
PATH_LIST_SUFFIXES: tuple[str, ...] = (".txt", ".lst")


#: schemes of remote inputs, read through pyarrow's file systems by the Ray reader
REMOTE_SCHEMES: tuple[str, ...] = ("s3://", "gs://", "gcs://", "hdfs://")


def is_remote(item: str) -> bool:
    """True for a remote URI (``s3://...``, ``gs://...``) rather than a local path."""
    return item.startswith(REMOTE_SCHEMES)


def input_key(item: str | Path) -> str:
    """What names one input whichever way it was written: a local path absolute with its links
    resolved (``./a.mp4``, ``$PWD/a.mp4`` and a link to it are one); a remote URI as it is."""
    text = str(item)
    return text if is_remote(text) else str(Path(text).resolve())


def expand_inputs(
    inputs: Iterable[str],
    suffixes: tuple[str, ...] = MEDIA_SUFFIXES,
    *,
    path_lists: bool = False,
    list_remote: Callable[[str], list[str]] | None = None,
) -> list[str]:
    """The files named by ``inputs``: files as given, folders searched recursively for media,
    globs expanded; with ``path_lists``, text files of paths (one a line, ``#`` comments,
    relative to the list); with ``list_remote``, URIs expanded by it (others are refused).

    A name that matches nothing is an error (a typo should not silently shrink a batch job);
    duplicates, by resolved path, are dropped with the first kept.
    """
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if is_remote(item):
            if list_remote is None:
                raise CavmaeError(f"{item}: remote inputs are read only with --ray")
            out.extend(list_remote(item))
        elif path.is_dir():
            named = [p for p in path.rglob("*") if is_media_file(p.name, suffixes) and not p.is_dir()]
            found = sorted(p for p in named if p.is_file())
            odd = len(named) - len(found)  # named pipes, sockets, devices, broken links
            if odd:
                example = next(p for p in named if not p.is_file())
                logger.warning("%s: skipped %d entr%s with a media name that %s no regular file (%s)",
                               path, odd, "y" if odd == 1 else "ies", "is" if odd == 1 else "are", example.name)
            if not found:
                raise CavmaeError(f"no media files in folder {path}")
            out.extend(str(p) for p in found)
        elif path.is_file() and path_lists and path.suffix.lower() in PATH_LIST_SUFFIXES:
            # a byte-order mark is no part of the first name; a name that is not UTF-8 keeps its
            # bytes (surrogate escapes, as the file system gives names)
            text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
            lines = [s.strip() for s in text.splitlines()]
            # relative entries are relative to the list, so a list travels with its files
            out.extend(s if is_remote(s) or Path(s).is_absolute() else str(path.parent / s)
                       for s in lines if s and not s.startswith("#"))
        elif path.is_file():
            out.append(str(path))
        elif path.exists():  # a named pipe, socket or device: no media file to read (or read again)
            raise CavmaeError(f"{item}: not a regular file (a named pipe, socket or device); give a media file")
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise CavmaeError(f"no files match {item!r}")
            out.extend(matches)
        else:
            raise CavmaeError(f"no such file or folder: {item}")
    seen: set[str] = set()
    unique = []
    for p in out:
        key = input_key(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
