"""A tiny ONNX graph for the engine tests: ``x [B,4,8] f32, idx [B,3] i64 -> y [B,4,6], z [B,3,5]``.

``y = x @ W + b`` and ``z = TABLE[idx]``: a float path and an int64 index path, like the real
graphs' token and mask-index inputs, small enough to check against numpy exactly.
"""

from __future__ import annotations

import numpy as np
from onnx import GraphProto, TensorProto, helper, numpy_helper

from cavmae.manifest import GraphSpec, TensorSpec


def proj_graph(w: np.ndarray, b: np.ndarray, table: np.ndarray, name: str = "proj") -> GraphProto:
    return helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("Gather", ["table", "idx"], ["z"], axis=0),
        ],
        name,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 6]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3, 5]),
        ],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(table, "table"),
        ],
    )


def proj_spec(max_batch: int, name: str = "proj", file: str = "proj.onnx") -> GraphSpec:
    """The manifest entry of :func:`proj_graph`."""
    return GraphSpec(
        name=name,
        file=file,
        inputs=(TensorSpec("x", ("batch", 4, 8), "float32"), TensorSpec("idx", ("batch", 3), "int64")),
        outputs=(TensorSpec("y", ("batch", 4, 6), "float32"), TensorSpec("z", ("batch", 3, 5), "float32")),
        max_batch=max_batch,
    )
