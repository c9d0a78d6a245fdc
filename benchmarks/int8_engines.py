"""int8 on the CPU, ONNX Runtime against PyTorch, and what the fp32 attention costs.

Questions this answers, in one process on a full-size random-weight classifier (10 frames):

1. Is PyTorch's dynamic int8 (``torch.ao`` ``quantize_dynamic`` of every ``nn.Linear``, the
   x86 backend: FBGEMM / oneDNN with VNNI) faster than the ONNX Runtime int8 graphs cavmae
   ships? Each graph is timed with both, runs alternating, so load hits both alike.
2. How much of a clip do the attention products take, which neither engine runs in int8, and
   does bf16 (AVX512_BF16) make them cheaper? ``scaled_dot_product_attention`` alone at the
   three graphs' shapes (all their layers), fp32 and bf16.

    python benchmarks/int8_engines.py --repeat 5 -o benchmarks/results/int8-engines-epyc-2core.json

Takes about five minutes and 1.5 GB under ``--work`` on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_study import TIMED, build_export, graph_feeds  # noqa: E402

from cavmae.export.int8 import Int8Options, quantize_export  # noqa: E402
from cavmae.export.validate import ort_session  # noqa: E402
from cavmae.manifest import Manifest  # noqa: E402
from cavmae.runtime.benchmark import load_average, machine_info, stage_gflop, write_result  # noqa: E402


def torch_int8_stages(checkpoint: Path, num_frames: int) -> dict[str, Callable[..., object]]:
    """The three classify stages of ``checkpoint`` with every Linear quantized by ``torch.ao``."""
    import torch
    from torch import nn

    from cavmae.checkpoint import load_checkpoint
    from cavmae.stages import build_stages

    model = load_checkpoint(checkpoint, progress=False)
    qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    stages = build_stages(qmodel, num_frames=num_frames, max_batch=1, graphs=set(TIMED))
    return {name: stages[name].module for name in TIMED}


def attention_shapes(manifest: Manifest) -> dict[str, tuple[int, int, int, int, int]]:
    """Per graph: (layers, batch, heads, tokens, head width) of its attention products."""
    cfg, f = manifest.model_config, manifest.num_frames
    heads, dh = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    audio_tokens = cfg.audio_grid[0] * cfg.audio_grid[1]
    visual_tokens = cfg.visual_grid[0] * cfg.visual_grid[1]
    return {
        "audio_encoder": (cfg.depth_modality, 1, heads, audio_tokens, dh),
        "visual_encoder": (cfg.depth_modality, f, heads, visual_tokens, dh),
        "joint_classifier": (cfg.depth_joint, f, heads,
                             audio_tokens + visual_tokens, dh),
    }


def median_s(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def attention_s(shape: tuple[int, int, int, int], dtype: object, repeat: int) -> float:
    """Median seconds of one fused attention (``scaled_dot_product_attention``) of ``shape``
    ``[B, heads, tokens, head width]`` in ``dtype``."""
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(shape).to(dtype) for _ in range(3))
    return median_s(lambda: F.scaled_dot_product_attention(q, k, v), repeat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8engines"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model: checks the script, measures nothing")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    src = build_export(args.work, tiny=args.tiny)
    manifest = Manifest.load(src)
    int8_dir = args.work / "int8"
    shutil.rmtree(int8_dir, ignore_errors=True)
    shutil.copytree(src, int8_dir)
    specs, report = quantize_export(int8_dir, dict(manifest.graphs), num_frames=manifest.num_frames,
                                    preprocess=manifest.preprocess,
                                    options=Int8Options(method="dynamic", min_top5=0, min_cosine=-1))
    print(f"ORT int8: {report.summary()}", file=sys.stderr)
    feeds = graph_feeds(manifest, manifest.num_frames)
    tq = torch_int8_stages(args.work / "random-base.pth", manifest.num_frames)
    gf = stage_gflop(manifest.model_config, manifest.num_frames)
    gflop = {"audio_encoder": gf["audio_encoder"],
             "visual_encoder": gf["visual_encoder_per_frame"] * manifest.num_frames,
             "joint_classifier": gf["joint_graph_per_clip"]}

    result: dict = {"tiny": args.tiny, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
                    "torch": torch.__version__, "torch_quantized_engine": torch.backends.quantized.engine,
                    "threads": args.threads, "repeat": args.repeat,
                    "load_before": load_average(), "graphs": {}}
    with torch.inference_mode():
        for name in TIMED:
            sess = ort_session(int8_dir / specs[name].file)  # all cores, as the runtime
            feed = feeds[name]
            tensors = [torch.from_numpy(feed[t.name]) for t in manifest.graphs[name].inputs]
            ort_t, torch_t = [], []
            sess.run(None, feed)
            tq[name](*tensors)
            for _ in range(args.repeat):  # alternate, so a busy moment hits both
                ort_t.append(median_s(lambda s=sess, f=feed: s.run(None, f), 1))
                torch_t.append(median_s(lambda m=tq[name], x=tensors: m(*x), 1))
            layers, b, h, n, dh = attention_shapes(manifest)[name]
            att32 = layers * attention_s((b, h, n, dh), torch.float32, args.repeat)
            att16 = layers * attention_s((b, h, n, dh), torch.bfloat16, args.repeat)
            att_gflop = layers * b * h * n * n * dh * 4 / 1e9
            entry = {"gflop": gflop[name], "ort_int8_s": float(np.median(ort_t)),
                     "torch_int8_s": float(np.median(torch_t)),
                     "attention": {"layers": layers, "batch": b, "heads": h, "tokens": n, "head_dim": dh,
                                   "gflop": att_gflop, "fp32_s": att32, "bf16_s": att16}}
            result["graphs"][name] = entry
            print(f"{name}: ORT int8 {entry['ort_int8_s'] * 1e3:.0f} ms, torch int8 "
                  f"{entry['torch_int8_s'] * 1e3:.0f} ms; attention ({att_gflop:.1f} GFLOP) fp32 "
                  f"{att32 * 1e3:.0f} ms, bf16 {att16 * 1e3:.0f} ms", file=sys.stderr)
            del sess
    g = result["graphs"]
    result["clip"] = {key: sum(g[n][key] for n in TIMED) for key in ("ort_int8_s", "torch_int8_s")}
    result["clip"]["attention_fp32_s"] = sum(g[n]["attention"]["fp32_s"] for n in TIMED)
    result["clip"]["attention_bf16_s"] = sum(g[n]["attention"]["bf16_s"] for n in TIMED)
    print(json.dumps(result["clip"]), file=sys.stderr)
    write_result(result, args.output)
    shutil.rmtree(int8_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
