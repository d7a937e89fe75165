"""Attention fused into MultiHeadAttention (export/attention.py) in the text encoders and the VAE: one node per
attention, the same outputs as the exported graph on other inputs and batch sizes than its checks used, and nothing
fused where the mask is not causal or where the fused graph would not give the original's outputs."""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import pytest
from sdturbo.engine.bundle import Bundle
from sdturbo.export import attention


def graph(bundle, name="text_encoder"):
    b = Bundle(bundle)
    return b.component("fp32", name).onnx, b.component("fp32", name).spec


def ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("which", ["sd", "sdxl-1", "sdxl-2", "vae_decoder", "vae_encoder"])
def test_every_attention_becomes_one_node_with_the_same_outputs(which, tiny_bundle, xl_bundle, tmp_path):
    bundle, name = {
        "sd": (tiny_bundle, "text_encoder"),
        "sdxl-1": (xl_bundle, "text_encoder"),
        "sdxl-2": (xl_bundle, "text_encoder_2"),
        "vae_decoder": (tiny_bundle, "vae_decoder"),
        "vae_encoder": (tiny_bundle, "vae_encoder"),
    }[which]
    src, _ = graph(bundle, name)
    work = tmp_path / "work"
    work.mkdir()
    model, n = attention.fuse_file(src, work)
    onnx.load_external_data_for_model(model, str(src.parent))
    fused = tmp_path / "fused.onnx"
    onnx.save(model, str(fused))
    before, after = ops(src), ops(fused)
    assert n == after["MultiHeadAttention"] == before["Softmax"] > 0  # every attention, one node each
    assert after["Softmax"] == 0 and before["MatMul"] - after["MatMul"] == 2 * n  # QK^T and PV gone
    flags = (a for x in model.graph.node for a in x.attribute if a.name == "unidirectional")
    causal = {onnx.helper.get_attribute_value(a) for a in flags}
    assert causal == ({1} if which.startswith("sd") else {0})  # text: causal; the VAE's: every pixel sees all
    rng = np.random.default_rng(7)  # not the checks' inputs or batch
    feeds = {}
    for k, v in attention.check_feeds(onnx.load(str(src), load_external_data=False)).items():
        shape = (3, *v.shape[1:])
        feeds[k] = (rng.integers(0, 50, shape) if v.dtype.kind == "i" else rng.standard_normal(shape)).astype(v.dtype)
    want, got = attention._run(src, feeds), attention._run(fused, feeds)
    for out, value in want.items():
        assert np.abs(got[out] - value).max() <= attention.TOLERANCE * np.abs(value).max(), out


def test_a_mask_that_is_not_causal_is_left_unfused(tiny_bundle, tmp_path, caplog):
    src, _ = graph(tiny_bundle)
    model = onnx.load(str(src))
    found = attention.find(model.graph)
    zeros = onnx.numpy_helper.from_array(np.zeros((1, 1, 77, 77), np.float32), "no_mask")
    model.graph.initializer.append(zeros)
    for node in model.graph.node:  # every attention sees all tokens: what a bidirectional encoder does
        node.input[:] = ["no_mask" if i == found[0]["mask"] else i for i in node.input]
    onnx.save(model, str(tmp_path / "bidirectional.onnx"))
    work = tmp_path / "work"
    work.mkdir()
    with caplog.at_level(logging.WARNING):
        out, n = attention.fuse_file(tmp_path / "bidirectional.onnx", work)
    assert (out, n) == (None, 0)
    assert "its mask is not causal; the attention is left unfused" in caplog.text


@pytest.mark.parametrize("wrong", ["scale", "heads", "causal", "nan"])
@pytest.mark.parametrize("name", ["text_encoder", "vae_decoder"])
def test_a_fusion_that_changes_the_outputs_is_not_used(wrong, name, tiny_bundle, tmp_path, monkeypatch, caplog):
    """A scale 1% off, a head count of another layout, the causal flag flipped: what a misread pattern would give;
    and outputs that are NaN, which no difference bar may let through."""
    src, _ = graph(tiny_bundle, name)
    make_node = onnx.helper.make_node
    change = {
        "scale": lambda k: {**k, "scale": k["scale"] * 1.01},
        "heads": lambda k: {**k, "num_heads": 1 if k["num_heads"] > 1 else 2},
        "causal": lambda k: {**k, "unidirectional": 1 - k["unidirectional"]},
        "nan": lambda k: {**k, "scale": float("nan")},
    }[wrong]

    def broken(op, *a, **k):
        return make_node(op, *a, **(change(k) if op == "MultiHeadAttention" else k))

    monkeypatch.setattr(onnx.helper, "make_node", broken)
    with caplog.at_level(logging.WARNING):
        out, n = attention.fuse_file(src, tmp_path)
    assert (out, n) == (None, 0)
    assert "fused attention moves" in caplog.text


def test_a_fused_graph_onnxruntime_cannot_run_is_not_used(tiny_bundle, tmp_path, monkeypatch, caplog):
    """Not an error that stops the build (and the components after it): the original graph is kept, as for a
    fused graph whose outputs differ. Here onnxruntime refuses the node when the session is made."""
    src, _ = graph(tiny_bundle)
    make_node = onnx.helper.make_node

    def refused(op, *a, **k):
        return make_node(op, *a, **({**k, "num_heads": 0} if op == "MultiHeadAttention" else k))

    monkeypatch.setattr(onnx.helper, "make_node", refused)
    with caplog.at_level(logging.WARNING):
        out, n = attention.fuse_file(src, tmp_path)
    assert (out, n) == (None, 0)
    assert f"onnxruntime cannot run the fused {src.name} (" in caplog.text and "num_heads" in caplog.text
    assert "its attentions are left unfused" in caplog.text


def test_a_graph_without_attention_is_returned_as_it_is(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    onnx.save(onnx.helper.make_model(g, ir_version=10), str(tmp_path / "relu.onnx"))
    work = tmp_path / "work"
    work.mkdir()
    assert attention.fuse_file(tmp_path / "relu.onnx", work) == (None, 0)
    assert not list(work.iterdir())  # nothing written
