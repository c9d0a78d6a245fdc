"""ONNX Runtime's intra-op threads spinning or sleeping between operators, side by side.

Loads the same export twice in one process, once with ``OrtEngine(spin=False)`` (cavmae's
default: idle threads sleep) and once with ``spin=True`` (ONNX Runtime's own default: idle
threads busy-wait for the next operator), and times the two taking turns, so that the machine's
other load hits both alike:

- ``classify``: ``Pipeline.classify`` on one clip decoded beforehand (the model alone);
- with ``--folder N``, also ``folder``: the loop of ``cavmae classify DIR`` over N clips (the
  two sample clips taking turns, as ``folder_throughput.py`` makes them), the next clips decoded
  on two threads while the model runs; there a spinning thread competes with decoding.

    python benchmarks/ort_spin.py --precision int8 --rounds 7 --folder 8
    python benchmarks/ort_spin.py --tiny --rounds 3 --out /tmp/spin-tiny.json   # quick check
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "examples" / "media" / "00W1lcxW-WU_40.000.mp4"


def _folder_throughput() -> Any:
    """benchmarks/folder_throughput.py, for its folder of sample clips and its command loop."""
    spec = importlib.util.spec_from_file_location("folder_throughput", Path(__file__).with_name("folder_throughput.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="The tiny model config.")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    ap.add_argument("--rounds", type=int, default=7, help="Timed runs of each measure and setting, taking turns.")
    ap.add_argument("--folder", type=int, default=0, metavar="N",
                    help="Also time the folder loop of `cavmae classify DIR` over N clips.")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cavmae-bench")
    ap.add_argument("--out", type=Path, default=None, help="Write the results here (JSON).")
    args = ap.parse_args(argv)

    from cavmae.config import BASE, TINY
    from cavmae.fsio import write_json
    from cavmae.runtime import load
    from cavmae.runtime.benchmark import _random_checkpoint, machine_info

    where = args.work / ("tiny" if args.tiny else "base")
    where.mkdir(parents=True, exist_ok=True)
    checkpoint = _random_checkpoint(where, TINY.replace(num_classes=527) if args.tiny else BASE)
    pipes = {spin: load(checkpoint, engine="ort", device="cpu", precision=args.precision, spin=spin)
             for spin in (False, True)}
    clip = pipes[False].load_clip(CLIP)
    audio, frames = clip.audio, clip.frames
    for pipe in pipes.values():  # warm-up: first runs allocate
        pipe.classify(audio, frames)
        pipe.classify(audio, frames)

    timed: dict[str, Callable[[Any], Any]] = {"classify": lambda pipe: pipe.classify(audio, frames)}
    if args.folder:
        folder = _folder_throughput()
        files = folder.make_folder(args.work / "spin-folder", args.folder)
        timed["folder"] = lambda pipe: folder.run_loop(pipe, files, workers=2)
    samples: dict[str, dict[str, list[float]]] = {what: {"sleep": [], "spin": []} for what in timed}
    for _ in range(args.rounds):
        for what, fn in timed.items():
            for spin, pipe in pipes.items():
                t0 = time.perf_counter()
                fn(pipe)
                samples[what]["spin" if spin else "sleep"].append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "machine": machine_info(),
        "model": "tiny random weights" if args.tiny else "full-size random-weight classifier",
        "precision": args.precision,
        "folder_clips": args.folder,
        "seconds": samples,
    }
    for what, by_setting in samples.items():
        medians = {k: statistics.median(v) for k, v in by_setting.items()}
        result[f"{what}_sleep_vs_spin"] = medians["sleep"] / medians["spin"]
        print(f"{what} p50: sleep {medians['sleep']:.3f} s, spin {medians['spin']:.3f} s "
              f"(sleep / spin {medians['sleep'] / medians['spin']:.3f})")
    if args.out:
        write_json(args.out, result, indent=1)
    return result


if __name__ == "__main__":
    main()
