"""Dynamic int8 quantization of one graph: ONNX Runtime's ``quantize_dynamic`` against
``cavmae.export.dynamic_int8``, side by side in one process, taking turns.

The graph is the full-size audio encoder (``--tiny``: the tiny one, a quick check), filled from
its shipped template with random weights. Each round quantizes it both ways (per-channel int8
weights, the export's settings) and times each; the first round also checks that the two files
hold the same int8 weights, scales and zero points and give the same outputs on random inputs.

    python benchmarks/quantize_speed.py --rounds 3 --out benchmarks/results/quantize-speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _graph(work: Path, tiny: bool) -> tuple[Path, Any]:
    """The fp32 audio encoder graph and its stage (traced when tiny: no template for it)."""
    import torch

    from cavmae.config import BASE, TINY
    from cavmae.export.graph_templates import fill_template, find_template
    from cavmae.export.onnx_export import OPSET, export_stage
    from cavmae.model import CAVMAEFT
    from cavmae.stages import plan_graphs, stage_of

    config = TINY.replace(num_classes=527) if tiny else BASE
    torch.manual_seed(0)
    planned = plan_graphs("classifier", config)["audio_encoder"]
    stage = stage_of(CAVMAEFT(config).eval(), planned)
    path = work / "audio_encoder.onnx"
    template = find_template(planned, config.to_dict(), OPSET)
    if template is None:
        export_stage(stage, path)
    else:
        fill_template(template.data, stage.module, path)
    return path, stage


def _same(theirs: Path, ours: Path, stage: Any) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(theirs)).graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ours)).graph.initializer}
    names = [k for k in want if k.endswith(("_quantized", "_scale", "_zero_point"))]
    same_weights = all(k in got and got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in names)
    feeds = stage.sample(np.random.default_rng(0), 1)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds) for p in (theirs, ours))
    return {"quantized_tensors": len(names), "same_weights": same_weights,
            "same_outputs": all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="The tiny model (a quick check, not a measure).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True, help="Write the results here (JSON).")
    args = ap.parse_args(argv)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cavmae.export.dynamic_int8 import quantize_dynamic_int8
    from cavmae.export.int8 import INT8_OPS, nodes_to_quantize
    from cavmae.fsio import write_json
    from cavmae.runtime.benchmark import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, stage = _graph(work, args.tiny)
        nodes = nodes_to_quantize(src)
        theirs, ours = work / "ort.onnx", work / "ours.onnx"
        result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                  "machine": machine_info(), "graph": "audio_encoder",
                                  "model": "tiny" if args.tiny else "full size", "rounds": []}
        for i in range(args.rounds):
            t0 = time.perf_counter()
            quantize_dynamic(src, theirs, op_types_to_quantize=list(INT8_OPS), per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                             extra_options={"MatMulConstBOnly": True})
            t1 = time.perf_counter()
            quantize_dynamic_int8(src, ours, nodes, per_channel=True)
            t2 = time.perf_counter()
            result["rounds"].append({"onnxruntime_s": t1 - t0, "cavmae_s": t2 - t1})
            print(f"round {i + 1}/{args.rounds}: onnxruntime {t1 - t0:.2f} s, cavmae {t2 - t1:.2f} s",
                  file=sys.stderr, flush=True)
            if i == 0:
                result["check"] = _same(theirs, ours, stage)
    med = {k: statistics.median(r[k] for r in result["rounds"]) for k in ("onnxruntime_s", "cavmae_s")}
    result["median"] = {**med, "speedup": med["onnxruntime_s"] / med["cavmae_s"]}
    write_json(args.out, result)
    print(f"check: {result['check']}; median speed-up {result['median']['speedup']:.1f}x", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
