"""Folder throughput of ``cavmae classify``: decoding clip after clip vs decoding ahead on threads.

A folder of ``--clips`` files (hard links to the two sample clips, the 256x144 and the 1280x720
one taking turns, half each) is classified in one process by a full-size CAV-MAE classifier
with random weights (the model ``runtime/benchmark.py`` measures, exported to ONNX once through
``cavmae.runtime.load``) on ONNX Runtime, CPU, fp32 (``--int8``: the int8 export too). Each
round measures, in turns, so that a change in the machine's other load hits all alike:

- ``sequential``: the command's loop with decoding inline
  (``classify_files(..., workers=0)``): probe, decode, model, clip after clip;
- ``overlapped``: the same loop as ``cavmae classify`` runs it, the next clips decoded on
  ``--workers`` threads while the model runs (``classify_files(..., workers=2)``);
- ``model``: ``pipe.classify`` on clips decoded beforehand: the model's own time per clip;
- ``decode``: ``pipe.load_clip`` alone, clip after clip (what the threads have to keep up with).

Printed and written to ``--out`` (JSON): clips/s of each way (median over the rounds), the
ratio ``overlapped / (1 / model time per clip)`` (1.0: the folder runs at the model's own
rate), the peak RSS of each way and the most clips in flight in the overlapped loop (taken from
the folder and not yet handed back by the model).

    python benchmarks/folder_throughput.py --tiny --out /tmp/folder-tiny.json   # quick check
    python benchmarks/folder_throughput.py --out benchmarks/results/folder-throughput.json
    python benchmarks/folder_throughput.py --int8 --rounds 5 --out /tmp/folder-int8.json

The random checkpoint is kept in ``--work`` (default ``$TMPDIR/cavmae-bench``), so its export is
made once and found in the cache (``$CAVMAE_HOME``) by later runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: the 256x144 AudioSet clip and the 1280x720 VGGSound clip (examples/media links to them)
SAMPLES = (ROOT / "examples" / "media" / "00W1lcxW-WU_40.000.mp4",
           ROOT / "examples" / "media" / "KlsG1EnBEjc_000361.mp4")
WAYS = ("sequential", "overlapped", "model", "decode")


def make_folder(folder: Path, count: int) -> list[Path]:
    """``count`` clips in ``folder``: hard links (copies where links fail) to the two samples,
    taking turns. Each is a file of its own, so the command's input expansion (which drops
    duplicates by resolved path) keeps them all."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        source = SAMPLES[i % 2].resolve()
        target = folder / f"clip{i:03d}{source.suffix}"
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        files.append(target)
    return files


def open_model(tiny: bool, precision: str, work: Path, threads: int | None) -> Any:
    """The random-weight classifier (full size, or the tiny config) as an ONNX Runtime pipeline."""
    from cavmae.config import BASE, TINY
    from cavmae.runtime import load
    from cavmae.runtime.benchmark import _random_checkpoint

    where = work / ("tiny" if tiny else "base")
    where.mkdir(parents=True, exist_ok=True)
    checkpoint = _random_checkpoint(where, TINY.replace(num_classes=527) if tiny else BASE)
    opts = {"threads": threads} if threads else {}
    return load(checkpoint, engine="ort", device="cpu", precision=precision, **opts)


def counted(files: Sequence[Path], taken: list[int]) -> Iterator[Path]:
    """``files``, counting in ``taken[0]`` how many the consumer has pulled so far."""
    for f in files:
        taken[0] += 1
        yield f


