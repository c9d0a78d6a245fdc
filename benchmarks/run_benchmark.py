"""Run the latency benchmark and record it: JSON under benchmarks/results/, a markdown table on
stdout for benchmarks/README.md.

The baseline (eager fp32 PyTorch, the reference's whole forward once per frame) and every engine
are measured in this one process, so the printed ratios compare like with like.

    python benchmarks/run_benchmark.py --engine ort --engine torch --batch 1,8 \
        --clip examples/media/00W1lcxW-WU_40.000.mp4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cavmae.runtime.benchmark import BenchConfig, format_table, parse_batches, run_benchmark

HERE = Path(__file__).resolve().parent


def markdown(result: dict) -> str:
    rows = ["| operation | batch | p50 ms | p90 ms | p99 ms | n | clips/s | GFLOP/s | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in result["timings"]:
        gf = f"{t['achieved_gflops']:.1f}" if t.get("achieved_gflops") else "-"
        rss = f"{t['peak_rss_mb']:.0f}" if t.get("peak_rss_mb") else "-"
        rows.append(f"| {t['name']} | {t['batch']} | {t['p50'] * 1e3:.1f} | {t['p90'] * 1e3:.1f} | "
                    f"{t['p99'] * 1e3:.1f} | {t['n']} | {t['clips_per_s']:.3f} | {gf} | {rss} |")
    lines = rows + [""] + [f"- speed-up vs baseline, {k}: **{v:.2f}x**" for k, v in result["ratios"].items()]
    mm = result.get("matmul_gflops", {})
    lines.append("- large fp32 matmul (2048^3) on this machine: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in mm.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", action="append", default=None, help="ort, trt, torch (repeatable)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--clip", default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--baseline-repeat", type=int, default=None)
    ap.add_argument("--torch-precision", action="append", choices=["fp32", "fp16", "bf16"],
                    help="torch engine autocast precision; repeat for several (default fp32)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--tag", default=None, help="name of the results file")
    args = ap.parse_args()
    cfg = BenchConfig(model=args.model, engines=tuple(args.engine or ["ort"]), device=args.device,
                      batches=parse_batches(args.batch), num_frames=args.frames, clip=args.clip,
                      warmup=args.warmup, repeat=args.repeat, baseline_repeat=args.baseline_repeat,
                      torch_precisions=tuple(args.torch_precision or ["fp32"]),
                      precision=args.precision)
    result = run_benchmark(cfg, log=lambda s: print(s, flush=True))
    tag = args.tag or time.strftime("%Y%m%d-%H%M%S") + f"-{args.device}"
    out = HERE / "results" / f"{tag}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(format_table(result))
    print()
    print(markdown(result))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
