"""``cavmae classify``: top-k audio-visual labels for videos, one clip or sliding windows.

Over several inputs the next clips are decoded on threads while the model runs on the current
one (:func:`cavmae.runtime.classify_records.classify_files`); results come in input order.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from cavmae import fsio
from cavmae.errors import CavmaeError, MissingStreamError
from cavmae.modes import AUTO, CLI_MODES
from cavmae.runtime.classify_records import (
    HEADER,
    classification_record,
    classification_rows,
    classify_files,
    label_names,
    min_hop,
    min_window,
    record_shows,
    rows_per_record,
    shown_settings,
)

from . import ray_run
from .common import (
    FRAMES,
    echo,
    echo_json,
    expand_inputs,
    model_options,
    open_pipeline,
    parse_shard,
    progress,
    ray_inputs,
    select_shard,
    warn_skipped,
)
from .ray_run import ParquetResults, RaySettings, ray_options
from .results import ResultWriter, stored_path


class _Seconds(click.FloatRange):
    """A range of seconds that refuses NaN and infinity too (NaN passes every comparison of a
    range check, and an infinite hop makes NaN window starts); ``below``: why a value under
    the minimum is refused, said instead of the bare range."""

    def __init__(self, low: float, high: float | None = None, *, min_open: bool = False,
                 below: str | None = None) -> None:
        super().__init__(low, high, min_open=min_open)
        self.below = below

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number of seconds.", param, ctx)
        if self.below is not None and self.min is not None and number < self.min:
            self.fail(f"{number:g} s is {self.below}.", param, ctx)
        return super().convert(number, param, ctx)


class _Terminated(KeyboardInterrupt):
    """SIGTERM during the run: it stops the run the way Ctrl-C does, so what is done is saved."""


@contextlib.contextmanager
def _sigterm_stops_the_run() -> Iterator[None]:
    """Within: SIGTERM raises :class:`_Terminated` (by default it would kill the process before
    ``-o`` is written, losing a ``.json`` file's results). The previous handler is restored
    after. Signal handlers can only be set in the main thread: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: exit status after SIGTERM: 128 + the signal's number, as a shell reports a process it killed
EXIT_TERMINATED = 128 + int(signal.SIGTERM)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True)
@model_options(precision=True)
@click.option("-k", "--top-k", default=5, show_default=True, type=click.IntRange(1), help="Labels to show per clip.")
@click.option("--mode", type=click.Choice([AUTO, *CLI_MODES]), default=AUTO, show_default=True,
              help="Modalities to use. auto: per file, audio-visual where the model and the file allow,"
                   " else the stream the file has (with a note on stderr).")
@click.option("--frames", default=None, type=FRAMES,
              help="Frames aggregated per clip [default: 10; an export directory's own].")
@click.option("--window", type=_Seconds(min_window(), 10, below=f"shorter than one audio frame (at least {min_window():g} s)"),
              default=None, help="Sliding windows of this many seconds over the whole video (max 10); see below.")
@click.option("--hop", type=_Seconds(min_hop(), below=f"shorter than the audio frame shift (at least {min_hop():g} s)"),
              default=None,
              help="Seconds between window starts [default: window/2].")
@click.option("--offset", type=_Seconds(0), default=0.0, show_default=True, help="Start of the clip (without --window).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None,
              help="Label CSV (index,mid,display_name) replacing the model's label names.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per clip/window.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows.")
@click.option("--all-scores", is_flag=True,
              help="Include every class's score: JSON records keep the top -k classes and add 'scores';"
                   " CSV gives one row per class instead (rank left empty, -k not used).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write results here as they come, in the format of its ending (.csv, .jsonl, or .json"
                   " rewritten whole); a re-run skips the clips and modes already in it.")
@click.option("--shard", default=None, help="Process shard i/n of the inputs (or 'auto' under torchrun).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0),
              help="Threads decoding the next clips while the model runs (0: decode in the main thread).")
