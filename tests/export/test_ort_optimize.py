"""ONNX Runtime's transformer optimizer on the tiny bundle: the fused ops (counted), fused == plain where the
CPU has kernels, the key, atomic writes, and a stale or damaged optimized graph refused, never used."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.backends.ort_optimized import find_optimized, optimized_paths
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.cli import main
from sdturbo.engine.errors import InputError
from sdturbo.engine.info import describe
from sdturbo.engine.pipeline import Pipeline
from sdturbo.export import ort_optimize
from sdturbo.export.check import check_bundle
from sdturbo.export.ort_optimize import fused_op_counts, optimize_bundle

from tests.memory import anon_rise, with_big_convs

VERSION = onnxruntime.__version__

# What onnxruntime 1.32's optimizer makes of random:tiny (2 down/up blocks, 1 transformer block of 2 layers
# per attention stage): every self-attention (packed QKV) and cross-attention (packed KV) becomes one
# MultiHeadAttention, every GroupNorm (+ the residual Add before it) a GroupNorm/SkipGroupNorm (NHWC), every
# Conv an NhwcConv, every GEGLU a BiasSplitGelu.
CUDA_UNET = {
    "BiasAdd": 4,
    "BiasSplitGelu": 4,
    "GroupNorm": 6,
    "MultiHeadAttention": 8,
    "NhwcConv": 25,
    "SkipGroupNorm": 15,
    "SkipLayerNormalization": 8,
}
CUDA_VAE_DECODER = {"GroupNorm": 14, "MultiHeadAttention": 1, "NhwcConv": 27, "SkipGroupNorm": 7}
# For the CPU: self-attention becomes Attention (QKV in one MatMul), cross-attention MultiHeadAttention;
# GEGLU a Gelu; no NHWC ops, no GroupNorm, no BiasAdd/BiasSplitGelu (no CPU kernels).
CPU_UNET = {"Attention": 4, "Gelu": 4, "MultiHeadAttention": 4, "SkipLayerNormalization": 8}
CPU_TEXT_ENCODER = {"BiasGelu": 2, "MultiHeadAttention": 2, "SkipLayerNormalization": 4}


@pytest.fixture(scope="module")
def optimized(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle with the CUDA graphs of the UNet and VAE decoder and the CPU graphs of the
    text encoder, UNet and VAE decoder."""
    path = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("optimized") / "b")
    optimize_bundle(path, ("unet", "vae_decoder"), provider="cuda")
    optimize_bundle(path, ("text_encoder", "unet", "vae_decoder"), provider="cpu")
    return path


def load_graph(bundle, provider, name):
    model, _ = optimized_paths(Bundle(bundle), VERSION, provider, "fp16", name)
    return onnx.load(str(model))


def io_types(graph):
    inits = {i.name for i in graph.initializer}
    return [(v.name, v.type.tensor_type.elem_type) for v in graph.input if v.name not in inits] + [
        (v.name, v.type.tensor_type.elem_type) for v in graph.output
    ]


