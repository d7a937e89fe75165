"""Writing an ONNX model whose weights are embedded without serializing it whole.

protobuf's serializer (upb, the one onnx's Python uses) builds a message's bytes in buffers it grows as it goes
and then copies them out: ``onnx.save_model`` of a graph with many embedded weights peaks at about five times
their size on top of the graph itself (measured: 64 weights of 4 MiB, 4.96x; 1 GB in 700, 5.0x), and of one big
weight at twice its size. SD-Turbo's fp16 UNet (1.7 GB) went through that in its export (which peaked there at
9.4 GB; 7.0 GB without it) and again after onnxruntime's fusions (7.7 GB; 6.1 GB without it).

``save_streamed`` writes the same bytes as ``onnx.save_model`` (byte for byte: protobuf writes a message's
fields in the order of their numbers, which is the order they are written in here) with the graph's weights
written from the graph itself, one at a time: beside the graph, it holds one weight's values (Python's copy of
them, to write) and the small fields around them. Fields this onnx does not know (a newer onnx's) are not carried
over; the graphs written here come from torch's exporter and onnxruntime's optimizer, which this onnx reads whole.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor

_LEN = 2  # protobuf's wire type of length-delimited fields (messages, bytes)
_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def value_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of an initializer's values, from its type and shape (wherever the proto keeps them), without
    serializing it as ``ByteSize()`` does (a copy of its values, and seconds per call for a full-size UNet)."""
    return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(number: int, length: int) -> bytes:
    """A length-delimited field's key and length: what precedes its bytes."""
    return _varint(number << 3 | _LEN) + _varint(length)


def _repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # (protobuf 6; ``label`` before it, deprecated since)
    return is_repeated if is_repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _split(message, number: int):
    """Two new messages of ``message``'s type: the fields numbered below ``number``, and those above (copies:
    only small fields are split this way, never the one numbered ``number``)."""
    parts = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number == number:
            continue
        part = parts[field.number > number]
        if _repeated(field):
            getattr(part, field.name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
    return parts


def _tensor_parts(tensor: onnx.TensorProto) -> tuple[bytes, bytes, bytes, int]:
    """``tensor`` serialized but for its values (``raw_data``): the fields before them, their key and length
    (empty where it has none), the fields after them; and its size serialized."""
    lo, hi = (part.SerializeToString() for part in _split(tensor, _RAW_DATA))
    n = len(tensor.raw_data)
    key = _key(_RAW_DATA, n) if tensor.HasField("raw_data") else b""
    return lo, key, hi, len(lo) + len(key) + n + len(hi)


def save_streamed(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` as ``onnx.save_model(model, path)`` does, one weight at a time: no more than
    one weight's values are copied at once (to be written)."""
    if not model.HasField("graph"):
        onnx.save_model(model, str(path))
        return
    model_lo, model_hi = _split(model, _GRAPH)
    graph_lo, graph_hi = _split(model.graph, _INITIALIZER)
    head, tail = graph_lo.SerializeToString(), graph_hi.SerializeToString()
    tensors = model.graph.initializer
    parts = [_tensor_parts(t) for t in tensors]
    graph_bytes = len(head) + len(tail) + sum(len(_key(_INITIALIZER, size)) + size for *_, size in parts)
    with open(Path(path), "wb") as f:
        f.write(model_lo.SerializeToString())
        f.write(_key(_GRAPH, graph_bytes))
        f.write(head)
        for tensor, (lo, key, hi, size) in zip(tensors, parts, strict=True):
            f.write(_key(_INITIALIZER, size))
            f.write(lo)
            f.write(key)
            f.write(tensor.raw_data)  # (b"" where it has none)
            f.write(hi)
        f.write(tail)
        f.write(model_hi.SerializeToString())
