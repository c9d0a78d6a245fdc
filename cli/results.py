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
changes them (they are kept beside it in a hidden ``.{name}.settings.json``). Settings known
before the model loads (from the command's flags) are checked first (:meth:`ResultWriter.check_settings`),
so a refused re-run neither loads nor exports anything. A file whose settings record is missing
(copied or moved without it) is checked against what its records show (``shows``: for
``cavmae classify``, the number of top classes and whether every score is there) and refused
when they differ; the settings the records cannot show (model, frames, window, labels) are not
checked then, which a warning says.

Inputs are recorded by absolute path (:func:`stored_path`): a relative one would name another
file when a re-run starts in another folder, and its result would count as done (or a done one
be redone and duplicated). Files of an older cavmae hold the paths as typed; those still read,
relative to the folder the re-run starts in (as that cavmae did), with a warning.

A job killed mid-write leaves a last line without its newline, and in a CSV file possibly only
some of the rows of its last result: that whole result is not counted as done, and is cut off
when the re-run appends its first result (not before: a file refused for other reasons, or a
run that writes nothing, leaves the file as it was).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cavmae import fsio
from cavmae.errors import CavmaeError
from cavmae.filetypes import input_key, is_remote

from .common import warn

__all__ = ["FORMATS", "ResultWriter", "result_format", "result_key", "stored_path"]

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
    are one), then the other ``fields`` (numbers as floats: CSV gives them as text).

    Result files record absolute paths (:func:`stored_path`), whose key does not depend on the
    current folder; a relative path (an input as typed, or a file of an older cavmae) is
    resolved against it."""
    key: list[Hashable] = []
    for name in fields:
        value = record[name]
        if name == "path":  # a remote URI (s3://, gs://, as --ray reads them) is its own key
            key.append(input_key(value))
        elif name in ("start", "end"):
            key.append(round(float(value), 6))
        else:
            key.append(str(value))
    return tuple(key)


def stored_path(path: str | Path) -> str:
    """The ``path`` a result file records for an input: absolute, so the file names the same
    input whichever folder a re-run starts in. ``..`` is folded away where that names the same
    file (it does not across a symbolic link); symbolic links are kept, not resolved, so a
    folder of links (git-annex, DVC) shows its own names."""
    text = str(path)
    if is_remote(text):
        return text
    folded = Path(os.path.abspath(text))
    return str(folded if folded.resolve() == Path(text).resolve() else Path(text).absolute())


@dataclass(frozen=True)
class _Tail:
    """The last result of a CSV file: its rows are the trailing run of rows with one key."""

    key: Hashable
    offset: int  # byte offset of its first row: where the file is cut to redo it
    rows: int
    seen_before: bool  # the key has rows earlier in the file as well (it stays done)


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
        shows: what one record read back (a JSON record, or one CSV row as text) shows of the
            settings that wrote it, as ``{setting: value}``; the file's value of a setting is
            the largest its records show (checked by ``bind_settings(shown=)`` when the settings
            record is missing).
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
        shows: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.path, self.columns, self.command, self.key = path, list(columns), command, key
        self.shows = shows
        #: per setting, the largest value the records read show (see ``shows``)
        self.shown: dict[str, Any] = {}
        self.fmt = result_format(path, requested) if path is not None else None
        self.done: set[Hashable] = set()
        self._file: Any = None
        self._records: list[Any] = []
        self._dirty = False
        self._last_rewrite = 0.0
        self._settings: dict[str, Any] | None = None
        self._cut: int | None = None  # bytes of the file to keep before the first append
        self._size_read = 0
        self._tail: _Tail | None = None
        self._warned_relative = False
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

    def bind_settings(
        self,
        settings: dict[str, Any],
        older: dict[str, Sequence[Any]] | None = None,
        shown: dict[str, Any] | None = None,
    ) -> None:
        """Tie the file to the settings its results depend on (model, frames, windows, ...).

        A re-run resumes only with the same settings: results of other settings under the same
        (path, mode, start) would otherwise count as done, and the file would mix two runs.
        Call before the first ``write``; refuses with one line when they differ. ``older``:
        per setting, the values an older cavmae recorded for the same setting (they match too,
        and the record is brought up to date). ``shown``: what this run's records will show
        (see ``shows``); a file without its settings record is refused when its records show
        other values, and resumed with a warning otherwise.
        """
        self._settings = json.loads(json.dumps(settings, default=str))  # as it reads back
        if self.path is None or not self.done:
            return
        earlier = self._earlier_settings()
        if earlier is None:
            self._check_shown(shown or {})
            return
        current = self._settings
        self._refuse_changes(earlier, current, older)
        if earlier != current:  # matched an older form: record the current one from now on
            fsio.write_json(self.settings_path(), current)

    def check_settings(self, settings: dict[str, Any], older: dict[str, Sequence[Any]] | None = None) -> None:
        """Refuse now, before the model loads, when a setting known already (from the flags)
        differs from the one that wrote the file; ``bind_settings`` checks them all later."""
        if self.path is None or not self.done:
            return
        earlier = self._earlier_settings()
        if earlier is None:
            return
        current = json.loads(json.dumps(settings, default=str))
        self._refuse_changes({k: v for k, v in earlier.items() if k in current}, current, older)

    def _earlier_settings(self) -> dict[str, Any] | None:
        """The settings record beside the file; None when it is missing."""
        try:
            earlier = json.loads(self.settings_path().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, dict):
            raise self._refuse(f"has an unreadable settings record ({self.settings_path().name})")
        return earlier

    def _refuse_changes(self, earlier: dict[str, Any], current: dict[str, Any],
                        older: dict[str, Sequence[Any]] | None) -> None:
        older = older or {}
        changed = sorted(k for k in set(earlier) | set(current)
                         if earlier.get(k) != current.get(k) and earlier.get(k) not in older.get(k, ()))
        if changed:
            what = ", ".join(f"{k} {earlier.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise self._refuse(f"holds results of other settings ({what})")

    def _check_shown(self, shown: dict[str, Any]) -> None:
        """No settings record: compare what the records show with what this run writes."""
        record = self.settings_path().name
        checked = sorted(k for k in shown if k in self.shown)
        changed = [k for k in checked if self.shown[k] != shown[k]]
        if changed:
            what = ", ".join(f"{k} {self.shown[k]!r} -> {shown[k]!r}" for k in changed)
            raise self._refuse(f"holds results of other settings ({what}, as its results show; its"
                               f" settings record {record} is missing)")
        agree = f"its results agree on {', '.join(checked)}, but " if checked else ""
        warn(f"{self.path}: no record of the settings that wrote it ({record}); {agree}the other"
             " settings cannot be checked: resuming by input, mode and start time")

    def expect_csv_rows(self, rows: int) -> None:
        """Each result is ``rows`` CSV rows: a last result with fewer (a run killed mid-write)
        is not done; it is cut off at the first append and redone. Call before ``is_done``."""
        tail = self._tail
        if self.fmt != "csv" or tail is None or tail.rows >= rows or self._cut == tail.offset:
            return
        self._drop_tail()
        warn(f"{self.path}: the last result has {tail.rows} of its {rows} rows (from an interrupted"
             " run); it is redone")

    def _open(self) -> Any:
        """The file, opened for appending on the first result (a job that fails before any
        result leaves no empty file behind)."""
        if self._file is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._cut_tail()
            new = not self.path.exists() or self.path.stat().st_size == 0
            if new and self._settings is not None:
                fsio.write_json(self.settings_path(), self._settings)
            self._file = open(self.path, "a", newline="", encoding="utf-8")
            if self.fmt == "csv" and new:
                csv.writer(self._file).writerow(self.columns)
        return self._file

    def _cut_tail(self) -> None:
        """Cut what an interrupted run left half-written, now that a result follows it."""
        assert self.path is not None
        if self._cut is None:
            return
        with open(self.path, "rb+") as f:
            # Only the file as it was read: if it grew since, another process (a shard) is
            # appending to it, and the end it wrote meanwhile is not ours to cut.
            if os.fstat(f.fileno()).st_size == self._size_read:
                f.truncate(self._cut)
        self._cut = None

    def _drop_tail(self) -> None:
        """Redo the last result of a CSV file: cut it off before the first append."""
        assert self._tail is not None
        self._cut = self._tail.offset
        if not self._tail.seen_before:
            self.done.discard(self._tail.key)

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
        data = path.read_bytes()
        self._size_read = len(data)
        # a last line without its newline is a job killed mid-write: read the lines before it
        whole = data[: data.rfind(b"\n") + 1]
        partial = data[len(whole):]
        try:
            text = whole.decode("utf-8")
        except UnicodeDecodeError:
            kind = "CSV" if self.fmt == "csv" else "JSON-lines"
            raise self._refuse(f"is not a UTF-8 {kind} file") from None
        header = (",".join(self.columns) + "\r\n").encode("utf-8")
        if not text and self.fmt == "csv" and header.startswith(partial):
            self._cut = 0  # killed while writing the header: the file holds no result yet
            return
        if self.fmt == "csv":
            self._read_csv(path, text, partial)
        else:
            self._read_jsonl(path, text)
            if partial and not partial.lstrip().startswith(b"{"):  # not a cut record: not ours to cut
                raise self._refuse(f"is not a JSON-lines file (line {text.count(chr(10)) + 1})")
        if partial:
            if self._cut is None:
                self._cut = len(whole)
            warn(f"{path}: dropped an incomplete last line (from an interrupted run); its result is redone")

    def _read_jsonl(self, path: Path, text: str) -> None:
        for n, line in enumerate(io.StringIO(text), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise self._refuse(f"is not a JSON-lines file (line {n})") from None
            if not isinstance(rec, dict):
                raise self._refuse(f"is not a JSON-lines file of `{self.command}` results (line {n})")
            self._mark_done(rec, f"{path}:{n}")

    def _read_csv(self, path: Path, text: str, partial: bytes) -> None:
        rows = _csv_rows(text)
        header = next(rows, None)
        if header is None or header[1] != self.columns:
            found = "" if header is None else ",".join(header[1])
            raise self._refuse(f"has the columns {found}, not those of `{self.command}` ({','.join(self.columns)})")
        earlier: set[Hashable] = set()  # the keys of the rows before the last result's
        key: Hashable = None
        offset = count = 0
        for n, (start, row) in enumerate(rows, 2):
            rec = dict(zip(self.columns, row, strict=False))  # a short row lacks its key: refused
            row_key = self._mark_done(rec, f"{path}:{n}")
            if count and row_key == key:
                count += 1
                continue
            if count:
                earlier.add(key)
            key, offset, count = row_key, start, 1
        if not count:
            return
        self._tail = _Tail(key, len(text[:offset].encode("utf-8")), count, key in earlier)
        # The half-written line is a row of the last result unless its key (the fields before
        # its last, maybe cut, one) shows that it began another: then the last one is whole.
        try:
            cut_row = next(csv.reader([partial.decode("utf-8", "ignore")]), [])
            began_another = self.key(dict(zip(self.columns, cut_row[:-1], strict=False))) != key
        except (csv.Error, KeyError, TypeError, ValueError):  # too little of it to tell
            began_another = False
        if partial and not began_another:
            self._drop_tail()

    def _mark_done(self, rec: dict[str, Any], where: str) -> Hashable:
        """Count ``rec`` as done; its key."""
        try:
            key = self.key(rec)
        except (KeyError, TypeError, ValueError):
            raise CavmaeError(
                f"{where} is not a `{self.command}` result (written by another command or an older"
                " cavmae); choose another -o"
            ) from None
        self.done.add(key)
        if self.shows is not None:
            for name, value in self.shows(rec).items():
                if name not in self.shown or value > self.shown[name]:
                    self.shown[name] = value
        path = rec.get("path")
        if not self._warned_relative and isinstance(path, str) and not is_remote(path) and not Path(path).is_absolute():
            self._warned_relative = True  # once per file: every record of such a file is relative
            warn(f"{self.path}: written by an older cavmae, with input paths as typed; they are read"
                 " relative to this folder")
        return key

    # -- writing -------------------------------------------------------------------------------
    def is_done(self, record: dict[str, Any]) -> bool:
        """Whether an earlier run wrote the result identified by ``record``'s key fields."""
        return self.path is not None and self.key(record) in self.done

    def write(self, record: dict[str, Any], csv_rows: Sequence[Sequence[Any]] = ()) -> None:
        """Add one result: ``record`` to JSON files, ``csv_rows`` (one or more) to a CSV file.
        A ``path`` field or column is written as :func:`stored_path`."""
        if self.path is None:
            return
        if "path" in record:
            record = {**record, "path": stored_path(record["path"])}
        self.done.add(self.key(record))
        if self.fmt == "csv":
            if "path" in self.columns and "path" in record:
                at = self.columns.index("path")
                csv_rows = [[*row[:at], record["path"], *row[at + 1:]] for row in csv_rows]
            # One write, then one flush: a result's rows reach the file together, never a part
            # of them left in the buffer when the job is stopped.
            text = io.StringIO()
            csv.writer(text).writerows(csv_rows)
            self._open().write(text.getvalue())
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


def _csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """The rows of CSV ``text`` with the offset (in characters) where each begins; blank lines
    are skipped. The reader takes one physical line at a time, so the characters it has taken
    when a row comes out are exactly those up to that row's end."""
    taken = 0

    def lines() -> Iterator[str]:
        nonlocal taken
        for line in io.StringIO(text, newline=""):
            taken += len(line)
            yield line

    start = 0
    for row in csv.reader(lines()):
        if row:
            yield start, row
        start = taken