def test_cuda_graphs_have_the_fused_ops_and_the_fp16_contract(optimized):
    for name, want in (("unet", CUDA_UNET), ("vae_decoder", CUDA_VAE_DECODER)):
        model = load_graph(optimized, "cuda", name)
        assert fused_op_counts(model) == want, name
        _, record = optimized_paths(Bundle(optimized), VERSION, "cuda", "fp16", name)
        assert json.loads(record.read_text())["fused"] == want
        plain = onnx.load(str(Bundle(optimized).component("fp16", name).onnx), load_external_data=False)
        assert io_types(model.graph) == io_types(plain.graph)  # float16 sample, float32 timestep, ...
    # GroupNorm, NhwcConv, BiasSplitGelu, BiasAdd have CUDA kernels only: such a graph does not load here
    model, _ = optimized_paths(Bundle(optimized), VERSION, "cuda", "fp16", "unet")
    with pytest.raises(Exception, match=r"NOT_IMPLEMENTED|GroupNorm|NhwcConv|BiasSplitGelu|BiasAdd"):
        onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def test_cpu_graphs_are_fused_and_agree_with_the_plain_graphs(optimized, caplog):
    assert fused_op_counts(load_graph(optimized, "cpu", "unet")) == CPU_UNET
    assert fused_op_counts(load_graph(optimized, "cpu", "text_encoder")) == CPU_TEXT_ENCODER
    assert fused_op_counts(load_graph(optimized, "cpu", "vae_decoder")) == {"MultiHeadAttention": 1}
    plain = check_bundle(optimized, ("text_encoder", "unet", "vae_decoder"))
    fused = check_bundle(optimized, ("text_encoder", "unet", "vae_decoder"), optimized="cpu")
    for p, f in zip(plain, fused, strict=True):
        (pe,), (fe,) = p.outputs, f.outputs
        assert fe.nonfinite == 0 and fe.rel_l2 <= 3 * max(pe.rel_l2, 1e-3), (f.component, fe, pe)
    with caplog.at_level(logging.INFO):
        got = Pipeline(optimized, OnnxRuntimeBackend("fp16"))(["a cat"], height=64, width=64, steps=2)
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert f"{name}: the optimized graph for cpu" in caplog.text  # the backend used it
    want = Pipeline(optimized, OnnxRuntimeBackend("fp16", fused=False))(["a cat"], height=64, width=64, steps=2)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def test_a_stale_or_damaged_graph_is_refused_and_rebuilt(optimized, caplog):
    b = Bundle(optimized)
    model, record = optimized_paths(b, VERSION, "cpu", "fp16", "text_encoder")
    assert model.parent == optimized / "ort-optimized" / f"{VERSION}-cpu" / "fp16"  # keyed: version, provider
    rec = json.loads(record.read_text())
    assert rec["sources"] == {p: b.components[p]["text_encoder"].sha256 for p in ("fp32", "fp16")}
    assert (rec["onnxruntime"], rec["provider"]) == (VERSION, "cpu")
    assert find_optimized(b, "text_encoder", "0.0.0", "cpu", "fp16") is None  # another onnxruntime: none
    record.write_text(json.dumps({**rec, "sources": {**rec["sources"], "fp32": "0" * 64}}))
    assert find_optimized(b, "text_encoder", VERSION, "cpu", "fp16") is None
    assert "the bundle's ONNX changed" in caplog.text
    record.write_text(json.dumps(rec))
    assert find_optimized(b, "text_encoder", VERSION, "cpu", "fp16") == model
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged in place, same size
    model.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        Pipeline(optimized, OnnxRuntimeBackend("fp16")).load()
    assert "does not match its recorded sha256" in caplog.text and "running the plain graph" in caplog.text
    assert f"(rebuild it with `sdturbo build {optimized} --ort-optimize --ort-provider cpu`)" in caplog.text
    assert "text_encoder: the optimized graph" not in caplog.text  # never used
    broken = []
    assert "BROKEN" in describe(optimized, broken=broken)  # sdturbo info shows it
    assert broken == []  # but it is a cache, rebuilt on use: `sdturbo info` still exits 0 (no bundle file is broken)
    optimize_bundle(optimized, ("text_encoder",), provider="cpu")  # rebuilt, with a warning
    assert "rebuilding the optimized text_encoder" in caplog.text
    assert find_optimized(b, "text_encoder", VERSION, "cpu", "fp16") == model
    assert "BROKEN" not in describe(optimized)


def test_text_encoders_made_before_their_attention_fusion_are_rebuilt_alone(optimized, caplog):
    b = Bundle(optimized)
    records = {n: optimized_paths(b, VERSION, "cpu", "fp16", n)[1] for n in ("text_encoder", "unet")}
    recs = {n: json.loads(r.read_text()) for n, r in records.items()}
    assert (recs["text_encoder"]["recipe"], recs["unet"]["recipe"]) == (2, 1)
    records["text_encoder"].write_text(json.dumps({**recs["text_encoder"], "recipe": 1}))  # made before it
    try:
        with caplog.at_level(logging.INFO):
            assert find_optimized(b, "text_encoder", VERSION, "cpu", "fp16") is None
            assert find_optimized(b, "unet", VERSION, "cpu", "fp16") is not None  # not rebuilt for it
        assert "made by optimizer recipe 1, this sdturbo makes 2" in caplog.text
    finally:
        records["text_encoder"].write_text(json.dumps(recs["text_encoder"]))


