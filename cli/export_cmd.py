"""``cavmae export``: per-stage ONNX graphs + manifest (+ a Triton model repository)."""

from __future__ import annotations

from pathlib import Path

import click

from cavmae.manifest import EXPORT_PRECISIONS
from cavmae.masking import DEFAULT_MASK_RATIO
from cavmae.modes import AUTO, FINETUNE_MODES

from .common import FRAMES, echo_json


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the export into (must be empty or absent).")
@click.option("--precision", type=click.Choice(EXPORT_PRECISIONS), default="fp32", show_default=True,
              help="int8: quantized graphs, written only when they agree with fp32 on real clips.")
@click.option("--calibration", type=click.Path(exists=True, path_type=Path), default=None, metavar="DIR",
              help="int8: clips the int8 graphs are compared on (and calibrated on, with --int8-method"
                   " static) [default: the two sample clips that ship with cavmae].")
@click.option("--int8-min-top5", default=4, show_default=True, type=click.IntRange(0, 5),
              help="int8: refuse the export when, on any clip, int8's top-5 keeps fewer of fp32's top-5 classes.")
@click.option("--int8-min-cosine", default=0.99, show_default=True, type=click.FloatRange(-1, 1),
              help="int8: refuse the export when an embedding's cosine to fp32 is lower on any clip.")
@click.option("--int8-method", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
              help="int8: dynamic (weights int8, activations scaled per call) or static (QDQ, calibrated).")
@click.option("--frames", default=10, show_default=True, type=FRAMES, help="Frames aggregated per clip.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="Largest batch of clips.")
@click.option("--finetune-mode", type=click.Choice([AUTO, *FINETUNE_MODES]), default=AUTO,
              show_default=True, help="What a classifier was fine-tuned for (auto: from the registry, or what a checkpoint cavmae"
              " finetune wrote says, else multimodal).")
@click.option("--task", type=click.Choice(["auto", "multi-label", "single-label"]), default="auto", show_default=True,
              help="Sigmoid (multi-label) or softmax (single-label) probabilities (auto: the registry's, or"
                   " the loss a cavmae finetune checkpoint was trained with, else by class count).")
@click.option("--labels", "labels_csv", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Label CSV (index,mid,display_name) to embed in the manifest.")
@click.option("--mask-ratio", default=DEFAULT_MASK_RATIO, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Audio mask ratio of the pre-training graphs (fixes the kept-token count).")
@click.option("--mask-ratio-v", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="Visual mask ratio [default: --mask-ratio].")
@click.option("--triton", is_flag=True, help="Also write a Triton Inference Server repository into OUTPUT/triton.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it holds an earlier export.")
@click.option("--no-validate", is_flag=True, help="Skip validating each graph against PyTorch (not recommended).")
@click.option("--validation-seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seed of the random validation inputs (reported; rerun with it to replay a check).")
@click.option("--mirror", envvar="CAVMAE_MIRROR", default=None, metavar="URL", help="Mirror for registry downloads.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export(model, output, precision, frames, max_batch, finetune_mode, task, labels_csv, mask_ratio, mask_ratio_v,
           triton, overwrite, no_validate, validation_seed, mirror, as_json, calibration, **int8) -> None:
    """Export MODEL (registry name or checkpoint) to fixed-shape ONNX graphs, one per stage.

    Every graph is checked with onnx.checker and validated against the PyTorch stage in ONNX
    Runtime; a failed validation fails the export and leaves nothing behind.

    \b
    Examples:
      cavmae export as-full-51.2 -o exports/as-full
      cavmae export my_finetuned.pth -o exports/mine --precision fp16 --triton
      cavmae export as-full-51.2 -o exports/as-int8 --precision int8 --calibration my_clips/
      cavmae export cav-mae-base-nonorm -o exports/recon --mask-ratio 0.75
    """
    from cavmae.export import export_model
    from cavmae.heap import keep_freed_memory
    from cavmae.runtime.loader import export_settings, model_labels, resolve_model

    keep_freed_memory()  # one export, then exit: large freed buffers are reused (cavmae.heap)

    given = _given_options(click.get_current_context())
    int8_only = sorted(given & {"calibration", "int8_min_top5", "int8_min_cosine", "int8_method"})
    if precision != "int8" and int8_only:
        raise click.UsageError(f"{', '.join(_flag(n) for n in int8_only)} only apply to --precision int8")
    mask_ratios = (mask_ratio, mask_ratio if mask_ratio_v is None else mask_ratio_v)
    # a ratio that keeps no token is refused before a registry model is downloaded
    source = resolve_model(model, mirror=mirror, progress=not as_json, mask_ratios=mask_ratios)
    if source.kind == "export":
        raise click.UsageError(f"{model} is already an export; give a checkpoint or a registry name")
    masks = sorted(given & {"mask_ratio", "mask_ratio_v"})
    if masks and source.model_kind == "classifier":
        raise click.UsageError(f"{', '.join(_flag(n) for n in masks)} only apply to pre-training models;"
                               f" {model} is a classifier")
    labels = model_labels(source, labels_csv, progress=not as_json)
    result = export_model(
        source.load_model(), output, precision,
        num_frames=frames, max_batch=max_batch,
        # auto: the registry's, or what a checkpoint cavmae finetune wrote says
        task=export_settings(source).get("task") if task == "auto" else task,
        finetune_mode=source.finetune_mode if finetune_mode == AUTO else finetune_mode,
        labels=labels, mask_ratio_a=mask_ratios[0], mask_ratio_v=mask_ratios[1],
        validate=not no_validate, validation_seed=validation_seed, overwrite=overwrite,
        progress=not as_json,
        source={"checkpoint": str(source.path.resolve()), "name": source.info.name if source.info else None,
                "sha256": _sha(source.path)},
        int8=_int8_options(calibration, **int8) if precision == "int8" else None,
    )
    triton_models = []
    if triton:
        from cavmae.export.triton import REPOSITORY_DIRNAME, write_triton_repository

        triton_models = [str(p) for p in write_triton_repository(output, output / REPOSITORY_DIRNAME)]
    summary = {
        "output": str(output),
        "kind": result.manifest.model_kind,
        "precision": precision,
        "validation_seed": None if no_validate else validation_seed,
        "int8_gate": result.manifest.quantization,
        "graphs": {name: {"file": spec.file, "max_batch": spec.max_batch,
                          "validation": result.reports[name].summary() if name in result.reports else None}
                   for name, spec in result.manifest.graphs.items()},
        "triton": triton_models,
    }
    if as_json:
        echo_json(summary)
        return
    click.echo(f"exported {result.manifest.model_kind} to {output} ({precision})")
    for name, g in summary["graphs"].items():
        click.echo(f"  {name:<18} {g['file']:<24} max batch {g['max_batch']:<4} {g['validation'] or 'not validated'}")
    if result.manifest.quantization is not None:
        from cavmae.export.int8 import format_gate

        click.echo(format_gate(result.manifest.quantization))
    if triton:
        click.echo(f"  triton repository: {output / REPOSITORY_DIRNAME} ({len(triton_models)} models)")


def _int8_options(calibration, int8_min_top5, int8_min_cosine, int8_method):
    from cavmae.export.int8 import Int8Options

    return Int8Options(method=int8_method, calibration=calibration, min_top5=int8_min_top5,
                       min_cosine=int8_min_cosine)


def _sha(path: Path) -> str:
    from cavmae.fsio import sha256_file

    return sha256_file(path)


def _given_options(ctx: click.Context) -> set[str]:
    """The parameters the user typed (not defaults or environment)."""
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
