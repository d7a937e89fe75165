"""Fixes to exported ONNX graphs, in plain onnx (no torch): what makes a graph run better on a provider without
changing what it computes."""

from __future__ import annotations

import logging

import onnx

from ..engine.spec import ComponentSpec

log = logging.getLogger(__name__)

INTEGER_TYPES = frozenset(
    getattr(onnx.TensorProto, t) for t in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
)
FLOAT_ARGMAX = "/float_argmax/"  # the Casts float_argmax adds are named so (fp16 conversion must keep them fp32)
PASS_THROUGH = frozenset(("Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"))
COMPARISONS = frozenset(("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor"))


def float_argmax(graph: onnx.GraphProto, spec: ComponentSpec) -> int:
    """Give every integer ArgMax a float32 input (a Cast before it); returns how many.

    CLIP's pooled output takes the hidden state at the end-of-text token: ``argmax(ids == eos)``, or
    ``argmax(ids)`` in older configs, an ArgMax over int32. onnxruntime's CUDA provider has ArgMax for floats
    only, so that one node would run on the CPU with host copies around it, every request, and onnxruntime
    refuses CUDA graphs for a session with host copies: SDXL's second text encoder could never be in one.
    float32 holds every integer below 2**24 exactly, so the index is the same (first maximum) when the
    input is known to be such: a comparison's 0/1, or the token ids (vocabularies are far smaller), through
    casts and reshapes only. Any other integer ArgMax is left as it is, with a warning."""
    producers = {out: node for node in graph.node for out in node.output}
    names = {*producers, *(i for node in graph.node for i in node.input), *(t.name for t in graph.initializer)}
    inputs = {t.name for t in spec.inputs if t.dtype.startswith("int")}  # the token ids
    types = element_types(graph)

    def bounded(name: str) -> bool:
        node = producers.get(name)
        if node is None:
            return name in inputs
        if node.op_type in COMPARISONS:
            return True
        return node.op_type in PASS_THROUGH and bounded(node.input[0])

    done, nodes, casts = 0, [], {}
    for node in graph.node:
        kind = types.get(node.input[0]) if node.op_type == "ArgMax" else None
        if node.op_type == "ArgMax" and (kind is None or kind in INTEGER_TYPES):
            if bounded(node.input[0]):
                if node.input[0] not in casts:  # one Cast per tensor, however many ArgMax read it
                    cast = f"{FLOAT_ARGMAX}{node.input[0]}"
                    while cast in names:
                        cast += "_"
                    names.add(cast)
                    casts[node.input[0]] = cast
                    nodes.append(
                        onnx.helper.make_node("Cast", [node.input[0]], [cast], name=cast, to=onnx.TensorProto.FLOAT)
                    )
                node.input[0] = casts[node.input[0]]
                done += 1
            else:
                log.warning("%s: ArgMax %s over integers of unknown range is left as it is", spec.name, node.name)
        nodes.append(node)
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
    return done


def element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Each tensor's element type where the graph says: its value info (inputs, outputs, inferred ones), else
    the Cast that makes it."""
    out = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    out = {name: kind for name, kind in out.items() if kind}
    for node in graph.node:
        if node.op_type == "Cast":
            out.setdefault(node.output[0], next(a.i for a in node.attribute if a.name == "to"))
    return out


def integer_argmax(path) -> bool:
    """Whether the ONNX graph at ``path`` (read without its weights) has an ArgMax over integers, as bundles
    exported before float_argmax have; False where the file cannot be read (the caller only adds a hint)."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:
        return False
    types = element_types(graph)
    return any(types.get(n.input[0]) in INTEGER_TYPES for n in graph.node if n.op_type == "ArgMax")


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s weights are too large to be saved inside its .onnx file (``EXTERNAL_DATA_BYTES``).
    Counted tensor by tensor: ``model.ByteSize()`` serializes the whole model to measure it (with protobuf's
    upb backend), a full-size UNet's weights once more in memory."""
    from ..engine.bundle import EXTERNAL_DATA_BYTES

    return sum(t.ByteSize() for t in model.graph.initializer) >= EXTERNAL_DATA_BYTES
