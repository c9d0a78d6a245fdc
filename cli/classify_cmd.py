"""``cavmae classify``: top-k audio-visual labels for videos, one clip or sliding windows."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import click

from cavmae.errors import CavmaeError, MediaError
from cavmae.runtime.classify_records import (
    classification_record,
    classification_rows,
    window_end,
    window_offsets,
)

from .common import (
    EXIT_INPUT_FAILED,
    echo_json,
    expand_inputs,
    model_options,
    open_pipeline,
    parse_shard,
    progress,
    select_shard,
    warn,
)


class ResultWriter:
    """Appends one record per prediction to ``-o`` (JSON lines or CSV), flushing each, and
    knows which (path, offset) pairs an earlier run already wrote, so a re-run skips them."""

    def __init__(self, path: Path | None, fmt: str, header: list[str]) -> None:
        self.path, self.fmt, self.header = path, fmt, header
        self.done: set[tuple[str, float]] = set()
        self._file: Any = None
        if path is None:
            return
        if path.exists() and path.stat().st_size:
            self._read_done(path)
        new = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="", encoding="utf-8")
        if fmt == "csv" and new:
            csv.writer(self._file).writerow(header)
            self._file.flush()

    def _read_done(self, path: Path) -> None:
        with open(path, newline="", encoding="utf-8") as f:
            if self.fmt == "csv":
                rows = csv.DictReader(f)
                if rows.fieldnames is None or "path" not in rows.fieldnames or "start" not in rows.fieldnames:
                    raise CavmaeError(f"{path} is not a results CSV of this command; choose another -o")
                for row in rows:
                    self.done.add((row["path"], float(row["start"])))
            else:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        self.done.add((rec["path"], float(rec["start"])))
                    except (ValueError, KeyError):
                        # a line cut by a kill mid-write: ignore it, the item is redone
                        warn(f"{path}:{n}: ignoring an incomplete line")

    def write(self, record: dict[str, Any], csv_rows: list[list[Any]]) -> None:
        if self._file is None:
            return
        if self.fmt == "csv":
            csv.writer(self._file).writerows(csv_rows)
        else:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True)
@model_options()
@click.option("-k", "--top-k", default=5, show_default=True, type=click.IntRange(1), help="Labels to show per clip.")
@click.option("--mode", type=click.Choice(["auto", "av", "audio", "visual"]), default="auto", show_default=True,
              help="Modalities to use; auto = audio-visual when the model supports it.")
@click.option("--frames", default=10, show_default=True, type=click.IntRange(1), help="Frames aggregated per clip.")
@click.option("--window", type=click.FloatRange(0, 10, min_open=True), default=None,
              help="Sliding windows of this many seconds over the whole video (max 10).")
@click.option("--hop", type=click.FloatRange(0, min_open=True), default=None, help="Window hop in seconds [default: window/2].")
@click.option("--offset", type=click.FloatRange(0), default=0.0, show_default=True, help="Start of the clip (without --window).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None,
              help="Label CSV (index,mid,display_name) replacing the model's label names.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per clip/window.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows.")
@click.option("--all-scores", is_flag=True, help="Include every class's score in JSON/CSV output.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append results here as they come (JSON lines, or CSV with --csv); a re-run skips done items.")
@click.option("--shard", default=None, help="Process shard i/n of the inputs (or 'auto' under torchrun).")
def classify(inputs, model, engine, device, mirror, top_k, mode, frames, window, hop, offset, labels_csv,
             as_json, as_csv, all_scores, output, shard) -> None:
    """Classify videos (files, folders or globs): top-k labels with scores.

    \b
    Examples:
      cavmae classify video.mp4
      cavmae classify clips/ --json -o results.jsonl
      cavmae classify long.mp4 --window 10 --hop 5 --csv
      cavmae classify talk.wav --mode audio -m as-46.6-audio
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    if hop is not None and window is None:
        raise click.UsageError("--hop needs --window")
    files = select_shard(expand_inputs(inputs), parse_shard(shard), key=lambda p: str(p.resolve()))
    pipe = open_pipeline(model, engine, device, mirror, num_frames=frames)
    names = _label_names(pipe, labels_csv)
    mode = _choose_mode(pipe, mode)
    fmt = "csv" if as_csv else "jsonl"
    header = ["path", "start", "end", "rank", "index", "label", "score"]
    writer = ResultWriter(output, fmt, header)
    stdout_csv = csv.writer(sys.stdout) if as_csv else None
    if stdout_csv:
        stdout_csv.writerow(header)
    failed: list[tuple[Path, str]] = []
    try:
        for path in progress(files, total=len(files), desc="classify"):
            try:
                offsets = [offset]
                span = None
                if window is not None:
                    from cavmae.media import probe

                    span = window
                    offsets = window_offsets(probe(path).duration, window, hop or window / 2)
                for start in offsets:
                    if (str(path), start) in writer.done:
                        continue
                    pred = _classify_one(pipe, path, mode, start, span)
                    record, rows = _record(path, start, span, pred, names, top_k, all_scores)
                    writer.write(record, rows)
                    _print(record, rows, as_json, stdout_csv, show_time=window is not None or start > 0)
            except MediaError as e:
                failed.append((path, str(e)))
                warn(f"skipped {path}: {e}")
    finally:
        writer.close()
    if failed:
        click.echo(f"{len(failed)} of {len(files)} inputs failed; the others were classified", err=True)
        sys.exit(EXIT_INPUT_FAILED)


