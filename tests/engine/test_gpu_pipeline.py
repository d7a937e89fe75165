"""GPU-only: TensorRT against ONNX Runtime and diffusers, CUDA-graph replay, and no stale buffers.

Skipped with a reason on a machine without an NVIDIA GPU, TensorRT or CUDA torch.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest


def reason() -> str | None:
    try:
        from sdturbo.engine.backends.trt_lib import import_trt
        from sdturbo.engine.cuda import gpu_available

        if not gpu_available():
            return "needs an NVIDIA GPU with a CUDA driver"
        from sdturbo.engine.backends.trt_lib import unsupported_here
        from sdturbo.engine.cuda import current_compute_capability

        why = unsupported_here(*import_trt(), current_compute_capability())
        if why:
            return why
    except Exception as e:  # no cuda-python, no TensorRT
        return f"needs TensorRT and cuda-python: {e}"
    import torch

    return None if torch.cuda.is_available() else "diffusers' reference needs a CUDA build of torch"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(reason() is not None, reason=str(reason()))]
from tests.reference import PROMPTS, SHAPE, H, W, diffusers_uint8, load  # noqa: E402  (the same work)


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle, tmp_path_factory):
    from sdturbo.engine.engine_store import Profile
    from sdturbo.export.trt_build import build_engines

    path = tmp_path_factory.mktemp("gpu") / "b"
    shutil.copytree(tiny_bundle, path)
    build_engines(path, profile=Profile.parse("1-2", "64-128"))
    return path


@pytest.fixture(scope="module")
def pipes(trt_bundle):
    from sdturbo.engine.trt_pipeline import TrtPipeline

    return {"graph": TrtPipeline(trt_bundle, cuda_graph=True), "plain": TrtPipeline(trt_bundle, cuda_graph=False)}


def latents(seed):
    return np.random.default_rng(seed).standard_normal((2, 4, H // 8, W // 8), dtype=np.float32)


def rms(a, b):
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def diffusers_fp16_bar(folder, steps: int, lat: np.ndarray) -> tuple[np.ndarray, float]:
    """diffusers' fp32 image on CUDA, and the fp16 bar: twice diffusers' own fp16 error against it, plus a level."""
    import torch
    from diffusers import AutoPipelineForText2Image

    refs = {}
    for dt in (torch.float32, torch.float16):
        pipe = load(AutoPipelineForText2Image, folder, dt, device="cuda")
        refs[dt] = diffusers_uint8(pipe, PROMPTS, [lat], num_inference_steps=steps, height=H, width=W)
    return refs[torch.float32], 2 * rms(refs[torch.float16], refs[torch.float32]) + 1.0


@pytest.mark.parametrize("steps", [1, 4])
def test_tensorrt_matches_onnxruntime_and_diffusers(steps, pipes, tiny_bundle, tiny_folder):
    """fp16 engines: no further from diffusers fp32 than twice diffusers' own fp16 error, plus a level."""
    from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
    from sdturbo.engine.pipeline import Pipeline

    lat = latents(steps)
    ours = pipes["graph"](PROMPTS, steps=steps, height=H, width=W, latents=lat)
    ort32 = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp32"))(PROMPTS, steps=steps, height=H, width=W, latents=lat)
    ref32, bound = diffusers_fp16_bar(tiny_folder, steps, lat)
    print(f"{steps} step(s): RMS TRT vs diffusers fp32 {rms(ours, ref32):.3f}, bound {bound:.3f}")
    assert rms(ours, ref32) <= bound
    assert rms(ours, ort32) <= bound


def test_graph_replay_equals_plain_enqueue(pipes):
    """The graph pipeline's images are its replays' (graph_status "on": no fall back to eager runs, which would
    make this pass with no graph at all), equal to a pipeline that never captures."""
    for steps in (1, 2, 4):
        a = pipes["graph"](PROMPTS, steps=steps, height=H, width=W, seed=3)
        b = pipes["plain"](PROMPTS, steps=steps, height=H, width=W, seed=3)
        np.testing.assert_array_equal(a, b)
    assert pipes["graph"].graph_status == "on", pipes["graph"].graph_status


