"""``cavmae prepare``, ``cavmae pretrain`` and ``cavmae finetune``.

The training commands take every field of :class:`cavmae.train.PretrainConfig` /
:class:`~cavmae.train.FinetuneConfig` as an option (``--field-name``), generated from the
dataclasses, so the CLI, YAML/JSON config files and the Python API share one set of names.
``--config FILE`` loads a file first; options given on the command line override it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cavmae.errors import CavmaeError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

#: short aliases for the most used options
_SHORT = {"output_dir": "-o"}


# --------------------------------------------------------------------------------------------
# prepare


@click.command(context_settings=CONTEXT)
@click.argument("videos", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (audio/, frames/frame_{i}/, the dataset JSON).")
@click.option("--list", "list_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV/JSON list of videos with labels (columns/keys 'video' and 'labels').")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes.")
@click.option("--json-name", default="data.json", show_default=True, help="Name of the dataset JSON.")
@click.option("--relative-paths", is_flag=True,
              help="Write paths relative to the output folder (default: absolute, as the reference needs).")
@click.option("--label-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Label CSV: also write class-balanced sampling weights ({json name}_weight.csv).")
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100), help="JPEG quality.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress: a bar on a terminal, a line every few seconds in a log.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def prepare(
    videos: tuple[Path, ...], output_dir: Path, list_file: Path | None, jobs: int, json_name: str,
    relative_paths: bool, label_csv: Path | None, quality: int, progress: bool, as_json: bool,
) -> None:
    """Extract audio (16 kHz, first channel) and 10 frames (224 JPEGs) of videos into the
    reference dataset layout and write the dataset JSON.

    VIDEOS are files or folders (searched recursively). Clips already extracted from the same
    video are skipped, so an interrupted run continues where it stopped. A re-run into the same
    folder adds to its dataset JSON (delete the JSON to start a new list); a video whose name is
    taken by another video prepared there earlier gets a new id, with a warning. Files that
    cannot be used are reported (and listed in OUTPUT/failed.txt) and skipped; the exit code is
    then 2.

    \b
    Examples:
      cavmae prepare clips/ -o data/train -j 8
      cavmae prepare --list train.csv --label-csv labels.csv -o data/train -j 8
      # train.csv columns: video,labels (labels: comma-separated mids, quoted)
    """
    from cavmae.prepare import prepare_videos

    from .common import EXIT_INPUT_FAILED, echo_json

    report = prepare_videos(
        videos, output_dir, list_file=list_file, jobs=jobs, json_name=json_name,
        relative_paths=relative_paths, jpeg_quality=quality, progress=progress, label_csv=label_csv,
    )
    failed_txt = report.output_dir / "failed.txt"
    if as_json:
        echo_json({
            "dataset_json": str(report.dataset_json), "output_dir": str(report.output_dir),
            "clips": len(report.clips), "extracted": report.extracted, "skipped": report.skipped,
            "kept": report.kept,
            "failed": [{"video": v, "reason": r} for v, r in report.failed],
            "renamed": [{"video": v, "video_id": i} for v, i in report.renamed],
            "duplicates": report.duplicates,
            "failed_list": str(failed_txt) if report.failed else None,
            "weight_csv": str(report.weight_csv) if report.weight_csv is not None else None,
        })
    else:
        kept = f", {report.kept} kept from earlier runs" if report.kept else ""
        click.echo(
            f"{len(report.clips)} clips in {report.dataset_json} ({report.extracted} extracted,"
            f" {report.skipped} already done, {len(report.failed)} failed{kept})"
        )
        if report.weight_csv is not None:
            click.echo(f"sampling weights: {report.weight_csv}")
    # each failure was reported as it happened; the summary only points at the full list
    prepared = report.extracted + report.skipped  # this run's; report.clips has earlier ones too
    if not prepared:
        raise CavmaeError(f"no video could be prepared; see {failed_txt}")
    if report.failed:
        total = prepared + len(report.failed)
        click.echo(f"{len(report.failed)} of {total} inputs failed (listed in {failed_txt});"
                   " the others were prepared", err=True)
        click.get_current_context().exit(EXIT_INPUT_FAILED)


# --------------------------------------------------------------------------------------------
# pretrain / finetune


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` from a field annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


class _JSONParam(click.ParamType):
    name = "JSON"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, dict):
            return value
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as e:
            self.fail(f"not valid JSON ({e}); e.g. '{{\"num_heads\": 4}}'", param, ctx)
        if not isinstance(obj, dict):
            self.fail("expected a JSON object", param, ctx)
        return obj


def config_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One option per field of the config dataclass ``cls`` (default None: not given)."""
    hints = typing.get_type_hints(cls)
    required = set(getattr(cls, "required_fields", ()))

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for fld in reversed(dataclasses.fields(cls)):
            typ, _ = _base_type(hints[fld.name])
            flag = "--" + fld.name.replace("_", "-")
            default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
            # not click's required=True: a --config file may give the field instead
            shown = "required" if fld.name in required else f"default: {default}"
            help_text = f"{fld.metadata.get('help', '')} [{shown}]"
            names = [flag] + ([_SHORT[fld.name]] if fld.name in _SHORT else [])
            if typ is bool:
                opt = click.option(f"{flag}/--no-{flag[2:]}", fld.name, default=None, help=help_text)
            elif typing.get_origin(typ) is tuple:
                opt = click.option(*names, fld.name, type=float, nargs=2, default=None, help=help_text)
            elif typ is dict or typing.get_origin(typ) is dict:
                opt = click.option(*names, fld.name, type=_JSONParam(), default=None, help=help_text)
            else:
                opt = click.option(*names, fld.name, type=typ, default=None, help=help_text)
            f = opt(f)
        return f

    return decorate


