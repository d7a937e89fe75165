"""GPU-only: ONNX Runtime on CUDA (onnxruntime-gpu) against diffusers and the CPU provider.

Skipped with a reason without an NVIDIA GPU, onnxruntime-gpu's CUDA provider or CUDA torch. The CPU check that
a CUDA session quietly falling back to the CPU is refused is in tests/engine/test_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest


def reason() -> str | None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"needs onnxruntime-gpu (this onnxruntime has {onnxruntime.get_available_providers()})"
    import torch

    return None if torch.cuda.is_available() else "needs an NVIDIA GPU and a CUDA build of torch"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(reason() is not None, reason=str(reason()))]
from tests.engine.test_gpu_pipeline import diffusers_fp16_bar, latents, rms  # noqa: E402
from tests.reference import PROMPTS, H, W  # noqa: E402


@pytest.fixture(scope="module")
def cuda_pipe(tiny_bundle):
    from sdturbo.engine.runtime import open_pipeline

    return open_pipeline(tiny_bundle, "onnxruntime-cuda", "fp16").load(img2img=True)


@pytest.mark.parametrize("steps", [1, 4])
def test_onnxruntime_cuda_matches_diffusers(steps, cuda_pipe, tiny_folder):
    """fp16 on CUDA: no further from diffusers fp32 than twice diffusers' own fp16 error, plus a level."""
    lat = latents(steps)
    ours = cuda_pipe(PROMPTS, steps=steps, height=H, width=W, latents=lat)
    ref32, bound = diffusers_fp16_bar(tiny_folder, steps, lat)
    print(f"{steps} step(s): RMS ORT-CUDA vs diffusers fp32 {rms(ours, ref32):.3f}, bound {bound:.3f}")
    assert rms(ours, ref32) <= bound


def test_every_session_runs_on_cuda(cuda_pipe):
    for name, stage in cuda_pipe._stages.items():
        assert stage._session.get_providers()[0] == "CUDAExecutionProvider", name


def test_onnxruntime_cuda_img2img_equals_itself_and_is_an_image(cuda_pipe):
    image = np.random.default_rng(0).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    kw = dict(steps=2, height=H, width=W, image=image, strength=0.5, seed=9)
    a, b = cuda_pipe(PROMPTS, **kw), cuda_pipe(PROMPTS, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.std() > 0