def run_loop(pipe: Any, files: Sequence[Path], workers: int) -> dict[str, Any]:
    """The command's loop (:func:`cavmae.runtime.classify_records.classify_files`, ``--mode
    auto``) over ``files``; the clips classified and the most in flight at once."""
    from cavmae.runtime.classify_records import classify_files

    taken = [0]
    in_flight = done = 0
    for n, outcome in enumerate(classify_files(pipe, counted(files, taken), mode="auto", workers=workers)):
        if outcome.error is not None:
            raise RuntimeError(f"{outcome.job.path}: {outcome.error}")
        in_flight = max(in_flight, taken[0] - n)  # taken and not handed back; this one included
        done += outcome.prediction is not None
    return {"clips": done, "in_flight": in_flight}


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s result with its wall seconds and the peak RSS while it ran (Linux)."""
    from cavmae.runtime.benchmark import peak_rss_mb, reset_peak_rss

    reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    return {**out, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def measure(pipe: Any, files: Sequence[Path], rounds: int, workers: int,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every way over ``files``, ``rounds`` times in turns after one warm-up clip each."""
    samples = [pipe.load_clip(s) for s in SAMPLES]  # decoded once: the model's inputs
    by_file = [samples[i % 2] for i in range(len(files))]  # the folder's order (make_folder)

    def model() -> dict[str, Any]:
        for clip in by_file:
            pipe.classify(clip.audio, clip.frames, "av")
        return {"clips": len(by_file)}

    def decode() -> dict[str, Any]:
        for f in files:
            pipe.load_clip(f)
        return {"clips": len(files)}

    ways: dict[str, Callable[[], dict[str, Any]]] = {
        "sequential": lambda: run_loop(pipe, files, 0), "overlapped": lambda: run_loop(pipe, files, workers),
        "model": model, "decode": decode,
    }
    run_loop(pipe, files[:2], workers)  # warm-up: the sessions' first runs, the decoders
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
    for r in range(rounds):
        for way in WAYS:
            got = timed(ways[way])
            runs[way].append(got)
            log(f"round {r + 1}/{rounds} {way}: {got['clips'] / got['seconds']:.2f} clips/s"
                f" ({got['seconds']:.1f} s, peak RSS {got['peak_rss_mb'] or float('nan'):.0f} MB)")
    return summarize(runs)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median clips/s per way, the overlapped loop against the model's own rate, memory."""
    cps = {w: statistics.median(r["clips"] / r["seconds"] for r in runs[w]) for w in WAYS}
    model_s = 1 / cps["model"]
    return {
        "clips_per_s": cps,
        "model_s_per_clip": model_s,
        "decode_s_per_clip": 1 / cps["decode"],
        "overlapped_vs_model_rate": cps["overlapped"] * model_s,  # overlapped / (1 / model time)
        "overlapped_vs_sequential": cps["overlapped"] / cps["sequential"],
        "clips_in_flight": max(r["in_flight"] for r in runs["overlapped"]),
        "peak_rss_mb": {w: max((r["peak_rss_mb"] or 0.0) for r in runs[w]) for w in WAYS},
        "runs": runs,
    }


def describe_machine() -> dict[str, Any]:
    from cavmae.runtime.benchmark import machine_info

    return {**machine_info(), "load_average_1m": os.getloadavg()[0]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="The tiny model config (a quick check, not a measure).")
    ap.add_argument("--int8", action="store_true", help="Also measure the int8 export.")
    ap.add_argument("--clips", type=int, default=20, help="Clips in the folder (half of each sample).")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds of every way, taking turns.")
    ap.add_argument("--workers", type=int, default=2, help="Decoding threads of the overlapped loop.")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [its default].")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cavmae-bench",
                    help="Where the random checkpoint is kept.")
    ap.add_argument("--out", type=Path, required=True, help="Write the results here (JSON).")
    args = ap.parse_args(argv)

    from cavmae.fsio import write_json

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine_before": describe_machine(),
        "model": ("tiny" if args.tiny else "full-size") + " random-weight classifier",
        "folder": f"{args.clips} clips: 256x144 and 1280x720 samples taking turns",
        "workers": args.workers, "rounds": args.rounds, "precisions": {},
    }
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="folder-throughput-", dir=args.work) as tmp:
        files = make_folder(Path(tmp) / "clips", args.clips)
        for precision in ("fp32", "int8") if args.int8 else ("fp32",):
            pipe = open_model(args.tiny, precision, args.work, args.threads)
            engine = pipe.describe()
            print(f"{precision}: {engine}", flush=True)
            try:
                got = measure(pipe, files, args.rounds, args.workers,
                              log=lambda s, p=precision: print(f"{p} {s}", flush=True))
            finally:
                pipe.close()
            result["precisions"][precision] = {"engine": engine, **got}
            cps = got["clips_per_s"]
            print(f"{precision}: sequential {cps['sequential']:.2f}, overlapped {cps['overlapped']:.2f},"
                  f" model alone {cps['model']:.2f}, decode alone {cps['decode']:.2f} clips/s;"
                  f" overlapped / model rate {got['overlapped_vs_model_rate']:.2f},"
                  f" overlapped / sequential {got['overlapped_vs_sequential']:.2f};"
                  f" at most {got['clips_in_flight']} clips in flight;"
                  f" peak RSS overlapped {got['peak_rss_mb']['overlapped']:.0f} MB,"
                  f" sequential {got['peak_rss_mb']['sequential']:.0f} MB", flush=True)
    result["machine_after"] = describe_machine()
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
