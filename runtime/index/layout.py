"""The on-disk layout of an index: file names, ``index.json`` metadata, parts, shard dirs.

Everything that knows how an index directory is named and numbered lives here, so the reader,
the writer and the merge agree on it by construction.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cavmae.errors import CavmaeError
from cavmae.filetypes import input_key

FORMAT = "cavmae-embedding-index"
FORMAT_VERSION = 2  # what writers write; version 1 (no offsets/keys files) still opens
READ_VERSIONS = (1, 2)
META_NAME = "index.json"
LOCK_NAME = ".lock"
MODALITIES = ("audio", "visual")
ARRAYS = (*MODALITIES, "mask")  # the three .npy files of each part
SIDECARS = ("offsets", "keys")  # per part since version 2: line offsets, sorted path hashes
ITEM_KEYS = ("row", "path", "duration", "has_audio", "has_video")  # written for every row
_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")
#: the name of a chunk (its files are ``<name>-audio.npy`` ...)
CHUNK_NAME_RE = re.compile(r"chunk-\d{5,}")
CHUNK_RE = re.compile(
    r"^chunk-\d{5,}-(audio|visual|mask|offsets|keys)\.npy$|^chunk-\d{5,}-items\.jsonl$"
)


class EmbeddingIndexError(CavmaeError):
    """An index is missing, malformed, in use, or made with another model."""


def path_key(path: str | Path) -> str:
    """The canonical form of a media path stored in an index (absolute, symlinks resolved); a
    remote URI (``s3://``, read with ``--ray``) as it is (:func:`cavmae.filetypes.input_key`)."""
    return input_key(path)


def shard_dir(index: str | Path, shard: tuple[int, int]) -> Path:
    """``INDEX/shard-i-of-n`` for shard ``(i, n)``."""
    i, n = shard
    return Path(index) / f"shard-{i}-of-{n}"


def parse_frame(frame: str | int) -> str | int:
    """``"middle"``, ``"mean"`` or a frame index (``"3"`` -> 3)."""
    if isinstance(frame, int):
        return frame
    text = str(frame).strip().lower()
    if text in ("middle", "mean"):
        return text
    if text.isdigit():
        return int(text)
    raise EmbeddingIndexError(f"frame must be 'middle', 'mean' or a frame index, not {frame!r}")


def check_modality(modality: str) -> str:
    """``modality`` itself when it is ``"audio"`` or ``"visual"``."""
    if modality not in MODALITIES:
        raise EmbeddingIndexError(f"modality must be 'audio' or 'visual', not {modality!r}")
    return modality


def is_index(path: str | Path) -> bool:
    """True when ``path`` is a directory holding an index's ``index.json``."""
    return (Path(path) / META_NAME).is_file()


def find_shards(path: str | Path) -> list[tuple[int, int, Path]]:
    """Shard sub-directories of an index as ``(i, n, dir)``, sorted by ``(n, i)``."""
    root = Path(path)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _SHARD_RE.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), int(m.group(2)), child))
    return sorted(out, key=lambda t: (t[1], t[0]))


def check_new_index_dir(path: Path) -> None:
    """Refuse to start an index in a folder that holds anything but what an index made there
    would (its lock, its shard folders): the files there are someone else's, and a writer
    cleans up names like its own."""
    if not path.is_dir():
        return
    others = sorted(c.name for c in path.iterdir()
                    if c.name != LOCK_NAME and not (_SHARD_RE.match(c.name) and c.is_dir()))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise EmbeddingIndexError(
            f"{path} is a folder of other files ({shown}), not an index; give an empty or new folder"
        )


def new_meta(
    model: dict[str, Any], want: dict[str, Any], shard: tuple[int, int] | None
) -> dict[str, Any]:
    """``index.json`` of an empty index; ``want`` holds ``dim``, ``frame`` and ``num_frames``."""
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "uid": new_uid(), "model": dict(model),
        **want, "count": 0, "base_count": 0, "chunks": [], "next_chunk": 1,
        "shard": list(shard) if shard else None, "finished": False,
    }


def read_meta(path: Path) -> dict[str, Any]:
    """The ``index.json`` of index directory ``path``, checked for format and version."""
    file = path / META_NAME
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbeddingIndexError(f"{path} is not an embedding index (no {META_NAME})") from None
    except (OSError, ValueError) as e:
        raise EmbeddingIndexError(f"cannot read {file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EmbeddingIndexError(f"{file} is not a cavmae embedding index")
    if meta.get("version") not in READ_VERSIONS:
        raise EmbeddingIndexError(
            f"{path} has index format version {meta.get('version')!r}; this cavmae reads"
            f" versions {', '.join(map(str, READ_VERSIONS))}: build the index again"
        )
    return meta


def new_uid() -> str:
    """A random identity for an index directory (an approximate index records whose it is)."""
    return secrets.token_hex(8)


def item_line(item: dict[str, Any]) -> bytes:
    """One line of ``items.jsonl`` (UTF-8). A file name that is not valid UTF-8 reaches Python
    with surrogate escapes, which UTF-8 cannot hold: that line is written with JSON's ``\\u``
    escapes instead, which read back to the same name."""
    text = json.dumps(item, ensure_ascii=False) + "\n"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(item, ensure_ascii=True) + "\n").encode("ascii")


