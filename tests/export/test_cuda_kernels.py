"""Every node of an exported graph has a kernel on onnxruntime's CUDA provider, so no session copies through
the host and every session may keep a CUDA graph. The one that had none: CLIP's pooled-token ArgMax over
int32 (SDXL's second text encoder). The CUDA provider registers ArgMax for double, float and float16 only
(onnxruntime docs/OperatorKernels.md, CUDAExecutionProvider), so the export casts its input to float32 first
(export/onnx_export.py: float_argmax), where that is exact."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.spec import ComponentSpec, TensorSpec
from sdturbo.export.graph_fixes import float_argmax

SPEC = ComponentSpec("text_encoder_2", (TensorSpec("input_ids", "int32", ("batch", 77)),), ())


def graph(source: str) -> onnx.ModelProto:
    """ids [B, 77] int32 -> ``source`` -> int32 -> ArgMax over the last axis -> index [B] int64."""
    nodes = {
        "eos": [  # CLIP: argmax(ids == eos), as the TorchScript exporter writes it
            helper.make_node("Equal", ["input_ids", "eos"], ["is_eos"]),
            helper.make_node("Cast", ["is_eos"], ["values"], to=TensorProto.INT32),
        ],
        "ids": [helper.make_node("Cast", ["input_ids"], ["values"], to=TensorProto.INT32)],  # older configs
        "product": [helper.make_node("Mul", ["input_ids", "input_ids"], ["values"])],  # a range nobody bounds
    }[source]
    nodes.append(helper.make_node("ArgMax", ["values"], ["index"], axis=-1, keepdims=0))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", 77])],
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor("eos", TensorProto.INT32, [], [49407])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)  # 1.31 reads <= 13


def run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    """Every output, one after another."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([out.ravel() for out in session.run(None, {"input_ids": ids})])


@pytest.mark.parametrize("source", ["eos", "ids"])
def test_an_integer_argmax_over_flags_or_ids_gets_a_float_input_and_the_same_index(source):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49408, (6, 77), dtype=np.int32)
    ids[:4, 70:] = 49407  # an end-of-text run: the first of them is the answer; rows 4-5 may have none
    ids[2, 5] = 49407
    model = graph(source)
    want = run(model, ids)
    assert float_argmax(model.graph, SPEC) == 1
    (argmax,) = [n for n in model.graph.node if n.op_type == "ArgMax"]
    (cast,) = [n for n in model.graph.node if n.output[0] == argmax.input[0]]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(run(model, ids), want)
    if source == "eos":
        assert want.tolist()[:4] == [70, 70, 5, 70]


def casts_before(model: onnx.ModelProto, node) -> list[int]:
    """The element types the Casts right before ``node``'s first input cast to, nearest first."""
    producers = {out: n for n in model.graph.node for out in n.output}
    out, name = [], node.input[0]
    while name in producers and producers[name].op_type == "Cast":
        out.append(producers[name].attribute[0].i)
        name = producers[name].input[0]
    return out


@pytest.mark.parametrize("source", ["eos", "ids"])
def test_the_fp16_conversion_of_the_fused_graphs_keeps_argmax_in_float32(source):
    """`sdturbo build --ort-optimize` converts the fp32 graph to fp16 with onnxruntime's converter, which makes
    every float32 Cast a float16 one unless told not to (export/ort_optimize.py: fp32_kept). In float16 the
    end-of-text id 49407 and the start 49406 both round to 49408: the first (position 0) would win, for every
    prompt. Here no float16 Cast stands before the ArgMax, and it reads float32."""
    from onnxruntime.transformers.onnx_model import OnnxModel
    from sdturbo.export.ort_optimize import fp32_kept

    def converted(keep: bool) -> onnx.ModelProto:
        model = graph(source)
        float_argmax(model.graph, SPEC)
        m = OnnxModel(model)
        m.convert_float_to_float16(keep_io_types=True, **(fp32_kept(m.model) if keep else {}))
        return m.model

    for keep in (True, False):
        model = converted(keep)
        (argmax,) = [n for n in model.graph.node if n.op_type == "ArgMax"]
        kinds = casts_before(model, argmax)
        if keep:
            assert kinds[0] == TensorProto.FLOAT and TensorProto.FLOAT16 not in kinds, kinds
        elif source == "ids":  # (what it guards against: onnxruntime's converter alone goes through float16)
            assert TensorProto.FLOAT16 in kinds, kinds


