"""``sdturbo check``: fp16 graphs against fp32 with polygraphy's comparator, and an fp16 overflow flagged."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sdturbo.engine.cli import main
from sdturbo.export import check as check_module
from sdturbo.export.check import check_bundle


def test_check_passes_the_tiny_bundles(tiny_bundle, xl_bundle, capsys):
    assert main(["check", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert f"| {name} | fp16 |" in out
    assert "FAIL" not in out
    (unet, vae) = check_bundle(xl_bundle, ("unet", "vae_decoder"))
    assert 0 < unet.outputs[0].rel_l2 <= 1e-2  # fp16 rounding: there, and small
    assert vae.outputs[0].rel_l2 == 0  # SDXL's VAE is fp32 in an fp16 bundle: the same graph


def scale_conv_in(path, factor: float) -> None:
    """Multiply the VAE decoder's first convolution's weights by ``factor`` in the graph at ``path``."""
    model = onnx.load(str(path))
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv" and "decoder/conv_in" in n.name]
    (init,) = [i for i in model.graph.initializer if i.name == conv.input[1]]
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((w.astype(np.float32) * factor).astype(w.dtype), init.name))
    onnx.save(model, str(path))


@pytest.fixture
def overflowing_bundle(tiny_bundle, tmp_path):
    """The tiny bundle with its VAE decoder's conv_in scaled (in both precisions) so that its activations pass
    fp16's 65504 while its fp16 weights stay finite, as the SDXL VAE's do (tests/sdxl/test_sdxl_export.py)."""
    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    manifest = json.loads((path / "manifest.json").read_text())
    for precision in ("fp32", "fp16"):
        entry = manifest["components"][precision]["vae_decoder"]
        onnx_path = path / entry["onnx"]
        scale_conv_in(onnx_path, 3e5)  # |w| <= 0.17 -> <= 5e4, finite in fp16; sums of 36 such products are not
        data = onnx_path.read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_check_flags_an_fp16_overflow_and_names_its_layer(overflowing_bundle, capsys):
    (report,) = check_bundle(overflowing_bundle, ("vae_decoder",), layerwise=True)
    (image,) = report.outputs
    assert image.nonfinite > 0 and not image.ok(1e-2)
    assert report.jump is not None and "decoder/conv_in" in report.jump and "non-finite" in report.jump
    assert main(["check", str(overflowing_bundle), "--components", "vae_decoder"]) == 1  # a failure is not exit 0
    assert "| vae_decoder | fp16 | image |" in capsys.readouterr().out


def test_layerwise_finds_no_jump_in_a_healthy_graph(tiny_bundle):
    """The text encoder's causal mask (-3.4e38 in fp32, clamped in fp16) is not a jump; nothing else is."""
    (report,) = check_bundle(tiny_bundle, ("text_encoder",), layerwise=True)
    assert report.tensors > 20 and report.jump is None