def _classify_one(pipe, path: Path, mode: str, start: float, span: float | None):
    from cavmae.media import load_clip
    from cavmae.runtime.pipeline import Prediction

    clip = load_clip(path, num_frames=pipe.num_frames, offset=start, config=pipe.manifest.preprocess,
                     need_audio=mode in ("av", "audio"), need_video=mode in ("av", "visual"), duration=span)
    probs = pipe.classify(clip.audio, clip.frames, mode)
    return Prediction(probs=probs, labels=pipe.labels, path=str(path), offset=start), clip


def _label_names(pipe, labels_csv: str | None) -> tuple[str, ...]:
    num_classes = pipe.manifest.model_config.num_classes
    if labels_csv:
        from cavmae.labels import read_label_csv

        names = read_label_csv(labels_csv).names
        if len(names) != num_classes:
            raise CavmaeError(f"{labels_csv} has {len(names)} labels but the model has {num_classes} classes")
        return names
    return pipe.labels or tuple(f"class {i}" for i in range(num_classes))


def _choose_mode(pipe, mode: str) -> str:
    if pipe.manifest.model_kind != "classifier":
        raise CavmaeError(
            "this is a pre-training model without a classification head; classify with a fine-tuned"
            " model such as as-full-51.2 (see `cavmae models`)"
        )
    supported = pipe.classify_modes
    if mode == "auto":
        return supported[0]
    if mode not in supported:
        raise CavmaeError(f"this model cannot classify with --mode {mode}; it supports: {', '.join(supported)}")
    return mode


def _record(path: Path, start: float, span: float | None, result, names, top_k: int, all_scores: bool):
    pred, clip = result
    end = window_end(start, span, clip.duration)
    record = classification_record(str(path), start, end, pred.probs, names, top_k, all_scores)
    return record, classification_rows(record, names)


def _print(record, rows, as_json: bool, stdout_csv, show_time: bool) -> None:
    if as_json:
        echo_json(record)
    elif stdout_csv is not None:
        stdout_csv.writerows(rows)
    else:
        buf = io.StringIO()
        when = f" [{record['start']:.1f}-{record['end']:.1f} s]" if show_time else ""
        buf.write(f"{record['path']}{when}\n")
        for t in record["top"]:
            buf.write(f"  {t['score']:.3f}  {t['label']}\n")
        click.echo(buf.getvalue(), nl=False)
