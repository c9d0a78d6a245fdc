"""``cavmae bench``: latency against the reference-style PyTorch loop, in one process."""

from __future__ import annotations

from pathlib import Path

import click

from cavmae import fsio
from cavmae.manifest import TORCH_PRECISIONS

from .common import ENGINE_CHOICES, FRAMES, echo_json


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "engines", multiple=True, type=click.Choice(ENGINE_CHOICES[1:]), default=("ort",),
              show_default=True, help="Engine(s) to measure; repeat the option for several.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N (auto: each engine's own choice; the baseline runs on"
                   " the GPU when an engine does).")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Clip batch sizes, comma separated.")
@click.option("--frames", default=10, show_default=True, type=FRAMES, help="Frames aggregated per clip.")
@click.option("-m", "--model", default=None, metavar="MODEL",
              help="Registry name, checkpoint or export [default: full-size random weights].")
@click.option("--clip", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Video to preprocess (also times decode, fbank and frame preprocessing).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0),
              help="Untimed runs before each measurement.")
@click.option("--repeat", default=5, show_default=True, type=click.IntRange(1), help="Timed runs per measurement.")
@click.option("--baseline-repeat", default=None, type=click.IntRange(1), help="Timed runs of the slow baseline [default: --repeat].")
@click.option("--no-baseline", is_flag=True, help="Skip the reference-style baseline.")
@click.option("--no-stages", is_flag=True, help="Skip the per-graph timings.")
@click.option("--torch-precision", type=click.Choice(TORCH_PRECISIONS), multiple=True, default=("fp32",),
              show_default=True,
              help="Autocast precision of the torch engine (fp16 needs CUDA; bf16 also runs on the CPU);"
                   " repeat the option to run several side by side.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="int8: also run the ort engine on the int8 export (gated on the sample clips), beside fp32.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads [default: physical cores].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the JSON result here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of a table.")
def bench(engines, device, batches, frames, model, clip, warmup, repeat, baseline_repeat, no_baseline, no_stages,
          torch_precision, threads, output, as_json, precision) -> None:
    """Measure classification latency of each engine next to the reference-style baseline
    (eager fp32 PyTorch, whole forward once per frame) in the same process; print ratios.

    \b
    Examples:
      cavmae bench --engine ort --batch 1,8
      cavmae bench --engine trt --engine torch --device cuda --torch-precision fp16
      cavmae bench --clip video.mp4 --json -o bench.json
      cavmae bench --engine ort --engine torch --precision int8 --torch-precision fp32 --torch-precision bf16 --batch 1
    """
    from cavmae.runtime.benchmark import BenchConfig, format_table, parse_batches, run_benchmark

    cfg = BenchConfig(
        model=model, engines=tuple(engines), device=device, batches=parse_batches(batches), num_frames=frames,
        clip=clip, warmup=warmup, repeat=repeat, baseline=not no_baseline, baseline_repeat=baseline_repeat,
        stages=not no_stages, torch_precisions=tuple(dict.fromkeys(torch_precision)), threads=threads, precision=precision,
    )
    if output:
        fsio.probe_writable(output)  # a read-only or mistyped folder fails now, not after the run
    log = (lambda s: None) if as_json else (lambda s: click.echo(s, err=True))
    result = run_benchmark(cfg, log=log)
    if as_json:  # printed first: a failed write below still leaves the numbers on screen
        echo_json(result)
    else:
        click.echo(format_table(result))
    if output:
        fsio.write_json(output, result, default=str)
