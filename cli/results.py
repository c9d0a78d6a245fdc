"""Result files of ``-o``: the format follows the file's ending, a re-run resumes.

- ``.csv``: a header row, then rows appended (and flushed) as results come;
- ``.jsonl`` (or ``.ndjson``): one JSON object per line, appended (and flushed) as they come;
- ``.json``: one JSON array. A whole-file format cannot be appended to, so the file is
  rewritten to a temporary name and renamed into place (at most every few seconds, and when the
  job ends or is interrupted): it is always complete and valid, whenever the job stops.

Before anything is written, the ending is checked against ``--csv``/``--json`` and an existing
file against the columns/fields of the command; a mismatch is refused with one line, so a
results file is never mixed up. Records already in the file are keyed (by default on the
resolved input path, the mode and the start time), so a re-run skips what is done; a command
that binds its settings (model, frames, windows, ...) to the file is refused when a re-run
changes them (they are kept beside it in a hidden ``.{name}.settings.json``).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from cavmae import fsio
from cavmae.errors import CavmaeError
from cavmae.filetypes import is_remote

from .common import warn

__all__ = ["FORMATS", "ResultWriter", "result_format", "result_key"]

#: file ending -> format of ``-o``
FORMATS: dict[str, str] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}

#: seconds between two rewrites of a ``.json`` file while a job runs
JSON_REWRITE_INTERVAL = 5.0


def result_format(path: Path, requested: str | None = None) -> str:
    """The format of ``-o path``: from its ending, checked against ``--csv`` / ``--json``.

    ``requested`` is "csv", "json" or None (neither flag). Raises ``CavmaeError`` for an
    unknown ending or a flag that contradicts it.
    """
    suffix = path.suffix.lower()
    fmt = FORMATS.get(suffix)
    if suffix == ".parquet":  # written by the Ray backend only (cli/ray_run.py ParquetResults)
        raise CavmaeError(f"-o {path}: Parquet results are written with --ray only; add --ray,"
                          " or use a .csv, .jsonl or .json file")
    if fmt is None:
        what = f"the ending {path.suffix!r}" if path.suffix else "a name without an ending"
        raise CavmaeError(f"-o {path}: {what} names no result format; use a .csv, .jsonl or .json file")
    if requested == "csv" and fmt != "csv":
        raise CavmaeError(f"--csv with -o {path}: a {suffix} file holds JSON; name it .csv or drop --csv")
    if requested == "json" and fmt == "csv":
        raise CavmaeError(f"--json with -o {path}: a .csv file holds CSV; name it .jsonl or .json, or use --csv")
    return fmt


def result_key(record: dict[str, Any], fields: Sequence[str] = ("path", "mode", "start")) -> tuple[Hashable, ...]:
    """The identity of a result: its input file resolved (so ``./a.mp4`` and ``$PWD/a.mp4``
    are one), then the other ``fields`` (numbers as floats: CSV gives them as text)."""
    key: list[Hashable] = []
    for name in fields:
        value = record[name]
        if name == "path":  # a remote URI (s3://, gs://, as --ray reads them) is its own key
            key.append(str(value) if is_remote(str(value)) else str(Path(value).resolve()))
        elif name in ("start", "end"):
            key.append(round(float(value), 6))
        else:
            key.append(str(value))
    return tuple(key)


class ResultWriter:
    """Writes the records of a command to ``-o`` and knows which ones an earlier run wrote.

    Args:
        path: the file, or None (nothing is written, nothing is done).
        columns: the CSV header (the record fields for JSON files are checked by ``key``).
        requested: "csv" / "json" from the command's flags, or None.
        command: the command's name, for messages.
        key: the identity of a record (see :func:`result_key`).
        shared: several processes (shards) write this file at once; refused for ``.json``,
            which each would rewrite with its own records only.
    """

    def __init__(
        self,
        path: Path | None,
        columns: Sequence[str],
        *,
        requested: str | None = None,
        command: str = "cavmae",
        key: Callable[[dict[str, Any]], Hashable] = result_key,
        shared: bool = False,
    ) -> None:
        self.path, self.columns, self.command, self.key = path, list(columns), command, key
        self.fmt = result_format(path, requested) if path is not None else None
        self.done: set[Hashable] = set()
        self._file: Any = None
        self._records: list[Any] = []
        self._dirty = False
        self._last_rewrite = 0.0
        self._settings: dict[str, Any] | None = None
        if path is None:
            return
        if shared and self.fmt == "json":
            raise CavmaeError(f"-o {path}: shards cannot share a .json file (each rewrites it whole);"
                              " use a .jsonl or .csv file, or one -o per shard")
        if path.is_dir():
            raise CavmaeError(f"-o {path} is a folder; give a file name ending in .csv, .jsonl or .json")
        if path.exists() and path.stat().st_size:
            self._read_existing(path)
        fsio.probe_writable(path)  # a read-only or mistyped folder fails before any work

    # -- the settings behind the results ---------------------------------------------------------
    def settings_path(self) -> Path:
        """Beside the file, hidden: the settings of the run that started it."""
        assert self.path is not None
        return self.path.with_name(f".{self.path.name}.settings.json")

    def bind_settings(self, settings: dict[str, Any]) -> None:
        """Tie the file to the settings its results depend on (model, frames, windows, ...).

        A re-run resumes only with the same settings: results of other settings under the same
        (path, mode, start) would otherwise count as done, and the file would mix two runs.
        Call before the first ``write``; refuses with one line when they differ.
        """
        self._settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        if self.path is None or not self.done:
            return
        try:
            earlier = json.loads(self.settings_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            warn(f"{self.path}: no record of the settings that wrote it; resuming by input, mode"
                 " and start time only")
            return
        changed = sorted(k for k in set(earlier) | set(self._settings) if earlier.get(k) != self._settings.get(k))
        if changed:
            what = ", ".join(f"{k} {earlier.get(k)!r} -> {self._settings.get(k)!r}" for k in changed)
            raise self._refuse(f"holds results of other settings ({what})")

    def _open(self) -> Any:
        """The file, opened for appending on the first result (a job that fails before any
        result leaves no empty file behind)."""
        if self._file is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            if new and self._settings is not None:
                fsio.write_json(self.settings_path(), self._settings)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            if self.fmt == "csv" and new:
                csv.writer(self._file).writerow(self.columns)
        return self._file

    # -- reading what an earlier run wrote ------------------------------------------------------
    def _refuse(self, why: str) -> CavmaeError:
        return CavmaeError(f"{self.path} {why}; choose another -o")

    def _read_existing(self, path: Path) -> None:
        if self.fmt == "json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise self._refuse("is not a JSON file") from None
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise self._refuse(f"is not a JSON list of `{self.command}` results")
            for rec in data:
                self._mark_done(rec, f"{path}")
            self._records = data
            return
        self._drop_incomplete_tail(path)
        with open(path, newline="", encoding="utf-8") as f:
            if self.fmt == "csv":
                rows = csv.DictReader(f)
                if rows.fieldnames != self.columns:
                    raise self._refuse(
                        f"has the columns {','.join(rows.fieldnames or [])}, not those of"
                        f" `{self.command}` ({','.join(self.columns)})"
                    )
                for n, row in enumerate(rows, 2):
                    self._mark_done(row, f"{path}:{n}")
                return
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise self._refuse(f"is not a JSON-lines file (line {n})") from None
                if not isinstance(rec, dict):
                    raise self._refuse(f"is not a JSON-lines file of `{self.command}` results (line {n})")
                self._mark_done(rec, f"{path}:{n}")

    def _mark_done(self, rec: dict[str, Any], where: str) -> None:
        try:
            self.done.add(self.key(rec))
        except (KeyError, TypeError, ValueError):
            raise CavmaeError(
                f"{where} is not a `{self.command}` result (written by another command or an older"
                " cavmae); choose another -o"
            ) from None

    def _drop_incomplete_tail(self, path: Path) -> None:
        """Cut a last line without its newline (a job killed mid-write): that item is redone, and
        the next record does not continue the broken line."""
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
        warn(f"{path}: dropped an incomplete last line (from an interrupted run); its item is redone")

    # -- writing -------------------------------------------------------------------------------
    def is_done(self, record: dict[str, Any]) -> bool:
        """Whether an earlier run wrote the result identified by ``record``'s key fields."""
        return self.path is not None and self.key(record) in self.done

    def write(self, record: dict[str, Any], csv_rows: Sequence[Sequence[Any]] = ()) -> None:
        """Add one result: ``record`` to JSON files, ``csv_rows`` (one or more) to a CSV file."""
        if self.path is None:
            return
        self.done.add(self.key(record))
        if self.fmt == "csv":
            csv.writer(self._open()).writerows(csv_rows)
            self._file.flush()
        elif self.fmt == "jsonl":
            self._open().write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        else:
            self._records.append(record)
            self._dirty = True
            if time.monotonic() - self._last_rewrite >= JSON_REWRITE_INTERVAL:
                self._rewrite_json()

    def _rewrite_json(self) -> None:
        assert self.path is not None
        if self._settings is not None and not self.path.exists():
            fsio.write_json(self.settings_path(), self._settings)
        fsio.write_json(self.path, self._records, indent=1, ensure_ascii=False)
        self._dirty = False
        self._last_rewrite = time.monotonic()

    def close(self) -> None:
        """Finish the file (a ``.json`` file is written out now)."""
        if self.fmt == "json" and self._dirty:
            self._rewrite_json()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
