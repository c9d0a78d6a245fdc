"""File endings taken as media when a folder is searched: one list for the CLI and ``prepare``.

Plain constants (no av, numpy or torch), so the command line can import them at start-up. A
file named explicitly is used whatever its ending; these decide only what a folder search
picks up.
"""

from __future__ import annotations

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
