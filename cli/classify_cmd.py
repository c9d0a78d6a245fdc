"""``cavmae classify``: top-k audio-visual labels for videos, one clip or sliding windows."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import click

from cavmae.errors import CavmaeError, MediaError, MissingStreamError
from cavmae.modes import AUTO, CLI_MODES

from .common import (
    EXIT_INPUT_FAILED,
    echo,
    echo_json,
    expand_inputs,
    model_options,
    open_pipeline,
    parse_shard,
    progress,
    select_shard,
    warn,
)
from .results import ResultWriter

#: columns of the CSV output (stdout and -o)
HEADER = ["path", "mode", "start", "end", "rank", "index", "label", "score"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True)
@model_options()
@click.option("-k", "--top-k", default=5, show_default=True, type=click.IntRange(1), help="Labels to show per clip.")
@click.option("--mode", type=click.Choice([AUTO, *CLI_MODES]), default=AUTO, show_default=True,
              help="Modalities to use. auto: per file, audio-visual where the model and the file allow,"
                   " else the stream the file has (with a note on stderr).")
@click.option("--frames", default=10, show_default=True, type=click.IntRange(1), help="Frames aggregated per clip.")
@click.option("--window", type=click.FloatRange(0, 10, min_open=True), default=None,
              help="Sliding windows of this many seconds over the whole video (max 10); see below.")
@click.option("--hop", type=click.FloatRange(0, min_open=True), default=None,
              help="Seconds between window starts [default: window/2].")
@click.option("--offset", type=click.FloatRange(0), default=0.0, show_default=True, help="Start of the clip (without --window).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False), default=None,
              help="Label CSV (index,mid,display_name) replacing the model's label names.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per clip/window.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV rows.")
@click.option("--all-scores", is_flag=True, help="Include every class's score in JSON/CSV output.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write results here as they come, in the format of its ending (.csv, .jsonl, or .json"
                   " rewritten whole); a re-run skips the clips and modes already in it.")
@click.option("--shard", default=None, help="Process shard i/n of the inputs (or 'auto' under torchrun).")
def classify(inputs, model, engine, device, mirror, top_k, mode, frames, window, hop, offset, labels_csv,
             as_json, as_csv, all_scores, output, shard) -> None:
    """Classify videos (files, folders or globs): top-k labels with scores.

    Audio files and videos without sound are classified with the one stream they have when the
    model supports it (--mode auto); images are classified as silent one-frame videos.

    Windows (--window W --hop H) start at 0, H, 2H, ... as long as they fit in the media; one
    more window, ending at the end, is added only when the tail left uncovered is longer than
    H/2 (30.02 s with --window 10 --hop 5: 0, 5, 10, 15, 20). Media no longer than W gets one
    window.

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
    # checked before the model loads: a wrong -o fails in a second, and writes nothing
    writer = ResultWriter(output, HEADER, requested="csv" if as_csv else "json" if as_json else None,
                          command="cavmae classify", shared=parse_shard(shard)[1] > 1)
    # --labels replaces the model's names inside load(), so no label file is downloaded then
    pipe = open_pipeline(model, engine, device, mirror, num_frames=frames, labels=labels_csv,
                         task="classify")
    names = _label_names(pipe)
    mode = _choose_mode(pipe, mode)
    stdout_csv = csv.writer(sys.stdout) if as_csv else None
    if stdout_csv:
        stdout_csv.writerow(HEADER)
    failed: list[tuple[Path, str]] = []
    already_done = 0  # inputs whose every result an earlier run wrote to -o
    try:
        for path in progress(files, total=len(files), desc="classify", unit="clip"):
            try:
                file_mode = _file_mode(pipe, path, mode)
                offsets = [offset]
                span = None
                if window is not None:
                    from cavmae.media import probe, window_offsets

                    span = window
                    offsets = window_offsets(probe(path).duration, window, hop or window / 2)
                todo = [s for s in offsets if not writer.is_done({"path": path, "mode": file_mode, "start": s})]
                already_done += not todo
                for start in todo:
                    pred = _classify_one(pipe, path, file_mode, start, span)
                    record, rows = _record(path, file_mode, start, span, pred, names, top_k, all_scores)
                    writer.write(record, rows)
                    _print(record, rows, as_json, stdout_csv, show_time=window is not None or start > 0)
            except MediaError as e:
                failed.append((path, str(e)))
                if len(files) > 1:
                    warn(f"skipped {path}: {e}")
    finally:
        writer.close()
    if already_done:
        echo(f"{already_done} of {len(files)} inputs already in {output}: skipped", err=True)
    if failed:
        if len(files) == 1:  # nothing else was classified: the reason is the whole message
            raise CavmaeError(failed[0][1])
        click.echo(f"{len(failed)} of {len(files)} inputs failed; the others were classified", err=True)
        sys.exit(EXIT_INPUT_FAILED)


