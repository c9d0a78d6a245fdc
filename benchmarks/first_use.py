"""First use of a checkpoint: ``cavmae classify CLIP -m CHECKPOINT`` into an empty cache, timed.

Each round runs the command twice as a user would, each in a process of its own:

- ``cold``: into a fresh, empty ``$CAVMAE_HOME``: hash and load the checkpoint, export and
  validate the graphs ``classify`` runs, save ONNX Runtime's optimized copies, classify;
- ``warm``: the same command again, the export now in the cache.

For each run it records the wall seconds, the child's user and system CPU seconds and its minor
page faults (``getrusage(RUSAGE_CHILDREN)`` before and after, so one run's own), and the exit
status; the cache is deleted after each round. The checkpoint is the full-size classifier with
random weights that ``runtime/benchmark.py`` measures (``--tiny``: the tiny config, a quick
check), kept in ``--work`` across runs; the rounds' caches are made there too. ``--env NAME=VALUE`` sets a variable for the command:
give it to compare a setting, with a second invocation without it, ideally taking turns.

    python benchmarks/first_use.py --rounds 3 --out benchmarks/results/first-use.json
    python benchmarks/first_use.py --tiny --rounds 1 --out /tmp/first-use-tiny.json   # quick check

Printed and written to ``--out`` (JSON): every run, and the median of each kind.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: the 10 s AudioSet sample clip, 256x144 (examples/media links to it)
CLIP = ROOT / "examples" / "media" / "00W1lcxW-WU_40.000.mp4"
KINDS = ("cold", "warm")


def checkpoint(work: Path, tiny: bool) -> Path:
    """The random-weight classifier checkpoint, written once into ``work``."""
    from cavmae.config import BASE, TINY
    from cavmae.runtime.benchmark import _random_checkpoint

    where = work / ("tiny" if tiny else "base")
    where.mkdir(parents=True, exist_ok=True)
    return _random_checkpoint(where, TINY.replace(num_classes=527) if tiny else BASE)


def run_command(argv: Sequence[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``argv`` to the end; its wall, user and system seconds, minor faults, exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = {
        "seconds": wall,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "returncode": done.returncode,
    }
    if done.returncode != 0:
        run["stderr_tail"] = done.stderr[-2000:]
    return run


def one_round(
    model: Path, clip: Path, extra_env: dict[str, str], timeout: float, work: Path
) -> dict[str, dict[str, Any]]:
    """A cold and a warm run of ``cavmae classify`` in a cache made in ``work`` for this round."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    env = {**os.environ, **extra_env, "CAVMAE_HOME": str(home)}
    argv = [sys.executable, "-m", "cavmae.cli", "classify", str(clip), "-m", str(model), "--json"]
    try:
        return {kind: run_command(argv, env, timeout) for kind in KINDS}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def summarize(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Median of every field per kind, over the rounds whose runs succeeded."""
    out = {}
    for kind in KINDS:
        ok = [r[kind] for r in runs if r[kind]["returncode"] == 0]
        if ok:
            out[kind] = {key: statistics.median(r[key] for r in ok)
                         for key in ("seconds", "user_s", "sys_s", "minor_faults")}
    return out


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="The tiny model config (a quick check, not a measure).")
    ap.add_argument("--rounds", type=int, default=3, help="Cold + warm pairs to run.")
    ap.add_argument("--clip", type=Path, default=CLIP, help="The clip to classify [the 10 s sample].")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="An environment variable for the command (repeatable).")
    ap.add_argument("--timeout", type=float, default=600, help="Seconds one command may take.")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cavmae-bench",
                    help="Where the random checkpoint is kept and the rounds' caches are made.")
    ap.add_argument("--out", type=Path, required=True, help="Write the results here (JSON).")
    args = ap.parse_args(argv)

    import json

    from cavmae.fsio import write_json
    from cavmae.runtime.benchmark import machine_info

    extra_env = parse_env(args.env)
    model = checkpoint(args.work, args.tiny)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine_before": machine_info(),
        "model": "tiny random weights" if args.tiny else "full-size random-weight classifier",
        "checkpoint_mb": model.stat().st_size / 2**20,
        "clip": str(args.clip.relative_to(ROOT) if args.clip.is_relative_to(ROOT) else args.clip),
        "env": extra_env,
        "runs": [],
    }
    for i in range(args.rounds):
        result["runs"].append(one_round(model, args.clip, extra_env, args.timeout, args.work))
        line = ", ".join(f"{k} {r['seconds']:.1f} s (exit {r['returncode']})" for k, r in result["runs"][-1].items())
        print(f"round {i + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    result["median"] = summarize(result["runs"])
    result["machine_after"] = machine_info()
    write_json(args.out, result, indent=1)
    print(json.dumps(result["median"], indent=1))
    return result


if __name__ == "__main__":
    main()