def key_hash(key: str) -> int:
    """A 64-bit hash of a path key: what ``keys.npy`` sorts (collisions are checked by path).
    Hashes the name's bytes on disk (``os.fsencode``: UTF-8, and the raw bytes of a name that is
    not valid UTF-8)."""
    return int.from_bytes(hashlib.blake2b(os.fsencode(key), digest_size=8).digest(), "little")


def line_offsets(lines: list[bytes]) -> np.ndarray:
    """``int64 [n + 1]``: where each of ``lines`` starts in their concatenation, then the end."""
    out = np.zeros(len(lines) + 1, dtype=np.int64)
    np.cumsum([len(line) for line in lines], out=out[1:])
    return out


def sorted_keys(hashes: np.ndarray) -> np.ndarray:
    """``uint64 [2, n]``: the path hashes of a part's rows sorted (row 0) and their local rows
    (row 1), so a path is found with a binary search of row 0 without reading the items."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    return np.stack([hashes[order], order.astype(np.uint64)])


@dataclass(frozen=True)
class Part:
    """Rows ``[start, start + count)`` of the index, stored under file prefix ``prefix``."""

    prefix: str  # "" for the base files, "chunk-00003-" for a chunk
    start: int
    count: int

    def file(self, directory: Path, what: str) -> Path:
        """The ``what`` file (``"audio"``, ``"visual"``, ``"mask"``, ``"items"``, ``"offsets"``
        or ``"keys"``) of the part."""
        ext = "jsonl" if what == "items" else "npy"
        return directory / f"{self.prefix}{what}.{ext}"


def parts(meta: dict[str, Any]) -> list[Part]:
    """The parts an ``index.json`` lists, in row order: the base rows, then each chunk."""
    out = []
    start = int(meta.get("base_count", 0))
    if start:
        out.append(Part("", 0, start))
    for chunk in meta.get("chunks", []):
        # a chunk is a file of this folder: a name with a folder part (an edited index.json
        # pointing elsewhere) is damage, not a place to read
        if not CHUNK_NAME_RE.fullmatch(str(chunk.get("name"))):
            raise EmbeddingIndexError(f"index.json lists a chunk named {chunk.get('name')!r}, not"
                                      " chunk-NNNNN; the index is damaged")
        out.append(Part(f"{chunk['name']}-", start, int(chunk["count"])))
        start += int(chunk["count"])
    return out


def load_npy(path: Path, rows: int, row_shape: tuple[int, ...] | None = None,
             dtype: Any = None) -> np.ndarray:
    """The first ``rows`` rows of a memory-mapped ``.npy`` file (base files may hold more),
    checked against the ``row_shape`` and ``dtype`` the index expects when given."""
    arr = np.load(path, mmap_mode="r")
    if arr.ndim == 0 or arr.shape[0] < rows:
        got = arr.shape[0] if arr.ndim else 0
        raise EmbeddingIndexError(f"{path} holds {got} rows, the index expects {rows}; it is damaged")
    if row_shape is not None and arr.shape[1:] != row_shape or dtype is not None and arr.dtype != dtype:
        raise EmbeddingIndexError(
            f"{path} holds {arr.dtype} rows of shape {arr.shape[1:]}, the index expects"
            f" {np.dtype(dtype) if dtype is not None else arr.dtype} rows of shape {row_shape}; it is damaged"
        )
    return arr[:rows]


def array_row_shape(what: str, dim: int) -> tuple[tuple[int, ...], Any]:
    """(row shape, dtype) of a part's ``audio``/``visual`` embeddings (``[dim]`` float32) or
    its ``mask`` (``[2]`` bool: has audio, has video)."""
    return ((2,), np.bool_) if what == "mask" else ((dim,), np.float32)


def read_item_lines(directory: Path, part: Part) -> Iterator[tuple[int, bytes]]:
    """``(row, raw line)`` for the part's rows (a base file may hold more lines than rows)."""
    with open(part.file(directory, "items"), "rb") as f:
        for k, line in enumerate(f):
            if k >= part.count:
                break
            yield part.start + k, line
