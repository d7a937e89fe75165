"""SDXL-Turbo export: components against torch, the fp32 VAE that survives what overflows fp16, engines."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sdturbo.engine.bundle import COMPONENTS_XL, Bundle
from sdturbo.engine.errors import InputError
from sdturbo.engine.runtime import open_pipeline
from sdturbo.engine.spec import component_specs_xl
from sdturbo.export.onnx_export import export_component, sample_inputs
from sdturbo.export.wrappers import build_wrapper

DIMS = {"batch": 3, "height": 64, "width": 96, "latent_height": 8, "latent_width": 12}


def run_onnx(path, spec, args):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {t.name: a.numpy() for t, a in zip(spec.inputs, args, strict=True)})


@pytest.mark.parametrize("name", COMPONENTS_XL)
def test_fp32_component_matches_torch(name, xl_bundle, xl_model):
    comp = Bundle(xl_bundle).component("fp32", name)
    args = sample_inputs(comp.spec, DIMS, vocab_size=700, seed=5)
    with torch.inference_mode():
        want = build_wrapper(name, xl_model)(*args)
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    got = run_onnx(comp.onnx, comp.spec, args)
    assert len(got) == len(want) == len(comp.spec.outputs)
    for g, w in zip(got, want, strict=True):
        assert float(np.linalg.norm(g - w) / np.linalg.norm(w)) <= 1e-4


def test_fp16_bundle_keeps_the_vae_in_fp32(xl_bundle):
    b = Bundle(xl_bundle)
    assert b.component("fp16", "unet").spec.inputs[0].dtype == "float16"
    for name in ("vae_decoder", "vae_encoder"):
        spec = b.component("fp16", name).spec
        assert {t.dtype for t in (*spec.inputs, *spec.outputs)} == {"float32"}


def test_fp32_vae_survives_what_overflows_fp16(xl_model, tmp_path):
    """Scale the decoder's first convolution so activations pass fp16's 65504: an fp16 decoder graph
    returns inf/NaN, the fp32 graph an fp16 bundle ships stays finite and matches torch."""
    lm = copy.deepcopy(xl_model)
    with torch.no_grad():
        lm.vae.decoder.conv_in.weight.mul_(1e5)  # outputs ~2e5, past fp16's 65504
    spec = component_specs_xl(77, 32, 32, 32, 4)["vae_decoder"]
    dims = {"batch": 1, "height": 64, "width": 64, "latent_height": 8, "latent_width": 8}
    args = sample_inputs(spec.resolve("fp16"), dims, vocab_size=700, seed=1)  # float32 latents
    export_component(lm, spec.resolve("fp16"), tmp_path / "fp32.onnx")
    with torch.inference_mode():
        want = build_wrapper("vae_decoder", lm)(*args).numpy()
    (got,) = run_onnx(tmp_path / "fp32.onnx", spec.resolve("fp16"), args)
    assert np.isfinite(got).all()
    assert float(np.linalg.norm(got - want) / np.linalg.norm(want)) <= 1e-4
    lm.vae.half()  # what an fp16 VAE graph would be
    half = spec.resolve("fp32")
    half = type(half)(
        half.name,
        tuple(type(t)(t.name, "float16", t.shape) for t in half.inputs),
        tuple(type(t)(t.name, "float16", t.shape) for t in half.outputs),
    )
    export_component(lm, half, tmp_path / "fp16.onnx")
    (bad,) = run_onnx(tmp_path / "fp16.onnx", half, [a.half() for a in args])
    assert not np.isfinite(bad).all(), "the overflow case did not overflow fp16; the test would prove nothing"


def test_step_noise_errors(xl_bundle, tiny_bundle):
    pipe = open_pipeline(xl_bundle, "onnxruntime", "fp32")
    with pytest.raises(InputError, match=r"step_noise has shape \(1, 1, 4, 8, 8\).*\(2, 1, 4, 8, 8\)"):
        pipe.request(["x"], steps=2, height=64, width=64, step_noise=np.zeros((1, 1, 4, 8, 8), np.float32))
    sd = open_pipeline(tiny_bundle, "onnxruntime", "fp32")
    with pytest.raises(InputError, match="only used by ancestral"):
        sd.request(["x"], steps=2, height=64, width=64, step_noise=np.zeros((2, 1, 4, 8, 8), np.float32))


def test_seeded_ancestral_noise_is_per_image(xl_bundle):
    pipe = open_pipeline(xl_bundle, "onnxruntime", "fp32")
    both = pipe(["a", "b"], steps=3, height=64, width=64, seed=4)
    np.testing.assert_array_equal(both[1], pipe(["b"], steps=3, height=64, width=64, seed=5)[0])


def test_tensorrt_rtx_builds_the_tiny_sdxl_engines(xl_bundle, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    import json
    import shutil

    from sdturbo.engine.engine_store import Profile
    from sdturbo.export.trt_build import build_engines

    path = shutil.copytree(xl_bundle, tmp_path / "b")
    plans = build_engines(path, "tensorrt-rtx", Profile.parse("1-2", "64-128"), compute_capability=86, opt_level=0)
    assert [p.stem for p in plans] == list(COMPONENTS_XL)
    bundle = Bundle(path)
    for plan in plans:
        rec = json.loads(plan.with_suffix(".json").read_text())
        spec = bundle.component("fp16", plan.stem).spec
        assert [(t["name"], t["dtype"]) for t in rec["io"]] == [
            (t.name, t.dtype) for t in (*spec.inputs, *spec.outputs)
        ]