def test_writes_are_atomic(optimized, monkeypatch):
    b = Bundle(optimized)
    model, record = optimized_paths(b, VERSION, "cpu", "fp16", "text_encoder")
    leftover = model.parent / ".text_encoder.tmp-killed"
    leftover.mkdir()  # what a killed run leaves
    before = (model.read_bytes(), record.read_text())

    def fail(*args, **kwargs):
        raise RuntimeError("killed while optimizing")

    monkeypatch.setattr(ort_optimize, "optimize_graph", fail)
    with pytest.raises(RuntimeError, match="killed"):
        optimize_bundle(optimized, ("text_encoder",), provider="cpu", force=True)
    assert (model.read_bytes(), record.read_text()) == before  # the old graph stays whole and valid
    assert not list(model.parent.glob(".text_encoder.tmp-*"))  # its own temporary and the leftover removed
    assert find_optimized(b, "text_encoder", VERSION, "cpu", "fp16") == model


def test_a_temporary_of_a_run_still_going_is_kept(optimized, tmp_path, monkeypatch):
    """Locks live under the cache root, so a run with another SDTURBO_CACHE on the same bundle does not wait
    for this one: its temporary folder, named with its process id, is kept while that process runs (removing
    it failed the other run), and removed once it has ended, as a killed run's."""
    b = Bundle(optimized)
    model, _ = optimized_paths(b, VERSION, "cpu", "fp16", "text_encoder")
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        live = model.parent / f".text_encoder.tmp-@{running.pid}@abc"
        dead = model.parent / f".text_encoder.tmp-@{ended.pid}@abc"
        for folder in (live, dead):
            folder.mkdir()
            (folder / "text_encoder.onnx").write_bytes(b"half")
        monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "another-cache"))
        optimize_bundle(optimized, ("text_encoder",), provider="cpu", force=True)
        assert live.is_dir() and not dead.exists()
    finally:
        running.kill()
        running.wait()
    assert find_optimized(b, "text_encoder", VERSION, "cpu", "fp16") == model
    shutil.rmtree(live)


def test_a_disk_that_fills_while_optimizing_is_named_and_the_old_graph_kept(optimized, monkeypatch):
    """A write that fails for a full disk says only "[Errno 28] No space left on device": the error raised names
    the folder the optimized graph was being written to; the graph there before is kept, nothing half-written."""
    b = Bundle(optimized)
    model, record = optimized_paths(b, VERSION, "cpu", "fp16", "text_encoder")
    before = (model.read_bytes(), record.read_text())

    def disk_fills(src, dst, *args):
        dst.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ort_optimize, "optimize_graph", disk_fills)
    with pytest.raises(OSError, match="No space left on device") as e:
        optimize_bundle(optimized, ("text_encoder",), provider="cpu", force=True)
    assert e.value.filename == str(model.parent)
    assert (model.read_bytes(), record.read_text()) == before
    assert not list(model.parent.glob(".text_encoder.tmp-*"))


