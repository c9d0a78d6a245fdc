"""Dynamic int8 quantization of the weight products of an fp32 graph, with whole-array numpy.

What it writes is what ONNX Runtime's ``quantize_dynamic`` writes for this project's settings
(int8 weights, symmetric, per output channel or per tensor, full or reduced range, ``MatMul`` nodes
with a constant 2-D weight only): the same int8 weights, scales and zero points, the same node
pattern (``DynamicQuantizeLinear`` on the activation, ``MatMulInteger``, ``Cast``, two ``Mul``),
which ONNX Runtime's optimizer fuses into ``DynamicQuantizeMatMul`` when it loads the graph.
``tests/test_int8.py`` checks the weights and the outputs against ``quantize_dynamic``.

Why not call ``quantize_dynamic``: its per-channel path quantizes one output channel at a time
in Python, 76,032 calls for a full-size audio encoder (4.5 of its 7.4 s, profiled; about 17 s of
an int8 export's 33 s of quantizing on a 2-core CPU). Here each weight is one array operation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: int8 range of a symmetric weight (ONNX Runtime's ``ONNX_INT_TYPE_SYMMETRIC_RANGE``)
_SYMMETRIC_MAX = 127
#: what a quantized weight is clipped to (the full int8 range, as ``quantize_nparray`` does)
_INT8_MIN, _INT8_MAX = -128, 127
#: the reduced range (``ONNX_INT_TYPE_REDUCED_RANGE``): 7 bits, for CPUs whose int8 products
#: sum pairs in 16 bits (``cavmae.cpu_flags.int8_products_saturate``)
_REDUCED_MAX = 64


def quantize_weight(
    weight: np.ndarray, per_channel: bool, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(int8 weight, float32 scale)`` of a ``[K, N]`` float32 weight: symmetric, zero point
    0, one scale per output column ``[N]`` (``per_channel``) or one for the tensor (``[]``).

    The arithmetic follows ONNX Runtime's ``compute_scale_zp`` and ``quantize_nparray``: the
    range includes 0, the scale is computed in float64 and stored in float32 (1.0 where it
    would be below float32's smallest normal), values are divided in float32, rounded half to
    even and clipped to [-128, 127], or to [-64, 64] with ``reduce_range``."""
    top = _REDUCED_MAX if reduce_range else _SYMMETRIC_MAX
    lo, hi = (-_REDUCED_MAX, _REDUCED_MAX) if reduce_range else (_INT8_MIN, _INT8_MAX)
    axis = 0 if per_channel else None
    low = np.minimum(weight.min(axis=axis), np.float32(0))
    high = np.maximum(weight.max(axis=axis), np.float32(0))
    absmax = np.maximum(np.abs(low), np.abs(high)).astype(np.float64)
    scale64 = np.asarray(2.0 * absmax / (2.0 * top))
    scale = np.where(scale64 < np.finfo(np.float32).tiny, 1.0, scale64).astype(np.float32)
    quantized = np.rint(weight.astype(np.float32) / scale)
    np.clip(quantized, lo, hi, out=quantized)
    return quantized.astype(np.int8), scale


def quantize_dynamic_int8(
    src: Path, dst: Path, nodes: Collection[str], per_channel: bool = True, reduce_range: bool = False
) -> int:
    """Write to ``dst`` the graph ``src`` with the ``MatMul`` nodes named in ``nodes`` that
    multiply by a float32 2-D initializer quantized dynamically (see the module doc); other
    nodes stay as they are. Returns how many products were quantized."""
    model = onnx.load(str(src))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    wanted = set(nodes)
    quantized: set[str] = set()  # weights already written in int8
    activations: set[str] = set()  # activations already quantized by a DynamicQuantizeLinear
    added: list[TensorProto] = []
    out_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        b = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        init = weights.get(b) if b is not None and node.name in wanted else None
        if b is None or init is None or init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
            out_nodes.append(node)
            continue
        if b not in quantized:
            q, scale = quantize_weight(numpy_helper.to_array(init), per_channel, reduce_range)
            added += [numpy_helper.from_array(q, f"{b}_quantized"),
                      numpy_helper.from_array(scale, f"{b}_scale"),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{b}_zero_point")]
            quantized.add(b)
        a, y, name = node.input[0], node.output[0], node.name
        if a not in activations:
            out_nodes.append(helper.make_node("DynamicQuantizeLinear", [a],
                                              [f"{a}_quantized", f"{a}_scale", f"{a}_zero_point"],
                                              name=f"{a}_QuantizeLinear"))
            activations.add(a)
        scales = f"{name}_quant_scales_mul:0"
        out_nodes += [
            helper.make_node("Mul", [f"{a}_scale", f"{b}_scale"], [scales], name=f"{name}_quant_scales_mul"),
            helper.make_node("MatMulInteger", [f"{a}_quantized", f"{b}_quantized", f"{a}_zero_point",
                                               f"{b}_zero_point"], [f"{y}_output_quantized"], name=f"{name}_quant"),
            helper.make_node("Cast", [f"{y}_output_quantized"], [f"{y}_output_quantized_cast_output"],
                             name=f"{y}_output_quantized_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{y}_output_quantized_cast_output", scales], [y],
                             name=f"{name}_quant_output_scale_mul"),
        ]
        uses[b] -= 1
        count += 1
    keep = [t for t in graph.initializer if not (t.name in quantized and uses[t.name] <= 0)]
    del graph.initializer[:]
    graph.initializer.extend([*keep, *added])
    del graph.node[:]
    graph.node.extend(out_nodes)
    onnx.save(model, str(dst))
    return count