def _build(cls: Any, config_file: Path | None, options: dict[str, Any]) -> Any:
    given = {k: v for k, v in options.items() if v is not None}
    if config_file is not None:
        return cls.from_file(config_file, **given)
    return cls.from_dict(given)


def _print_epoch(rec: dict[str, Any]) -> None:
    parts = [f"epoch {rec['epoch']:>3}"]
    for k, v in rec.items():
        if k in ("event", "epoch", "step", "time_s") or not isinstance(v, float):
            continue
        if k.startswith("train_loss") or k.startswith("val_") or k in ("train_c_acc", "lr"):
            parts.append(f"{k} {v:.4g}")
    click.echo("  ".join(parts))


def speaks_for_the_run() -> bool:
    """Whether this process prints the run's outcome: the only process, or rank 0 of a
    ``torchrun`` job (as with the epoch lines); the others would print the same lines again."""
    return int(os.environ.get("WORLD_SIZE") or 1) <= 1 or int(os.environ.get("RANK") or 0) == 0


def _report(result: Any, config: Any, config_file: Path | None, max_steps_option: bool) -> None:
    """Print the outcome; a run stopped by max_steps says how to continue it (the same
    max_steps would stop again at once)."""
    if not result.completed:
        if max_steps_option or config_file is None:
            how = "run again with a larger --max-steps, or without --max-steps"
        else:
            how = f"raise max_steps in {config_file} (or give a larger --max-steps), or remove it"
        click.echo(
            f"stopped at step {result.global_step} (max_steps {config.max_steps}) in {result.run_dir};"
            f" to continue, {how} to finish all {config.epochs} epochs"
        )
        return
    click.echo(f"done: {result.epoch} epochs, {result.global_step} steps; run directory {result.run_dir}")
    for label, path in (("final", result.final_checkpoint), ("best", result.best_checkpoint),
                        ("averaged", result.averaged_checkpoint)):
        if path is not None:
            click.echo(f"  {label}: {path}")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in (result.final_metrics or {}).items()}
    if set(shown) - {"model"}:  # metrics, not only which weights were kept
        click.echo(f"  final evaluation: {json.dumps(shown)}")
    label_csv = getattr(config, "label_csv", None)
    if label_csv and result.final_checkpoint is not None:  # the checkpoints carry its class names
        click.echo(f"  classify with it: cavmae classify VIDEO -m {result.final_checkpoint}")


def _train_command(name: str, cls_name: str, doc: str) -> click.Command:
    from cavmae import train as train_mod

    cls = getattr(train_mod, cls_name)
    run = getattr(train_mod, name)

    @click.command(name=name, context_settings=CONTEXT, help=doc)
    @click.option("-c", "--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="YAML or JSON file with config fields; options given here override it.")
    @click.option("--print-config", is_flag=True, help="Print the resolved config as JSON and exit.")
    @config_options(cls)
    def command(config_file: Path | None, print_config: bool, **options: Any) -> None:
        config = _build(cls, config_file, options)
        if print_config:
            click.echo(json.dumps(config.to_dict(), indent=2))
            return
        config.validate()
        result = run(config, on_epoch=_print_epoch)
        if speaks_for_the_run():
            _report(result, config, config_file, options.get("max_steps") is not None)

    return command


_DOCS = {
    "pretrain": (
        "PretrainConfig",
        """CAV-MAE pre-training: masked reconstruction + audio-visual contrast.

    Every config field is an option; defaults follow the reference CAV-MAE-Scale++ recipe.
    The run directory gets metrics.jsonl, model.{epoch}.pth, best/final.pth and state.pt; running
    the same command on a directory with a state.pt continues the run; a directory holding an
    earlier run without its state.pt is refused unless --overwrite (which deletes that run's
    files). Under torchrun the job runs data-parallel (only rank 0 writes).

    \b
    Examples:
      cavmae pretrain --train-data data/train/data.json --val-data data/val/data.json -o runs/pre
      cavmae pretrain -c pretrain.yaml --epochs 5 --batch-size 64
      torchrun --nproc-per-node 4 $(which cavmae) pretrain -c pretrain.yaml
    """,
    ),
    "finetune": (
        "FinetuneConfig",
        """Fine-tune a classifier (from a pre-trained checkpoint) and evaluate it.

    Every config field is an option; defaults follow the reference AudioSet-20K recipe (BCE,
    mAP, mixup 0.5, SpecAugment 48/192, head lr x50, weight averaging). Single-label sets use
    --loss CE (accuracy). The final evaluation averages the predictions of all 10 frames.

    \b
    Examples:
      cavmae finetune --train-data data/train/data.json --val-data data/val/data.json \\
          --label-csv labels.csv --init-checkpoint runs/pre/final.pth -o runs/ft
      cavmae finetune -c finetune.yaml --mode audioonly --freeze-backbone    # linear probe
    """,
    ),
}


def __getattr__(name: str) -> click.Command:
    """``pretrain`` / ``finetune`` are built on first access, so ``cavmae prepare`` does not
    import torch."""
    if name not in _DOCS:
        raise AttributeError(name)
    command = _train_command(name, *_DOCS[name])
    globals()[name] = command
    return command