def _classify_one(pipe, path: Path, mode: str, start: float, span: float | None):
    from cavmae.media import load_clip
    from cavmae.modes import needs
    from cavmae.runtime.pipeline import Prediction

    need_audio, need_video = needs(mode)
    try:
        clip = load_clip(path, num_frames=pipe.num_frames, offset=start, config=pipe.manifest.preprocess,
                         need_audio=need_audio, need_video=need_video, duration=span)
    except MissingStreamError as e:
        raise e.with_hint(_missing_hint(pipe, e.stream or "")) from None
    probs = pipe.classify(clip.audio, clip.frames, mode)
    return Prediction(probs=probs, labels=pipe.labels, path=str(path), offset=start), clip


def _label_names(pipe) -> tuple[str, ...]:
    """The model's class names (those of ``--labels`` when given), else ``class i``."""
    num_classes = pipe.manifest.model_config.num_classes
    return pipe.labels or tuple(f"class {i}" for i in range(num_classes))


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


def _file_mode(pipe, path: Path, mode: str) -> str:
    """The mode one file is classified in: ``mode``, or for ``auto`` the best one the model
    supports with the streams the file has (a note on stderr when a stream is left out)."""
    if mode != AUTO:
        return mode
    from cavmae.media import probe
    from cavmae.modes import best_mode, needs

    info = probe(path)
    supported = pipe.classify_modes
    chosen = best_mode(supported, info.has_audio, info.has_video)
    if chosen is None:
        # every mode of the model needs the stream this file lacks
        missing = "audio" if needs(supported[0])[0] and not info.has_audio else "video"
        raise MissingStreamError.of(str(path), missing, _missing_hint(pipe, missing))
    if chosen != supported[0]:
        lacks = "video" if info.has_audio else "audio"
        echo(f"note: {path}: no {lacks} stream; classified with {chosen} only (--mode {chosen})", err=True)
    return chosen


def _missing_hint(pipe, stream: str) -> str:
    """What to do about a file without ``stream`` (``audio``/``video``), in this command's flags."""
    from cavmae.modes import needs

    uses = 0 if stream == "audio" else 1
    others = [m for m in pipe.classify_modes if not needs(m)[uses]]
    if others:
        return f"classify it with --mode {others[0]} (or --mode {AUTO})"
    track = "a sound track" if stream == "audio" else "a video track"
    only = "/".join(pipe.classify_modes)
    return (f"this model classifies with {only} only: give a file with {track}, or another model"
            " with -m (see `cavmae models`)")


def _record(path: Path, mode: str, start: float, span: float | None, result, names, top_k: int,
            all_scores: bool):
    pred, clip = result
    idx = pred.probs.argsort()[::-1][:top_k]
    if span is not None:
        end = min(start + span, clip.duration)
    else:
        end = min(start + 10.0, clip.duration)
    top = [{"rank": r + 1, "index": int(i), "label": names[i], "score": round(float(pred.probs[i]), 6)}
           for r, i in enumerate(idx)]
    record: dict[str, Any] = {"path": str(path), "mode": mode, "start": start, "end": round(end, 3), "top": top}
    if all_scores:
        record["scores"] = [round(float(p), 6) for p in pred.probs]
    first = [str(path), mode, start, round(end, 3)]
    rows = [[*first, t["rank"], t["index"], t["label"], t["score"]] for t in top]
    if all_scores:
        rows = [[*first, "", i, names[i], round(float(p), 6)] for i, p in enumerate(pred.probs)]
    return record, rows


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