@ray_options
def classify(inputs, model, engine, device, mirror, precision, top_k, mode, frames, window, hop, offset, labels_csv,
             as_json, as_csv, all_scores, output, shard, workers, ray_address, ray_actors,
             ray_gpus_per_actor) -> None:
    """Classify videos (files, folders or globs): top-k labels with scores.

    Audio files and videos without sound are classified with the one stream they have when the
    model supports it (--mode auto); images are classified as silent one-frame videos.

    Windows (--window W --hop H) start at 0, H, 2H, ... as long as they fit in the media; one
    more window, ending at the end, is added only when the tail left uncovered is longer than
    H/2 (30.02 s with --window 10 --hop 5: 0, 5, 10, 15, 20). Media no longer than W gets one
    window.

    Over many inputs the next clips are decoded on --workers threads while the model runs on
    the current one; at most workers + 1 clips (3 by default) are in memory at once.

    \b
    Examples:
      cavmae classify video.mp4
      cavmae classify clips/ --json -o results.jsonl
      cavmae classify long.mp4 --window 10 --hop 5 --csv
      cavmae classify talk.wav --mode audio -m as-46.6-audio
      cavmae classify clips/ --precision int8 --json -o results.jsonl
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    if hop is not None and window is None:
        raise click.UsageError("--hop needs --window")
    if offset and window is not None:
        raise click.UsageError("--offset picks one clip; --window covers the whole file from 0 s (drop one)")
    # with --ray, lists of paths and s3:// or gs:// inputs too, listed here so a re-run skips what is done
    listed: list[Any] = [*(ray_inputs(inputs) if ray_address is not None else expand_inputs(inputs))]
    files = select_shard(listed, parse_shard(shard), key=stored_path)
    # checked before the model loads: a wrong -o fails in a second, and writes nothing
    if ray_address is not None and output is not None and output.suffix.lower() == ".parquet":
        writer: Any = ParquetResults(output, all_scores)
    else:
        writer = ResultWriter(output, HEADER, requested="csv" if as_csv else "json" if as_json else None,
                              command="cavmae classify", shared=parse_shard(shard)[1] > 1, shows=record_shows)
    # what a result depends on beyond its key (path, mode, start): a re-run must match it; what
    # the flags decide is checked now, so a refused re-run neither loads nor exports the model
    kept = _flag_settings(writer, labels_csv, window=window, top_k=top_k, all_scores=all_scores, frames=frames,
                          precision=precision if engine != "torch" else None)  # torch: autocast, not the export's
    # --labels replaces the model's names inside load(), so no label file is downloaded then
    pipe = open_pipeline(model, engine, device, mirror, num_frames=frames, labels=labels_csv,
                         task="classify", precision=precision)
    mode = _choose_mode(pipe, mode)
    if isinstance(writer, ResultWriter):
        source = pipe.manifest.source
        kept.update(model=source.get("sha256") or source.get("checkpoint") or str(model),
                    precision=pipe.manifest.precision, frames=pipe.manifest.num_frames)
        names = label_names(pipe)
        writer.bind_settings(kept, older={"labels": [labels_csv]} if labels_csv else None,
                             shown=shown_settings(len(names), top_k, all_scores, writer.fmt))
        writer.expect_csv_rows(rows_per_record(len(names), top_k, all_scores))
    out = _Output(writer, label_names(pipe), top_k, all_scores, as_json,
                  csv.writer(sys.stdout) if as_csv else None, windows=window is not None)
    if out.stdout_csv:
        out.stdout_csv.writerow(HEADER)
    if ray_address is not None:  # the same results, computed on Ray Data (cli/ray_run.py)
        settings = RaySettings(ray_address, ray_actors, ray_gpus_per_actor)
        done_before = bool(writer.done)  # the inputs done already are not counted on Ray
        ray_run.finish(ray_run.classify(settings, files=files, pipe=pipe, spec=settings.spec(
            model, engine, device, num_frames=pipe.manifest.num_frames, precision=precision), mode=mode, window=window, hop=hop,
            offset=offset, writer=writer, emit=out.emit), len(files), None if done_before else 0)
        return
    try:
        with _sigterm_stops_the_run():
            failed, already_done = _classify_local(pipe, files, _Clips(mode, offset, window, hop), out, workers)
    except _Terminated:
        writer.close()  # before the message: it says the results are saved
        saved = f"; the results so far are in {output}" if output is not None else ""
        echo(f"Terminated{saved}.", err=True)
        raise click.exceptions.Exit(EXIT_TERMINATED) from None
    finally:
        writer.close()
    if already_done:
        echo(f"{already_done} of {len(files)} inputs already in {output}: skipped", err=True)
    ray_run.finish(failed, len(files), already_done)  # the same report with and without --ray


def _flag_settings(writer: Any, labels_csv: str | None, *, window: float | None, top_k: int, all_scores: bool,
                   frames: int | None, precision: str | None) -> dict[str, Any]:
    """The settings of ``-o``'s results that the flags decide, checked against the file's record
    now, before the model loads (``frames``, ``precision``: None where the model decides them).
    ``labels``: the label file by content, so the same file named another way (./l.csv,
    $PWD/l.csv) is the same setting and an edited one is not; an older cavmae recorded the name
    as typed, which still matches (and the record is updated)."""
    if not isinstance(writer, ResultWriter) or writer.path is None:
        return {}
    known: dict[str, Any] = {"window": window, "top_k": top_k, "all_scores": all_scores}
    known.update({k: v for k, v in (("frames", frames), ("precision", precision)) if v is not None})
    if labels_csv is None:
        known["labels"] = None
    elif Path(labels_csv).is_file():  # else load() says what is wrong with it
        known["labels"] = f"sha256:{fsio.sha256_file(labels_csv)}"
    writer.check_settings(known, older={"labels": [labels_csv]} if labels_csv else None)
    return known


@dataclass(frozen=True)
class _Clips:
    """Which clips of each file: ``--mode`` (or auto), ``--offset``, ``--window``/``--hop``."""

    mode: str
    offset: float
    window: float | None
    hop: float | None


@dataclass(frozen=True)
class _Output:
    """Where each result goes: the ``-o`` writer and stdout (plain, ``--json`` or ``--csv``)."""

    writer: Any
    names: tuple[str, ...]
    top_k: int
    all_scores: bool
    as_json: bool
    stdout_csv: Any
    windows: bool

    def emit(self, pred) -> None:
        """Write one prediction to ``-o`` and print it."""
        record, rows = _record(pred, self.names, self.top_k, self.all_scores)
        self.writer.write(record, rows)
        _print(record, rows, self.as_json, self.stdout_csv, show_time=self.windows or pred.offset > 0)


def _classify_local(pipe, files: list[Path], clips: _Clips, out: _Output,
                    workers: int) -> tuple[list[tuple[str, str]], int]:
    """Classify ``files`` in this process, decoding ahead on ``workers`` threads
    (:func:`~cavmae.runtime.classify_records.classify_files`); results are written and printed
    in input order. Returns the failed (path, reason) pairs and how many inputs were done already."""
    failed: list[tuple[str, str]] = []
    already_done = 0  # inputs whose every result an earlier run wrote to -o
    outcomes = classify_files(pipe, files, mode=clips.mode, offset=clips.offset, window=clips.window,
                              hop=clips.hop, is_done=out.writer.is_done, workers=workers)
    with contextlib.closing(outcomes):
        for path in progress(files, total=len(files), desc="classify", unit="clip"):
            for got in outcomes:  # this file's outcomes: every input has at least one, the last marked
                if got.job.note:
                    echo(f"note: {got.job.note} (--mode {got.job.mode})", err=True)
                if got.error is not None:
                    error = got.error
                    if isinstance(error, MissingStreamError):
                        error = error.with_hint(_missing_hint(pipe, error.stream or ""))
                    failed.append((str(path), str(error)))
                    if len(files) > 1:
                        warn_skipped(path, str(error))
                elif got.prediction is None:
                    already_done += 1
                else:
                    out.emit(got.prediction)
                if got.last:
                    break
    return failed, already_done


def _choose_mode(pipe, mode: str) -> str:
    """``--mode`` checked against the model: a mode it supports, or ``auto`` (decided per file)."""
    if pipe.manifest.model_kind != "classifier":
        raise CavmaeError(
            "this is a pre-training model without a classification head; classify with a fine-tuned"
            " model such as as-full-51.2 (see `cavmae models`)"
        )
    supported = pipe.classify_modes
    if mode != AUTO and mode not in supported:
        raise CavmaeError(f"this model cannot classify with --mode {mode}; it supports: {', '.join(supported)}"
                          f" (or --mode {AUTO})")
    return mode


def _missing_hint(pipe, stream: str) -> str:
    """What to do about a file without ``stream`` (``audio``/``video``), in this command's flags."""
    from cavmae.modes import modes_without

    others = modes_without(pipe.classify_modes, stream)
    if others:
        return f"classify it with --mode {others[0]} (or --mode {AUTO})"
    track = "a sound track" if stream == "audio" else "a video track"
    only = "/".join(pipe.classify_modes)
    return (f"this model classifies with {only} only: give a file with {track}, or another model"
            " with -m (see `cavmae models`)")


def _record(pred, names, top_k: int, all_scores: bool) -> tuple[dict[str, Any], list[list[Any]]]:
    """The result record of one prediction and its CSV rows (the builder ``cavmae serve`` uses too)."""
    record = classification_record(str(pred.path), pred.mode, pred.offset, pred.end, pred.probs, names,
                                   top_k, all_scores)
    return record, classification_rows(record, names)


def _print(record, rows, as_json: bool, stdout_csv, show_time: bool) -> None:
    """One result on stdout; the helpers used clear the progress bar first, so they never share a line."""
    if as_json:
        echo_json(record)
    elif stdout_csv is not None:
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        echo(buf.getvalue(), nl=False)
    else:
        buf = io.StringIO()
        when = f" [{record['start']:.1f}-{record['end']:.1f} s]" if show_time else ""
        buf.write(f"{record['path']}{when}\n")
        for t in record["top"]:
            buf.write(f"  {t['score']:.3f}  {t['label']}\n")
        echo(buf.getvalue(), nl=False)
