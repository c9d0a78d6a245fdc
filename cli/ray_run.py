"""``--ray`` for ``cavmae classify`` and ``cavmae embed``: the same results, computed on Ray Data.

The commands keep their options and output; this module builds the Ray pipeline of
:mod:`cavmae.runtime.ray_data`, consumes its rows in the driver and writes them through the
commands' own writers (``-o`` result files, the index writer), plus ``.parquet`` results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from cavmae.errors import CavmaeError
from cavmae.filetypes import is_remote

from .common import EXIT_INPUT_FAILED, default_model, echo, progress, warn_skipped
from .results import stored_path

#: ``--ray`` given without an address
LOCAL = "local"


def ray_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--ray [ADDRESS]``, ``--ray-actors N``, ``--ray-gpus-per-actor F``."""
    f = click.option("--ray-gpus-per-actor", type=click.FloatRange(0), default=0.0, show_default=True,
                     help="GPUs per model actor with --ray (0: the actors run on CPU).")(f)
    f = click.option("--ray-actors", type=click.IntRange(1), default=None,
                     help="Model actors with --ray [default: one per GPU, else one per 2 CPUs].")(f)
    f = click.option("--ray", "ray_address", is_flag=False, flag_value=LOCAL, default=None,
                     metavar="[ADDRESS]", callback=_check_address,
                     help="Run on Ray Data: alone a new local Ray, 'auto' the running cluster,"
                          " HOST:PORT or ray://HOST:10001 a remote one (give it after the inputs).")(f)
    return f


