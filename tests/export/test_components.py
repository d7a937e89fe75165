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


def raw_external(comp, folder, **save) -> onnx.ModelProto:
    """``comp``'s graph saved in ``folder`` with every weight external (as the exporter leaves a graph over
    2 GB; ``save``: onnx's other external-data options); its head, loaded without the weights."""
    folder.mkdir()
    onnx.save_model(
        onnx.load(str(comp.onnx)), str(folder / "raw.onnx"), save_as_external_data=True, size_threshold=0, **save
    )
    return onnx.load(str(folder / "raw.onnx"), load_external_data=False)


def external_offsets(model: onnx.ModelProto) -> list[int]:
    """The ``offset`` of each external initializer of ``model`` (0 where none is recorded)."""
    return [
        int({e.key: e.value for e in t.external_data}.get("offset", 0))
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


def test_large_graph_path_streams_weights_into_one_file(tiny_bundle, tmp_path):
    """Graphs over 2 GB arrive from the exporter with one external file per tensor; they are streamed into
    one page-aligned .data file without loading the weights. Simulated on the tiny UNet."""
    import shutil

    from sdturbo.export.onnx_export import _stream_large

    comp = Bundle(tiny_bundle).component("fp32", "unet")
    head = raw_external(comp, tmp_path / "raw", all_tensors_to_one_file=False)
    data, total = _stream_large(head, tmp_path / "raw", comp.spec, tmp_path / "unet.onnx")
    shutil.rmtree(tmp_path / "raw")  # nothing may still point there
    assert data == tmp_path / "unet.onnx.data" and total > 0
    offsets = external_offsets(onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False))
    assert offsets and all(o % 4096 == 0 for o in offsets)
    args = sample_inputs(comp.spec, DIMS[0], vocab_size=700, seed=4)
    feeds = {t.name: a.numpy() for t, a in zip(comp.spec.inputs, args, strict=True)}
    want = ort.InferenceSession(str(comp.onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)


def test_streaming_reads_each_tensor_at_its_offset_in_a_shared_external_file(tiny_bundle, tmp_path):
    """An exporter may write every weight into one external file, each tensor at its own ``offset``
    (onnx's external-data fields): each is read from there, so the streamed graph computes the same."""
    import shutil

    from sdturbo.export.onnx_export import _stream_large

    comp = Bundle(tiny_bundle).component("fp32", "text_encoder")
    head = raw_external(comp, tmp_path / "raw", all_tensors_to_one_file=True, location="weights.bin")
    offsets = external_offsets(head)
    assert len(offsets) > 1 and max(offsets) > 0  # (the case under test: tensors after the first)
    _stream_large(head, tmp_path / "raw", comp.spec, tmp_path / "text_encoder.onnx")
    shutil.rmtree(tmp_path / "raw")
    args = sample_inputs(comp.spec, DIMS[1], vocab_size=700, seed=7)
    feeds = {t.name: a.numpy() for t, a in zip(comp.spec.inputs, args, strict=True)}
    want = ort.InferenceSession(str(comp.onnx), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    np.testing.assert_array_equal(got, want)
