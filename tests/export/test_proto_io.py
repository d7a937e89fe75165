"""export/proto_io.py: a graph with embedded weights written one weight at a time, the same bytes as onnx's."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from sdturbo.engine.bundle import Bundle
from sdturbo.export import onnx_export
from sdturbo.export.proto_io import save_streamed, value_bytes

from tests.memory import anon_rise, with_big_convs


def _same_bytes(model: onnx.ModelProto, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    save_streamed(model, ours)
    onnx.save_model(model, str(theirs))
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_every_component_is_written_as_onnx_writes_it(tiny_bundle, xl_bundle, model, tmp_path):
    """Byte for byte, so that a bundle's graphs and their sha256 stay what they were (and the caches keyed by
    them valid): every component of SD's and SDXL's tiny bundles, in both precisions."""
    bundle = Bundle(tiny_bundle if model == "tiny" else xl_bundle)
    for precision in ("fp32", "fp16"):
        for name in bundle.component_names:
            _same_bytes(onnx.load(str(bundle.component(precision, name).onnx)), tmp_path)


def test_a_weight_s_size_is_read_from_its_type_and_shape(tiny_bundle):
    """value_bytes (what the export and the optimizer's weightless shape inference size weights by, without
    serializing them) is the size of the values each initializer holds, for every tiny weight in both precisions."""
    bundle = Bundle(tiny_bundle)
    for precision in ("fp32", "fp16"):
        for name in bundle.component_names:
            for t in onnx.load(str(bundle.component(precision, name).onnx)).graph.initializer:
                assert value_bytes(t) == onnx.numpy_helper.to_array(t).nbytes, (precision, name, t.name)


def test_fields_on_both_sides_of_the_weights_keep_their_order(tmp_path):
    """Every kind of field a model and its graph may have, those numbered below and above the graph's and the
    initializers' (the order protobuf writes them in), and none."""
    weight = onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    values, indices = np.ones(2, np.float32), np.array([0, 4])
    sparse = onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(values, "s"), onnx.numpy_helper.from_array(indices), [2, 3]
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"], name="add")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [weight, onnx.numpy_helper.from_array(np.zeros(3, np.float32), "unused")],
        doc_string="graph doc",
        value_info=[onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        sparse_initializer=[sparse],
    )
    graph.metadata_props.add(key="k", value="v")
    model = onnx.helper.make_model(graph, producer_name="p", doc_string="model doc", domain="d", model_version=3)
    onnx.helper.set_model_props(model, {"a": "b"})
    model.functions.add().name = "f"
    _same_bytes(model, tmp_path)
    _same_bytes(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])), tmp_path)
    _same_bytes(onnx.ModelProto(ir_version=9), tmp_path)  # no graph


def test_writing_holds_one_weight_beside_the_graph_not_the_whole_graph_again(tmp_path):
    """onnx.save_model of a graph with 256 MiB of embedded fp32 weights (64 of 4 MiB) rises 4.96x their size
    (protobuf's serializer; measured); save_streamed 0.05x (one 4 MiB weight at a time). The bar is 0.25x."""
    size = 256 * 2**20
    rise, before, path = anon_rise(_writing, size, tmp_path / "model.onnx")
    assert Path(path).stat().st_size > size
    assert rise < 0.25 * size / 2**20, f"rose {rise} MB over {before} MB, for {size >> 20} MiB of weights"


def test_an_export_writes_its_graph_one_weight_at_a_time(tiny_bundle, tmp_path):
    """The export's writer of graphs under 2 GB (SD-Turbo's fp16 UNet is 1.7 GB): on the tiny UNet with 256 MiB
    of weights added, measured 0.05x their size, and 4.96x written whole; the same 0.25x bar as above."""
    size = 256 * 2**20
    spec = Bundle(tiny_bundle).component("fp32", "unet").spec
    model = with_big_convs(onnx.load(str(Bundle(tiny_bundle).component("fp32", "unet").onnx)), size, 64)
    src = tmp_path / "src.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="src.onnx.data")
    del model
    rise, before, path = anon_rise(_exporting, src, spec, tmp_path / "unet.onnx")
    assert onnx.load(path).graph.input[0].name == "sample" and Path(path).stat().st_size > size
    assert rise < 0.25 * size / 2**20, f"rose {rise} MB over {before} MB, for {size >> 20} MiB of weights"


def _writing(size: int, path: Path):
    """(tests/memory.py's setup, in a fresh process) A graph with ``size`` bytes of fp32 weights in 64 tensors, and
    what writes it to ``path`` with save_streamed."""
    n, model = 64, onnx.ModelProto(ir_version=9)
    for i in range(n):  # (made in place: no copies of them left for the write to reuse the memory of)
        tensor = model.graph.initializer.add(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=[size // n // 4])
        tensor.raw_data = np.full(size // n // 4, i, np.float32).tobytes()
    return partial(_written, model, path)


def _written(model, path: Path) -> str:
    save_streamed(model, path)
    return str(path)


def _exporting(src: Path, spec, path: Path):
    """(tests/memory.py's setup) The graph at ``src`` read with its weights, and what writes it as the export
    writes a graph under 2 GB."""
    model = onnx.load(str(src))
    return partial(_exported, model, spec, path)


def _exported(model, spec, path: Path) -> str:
    data, _ = onnx_export._clean_small(model, spec, path)
    assert data is None
    return str(path)