def test_two_argmax_of_one_tensor_share_one_cast():
    model = graph("eos")
    model.graph.node.append(helper.make_node("ArgMax", ["values"], ["first"], axis=0, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("first", TensorProto.INT64, [77]))
    ids = np.random.default_rng(1).integers(49400, 49408, (3, 77), dtype=np.int32)
    want = run(model, ids)
    assert float_argmax(model.graph, SPEC) == 2
    assert [n.op_type for n in model.graph.node].count("Cast") == 2  # the graph's own, and one float32 Cast
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(run(model, ids), want)


def test_an_integer_argmax_of_unknown_range_is_left_with_a_warning(caplog):
    model = graph("product")
    with caplog.at_level(logging.WARNING):
        assert float_argmax(model.graph, SPEC) == 0
    assert [n.op_type for n in model.graph.node] == ["Mul", "ArgMax"]
    assert "over integers of unknown range is left as it is" in caplog.text


# Where onnxruntime's CUDA provider registers an op for fewer types than ONNX allows (docs/OperatorKernels.md,
# CUDAExecutionProvider, commit 001d12d2): op -> (which input carries the type, the types it has kernels for).
# A node outside these runs on the CPU, with host copies, and its session can keep no CUDA graph.
F3 = {"double", "float", "float16"}
CUDA_GAPS = {
    "ArgMax": (0, F3),
    "ArgMin": (0, F3),
    "Clip": (0, {"double", "float", "float16", "int64", "int8", "uint64", "uint8"}),
    "Pad": (0, {"bool", "double", "float", "float16"}),
    "Resize": (0, {"double", "float", "float16", "int32", "uint8"}),
    "Where": (1, {"bfloat16", "double", "float", "float16", "int32", "int64", "uint8"}),
    "InstanceNormalization": (0, F3),
    "Sin": (0, F3),
    "Cos": (0, F3),
}


def test_no_exported_graph_needs_a_type_the_cuda_provider_lacks(tiny_vae_bundle, xl_bundle):
    """The SD-Turbo bundle with its tiny VAE and the SDXL-Turbo bundle, every component and precision. (Their
    parity with torch and diffusers, pooled output included, is tested where they are exported.)"""
    checked = 0
    for path in (tiny_vae_bundle, xl_bundle):
        b = Bundle(path)
        for precision, components in b.components.items():
            for name in components:
                model = onnx.shape_inference.infer_shapes(onnx.load(b.component(precision, name).onnx))
                g = model.graph
                types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
                for node in g.node:
                    if node.op_type in CUDA_GAPS:
                        index, allowed = CUDA_GAPS[node.op_type]
                        kind = TensorProto.DataType.Name(types[node.input[index]]).lower()
                        assert kind in allowed, (path.name, precision, name, node.op_type, kind)
                        checked += node.op_type == "ArgMax"
    assert checked >= 2  # SDXL's second text encoder has one, in each precision


def test_the_fused_graph_of_sdxls_second_text_encoder_keeps_its_argmax_in_float32(xl_bundle, tmp_path):
    import shutil

    from sdturbo.engine.backends.ort_optimized import find_optimized
    from sdturbo.export.ort_optimize import optimize_bundle

    path = shutil.copytree(xl_bundle, tmp_path / "b")
    optimize_bundle(path, ("text_encoder_2",), provider="cuda")
    fused = find_optimized(Bundle(path), "text_encoder_2", ort.__version__, "cuda", "fp16")
    model = onnx.load(fused)
    (argmax,) = [n for n in model.graph.node if n.op_type == "ArgMax"]
    kinds = casts_before(model, argmax)
    assert kinds[0] == TensorProto.FLOAT and TensorProto.FLOAT16 not in kinds, kinds


def test_a_graph_with_an_integer_argmax_is_recognised(tmp_path):
    """(What the ONNX Runtime CUDA pipeline checks to tell a user why a text encoder of an older bundle runs
    without CUDA graphs, and how to renew it.)"""
    from sdturbo.export.graph_fixes import integer_argmax

    old, new = graph("eos"), graph("eos")
    float_argmax(new.graph, SPEC)
    for model, name in ((old, "old"), (new, "new")):
        onnx.save(model, tmp_path / f"{name}.onnx")
    assert integer_argmax(tmp_path / "old.onnx") and not integer_argmax(tmp_path / "new.onnx")
    assert not integer_argmax(tmp_path / "missing.onnx")  # (a hint only: never an error)