def test_info_lists_optimized_graphs(optimized):
    text = describe(optimized)
    assert f"onnxruntime {VERSION} cuda fp16 unet" in text and "MultiHeadAttention 8" in text
    assert "[valid]" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ort-optimize", "--components", "nope"], "--components nope is not allowed"),
        (["--ort-optimize", "--components", "text_encoder_2"], "--components text_encoder_2 is not allowed"),
        (["--ort-optimize", "--components", ""], "--components is empty; name one or more of text_encoder, unet"),
        (["--ort-optimize", "--components", ","], "--components is empty"),  # (never "every component")
        # options of the other kind of build are refused, never ignored (a TensorRT build was started instead)
        (["--ort-provider", "cpu"], "--ort-provider is for --ort-optimize; give --ort-optimize too"),
        (["--ort-optimize", "--compute-capability", "86"], "--compute-capability is for TensorRT engines;"),
        (["--ort-optimize", "--trt", "tensorrt-rtx", "--batch", "1-2"], "--trt, --batch is for TensorRT engines;"),
        (["--ort-optimize", "--size", "64", "--opt-level", "0"], "--size, --opt-level is for TensorRT engines;"),
        (["--ort-optimize", "--workspace-gb", "2"], "--workspace-gb is for TensorRT engines;"),
    ],
)
def test_bad_build_input_is_one_line(tiny_bundle, capsys, args, message):
    assert main(["build", str(tiny_bundle), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdturbo: error:") and message in err and "\n" not in err


def test_a_bundle_without_fp32_cannot_be_optimized(tiny_bundle, tmp_path, capsys):
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["components"]["fp32"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["build", str(path), "--ort-optimize", "--components", "text_encoder"]) == 2
    assert "has no fp32 ONNX" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_going_through_the_disk_between_stages_writes_the_same_graphs(tiny_bundle, xl_bundle, model, tmp_path):
    """Between fusing and converting the graph is written out and read back, so that the weights the fusions
    replaced are freed. Every component must come out byte for byte as it does carried through in memory
    (onnxruntime's own way), for CUDA's fusions (the staging does not depend on the provider): SD's and SDXL's
    (whose VAE stays fp32: nothing to stage)."""
    bundle = Bundle(tiny_bundle if model == "tiny" else xl_bundle)
    staged = []
    real = ort_optimize._through_disk
    for name in bundle.component_names:
        src, spec = bundle.component("fp32", name).onnx, bundle.component("fp16", name).spec
        files = []
        for through_disk in (real, lambda holder, work: holder.pop()):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ort_optimize, "_through_disk", lambda h, w, f=through_disk: staged.append(1) or f(h, w))
                out = tmp_path / f"{name}-{len(files)}" / f"{name}.onnx"
                out.parent.mkdir()
                ort_optimize.optimize_graph(src, out, name, spec, "cuda")
                files.append({f.name: f.read_bytes() for f in out.parent.iterdir()})
        assert files[0] == files[1], name
    # fused -> converted (not SDXL's VAE, kept in fp32); both ways
    stages = sum("float16" in str(bundle.component("fp16", n).spec) for n in bundle.component_names)
    assert len(staged) == 2 * stages


def test_a_graph_is_written_as_onnxruntime_writes_it(tiny_bundle, tmp_path, monkeypatch):
    """A graph under 2 GB is written one weight at a time (export/proto_io.py) after what onnxruntime's own writer
    (OnnxModel.save_model_to_file) does first: its nodes sorted, the com.microsoft opset declared where fused ops
    use it. The file must be the one that writer makes of the same graph, byte for byte, for every component."""
    import onnxruntime.transformers  # noqa: F401  (puts the optimizer's own folder, onnx_model's, on sys.path)
    from onnx_model import OnnxModel

    graphs, real = [], ort_optimize._check_contract
    monkeypatch.setattr(
        ort_optimize, "_check_contract", lambda m, spec: graphs.append(m.__deepcopy__()) or real(m, spec)
    )
    bundle = Bundle(tiny_bundle)
    for name in bundle.component_names:
        out = tmp_path / name / f"{name}.onnx"
        out.parent.mkdir()
        ort_optimize.optimize_graph(
            bundle.component("fp32", name).onnx, out, name, bundle.component("fp16", name).spec, "cuda"
        )
        theirs = tmp_path / name / "theirs.onnx"
        OnnxModel(graphs.pop()).save_model_to_file(str(theirs))
        assert out.read_bytes() == theirs.read_bytes(), name


def test_optimizing_holds_each_stage_s_weights_not_every_stage_s(tiny_bundle, tmp_path):
    """protobuf frees a weight the optimizer replaced only with the whole graph, so a graph carried through
    fusing and converting held the weights of both (SD-Turbo's UNet: 3.4 GB of fp32 weights, peak 9.3 GB); and
    serializing a graph whole to write it peaks at five times its weights (export/proto_io.py). 256 MiB of fp32
    Conv weights are added to the tiny UNet (64 of 4 MiB, each Conv ReduceMax-ed, summed, times zero, added to
    the output), which CUDA's fusions transpose into NhwcConv weights: the fusions hold both copies, 2x their size
    (measured: 2.12x); carried into converting, the dead fp32 copies beside the live ones and their fp16 copies
    (2.55x); written whole (4.01x). The bar is 2.3x. Measured from outside the process (tests/memory.py): a sampler
    inside it read 1.56x where this test's earlier graph took 2.01x, and never saw the whole write's peak."""
    size, n = 256 * 2**20, 64
    src = tmp_path / "src" / "unet.onnx"
    src.parent.mkdir()
    model = with_big_convs(onnx.load(str(Bundle(tiny_bundle).component("fp32", "unet").onnx)), size, n)
    onnx.save_model(model, str(src), save_as_external_data=True, location="unet.onnx.data")  # as large UNets are
    del model
    rise, before, dst = anon_rise(_optimizing, tiny_bundle, src, tmp_path)
    assert size // 2 < Path(dst).stat().st_size < size  # the weights made fp16
    assert rise < 2.3 * size / 2**20, f"rose {rise} MB over {before} MB, for {size >> 20} MiB of weights"


def _optimizing(bundle: Path, src: Path, tmp_path: Path):
    """(tests/memory.py's setup, in a fresh process) The tiny UNet optimized for CUDA once (onnxruntime's optimizer
    and sympy imported, outside the span that counts); then what optimizes ``src`` the same way."""
    spec = Bundle(bundle).component("fp16", "unet").spec
    warm = tmp_path / "warm" / "unet.onnx"
    warm.parent.mkdir()
    ort_optimize.optimize_graph(Bundle(bundle).component("fp32", "unet").onnx, warm, "unet", spec, "cuda")
    dst = tmp_path / "dst" / "unet.onnx"
    dst.parent.mkdir()
    return partial(_optimized, src, dst, spec)


def _optimized(src: Path, dst: Path, spec) -> str:
    ort_optimize.optimize_graph(src, dst, "unet", spec, "cuda")
    return str(dst)


@pytest.mark.parametrize("model", ["tiny", "xl"])
def test_shape_inference_without_the_weights_converts_the_same_graphs(tiny_bundle, xl_bundle, model, tmp_path, caplog):
    """The fp16 converter's shape inference runs on a copy of the model without its large initializers (as
    graph inputs), not on a copy of every weight (a full-size SDXL UNet went past 24 GB for it). With the bar
    at 64 bytes, so that every weight of the tiny models is left out, each component's converted graph must be
    the one converting with the weights gives, byte for byte."""
    from sdturbo.export.ort_optimize import weightless

    seen = {}  # threshold -> the largest initializer of each copy shape inference ran on

    def spy(model, above):
        light = weightless(model, above)
        seen.setdefault(above, []).append(max((len(t.raw_data) for t in light.graph.initializer), default=0))
        return light

    bundle = Bundle(tiny_bundle if model == "tiny" else xl_bundle)
    for name in bundle.component_names:
        src, spec = bundle.component("fp32", name).onnx, bundle.component("fp16", name).spec
        graphs = []
        seen.clear()
        for above in (1 << 62, 64):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ort_optimize, "WEIGHTLESS_ABOVE", above)
                mp.setattr(ort_optimize, "weightless", spy)
                out = tmp_path / f"{name}-{above}" / f"{name}.onnx"
                out.parent.mkdir()
                ort_optimize.optimize_graph(src, out, name, spec, "cuda")
                graphs.append(onnx.load(str(out)))
        with_weights, without = graphs
        assert any(len(t.raw_data) > 64 for t in with_weights.graph.initializer)
        if seen:  # (the shape inference runs for the fusions of some components, and to convert to fp16)
            assert min(seen[1 << 62]) > 64 >= max(seen[64])  # it saw the weights, then none
        assert with_weights.SerializeToString() == without.SerializeToString(), name
    assert "Failed to run symbolic shape inference" not in caplog.text