def test_the_verdict_is_the_graphs_as_they_run_with_or_without_layerwise(tiny_bundle):
    """--layerwise makes every tensor an output, which changes what onnxruntime fuses (and so the outputs'
    errors): the outputs' statistics, and the exit status with them, are those of the graphs as they run."""
    (plain,) = check_bundle(tiny_bundle, ("unet",))
    (layered,) = check_bundle(tiny_bundle, ("unet",), layerwise=True)
    assert layered.tensors > 0 and plain.tensors == 0
    assert layered.outputs == plain.outputs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp8"], "--precision 'fp8' is not allowed"),
        (["--size", "60x64"], "multiple of 8"),
        (["--components", "nope"], "--components nope"),
        (["--tolerance", "0"], "--tolerance 0.0 is not allowed"),
        (["--batch", "0"], "batch 0 is not allowed"),
        (["--optimized", "cpu", "--components", "unet"], "no valid optimized unet for cpu"),
        (["--engines", "--layerwise"], "--engines compares the engines' outputs only"),
        (["--engines", "tensorrt-rtx", "--optimized", "cpu"], "--engines compares the engines' outputs only"),
    ],
)
def test_bad_check_input_is_one_line(tiny_bundle, capsys, args, message):
    assert main(["check", str(tiny_bundle), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdturbo: error:") and message in err and "\n" not in err


def test_a_missing_cuda_provider_says_how_to_install_it(tiny_bundle, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert main(["check", str(tiny_bundle), "--optimized", "cuda"]) == 2
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]'" in capsys.readouterr().err


# -- --engines: the TensorRT engines against fp32 (on an emulated GPU here: tests/engine/emulated_gpu.py) ----------


@pytest.fixture(scope="module")
def engine_bundles(tiny_bundle, tiny_vae_bundle, tmp_path_factory):
    """The tiny bundle with TensorRT-RTX engines for batch 1-2 at 64-128 (SM86, as the emulated GPU), the
    overflowing one (conv_in scaled) and the one with a tiny VAE with the same; built for real, run emulated as
    their fp16 ONNX."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'sdturbo[tensorrt-rtx]')")
    from sdturbo.engine.engine_store import Profile
    from sdturbo.export.trt_build import build_engines

    out = {}
    for name, source, factor in (
        ("healthy", tiny_bundle, None),
        ("overflowing", tiny_bundle, 3e5),
        ("tiny-vae", tiny_vae_bundle, None),
    ):
        path = shutil.copytree(source, tmp_path_factory.mktemp("engines") / name)
        if factor:
            rehash_scaled(path, factor)
        build_engines(path, "tensorrt-rtx", Profile.parse("1-2", "64-128"), compute_capability=86, opt_level=0)
        out[name] = path
    return out


def rehash_scaled(path, factor: float) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for precision in ("fp32", "fp16"):
        entry = manifest["components"][precision]["vae_decoder"]
        onnx_path = path / entry["onnx"]
        scale_conv_in(onnx_path, factor)
        data = onnx_path.read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_engines_are_compared_with_fp32_and_give_back_what_they_held(engine_bundles):
    """Each component's engine, loaded as TrtPipeline loads it for that batch and size, run on the sample inputs:
    the emulated engines are the fp16 ONNX, so their errors are exactly the fp16 graphs' (any wrong binding,
    shape, dtype or copy shows); every buffer, pinned array, stream and engine memory is given back."""
    import gc

    from tests.engine.emulated_gpu import EmulatedCuda, emulated_trt_class

    cuda = EmulatedCuda()
    kw = dict(size=(96, 64), batch=2)
    engines = check_bundle(
        engine_bundles["healthy"], engines="tensorrt-rtx", trt_pipeline=emulated_trt_class(cuda), **kw
    )
    graphs = check_bundle(engine_bundles["healthy"], **kw)
    assert (
        [r.component for r in engines]
        == [r.component for r in graphs]
        == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    )
    for e, g in zip(engines, graphs, strict=True):
        assert e.test == "tensorrt-rtx engine" and g.test == "fp16"
        assert [(o.name, o.rel_l2, o.max_abs) for o in e.outputs] == [(o.name, o.rel_l2, o.max_abs) for o in g.outputs]
        assert all(0 < o.rel_l2 <= 1e-2 for o in e.outputs), e  # fp16 rounding: there, and small
    gc.collect()
    assert cuda.runtime.faults == [] and cuda.live() == {"cudaMalloc": 0, "cudaMallocHost": 0, "stream": 0, "event": 0}


def test_an_engine_that_overflows_fails_the_check(engine_bundles, capsys, monkeypatch):
    from sdturbo.export import check

    from tests.engine.emulated_gpu import emulated_trt_class

    real = check._check_engines
    monkeypatch.setattr(check, "_check_engines", lambda *a: real(*a[:7], emulated_trt_class()))
    path = engine_bundles["overflowing"]
    assert main(["check", str(path), "--engines", "--components", "vae_decoder,unet"]) == 1
    out = capsys.readouterr().out
    assert "| vae_decoder | tensorrt-rtx engine | image |" in out and "| unet | tensorrt-rtx engine |" in out
    (vae,) = check_bundle(path, ("vae_decoder",), engines="auto", trt_pipeline=emulated_trt_class())
    assert vae.outputs[0].nonfinite > 0


def test_engines_not_built_for_the_size_say_how_to_build_them(engine_bundles, tiny_bundle):
    from sdturbo.engine.errors import EngineMissing

    from tests.engine.emulated_gpu import emulated_trt_class

    with pytest.raises(
        EngineMissing, match=r"no tensorrt-rtx .* engines on sm86 for batch 1 at 256x64 .*sdturbo build"
    ):
        check_bundle(
            engine_bundles["healthy"], engines="tensorrt-rtx", size=(256, 64), trt_pipeline=emulated_trt_class()
        )


def test_engines_without_a_gpu_say_so(tiny_bundle, capsys):
    from sdturbo.engine.cuda import gpu_problem

    if gpu_problem() is None:
        pytest.skip("this machine has a GPU")
    assert main(["check", str(tiny_bundle), "--engines"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdturbo: error: --engines runs the TensorRT engines, on the GPU they were built for: ")
    assert "\n" not in err


def test_tiny_vae_engines_and_the_profiles_own_size(engine_bundles):
    """A bundle with a tiny VAE: its engines are checked too (a pipeline asked for the tiny VAE loads them), all
    components by default. Without --size the engines' profile gives the size (its optimum): the errors are
    those of the fp16 graphs at that size."""
    from sdturbo.engine.bundle import Bundle
    from sdturbo.engine.engine_store import built_profiles

    from tests.engine.emulated_gpu import emulated_trt_class

    path = engine_bundles["tiny-vae"]
    engines = check_bundle(path, engines="auto", trt_pipeline=emulated_trt_class())
    (profile,) = built_profiles(Bundle(path), "tensorrt-rtx", __import__("tensorrt_rtx").__version__, "sm86")
    graphs = check_bundle(path, size=(profile.width[1], profile.height[1]))
    assert [r.component for r in engines] == [r.component for r in graphs]
    assert {"tiny_vae_decoder", "tiny_vae_encoder", "vae_decoder"} <= {r.component for r in engines}
    for e, g in zip(engines, graphs, strict=True):
        assert e.test == "tensorrt-rtx engine"
        assert [(o.name, o.rel_l2) for o in e.outputs] == [(o.name, o.rel_l2) for o in g.outputs], e.component


def test_a_batch_outside_the_engines_profile_is_named(engine_bundles):
    from sdturbo.engine.errors import InputError

    from tests.engine.emulated_gpu import emulated_trt_class

    with pytest.raises(InputError, match=r"--batch 3 is outside the engines' profile b1-2_64-128x64-128"):
        check_bundle(engine_bundles["healthy"], engines="auto", batch=3, trt_pipeline=emulated_trt_class())


def test_a_batch_runs_one_image_at_a_time_with_the_same_errors(tiny_bundle, monkeypatch):
    """Each graph sees one image at a time (a VAE at 1024x1024 x 4 took 13 GB whole and was killed without a
    word); the errors are those of the batch run whole, for every output of every component."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    monkeypatch.setattr(check_module, "_per_image", lambda feeds: [feeds])  # as before: the batch whole
    whole = check_bundle(tiny_bundle, batch=3)
    monkeypatch.undo()
    seen = []
    real = OnnxrtRunner.infer

    def infer(self, feeds, *args, **kwargs):
        seen.append({v.shape[0] for v in feeds.values()})
        return real(self, feeds, *args, **kwargs)

    monkeypatch.setattr(OnnxrtRunner, "infer", infer)
    parts = check_bundle(tiny_bundle, batch=3)
    assert seen and all(s == {1} for s in seen), seen
    assert len(seen) == 3 * 2 * len(parts)  # three images, two graphs, each component
    for a, b in zip(whole, parts, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            # (measured equal here, to every digit: the same values, image by image)
            np.testing.assert_allclose([y.max_abs, y.rel_l2], [x.max_abs, x.rel_l2], rtol=1e-6, err_msg=a.component)
