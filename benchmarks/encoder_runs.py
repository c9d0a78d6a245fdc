"""Encoder runs sized for the CPU's cache against whole-batch runs, side by side in one process.

The ONNX Runtime pipeline on a CPU splits encoder batches into runs of about a thousand tokens
that never span two clips (``cavmae.run_sizes``). This loads one export twice, once with that
split and once running each graph's whole batch (the behaviour before it), and times
``classify_batch`` on decoded clips, runs taking turns so load hits both alike.

    python benchmarks/encoder_runs.py --precision int8 --batch 1,4 --repeat 7 \
        -o benchmarks/results/encoder-runs-epyc-2core.json

Without ``--export`` it builds a full-size random-weight classifier export under ``--work``
(about a minute, 1 GB for int8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cavmae.runtime import load
from cavmae.runtime.benchmark import load_average, machine_info, parse_batches, write_result


def build_export(work: Path, precision: str, max_batch: int) -> Path:
    """A full-size random-weight classifier (seed 0) exported at ``precision`` under ``work``."""
    import torch

    from cavmae import CAVMAEFT
    from cavmae.checkpoint import save_checkpoint
    from cavmae.config import BASE
    from cavmae.export import export_model

    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(BASE).eval(), work / "random-base.pth")
    out = work / f"export-{precision}"
    export_model(ckpt, out, max_batch=max_batch, precision=precision, overwrite=True,
                 graphs=["audio_encoder", "visual_encoder", "joint_classifier"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=None, help="an export directory (default: build one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cavmae-encoder-runs"))
    ap.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    ap.add_argument("--batch", default="1,4", help="clips per classify_batch call, comma-separated")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--clip", type=Path, default=None, help="a media file (default: the AudioSet sample)")
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args(argv)
    batches = parse_batches(args.batch)
    export = args.export or build_export(args.work, args.precision, max(batches))
    sized, whole = load(export, engine="ort", device="cpu"), load(export, engine="ort", device="cpu")
    whole.engine.cpu_sized_runs = False
    from cavmae.samples import sample_clips

    clip = sized.load_clip(args.clip or sample_clips()[0])
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
              "export": str(export), "precision": sized.manifest.precision, "repeat": args.repeat,
              "load_before": load_average(), "batches": {}}
    for b in batches:
        audio, frames = np.stack([clip.audio] * b), np.stack([clip.frames] * b)
        times: dict[str, list[float]] = {"sized": [], "whole": []}
        pipes = {"sized": sized, "whole": whole}
        for pipe in pipes.values():  # warm-up
            pipe.classify_batch(audio, frames)
        for _ in range(args.repeat):
            for name, pipe in pipes.items():
                t0 = time.perf_counter()
                pipe.classify_batch(audio, frames)
                times[name].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        result["batches"][str(b)] = {"median_s": med, "times_s": times, "whole_over_sized": med["whole"] / med["sized"]}
        print(f"batch {b}: sized runs {med['sized'] * 1e3:.0f} ms, whole batch {med['whole'] * 1e3:.0f} ms"
              f" ({med['whole'] / med['sized']:.3f}x)", file=sys.stderr, flush=True)
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
