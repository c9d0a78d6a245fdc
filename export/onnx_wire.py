"""Edit the small parts of a serialized ONNX model without re-serializing its weights.

Why: the exporter hands over a full-size graph as ~340 MB of protobuf bytes, and the
declared shapes of its inputs and outputs then need a few numbers changed. Parsing the whole
model and serializing it again copies every weight twice more (about a second and a few
hundred MB of fresh memory per graph on a 2-core CPU, much of a first use). Protobuf lets a
message's fields come in any order, and a repeated field's entries may be split across the
message, so the weights' bytes (``GraphProto.initializer``, field 5, and
``sparse_initializer``, field 15) can be carried over verbatim while everything else (nodes,
inputs, outputs, value infos: kilobytes) is parsed, edited and serialized as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

#: ModelProto.graph
_GRAPH_FIELD = 7
#: GraphProto.initializer and GraphProto.sparse_initializer: the weights
_INITIALIZER_FIELD = 5
_WEIGHT_FIELDS = frozenset({_INITIALIZER_FIELD, 15})
#: TensorProto.raw_data
_RAW_DATA_FIELD = 9
_LENGTH_DELIMITED = 2


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(data: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, start of the field, start of its payload, end)`` for each field of the
    message serialized in ``data``, in order; payload is the value of a length-delimited field
    (for the others it is where the value starts)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _varint(data, pos)
        elif wire == 1:
            end = pos + 8
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            end = pos + length
        elif wire == 5:
            end = pos + 4
        else:  # groups (3, 4) are not used by ONNX
            raise ValueError(f"unsupported protobuf wire type {wire} in field {number}")
        if end > len(data):
            raise ValueError("truncated protobuf field")
        yield number, start, pos, end
        pos = end


def write_edited_model(data: bytes | memoryview, path: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Write the ONNX model serialized in ``data`` to ``path`` after ``edit`` changed it, where
    ``edit`` sees the model without its weights (``graph.initializer`` empty) and must not add
    any. The weights' bytes are copied from ``data`` unchanged.

    The file parses to the same model as ``edit`` applied to the fully parsed model would give
    (tests/test_onnx_wire.py), with the initializers after the graph's other fields.
    """
    data = memoryview(data)
    rest, graph_parts, weights = bytearray(), bytearray(), []
    for number, start, payload, end in _fields(data):
        if number != _GRAPH_FIELD:
            rest += data[start:end]
            continue
        for g_number, g_start, _, g_end in _fields(data[payload:end]):
            piece = data[payload + g_start:payload + g_end]
            if g_number in _WEIGHT_FIELDS:
                weights.append(piece)
            else:
                graph_parts += piece
    model = onnx.ModelProto()
    model.ParseFromString(bytes(rest))
    model.graph.ParseFromString(bytes(graph_parts))
    edit(model)
    if len(model.graph.initializer) or len(model.graph.sparse_initializer):
        raise ValueError("write_edited_model: the edit must not add initializers")
    _write_model(path, model, weights)


def write_model_with_weights(
    model: onnx.ModelProto, weights: Sequence[tuple[str, np.ndarray]], path: Path
) -> None:
    """Write ``model`` (whose graph holds no weights of these names) to ``path`` with the
    ``weights`` (name, array) appended as its graph's initializers, each array's bytes written
    straight from its buffer (no protobuf copy of hundreds of MB). Arrays are stored as
    little-endian ``raw_data`` in their own dtype; they must be C-contiguous."""
    pieces: list[bytes | memoryview] = []
    for name, array in weights:
        if not array.flags.c_contiguous:
            raise ValueError(f"write_model_with_weights: {name} is not C-contiguous")
        header = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        head = header.SerializeToString()
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).data.cast("B")
        raw = _encode_varint(_RAW_DATA_FIELD << 3 | _LENGTH_DELIMITED) + _encode_varint(len(data))
        size = len(head) + len(raw) + len(data)
        pieces += [_encode_varint(_INITIALIZER_FIELD << 3 | _LENGTH_DELIMITED) + _encode_varint(size)
                   + head + raw, data]
    _write_model(path, model, pieces)


def _write_model(path: Path, model: onnx.ModelProto, weights: Sequence[bytes | memoryview]) -> None:
    """Write ``model`` with the serialized graph fields ``weights`` appended to its graph
    (``model``'s graph is cleared)."""
    graph = model.graph.SerializeToString()
    model.ClearField("graph")
    graph_length = len(graph) + sum(len(w) for w in weights)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
        f.write(_encode_varint(_GRAPH_FIELD << 3 | _LENGTH_DELIMITED))
        f.write(_encode_varint(graph_length))
        f.write(graph)
        for w in weights:
            f.write(w)
