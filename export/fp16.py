"""fp16 variants of exported graphs.

Weights and matrix products go to fp16; LayerNormalization, Softmax and the reductions that
normalize embeddings stay in fp32 (their sums and exponentials are where fp16 loses accuracy),
and graph inputs and outputs stay float32 so callers feed the same arrays to either precision.
"""

from __future__ import annotations

from pathlib import Path

import onnx

#: ops kept in fp32
FP32_OPS = [
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "Sigmoid",
    "Pow",
    "Sqrt",
    "Div",
    "Erf",
]


def convert_to_fp16(path: Path) -> None:
    """Rewrite the ONNX file at ``path`` in place as its fp16 variant."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    topological_sort(converted.graph)
    onnx.save(converted, str(path))


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs.

    The fp16 converter appends the Cast nodes for float32 graph inputs at the end; ONNX requires
    producers first.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("the graph has a cycle or an input no node produces")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)