def test_repeated_calls_have_no_stale_buffers(pipes):
    """Interleave prompts, seeds, sizes and batch sizes; each result equals a fresh plain run."""
    calls = [
        (PROMPTS, 1, 64, 96),
        (PROMPTS[:1], 2, 64, 64),
        (PROMPTS, 3, 128, 64),
        (PROMPTS[::-1], 1, 64, 96),
        (PROMPTS[:1], 4, 64, 64),
    ]
    for _ in range(2):
        for prompts, seed, h, w in calls:
            got = pipes["graph"](prompts, height=h, width=w, seed=seed)
            want = pipes["plain"](prompts, height=h, width=w, seed=seed)
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(
        pipes["graph"](PROMPTS[:1], height=64, width=64, seed=1),
        pipes["graph"](PROMPTS[:1], height=64, width=64, seed=2),
    )
    assert pipes["graph"].graph_status == "on", pipes["graph"].graph_status


def test_img2img_on_tensorrt(pipes):
    image = np.random.default_rng(0).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    a = pipes["graph"](PROMPTS, steps=2, height=H, width=W, image=image, strength=0.5, seed=9)
    b = pipes["plain"](PROMPTS, steps=2, height=H, width=W, image=image, strength=0.5, seed=9)
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def xl_pipes(xl_bundle, tmp_path_factory):
    from sdturbo.engine.engine_store import Profile
    from sdturbo.engine.trt_pipeline import TrtPipeline
    from sdturbo.export.trt_build import build_engines

    path = tmp_path_factory.mktemp("gpu-xl") / "b"
    shutil.copytree(xl_bundle, path)
    build_engines(path, profile=Profile.parse("1-2", "64-128"))
    return {"graph": TrtPipeline(path, cuda_graph=True), "plain": TrtPipeline(path, cuda_graph=False)}


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_tensorrt_matches_diffusers(steps, xl_pipes, xl_folder):
    """SDXL-Turbo (fp16 UNet, fp32 VAE, ancestral noise replayed): the fp16 bar as for SD-Turbo."""
    kw, ref32, bound = sdxl_fp16_reference(xl_folder, steps)
    ours = xl_pipes["graph"](PROMPTS, **kw)
    np.testing.assert_array_equal(ours, xl_pipes["plain"](PROMPTS, **kw))
    print(f"SDXL {steps} step(s): RMS TRT vs diffusers fp32 {rms(ours, ref32):.3f}, bound {bound:.3f}")
    assert rms(ours, ref32) <= bound


def sdxl_fp16_reference(xl_folder, steps: int) -> tuple[dict, np.ndarray, float]:
    """(our request's keywords, diffusers' fp32 image on CUDA, the fp16 bar): the same latents and per-step
    noise for both; the bar is twice diffusers' own fp16 error, plus a level."""
    import torch
    from diffusers import AutoPipelineForText2Image

    rng = np.random.default_rng(steps)
    noise = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(1 + steps)]  # latents, then each step's
    ref32, ref16 = (
        diffusers_uint8(
            load(AutoPipelineForText2Image, xl_folder, dt, device="cuda"),
            PROMPTS,
            noise,
            num_inference_steps=steps,
            height=H,
            width=W,
        )
        for dt in (torch.float32, torch.float16)
    )
    kw = dict(steps=steps, height=H, width=W, latents=noise[0], step_noise=np.stack(noise[1:]))
    return kw, ref32, 2 * rms(ref16, ref32) + 1.0


def test_sdxl_img2img_on_tensorrt(xl_pipes):
    image = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    kw = dict(steps=4, height=64, width=64, image=image, strength=0.5, seed=9)
    np.testing.assert_array_equal(xl_pipes["graph"](PROMPTS, **kw), xl_pipes["plain"](PROMPTS, **kw))
