"""Where the time of an exported graph goes in ONNX Runtime, by operator type, and how close the
int8 products come to what this CPU can do.

    python benchmarks/ort_profile.py EXPORT_DIR [--graph visual_encoder] [--runs 4] [--json OUT]

For each graph: ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) over ``--runs``
runs after one warm-up, summed per operator type (milliseconds per run and share). Then a
ceiling: one product of the size of a ViT-B MLP layer (1960 x 768 times 768 x 3072, ten frames of
196 tokens) as a one-node graph, fp32 ``MatMul`` and int8 ``DynamicQuantizeMatMul`` (the node
the int8 export's products become after ONNX Runtime's fusions), timed alone. Its GOP/s is the
most the graph's products can reach on this machine with this library.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _session(path: str, threads: int, profile: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = profile
    if profile:
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        if "int64" in i.type:
            feeds[i.name] = np.zeros(shape, np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def profile_graph(path: Path, batch: int, runs: int, threads: int) -> dict:
    """Milliseconds per run by operator type, from ONNX Runtime's profiler."""
    session = _session(str(path), threads, profile=True)
    feeds = _feeds(session, batch)
    session.run(None, feeds)  # warm-up (its events are dropped below: first run only)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feeds)
    wall = (time.perf_counter() - start) / runs
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    first_end = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0
    by_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    return {
        "graph": path.stem, "batch": batch, "runs": runs, "wall_ms": wall * 1e3,
        "kernel_ms": total / runs / 1e3,
        "by_op": {op: {"ms": us / runs / 1e3, "share": us / total} for op, us in by_op.most_common()},
    }


def _one_product_graph(kind: str, m: int, k: int, n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    if kind == "fp32":
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(w, "w")]
        opsets = [helper.make_opsetid("", 17)]
    else:  # per-channel int8 weights, activations quantized per call: what the int8 export runs
        scale = np.abs(w).max(axis=0) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws", "wz"], ["y"],
                                  domain="com.microsoft")]
        inits = [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "wz")]
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph(nodes, f"{kind}_product", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=opsets)


def product_ceiling(threads: int, m: int = 1960, k: int = 768, n: int = 3072, repeat: int = 20) -> dict:
    """GOP/s of one ViT-B-sized product, fp32 and int8, each as a graph of one node."""
    out = {"shape": [m, k, n]}
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("fp32", "int8"):
            path = os.path.join(tmp, f"{kind}.onnx")
            onnx.save(_one_product_graph(kind, m, k, n), path)
            session = _session(path, threads, profile=False)
            for _ in range(3):
                session.run(None, {"x": x})
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                session.run(None, {"x": x})
                times.append(time.perf_counter() - t)
            p50 = float(np.median(times))
            out[kind] = {"p50_ms": p50 * 1e3, "gops": 2 * m * k * n / p50 / 1e9}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="an export directory (fp32 or int8)")
    ap.add_argument("--graph", action="append", help="graph name (repeat); default: the encoders and the joint classifier")
    ap.add_argument("--frames", type=int, default=10, help="frames per clip (batch of the per-frame graphs)")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    manifest = json.loads((args.export / "manifest.json").read_text())
    graphs = args.graph or ["audio_encoder", "visual_encoder", "joint_classifier"]
    result = {"export": str(args.export), "precision": manifest.get("precision"),
              "machine": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
              "threads": args.threads, "graphs": [], "ceiling": None}
    for g in graphs:
        batch = args.frames if g.startswith("visual") else 1
        r = profile_graph(args.export / f"{g}.onnx", batch, args.runs, args.threads)
        result["graphs"].append(r)
        print(f"{g} (batch {batch}): {r['wall_ms']:.1f} ms per run, {r['kernel_ms']:.1f} ms in kernels")
        for op, v in list(r["by_op"].items())[:8]:
            print(f"  {op:24s} {v['ms']:8.1f} ms  {100 * v['share']:5.1f}%")
    result["ceiling"] = c = product_ceiling(args.threads)
    print(f"one {c['shape'][0]}x{c['shape'][1]} @ {c['shape'][1]}x{c['shape'][2]} product: fp32 "
          f"{c['fp32']['gops']:.0f} GFLOP/s, int8 {c['int8']['gops']:.0f} GOP/s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
