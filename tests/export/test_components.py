"""Each exported fp32 component against its PyTorch module, at a batch and size it was not traced at."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sdturbo.engine.bundle import COMPONENTS, Bundle
from sdturbo.export.onnx_export import sample_inputs
from sdturbo.export.wrappers import build_wrapper

DIMS = [
    {"batch": 3, "height": 64, "width": 96, "latent_height": 8, "latent_width": 12},
    {"batch": 1, "height": 40, "width": 56, "latent_height": 5, "latent_width": 7},  # odd latent sides
]


def onnx_rel_error(comp, args, want: np.ndarray, dims: dict, record_property) -> float:
    """``comp``'s ONNX run on the CPU on ``args`` against ``want`` (its PyTorch module's output): the output
    shape is the manifest's at ``dims``; the relative L2 error is recorded and returned."""
    session = ort.InferenceSession(str(comp.onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {t.name: a.numpy() for t, a in zip(comp.spec.inputs, args, strict=True)})[0]
    assert got.shape == want.shape == comp.spec.outputs[0].concrete(dims)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    record_property("rel_l2", rel)
    return rel


def check_manifest_io(comp) -> None:
    """Input/output names, element types and symbolic axes in ``comp``'s ONNX graph are the manifest's."""
    graph = onnx.load(str(comp.onnx), load_external_data=False).graph
    for declared, actual in ((comp.spec.inputs, graph.input), (comp.spec.outputs, graph.output)):
        assert [t.name for t in declared] == [v.name for v in actual]
        for t, v in zip(declared, actual, strict=True):
            tt = v.type.tensor_type
            assert onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) == np.dtype(t.dtype)
            assert tuple(d.dim_param or d.dim_value for d in tt.shape.dim) == t.shape


@pytest.mark.parametrize("dims", DIMS, ids=["b3-64x96", "b1-40x56"])
@pytest.mark.parametrize("name", COMPONENTS)
def test_fp32_component_matches_torch(name, dims, tiny_bundle, tiny_model, record_property):
    comp = Bundle(tiny_bundle).component("fp32", name)
    args = sample_inputs(comp.spec, dims, vocab_size=700, seed=3)
    with torch.inference_mode():
        want = build_wrapper(name, tiny_model)(*args).numpy()
    assert onnx_rel_error(comp, args, want, dims, record_property) <= 1e-4


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_declare_the_manifest_io(precision, tiny_bundle):
    """Input/output names, element types and symbolic axes in each ONNX graph are the manifest's."""
    b = Bundle(tiny_bundle)
    for name in COMPONENTS:
        check_manifest_io(b.component(precision, name))


def test_large_graph_path_streams_weights_into_one_file(tiny_bundle, tmp_path):
    """Graphs over 2 GB arrive from the exporter with one external file per tensor; they are streamed into
    one page-aligned .data file without loading the weights. Simulated on the tiny UNet."""
    import shutil

    from sdturbo.export.onnx_export import _stream_large

    comp = Bundle(tiny_bundle).component("fp32", "unet")
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    onnx.save_model(
        onnx.load(str(comp.onnx)),
        str(raw_dir / "raw.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    head = onnx.load(str(raw_dir / "raw.onnx"), load_external_data=False)
    data, total = _stream_large(head, raw_dir, comp.spec, tmp_path / "unet.onnx")
    shutil.rmtree(raw_dir)  # nothing may still point there
    assert data == tmp_path / "unet.onnx.data" and total > 0
    saved = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False)
    offsets = [
        int({e.key: e.value for e in t.external_data}["offset"])
        for t in saved.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    args = sample_inputs(comp.spec, DIMS[0], vocab_size=700, seed=4)
    feeds = {t.name: a.numpy() for t, a in zip(comp.spec.inputs, args, strict=True)}
    want = ort.InferenceSession(str(comp.onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)