def _check_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--ray``'s value: none (a local Ray), ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``.

    ``--ray`` given before the inputs takes the first input as its address; that is refused
    here, before anything loads, rather than failing to connect to a file name.
    """
    if value is None or value in (LOCAL, "auto"):
        return value
    scheme, sep, _ = value.partition("://")
    looks_like_input = Path(value).exists() or (bool(sep) and scheme != "ray") or ":" not in value
    if looks_like_input:
        raise click.BadParameter(
            f"{value!r} is not a Ray address (auto, HOST:PORT or ray://HOST:10001); give --ray"
            " after the inputs, alone for a local Ray", ctx=ctx, param=param)
    return value


@dataclass(frozen=True)
class RaySettings:
    """Where the job runs and how the model actors are sized."""

    address: str
    actors: int | None = None
    gpus_per_actor: float = 0.0

    def init(self) -> None:
        """Start or join Ray; one line on stderr says which and what it has."""
        from cavmae.runtime import ray_data

        what = ray_data.init_ray(None if self.address == LOCAL else self.address)
        echo(f"ray: {what}", err=True)

    def spec(self, model: str | None, engine: str, device: str, **kw: Any) -> Any:
        """What each actor loads: the model by an absolute path or its registry name."""
        from cavmae.runtime.ray_data import ModelSpec

        ref = model or default_model()
        if Path(ref).exists():
            ref = str(Path(ref).resolve())
        if device == "auto":
            device = "cuda" if self.gpus_per_actor > 0 else "cpu"
        return ModelSpec(ref, engine=engine, device=device, **kw)


# -- classify -----------------------------------------------------------------------------------
class ParquetResults:
    """``-o results.parquet``: one row per clip or window (path, mode, offset, duration, end,
    the top-k indexes, labels and scores as lists, ``scores`` [C] with ``--all-scores``, and
    ``error``: empty, or why the file failed, for an error row with empty top-k lists).

    Parquet cannot be appended to: the file is written whole when the job ends (rows of an
    earlier run carried over, so a re-run skips them and adds the rest). Error rows are not
    done: a re-run tries their files again, and a file's new rows replace its old error rows.
    """

    def __init__(self, path: Path, all_scores: bool) -> None:
        self.path, self.all_scores = path, all_scores
        self.rows: list[dict[str, Any]] = []
        self.done: set[Hashable] = set()
        self._old_errors: dict[str, list[dict[str, Any]]] = {}  # resolved path -> its rows
        if path.is_dir():
            raise CavmaeError(f"-o {path} is a folder; give a file name ending in .parquet")
        if path.exists() and path.stat().st_size:
            self._read_existing(path)

    def _read_existing(self, path: Path) -> None:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception:
            raise CavmaeError(f"{path} is not a Parquet file; choose another -o") from None
        names = set(table.column_names)
        if not {"path", "mode", "offset", "top_index"} <= names:
            raise CavmaeError(f"{path} is not a `cavmae classify` result; choose another -o")
        if ("scores" in names) != self.all_scores:
            had = "has" if "scores" in names else "has no"
            raise CavmaeError(f"{path} {had} every class's score: run again"
                              f" {'with' if 'scores' in names else 'without'} --all-scores,"
                              " or choose another -o")
        for r in table.to_pylist():
            r.setdefault("error", "")
            if r["error"]:
                self._old_errors.setdefault(_resolved(r["path"]), []).append(r)
            else:
                self.rows.append(r)
        self.done = {self.key(r) for r in self.rows}

    def _schema(self) -> Any:
        import pyarrow as pa

        fields = [("path", pa.string()), ("mode", pa.string()), ("offset", pa.float64()),
                  ("duration", pa.float64()), ("end", pa.float64()),
                  ("top_index", pa.list_(pa.int64())), ("top_label", pa.list_(pa.string())),
                  ("top_score", pa.list_(pa.float64()))]
        if self.all_scores:
            fields.append(("scores", pa.list_(pa.float64())))
        return pa.schema([*fields, ("error", pa.string())])

    @staticmethod
    def key(record: dict[str, Any]) -> Hashable:
        from .results import result_key

        return result_key({**record, "start": record.get("start", record.get("offset"))})

    def is_done(self, record: dict[str, Any]) -> bool:
        return self.key(record) in self.done

    def write(self, record: dict[str, Any], csv_rows: Sequence[Sequence[Any]] = ()) -> None:
        top = record["top"]
        row = {"path": stored_path(record["path"]), "mode": record["mode"], "offset": float(record["start"]),
               "duration": round(record["end"] - record["start"], 3), "end": record["end"],
               "top_index": [t["index"] for t in top], "top_label": [t["label"] for t in top],
               "top_score": [t["score"] for t in top], "error": ""}
        if self.all_scores:
            row["scores"] = record["scores"]
        self._old_errors.pop(_resolved(row["path"]), None)
        self.rows.append(row)
        self.done.add(self.key(record))

    def write_error(self, path: str, mode: str, offset: float, reason: str) -> None:
        """The row of a clip that could not be classified (NaN times, empty lists)."""
        row = {"path": stored_path(path), "mode": mode, "offset": float(offset), "duration": math.nan,
               "end": math.nan, "top_index": [], "top_label": [], "top_score": [],
               "error": reason}
        if self.all_scores:
            row["scores"] = None
        self._old_errors.pop(_resolved(path), None)
        self.rows.append(row)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from cavmae import fsio

        rows = self.rows + [r for old in self._old_errors.values() for r in old]
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=self._schema())
        with fsio.atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)


def _resolved(path: str) -> str:
    from .results import result_key

    return str(result_key({"path": path}, ("path",))[0])


def classify(settings: RaySettings, *, files: Sequence[str | Path], pipe: Any, spec: Any, mode: str,
             window: float | None, hop: float | None, offset: float, writer: Any,
             emit: Callable[[Any], None]) -> list[tuple[str, str]]:
    """Classify ``files`` on Ray; ``emit(prediction)`` writes and prints each result in the
    driver. Returns the failed (path, reason) pairs."""
    from cavmae.runtime import ray_data
    from cavmae.runtime.pipeline import Prediction

    settings.init()
    done = writer.done if getattr(writer, "path", None) is not None else set()
    ds = ray_data.from_paths([str(f) for f in files])  # listed by the driver already
    ds = ray_data.plan_clips(ds, modes=pipe.classify_modes, mode=mode, window=window, hop=hop,
                             offset=offset, done=done)
    ds = ray_data.decode_clips(ds, pipe.manifest.preprocess)
    ds = ray_data.classify_clips(ds, spec, actors=settings.actors,
                                 gpus_per_actor=settings.gpus_per_actor)
    failed: list[tuple[str, str]] = []
    try:
        unit = "window" if window is not None else "clip"  # a row is one window of a file then
        for row in progress(ds.iter_rows(), total=None, desc="classify", unit=unit):
            if row["error"]:
                failed.append((row["path"], row["error"]))
                warn_skipped(row["path"], row["error"])
                if isinstance(writer, ParquetResults):
                    writer.write_error(row["path"], row["mode"], float(row["offset"]), row["error"])
                continue
            emit(Prediction(probs=row["probs"], labels=pipe.labels, path=row["path"],
                            offset=float(row["offset"]), end=float(row["end"]), mode=row["mode"]))
    finally:
        writer.close()
    # one failure per file (a file's windows fail together at its probe)
    seen: dict[str, str] = {}
    for path, why in failed:
        seen.setdefault(path, why)
    return list(seen.items())


def finish(failed: Sequence[tuple[str, str]], total: int, already_done: int | None = 0) -> None:
    """Report the failed inputs at the end, as without ``--ray``: exit 2 when any failed.
    ``already_done``: the inputs an earlier run had done (skipped), None when not counted."""
    if not failed:
        return
    if total == 1:
        raise CavmaeError(failed[0][1])
    click.echo(f"{len(failed)} of {total} inputs failed{_the_others(total - len(failed), already_done)}", err=True)
    click.get_current_context().exit(EXIT_INPUT_FAILED)


def _the_others(others: int, already_done: int | None) -> str:
    """What happened to the inputs that did not fail: classified, or done by an earlier run."""
    if not others:
        return ""
    if already_done is None:
        return "; the others were classified or done already"
    already_done = min(already_done, others)
    classified = others - already_done
    if not already_done:
        return "; the others were classified"
    if not classified:
        return f"; {already_done} done already (skipped)"
    return f"; {classified} classified, {already_done} done already (skipped)"


# -- embed --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayEmbed:
    """``cavmae embed --ray``: the model the actors load; :meth:`results` replaces the local
    decode-and-embed loop, the index writer stays in the driver (the same index format)."""

    settings: RaySettings
    model: str | None
    engine: str
    device: str

    def results(self, pipe: Any, todo: Sequence[Path | str], writer: Any) -> Iterator[Any]:
        """Embed ``todo`` on Ray and append to ``writer``; one ``FileResult`` per path."""
        from cavmae.runtime import ray_data
        from cavmae.runtime.index import FileResult, file_stamp

        self.settings.init()
        spec = self.settings.spec(self.model, self.engine, self.device, num_frames=pipe.num_frames,
                                  frame=writer.meta["frame"])
        ds = ray_data.from_paths([str(p) for p in todo])  # listed by the driver already
        ds = ray_data.plan_clips(ds, modes=(), mode="embed")
        ds = ray_data.decode_clips(ds, pipe.manifest.preprocess)
        ds = ray_data.embed_clips(ds, spec, actors=self.settings.actors,
                                  gpus_per_actor=self.settings.gpus_per_actor)
        for row in ds.iter_rows():
            path: Path | str = row["path"] if is_remote(row["path"]) else Path(row["path"])
            if row["error"]:
                yield FileResult(path, error=row["error"])
                continue
            a, v, duration = row["audio_embedding"], row["visual_embedding"], row["clip_duration"]
            a = None if np.isnan(a).any() else a  # NaN: the file has no such stream
            v = None if np.isnan(v).any() else v
            try:  # what a later run compares to tell that the file changed (a local file)
                stamp = {} if isinstance(path, str) else file_stamp(path)
            except OSError:
                stamp = {}
            r = writer.add(path, a, v, duration=None if math.isnan(duration) else float(duration), **stamp)
            yield FileResult(path, row=r, has_audio=a is not None, has_video=v is not None)
