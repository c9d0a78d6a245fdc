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
@click.option("--baseline-repeat", default=None, type=click.IntRange(1), help="Timed runs of the slow baseline [default: --repeat]; 1 or 2 shortens a CPU run most.")
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

    The defaults take long on a small CPU: 10 minutes or more on 2 cores, 7 of them the
    baseline (1 warm-up and 5 timed runs at batch 1, about 8 s each, and at batch 8, about
    60 s each; the engines' own runs take about 3 minutes). --batch 1 --baseline-repeat 2
    takes 1-2 minutes; --no-baseline skips the baseline, --no-stages the per-graph timings.
    Each measurement shows its runs on stderr (in a log: a line after the first and the last
    run, and at most one every CAVMAE_PROGRESS_INTERVAL seconds between), and a long baseline
    says after its first run how long it will take.

    Without -m the model is a full-size classifier with random weights (latency does not depend
    on them), written once to $TMPDIR/cavmae-bench; its ONNX export (about 1.2 GB) stays in the
    cache ($CAVMAE_HOME) for later runs. The last line says what a run added to the cache;
    `cavmae cache clear` (or `cavmae cache prune --older-than AGE`) removes it.

    \b
    Examples:
      cavmae bench --engine ort --batch 1,8
      cavmae bench --engine trt --engine torch --device cuda --torch-precision fp16
      cavmae bench --clip video.mp4 --json -o bench.json
      cavmae bench --engine ort --engine torch --precision int8 --torch-precision fp32 --torch-precision bf16 --batch 1
    """
    from cavmae.runtime.benchmark import (
        BenchConfig,
        cache_note,
        format_table,
        parse_batches,
        run_benchmark,
    )

    cfg = BenchConfig(
        model=model, engines=tuple(engines), device=device, batches=parse_batches(batches), num_frames=frames,
        clip=clip, warmup=warmup, repeat=repeat, baseline=not no_baseline, baseline_repeat=baseline_repeat,
        stages=not no_stages, torch_precisions=tuple(dict.fromkeys(torch_precision)), threads=threads, precision=precision,
    )
    if output:
        fsio.probe_writable(output)  # a read-only or mistyped folder fails now, not after the run
    log = (lambda s: None) if as_json else (lambda s: click.echo(s, err=True))
    result = run_benchmark(cfg, log=log, progress=True)
    if as_json:  # printed first: a failed write below still leaves the numbers on screen
        echo_json(result)
    else:
        click.echo(format_table(result))
    if output:
        fsio.write_json(output, result, default=str)
    note = cache_note(result)
    if note:  # the export a run leaves behind is large at full size: say where it went
        click.echo(note, err=True)
