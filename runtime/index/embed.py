"""Embedding media files into an index: decode ahead in threads, embed in batches, append.

Decoding runs on :func:`cavmae.prefetch.prefetch` threads while the model embeds the previous
batch; a file that cannot be used is reported with its reason and the job goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cavmae.errors import MediaError
from cavmae.prefetch import prefetch

from .reader import EmbeddingIndex
from .writer import IndexWriter

if TYPE_CHECKING:
    from ..pipeline import Pipeline


@dataclass(frozen=True)
class FileResult:
    """What happened to one input: its row, or why it failed."""

    path: Path | str  # a str for a remote URI (read with --ray)
    row: int | None = None
    error: str | None = None
    has_audio: bool = False
    has_video: bool = False


@dataclass
class _Decoded:
    path: Path
    audio: np.ndarray | None  # [T, F]
    frames: np.ndarray | None  # [F, 3, H, W]
    duration: float
    stamp: dict[str, int]  # file_stamp() before decoding


def file_stamp(path: str | Path) -> dict[str, int]:
    """What a row remembers of its file (``size``, ``mtime_ns``): a later run can tell that the
    file changed since it was embedded (:func:`changed_files`)."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def changed_files(index: EmbeddingIndex, paths: Sequence[str | Path]) -> list[Path]:
    """The ``paths`` in ``index`` whose file changed (size or modification time) since its row
    was embedded. Rows without a stamp (written by older versions) are not judged, nor are
    files that are gone."""
    changed = []
    for start in range(0, len(paths), _STAMP_BLOCK):  # in blocks: a re-run may skip millions
        block = paths[start : start + _STAMP_BLOCK]
        rows = index.rows_of(block)
        there = [(Path(p), int(r)) for p, r in zip(block, rows, strict=True) if r >= 0]
        for (path, _), item in zip(there, index.items(r for _, r in there), strict=True):
            if "size" not in item or "mtime_ns" not in item:
                continue
            try:
                now = file_stamp(path)
            except OSError:
                continue
            if now != {"size": item["size"], "mtime_ns": item["mtime_ns"]}:
                changed.append(path)
    return changed


#: paths whose rows :func:`changed_files` reads at a time
_STAMP_BLOCK = 4096


def _decode(path: Path, pipeline: Pipeline) -> _Decoded:
    from cavmae.media import probe

    stamp = file_stamp(path)  # before reading: a change while decoding shows next time
    info = probe(path)
    if not (info.has_audio or info.has_video):
        raise MediaError(f"{path}: no audio or video stream")
    clip = pipeline.load_clip(path, need_audio=info.has_audio, need_video=info.has_video)
    return _Decoded(path, clip.audio, clip.frames, float(clip.duration), stamp)


def _reason(path: Path, error: Exception) -> str:
    """A one-line reason why ``path`` could not be used (media errors name the file already)."""
    if isinstance(error, MediaError):
        return str(error)
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{path}: {type(error).__name__}: {first}"


def _embed_batch(
    pipeline: Pipeline, writer: IndexWriter, clips: list[_Decoded]
) -> Iterator[FileResult]:
    """Embed ``clips`` (audio over those with audio, frames over those with video), append."""
    frame = writer.meta["frame"]
    with_a = [(c, c.audio) for c in clips if c.audio is not None]
    with_v = [(c, c.frames) for c in clips if c.frames is not None]
    ea = pipeline.embed_audio(np.stack([x for _, x in with_a])) if with_a else None
    ev = pipeline.embed_frames(np.stack([x for _, x in with_v]), frame) if with_v else None
    a_of = {id(c): ea[j] for j, (c, _) in enumerate(with_a)} if ea is not None else {}
    v_of = {id(c): ev[j] for j, (c, _) in enumerate(with_v)} if ev is not None else {}
    for c in clips:
        a, v = a_of.get(id(c)), v_of.get(id(c))
        row = writer.add(c.path, a, v, duration=c.duration, **c.stamp)
        yield FileResult(c.path, row=row, has_audio=a is not None, has_video=v is not None)


def embed_files(
    pipeline: Pipeline,
    paths: Sequence[str | Path],
    writer: IndexWriter,
    *,
    batch: int = 8,
    workers: int = 2,
) -> Iterator[FileResult]:
    """Decode, embed and append ``paths`` to ``writer``; one :class:`FileResult` per path.

    Files are decoded ``workers`` at a time in threads while the model runs; clips are embedded
    ``batch`` at a time (``embed_audio`` over the clips with audio, ``embed_frames`` with the
    index's frame choice over those with video). A file that cannot be decoded yields a result
    with ``error`` and the job goes on; model errors propagate (rows committed so far stay).
    Paths already in the index are skipped silently (no result).
    """
    there = writer.contains_many(paths)
    todo = [Path(p) for p, t in zip(paths, there, strict=True) if not t]
    pending: list[_Decoded] = []
    decoded = prefetch(
        lambda p: _decode(p, pipeline), todo, workers=workers, thread_name="cavmae-decode"
    )
    with contextlib.closing(decoded):  # a consumer that stops early stops the decoding threads
        for got in decoded:
            if got.error is not None:
                yield FileResult(got.item, error=_reason(got.item, got.error))
                continue
            pending.append(got.unwrap())
            if len(pending) >= batch:
                yield from _embed_batch(pipeline, writer, pending)
                pending = []
    if pending:
        yield from _embed_batch(pipeline, writer, pending)
