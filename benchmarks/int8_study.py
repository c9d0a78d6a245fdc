"""int8 study: which quantization to ship, decided by measurement on a full-size export.

For each variant (dynamic per-channel, dynamic per-tensor, static QDQ per-channel) this quantizes
the fp32 graphs of an export, then in one process and interleaved with fp32 (so a busy machine
slows both alike) times each graph and runs the accuracy gate on the sample clips.

    python benchmarks/int8_study.py --export /tmp/int8study/fp32 -o benchmarks/results/int8-study.json

Without ``--export`` it first writes a full-size random-weight classifier and exports it
(about a minute and 1.4 GB under ``--work``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cavmae.export.int8 import Int8Options, quantize_export
from cavmae.export.validate import ort_session
from cavmae.manifest import Manifest
from cavmae.runtime.benchmark import load_average, machine_info, stage_gflop, write_result

VARIANTS = {
    "dynamic-per-channel": Int8Options(method="dynamic", per_channel=True, min_top5=0, min_cosine=-1),
    "dynamic-per-tensor": Int8Options(method="dynamic", per_channel=False, min_top5=0, min_cosine=-1),
    "static-qdq-per-channel": Int8Options(method="static", per_channel=True, min_top5=0, min_cosine=-1),
}
TIMED = ("audio_encoder", "visual_encoder", "joint_classifier")


def build_export(work: Path, tiny: bool = False) -> Path:
    """A random-weight classifier (seed 0) saved as ``work/random-base.pth`` and its fp32
    export in ``work/fp32``: full size, or the tests' tiny size with ``tiny``."""
    import torch

    from cavmae import CAVMAEFT
    from cavmae.checkpoint import save_checkpoint
    from cavmae.config import BASE, TINY
    from cavmae.export import export_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(CAVMAEFT(TINY if tiny else BASE).eval(), work / "random-base.pth")
    out = work / "fp32"
    export_model(ckpt, out, max_batch=1, overwrite=True,
                 graphs=["audio_encoder", "visual_encoder", "joint_classifier", "audio_embed", "visual_embed"])
    return out


def graph_feeds(manifest: Manifest, num_frames: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for name in TIMED:
        spec = manifest.graphs[name]
        batch = num_frames if name == "visual_encoder" else 1
        out[name] = {t.name: rng.standard_normal(t.concrete_shape(batch), dtype=np.float32) for t in spec.inputs}
    return out


def time_pair(a, b, feeds, repeat: int) -> tuple[float, float]:
    """Median seconds of sessions ``a`` and ``b``, alternating runs."""
    a.run(None, feeds)
    b.run(None, feeds)
    ta, tb = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a.run(None, feeds)
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b.run(None, feeds)
        tb.append(time.perf_counter() - t0)
    return float(np.median(ta)), float(np.median(tb))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=None, help="an fp32 export (max batch 1)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8study"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    src = args.export or build_export(args.work)
    manifest = Manifest.load(src)
    gf = stage_gflop(manifest.model_config, manifest.num_frames)
    gflop = {"audio_encoder": gf["audio_encoder"],
             "visual_encoder": gf["visual_encoder_per_frame"] * manifest.num_frames,
             "joint_classifier": gf["joint_graph_per_clip"]}
    feeds = graph_feeds(manifest, manifest.num_frames)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
              "load_before": load_average(), "variants": {}}
    for variant in args.variants.split(","):
        opts = VARIANTS[variant]
        work = args.work / variant
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)
        t0 = time.perf_counter()
        specs, report = quantize_export(work, dict(manifest.graphs), num_frames=manifest.num_frames,
                                        preprocess=manifest.preprocess, options=opts)
        entry = {"quantize_and_gate_s": time.perf_counter() - t0, "gate": report.to_dict(), "graphs": {}}
        print(f"{variant}: {report.summary()}", file=sys.stderr)
        for name in TIMED:
            fp, q = ort_session(src / manifest.graphs[name].file), ort_session(work / specs[name].file)
            t_fp, t_q = time_pair(fp, q, feeds[name], args.repeat)
            entry["graphs"][name] = {"fp32_s": t_fp, "int8_s": t_q, "speedup": t_fp / t_q,
                                     "fp32_gflops": gflop[name] / t_fp, "int8_gops": gflop[name] / t_q,
                                     "size_mb": (work / specs[name].file).stat().st_size / 2**20}
            print(f"  {name}: fp32 {t_fp:.3f} s, int8 {t_q:.3f} s ({t_fp / t_q:.2f}x,"
                  f" {gflop[name] / t_q:.0f} GOP/s)", file=sys.stderr)
            del fp, q
        result["variants"][variant] = entry
        shutil.rmtree(work, ignore_errors=True)
    write_result(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
