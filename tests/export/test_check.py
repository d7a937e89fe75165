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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp8"], "--precision 'fp8' is not allowed"),
        (["--size", "60x64"], "multiple of 8"),
        (["--components", "nope"], "--components nope"),
        (["--tolerance", "0"], "--tolerance 0.0 is not allowed"),
        (["--batch", "0"], "batch 0 is not allowed"),
        (["--optimized", "cpu", "--components", "unet"], "no valid optimized unet for cpu"),
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
    assert "pip install 'sdturbo[cuda]'" in capsys.readouterr().err
