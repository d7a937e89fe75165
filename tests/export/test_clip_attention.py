"""The text encoders' self-attention fused into MultiHeadAttention (export/clip_attention.py): one node per layer,
the same outputs as the exported graph on other tokens and batch sizes than its checks used, and nothing fused
where the mask is not causal or where the fused graph would not give the original's outputs."""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import pytest
from sdturbo.engine.bundle import Bundle
from sdturbo.export import clip_attention
from sdturbo.export.ort_optimize import token_feeds


def graph(bundle, name="text_encoder"):
    b = Bundle(bundle)
    return b.component("fp32", name).onnx, b.component("fp32", name).spec


def ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("which", ["sd", "sdxl-1", "sdxl-2"])
def test_every_layer_s_attention_becomes_one_node_with_the_same_outputs(which, tiny_bundle, xl_bundle, tmp_path):
    bundle, name = {
        "sd": (tiny_bundle, "text_encoder"),
        "sdxl-1": (xl_bundle, "text_encoder"),
        "sdxl-2": (xl_bundle, "text_encoder_2"),
    }[which]
    src, spec = graph(bundle, name)
    work = tmp_path / "work"
    work.mkdir()
    model, n = clip_attention.fuse_file(src, work, token_feeds(src, spec))
    onnx.load_external_data_for_model(model, str(src.parent))
    fused = tmp_path / "fused.onnx"
    onnx.save(model, str(fused))
    before, after = ops(src), ops(fused)
    assert n == after["MultiHeadAttention"] == before["Softmax"] > 0  # every attention, one node each
    assert after["Softmax"] == 0 and before["MatMul"] - after["MatMul"] == 2 * n  # QK^T and PV gone
    ids = np.random.default_rng(7).integers(0, 50, (3, 77)).astype(np.int32)  # not the checks' tokens or batch
    want, got = clip_attention._run(src, {"input_ids": ids}), clip_attention._run(fused, {"input_ids": ids})
    for out, value in want.items():
        assert np.abs(got[out] - value).max() <= clip_attention.TOLERANCE * np.abs(value).max(), out


def test_a_mask_that_is_not_causal_is_left_unfused(tiny_bundle, tmp_path, caplog):
    src, spec = graph(tiny_bundle)
    model = onnx.load(str(src))
    found = clip_attention.find(model.graph)
    zeros = onnx.numpy_helper.from_array(np.zeros((1, 1, 77, 77), np.float32), "no_mask")
    model.graph.initializer.append(zeros)
    for node in model.graph.node:  # every attention sees all tokens: what a bidirectional encoder does
        node.input[:] = ["no_mask" if i == found[0]["mask"] else i for i in node.input]
    onnx.save(model, str(tmp_path / "bidirectional.onnx"))
    work = tmp_path / "work"
    work.mkdir()
    with caplog.at_level(logging.WARNING):
        out, n = clip_attention.fuse_file(tmp_path / "bidirectional.onnx", work, token_feeds(src, spec))
    assert (out, n) == (None, 0)
    assert "its mask is not causal; the attention is left unfused" in caplog.text


@pytest.mark.parametrize("wrong", ["scale", "heads"])
def test_a_fusion_that_changes_the_outputs_is_not_used(wrong, tiny_bundle, tmp_path, monkeypatch, caplog):
    """A scale read 1% off, or a head count of another layout: what a misread pattern would give."""
    src, spec = graph(tiny_bundle)
    if wrong == "scale":
        find = clip_attention.find
        monkeypatch.setattr(clip_attention, "find", lambda g: [{**f, "scale": f["scale"] * 1.01} for f in find(g)])
    else:
        make_node = onnx.helper.make_node

        def one_head(op, *a, **k):
            return make_node(op, *a, **({**k, "num_heads": 1} if op == "MultiHeadAttention" else k))

        monkeypatch.setattr(onnx.helper, "make_node", one_head)
    with caplog.at_level(logging.WARNING):
        out, n = clip_attention.fuse_file(src, tmp_path, token_feeds(src, spec))
    assert (out, n) == (None, 0)
    assert "fused attention moves hidden_states by" in caplog.text


def test_graphs_without_a_masked_attention_are_returned_as_they_are(tiny_bundle, tmp_path):
    for name in ("unet", "vae_decoder"):  # attention without a mask: nothing this pass is for
        src, _ = graph(tiny_bundle, name)
        assert clip_attention.find(onnx.load(str(src), load_external_data=False).graph) == []
        assert clip_attention.fuse_file(src, tmp_path, {}) == (None, 0)
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_text_encoder_with_external_weights_is_fused_without_touching_its_files(tiny_bundle, tmp_path):
    """Large text encoders (SDXL's second, 2.8 GB in fp32) keep their weights in a file beside the graph: the checks
    run on a copy made beside the optimized graph, removed after; the bundle's files are left as they were."""
    from sdturbo.export.ort_optimize import optimize_graph

    src, _ = graph(tiny_bundle)
    spec = Bundle(tiny_bundle).component("fp16", "text_encoder").spec
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    onnx.save(onnx.load(str(src)), str(bundle_dir / "te.onnx"), save_as_external_data=True, location="te.onnx.data",
              size_threshold=0)  # fmt: skip
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_nlink) for p in bundle_dir.iterdir()}
    out = tmp_path / "out"
    out.mkdir()
    fused = optimize_graph(bundle_dir / "te.onnx", out / "te.onnx", "text_encoder", spec, "cpu")
    assert fused["MultiHeadAttention"] == ops(src)["Softmax"] > 0
    assert [p.name for p in out.iterdir()] == ["te.onnx"]  # the check runs' folder is gone
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_nlink) for p in bundle_dir.iterdir()} == before