def test_graphs_over_the_external_data_bar_are_saved_with_their_weights_beside_them(monkeypatch):
    """Whether a graph's weights go to a .data file is decided by their size counted tensor by tensor (the
    whole ModelProto's ByteSize would serialize a full-size UNet once more to measure it)."""
    from onnx import TensorProto, helper, numpy_helper
    from sdturbo.engine import bundle as bundle_module
    from sdturbo.export.graph_fixes import needs_external_data

    weights = [numpy_helper.from_array(np.zeros(1000, np.float32), name=f"w{i}") for i in range(2)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1000])
    nodes = [helper.make_node("Add", ["x", "w0"], ["y"]), helper.make_node("Add", ["y", "w1"], ["z"])]
    out = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1000])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [out], weights))
    for bar, big in ((7900, True), (8100, False)):  # 2 x 4000 bytes of weights, and their headers
        monkeypatch.setattr(bundle_module, "EXTERNAL_DATA_BYTES", bar)
        assert needs_external_data(model) is big


def test_an_optimization_the_disk_cannot_hold_is_refused_before_it_starts(optimized, tmp_path, monkeypatch, disk_free):
    """Each component checks the free space first (the UNet's fusion takes minutes at full size): its optimized
    graph, and a copy of its fp32 graph (between the optimizer's stages; the attention checks). Short of that: one line
    naming both and what is free, nothing written, the graphs already made kept; exactly that much: it runs. The
    estimate is never below what the optimized graphs take (measured: the tiny ones are 80-90% of it)."""
    import re

    path = shutil.copytree(optimized, tmp_path / "b")
    b = Bundle(path)
    need = {n: b.component("fp16", n).bytes + b.component("fp32", n).bytes for n in b.component_names}
    for provider, names in (("cuda", ("unet", "vae_decoder")), ("cpu", ("text_encoder", "unet", "vae_decoder"))):
        for name in names:  # what each optimized graph takes, against the estimate of it
            model, _ = optimized_paths(b, VERSION, provider, "fp16", name)
            made = sum(f.stat().st_size for f in model.parent.glob(f"{name}.onnx*"))
            assert 0.7 * b.component("fp16", name).bytes <= made <= b.component("fp16", name).bytes, (provider, name)
    fused, real = [], ort_optimize.optimize_graph
    monkeypatch.setattr(
        ort_optimize, "optimize_graph", lambda src, dst, name, *a: fused.append(name) or real(src, dst, name, *a)
    )
    for name in ("unet", "vae_decoder"):
        model, _ = optimized_paths(b, VERSION, "cuda", "fp16", name)
        before = sorted(model.parent.iterdir())
        disk_free(need[name] - 1)
        said = rf"optimizing {name} for cuda needs about [\d.]+ MB free in {re.escape(str(model.parent))}: "
        said += r"its optimized graph, about [\d.]+ MB, and a copy of its fp32 graph, [\d.]+ MB, while it is optimized"
        with pytest.raises(InputError, match=said + r"; [\d.]+ MB is free there"):
            optimize_bundle(path, (name,), provider="cuda", force=True)
        assert sorted(model.parent.iterdir()) == before and not fused
        assert find_optimized(b, name, VERSION, "cuda", "fp16") == model  # the one made before: kept, valid
        disk_free(need[name])
        optimize_bundle(path, (name,), provider="cuda", force=True)
        assert fused.pop() == name and find_optimized(b, name, VERSION, "cuda", "fp16") == model


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_the_optimizer_s_own_info_lines_show_with_verbose_only(tiny_bundle, tmp_path, caplog, level):
    """onnxruntime's optimizer logs every fusion and node removal at INFO (dozens of lines a graph, between its
    progress bars): our lines were buried. At INFO only ours show, with onnxruntime's warnings; at DEBUG (-v)
    everything, so its lines are there to be hidden."""
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    with caplog.at_level(level):
        optimize_bundle(path, ("text_encoder",), provider="cpu", force=True)
    info = [r for r in caplog.records if r.levelno == logging.INFO]
    theirs = [r.getMessage() for r in info if not r.name.startswith("sdturbo")]
    ours = [r.getMessage() for r in info if r.name.startswith("sdturbo")]
    assert ours[0] == f"optimizing text_encoder for cpu (onnxruntime {VERSION})", ours
    assert ours[-1].startswith("optimized text_encoder for cpu in "), ours
    if level == logging.INFO:
        assert theirs == [], theirs
    else:
        assert any(m.startswith("Fused SkipLayerNormalization") for m in theirs), theirs
    assert all(lg.level < logging.WARNING for lg in (logging.getLogger("onnx_model"),)), "levels restored"
