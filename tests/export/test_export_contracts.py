"""Export behaviours no other test pinned down (found by a mutation-testing pass): which integer ArgMax is made
float, the export order of precisions, a new bundle's default limits, every file of a component in its checksum,
the tiny VAE ``auto`` names, ``check``'s relative error, and the peak RSS of a span."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.spec import ComponentSpec, TensorSpec
from sdturbo.export import onnx_export
from sdturbo.export.rss import PeakRss

DIMS = {"batch": 2, "height": 40, "width": 56, "latent_height": 5, "latent_width": 7}  # not the trace sizes


def run_cpu(model_or_path, feeds: dict) -> list[np.ndarray]:
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


# --- graph_fixes.float_argmax: only integers of known range are made float ---------------------------------


def test_a_cast_of_an_unbounded_integer_is_not_taken_for_a_bounded_one(caplog):
    """float_argmax makes an ArgMax float only where its integers are bounded: a comparison's 0/1 or the token
    ids, "through casts and reshapes only". A Cast of a product is a cast of integers of unknown range (float32 is
    exact only below 2**24): it is left as it is, with the warning, however many casts stand before the ArgMax."""
    from sdturbo.export.graph_fixes import float_argmax

    spec = ComponentSpec("text_encoder", (TensorSpec("input_ids", "int32", ("batch", 77)),), ())
    nodes = [
        helper.make_node("Mul", ["input_ids", "input_ids"], ["product"]),
        helper.make_node("Cast", ["product"], ["values"], to=TensorProto.INT32),
        helper.make_node("ArgMax", ["values"], ["index"], axis=-1, keepdims=0),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", 77])],
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    ids = np.random.default_rng(0).integers(4097, 46000, (3, 77), dtype=np.int32)  # squares beyond 2**24
    want = run_cpu(model, {"input_ids": ids})[0]
    with caplog.at_level(logging.WARNING):
        assert float_argmax(model.graph, spec) == 0
    assert [n.op_type for n in model.graph.node] == ["Mul", "Cast", "ArgMax"]
    assert "over integers of unknown range is left as it is" in caplog.text
    np.testing.assert_array_equal(run_cpu(model, {"input_ids": ids})[0], want)


# --- onnx_export: the checksum of a component's files ------------------------------------------------------------


def test_a_components_record_covers_its_external_data_file(tiny_model, tmp_path, monkeypatch):
    """A graph over the external-data threshold is saved as .onnx + .onnx.data; the manifest entry's sha256 and
    bytes are those of both files together, as the bundle verifies them (engine/integrity.py)."""
    from sdturbo.engine.integrity import file_sha256, verify
    from sdturbo.export import onnx_export
    from sdturbo.export.bundle_writer import specs_for

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the text encoder were over 2 GB
    spec = specs_for(tiny_model)["text_encoder"].resolve("fp32")
    rec = onnx_export.export_record(tiny_model, spec, tmp_path, "fp32")
    assert rec["data"] == "onnx/fp32/text_encoder.onnx.data"
    files = [tmp_path / "text_encoder.onnx", tmp_path / "text_encoder.onnx.data"]
    assert files[1].stat().st_size > 0
    assert rec["sha256"] == file_sha256(*files)
    assert rec["bytes"] == sum(f.stat().st_size for f in files)
    verify(files, rec["sha256"], "text_encoder", rehash=True)


# --- bundle_writer: precisions in any order, and a new bundle's default limits ---------------------------------


@pytest.fixture(scope="module")
def fp16_first(tiny_folder, tmp_path_factory):
    """random:tiny exported with the precisions given fp16 first, and no limits given."""
    from sdturbo.export.bundle_writer import export_bundle

    return export_bundle("random:tiny", tmp_path_factory.mktemp("fp16-first") / "b", ("fp16", "fp32"))


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder"])
def test_precisions_given_fp16_first_still_export_fp32_graphs_of_the_fp32_model(fp16_first, tiny_model, name):
    """The fp16 export converts the loaded modules in place; whatever order the precisions are given in, the
    fp32 graphs are the fp32 model's (float32 contract, outputs equal to its PyTorch modules)."""
    from sdturbo.export.onnx_export import sample_inputs
    from sdturbo.export.wrappers import build_wrapper

    b = Bundle(fp16_first)
    assert set(b.precisions) == {"fp32", "fp16"}
    comp = b.component("fp32", name)
    graph = onnx.load(str(comp.onnx), load_external_data=False).graph
    floats = {i.data_type for i in graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert floats == {TensorProto.FLOAT}
    args = sample_inputs(comp.spec, DIMS, vocab_size=700, seed=3)
    with torch.inference_mode():
        want = build_wrapper(name, tiny_model)(*args).numpy()
    got = run_cpu(comp.onnx, {t.name: a.numpy() for t, a in zip(comp.spec.inputs, args, strict=True)})[0]
    assert got.dtype == np.float32
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4


def test_a_new_bundle_without_limits_gets_the_documented_defaults(fp16_first, capsys):
    """``sdturbo export --help`` documents the limits a new bundle gets when none is given."""
    from sdturbo.engine.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    options = text.split(" options: ", 1)[1]  # past the usage line
    documented = {}
    for flag in ("max-batch", "min-size", "max-size"):
        m = re.search(rf"--{flag} [A-Z_]+ [^()]*\(default (\d+)\)", options)
        assert m, (flag, text)
        documented[flag.replace("-", "_")] = int(m.group(1))
    lim = Bundle(fp16_first).limits
    assert {k: getattr(lim, k) for k in documented} == documented


# --- tiny_vae: what ``--tiny-vae auto`` names ------------------------------------------------------------------


def test_auto_names_each_familys_own_taesd(xl_folder, tiny_folder):
    """`auto` is the model's own TAESD (README): madebyollin/taesdxl for SDXL-Turbo, madebyollin/taesd for
    SD-Turbo; the random architectures of the same names for random models (family read from the folder)."""
    from sdturbo.export.models import model_family
    from sdturbo.export.tiny_vae import default_source

    assert model_family(xl_folder) == "sdxl-turbo" and model_family(tiny_folder) == "sd-turbo"
    assert default_source("stabilityai/sdxl-turbo", "sdxl-turbo") == "madebyollin/taesdxl"
    assert default_source("stabilityai/sd-turbo", "sd-turbo") == "madebyollin/taesd"
    assert default_source("random:sdxl-tiny") == "random:taesdxl"
    assert default_source("random:tiny") == "random:taesd"


# --- check: the relative L2 error is relative to the reference -------------------------------------------------


def test_relative_error_is_relative_to_the_reference():
    """``rel_l2`` is |test - ref| / |ref| (export/check.py): the fp32 graph's norm, not the tested one's."""
    from sdturbo.export.check import rel_l2

    ref = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    for scale in (0.0, 0.5, 2.0, 3.0):
        got, bad = rel_l2((scale * ref).astype(np.float16), ref)
        assert bad == 0
        assert got == pytest.approx(abs(scale - 1.0), rel=2e-3, abs=1e-3), scale
    test = ref.copy()
    test[0, 0, 0, :3] = [np.inf, -np.inf, np.nan]
    assert rel_l2(test, ref) == (float("inf"), 3)
    both = ref.copy()
    both[1, 0, 0, 0] = np.inf  # not finite in the reference too: not counted against the test
    with np.errstate(invalid="ignore"):  # inf - inf where both are infinite
        assert rel_l2(both, both)[1] == 0


# --- rss: the peak memory of a span of work -----------------------------------------------------------------


def test_peak_rss_is_the_span_s_own_peak_not_the_process_s():
    """Each PeakRss starts a span: memory used and freed before it is not its peak (export records and the
    benchmark's CPU peak memory are per span)."""

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs here: the peak is the process's")
    big = np.ones(256 * 2**20 // 8)  # 256 MiB, every page touched
    high = PeakRss().peak_mb()
    del big
    span = PeakRss()
    assert span.peak_mb() < high - 128
    more = np.ones(64 * 2**20 // 8)
    assert span.peak_mb() >= PeakRss().peak_mb() and more.sum() > 0


def test_writing_a_graph_costs_one_weight_s_copy_at_a_time(tiny_bundle, tmp_path):
    """Writing a graph under 2 GB costs one copy of a weight at a time (Python's bytes of its values, to write them:
    export/proto_io.py; measured 1.0x), not the two that serializing it whole makes (protobuf's buffer, then
    Python's bytes: 2.0x), nor the six that onnx-graphsurgeon's import, cleanup and export made (6.0x; SD-Turbo's
    fp16 UNet, 1.7 GB of weights, peaked at 10.8 GB that way). One weight of the tiny decoder is made 256 MiB so
    that the copies stand out of the noise; the bar is 1.5x."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs here: the peak is the process's")
    comp = Bundle(tiny_bundle).component("fp32", "vae_decoder")
    model = onnx.load(str(comp.onnx))
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    size = 256 * 2**20
    big.raw_data = np.ones(size // 4, np.float32).tobytes()
    del big.dims[:]
    big.dims.append(size // 4)
    before = PeakRss().peak_mb()  # the current RSS: the graph and its big weight are in memory already
    span = PeakRss()
    onnx_export._clean_small(model, comp.spec, tmp_path / "vae_decoder.onnx")
    assert (tmp_path / "vae_decoder.onnx").stat().st_size > size
    assert span.peak_mb() - before < 1.5 * size / 2**20
