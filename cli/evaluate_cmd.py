"""``cavmae evaluate``: classification mAP / accuracy and retrieval recall on a dataset.

Thin: parses, reads the dataset with :mod:`cavmae.clip_lists`, evaluates it with
:mod:`cavmae.runtime.evaluation`, prints.
Exit codes: 0 every clip evaluated; 2 a user mistake (bad option, unreadable dataset, wrong label
set; one line on stderr), and also when some clips failed (skipped and reported, metrics over
the rest) or none could be evaluated; 1 only for a bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cavmae.modes import CLI_MODES

from .common import (
    EXIT_INPUT_FAILED,
    echo_json,
    expand_inputs,
    model_options,
    open_pipeline,
    progress,
    warn_skipped,
)

if TYPE_CHECKING:
    from cavmae.clip_lists import ClipList


def _is_dataset_json(inputs: tuple[str, ...]) -> bool:
    return len(inputs) == 1 and inputs[0].lower().endswith(".json") and Path(inputs[0]).is_file()


def _fmt(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _print_summary(result: Any) -> None:
    """Human-readable metric lines on stdout."""
    click.echo(
        f"dataset: {result.dataset} ({result.num_items} clips, {result.num_evaluated}"
        f" evaluated, {result.num_failed} failed)"
    )
    click.echo(f"model: {result.model} ({result.engine})")
    c = result.classification
    if c is not None:
        head = f"classification ({result.task}, mode {result.mode}, frame-averaged):"
        if "mAP" in c:
            click.echo(
                f"{head} mAP {_fmt(c['mAP'])}  mAUC {_fmt(c['mAUC'])}"
                f"  ({c['num_classes_with_positives']} of {c['num_classes']} classes have positives)"
            )
        else:
            click.echo(f"{head} accuracy {_fmt(c['accuracy'])}  top-5 {_fmt(c['top5_accuracy'])}")
    if result.retrieval is not None:
        names = {"audio_to_visual": "audio->visual", "visual_to_audio": "visual->audio"}
        for key, m in result.retrieval.items():
            click.echo(
                f"retrieval {names.get(key, key)} ({result.retrieval_frame} frame):"
                f" R@1 {m['R@1']:.1f}  R@5 {m['R@5']:.1f}  R@10 {m['R@10']:.1f}"
                f"  median rank {m['median_rank']:g}  mean rank {m['mean_rank']:.1f}"
                f"  (N={int(m['num_queries'])})"
            )
    if result.failures:
        click.echo(f"failed: {result.num_failed} clip(s), skipped (reasons above)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dataset", nargs=-1, required=True)
@model_options(precision=True)
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="CSV",
    help="Label set (index,mid,display_name) the model's outputs follow. [default: the model's]",
)
@click.option(
    "--labels-file",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="CSV",
    help="For videos: rows 'file_or_id,labels' (names or mids, several separated by ';').",
)
@click.option(
    "--mode",
    type=click.Choice(CLI_MODES),
    default=None,
    help="Classification input: both modalities, audio only or visual only. [default: av]",
)
@click.option(
    "--classification/--no-classification",
    default=None,
    help="Score classification (off by itself for pre-training models and unlabelled data).",
)
@click.option(
    "--retrieval/--no-retrieval", default=None, help="Score audio<->visual retrieval. [default: on]"
)
@click.option(
    "--retrieval-frame",
    type=click.Choice(["middle", "mean"]),
    default="middle",
    show_default=True,
    help="Visual embedding of a clip: the middle frame (reference) or the mean over frames.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Clips per model call.",
)
@click.option(
    "--block",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Retrieval ranks are computed in blocks of this many clips (bounds memory).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Threads decoding clips ahead of the model.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Evaluate only the first N clips.",
)
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="NPZ",
    help="Also save ids, scores, targets, embeddings and ranks to this .npz file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def evaluate(
    dataset: tuple[str, ...],
    model: str | None,
    engine: str,
    device: str,
    mirror: str | None,
    precision: str | None,
    labels_csv: str | None,
    labels_file: str | None,
    mode: str | None,
    classification: bool | None,
    retrieval: bool | None,
    retrieval_frame: str,
    batch_size: int,
    block: int,
    workers: int,
    limit: int | None,
    predictions: str | None,
    as_json: bool,
) -> None:
    """Evaluate a model on DATASET: mAP / accuracy and retrieval R@1/5/10.

    DATASET is a reference dataset JSON ({"data": [{"video_id", "wav", "video_path",
    "labels"}]}, frames at VIDEO_PATH/frame_I/VIDEO_ID.jpg), or video files, folders or globs
    with --labels-file. Classification averages the probabilities of the 10 frames (the
    reference protocol): mAP and mean AUC for multi-label models, top-1 / top-5 accuracy for
    single-label ones. Retrieval ranks visual clips for each audio clip and back by cosine
    similarity of the audio-only and visual-only embeddings (R@k in percent, median rank).

    \b
    Labels file (for videos): one row per clip, optional header 'file,labels':
      dog_park.mp4,Dog;Bark
      cat_01,"/m/01yrx,/m/07qrkrw"
    The key is a file name, an id (file name without ending) or a path relative to the labels
    file; labels are display names or mids of the label set.

    \b
    Examples:
      cavmae evaluate eval.json --model as-full-51.2 --json
      cavmae evaluate eval.json -m vgg-65.5 --labels class_labels_indices_vgg.csv
      cavmae evaluate clips/ --labels-file clips/labels.csv -m my_finetuned.pth
      cavmae evaluate eval.json -m cav-mae-scale++ --no-classification

    Clips that cannot be read are skipped and reported; the exit code is then 2.
    """
    from cavmae.runtime import evaluation as ev

    if predictions is not None:
        _check_predictions_path(predictions)
    data = _read_dataset(dataset, labels_file, limit)
    pipeline = open_pipeline(model, engine, device, mirror, precision=precision)
    try:
        label_set = ev.model_label_set(pipeline, labels_csv) if labels_csv is not None else None
        result = ev.evaluate(
            pipeline,
            data,
            label_set=label_set,
            mode=mode,
            classification=classification,
            retrieval=retrieval,
            retrieval_frame=retrieval_frame,
            batch_size=batch_size,
            block=block,
            workers=workers,
            progress=lambda it, total: progress(it, total=total, desc="evaluate", unit="clip"),
            on_failure=lambda f: warn_skipped(f.id, f.reason),
            model_name=model,
        )
    finally:
        pipeline.close()

    _report(result, predictions, as_json)


def _check_predictions_path(path: str) -> None:
    """Before any clip is read: the predictions file is a new or earlier ``.npz`` in a folder
    that takes files (so it can never replace an input, and the run's results are not lost at
    the end for want of a writable folder)."""
    from cavmae import fsio
    from cavmae.errors import CavmaeError

    if not path.lower().endswith(".npz"):
        raise CavmaeError(f"--predictions writes a numpy .npz file; give a name ending in .npz, not {path!r}")
    fsio.probe_writable(path)


def _read_dataset(dataset: tuple[str, ...], labels_file: str | None, limit: int | None) -> ClipList:
    """The clips to evaluate: a reference dataset JSON, or media files with a labels file."""
    from cavmae import clip_lists
    from cavmae.errors import CavmaeError

    if _is_dataset_json(dataset):
        if labels_file is not None:
            raise CavmaeError(
                "--labels-file is for video files; a dataset JSON carries its own labels"
            )
        data = clip_lists.read_dataset_json(dataset[0])
    else:
        if any(d.lower().endswith(".json") for d in dataset) and len(dataset) > 1:
            raise CavmaeError("give one dataset JSON at a time")
        if len(dataset) == 1 and dataset[0].lower().endswith(".json"):
            raise CavmaeError(f"no such dataset file: {dataset[0]}")
        data = clip_lists.read_video_files(expand_inputs(dataset), labels_file)
    if limit is not None and limit < len(data):
        data = data.head(limit)
    return data


def _report(result: Any, predictions: str | None, as_json: bool) -> None:
    """Notes on stderr, the predictions file, the metrics; exit 2 unless every clip was evaluated."""
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if predictions is not None:
        result.save_predictions(predictions)
    if as_json:
        out = result.to_dict()
        if predictions is not None:
            out["predictions"] = str(predictions)
        echo_json(out)
    else:
        _print_summary(result)
        if predictions is not None:
            click.echo(f"predictions: {predictions}")
    if not result.ok:
        click.get_current_context().exit(EXIT_INPUT_FAILED)
