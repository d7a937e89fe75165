"""SDXL-Turbo against diffusers' SDXL pipelines on the same weights, latents and per-step noise.

The ancestral scheduler draws fresh noise at every step from the pipeline's generator; the tests draw
the same tensors from a generator with the same seed, in diffusers' order, and pass them in.
Bars as for SD-Turbo (tests/engine/test_pipeline_parity.py): fp32 PSNR >= 40 dB; fp16 no further from
diffusers fp32 than twice diffusers' own fp16 error plus one level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdturbo.engine.images import psnr
from sdturbo.engine.runtime import open_pipeline

PROMPTS = ["a cinematic shot of a baby racoon wearing an intricate italian priest robe", "a red fox in the snow"]
H, W = 64, 96
SHAPE = (2, 4, H // 8, W // 8)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def reference(folder, steps: int, lat: np.ndarray, seed: int, dtype, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(diffusers' image, the per-step noise its scheduler drew: on the CPU generator, on any device)."""
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=dtype, add_watermarker=False).to(device)
    g = torch.Generator().manual_seed(seed)
    step_noise = torch.stack([torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(steps)])
    out = pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=0.0,
        height=H,
        width=W,
        latents=torch.from_numpy(lat).to(dtype),
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return to_uint8(out), step_noise.float().numpy()


@pytest.mark.parametrize("steps", [1, 4])
def test_txt2img_fp32_matches_diffusers(steps, xl_folder, xl_bundle, record_property):
    lat = np.random.default_rng(steps).standard_normal(SHAPE, dtype=np.float32)
    ref, step_noise = reference(xl_folder, steps, lat, seed=100 + steps, dtype=torch.float32)
    ours = open_pipeline(xl_bundle, "onnxruntime", "fp32")(
        PROMPTS, steps=steps, height=H, width=W, latents=lat, step_noise=step_noise
    )
    assert ref.std() > 10, "the reference image is flat; the comparison would prove nothing"
    value = psnr(ours, ref)
    record_property("psnr_db", value)
    print(f"SDXL txt2img fp32 {steps} step(s): PSNR {value:.1f} dB")
    assert value >= 40.0


def test_more_steps_use_the_step_noise(xl_bundle):
    """With 4 ancestral steps the per-step noise changes the image (so the parity above is not vacuous)."""
    pipe = open_pipeline(xl_bundle, "onnxruntime", "fp32")
    lat = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    a = pipe(PROMPTS, steps=4, height=H, width=W, latents=lat, step_noise=np.zeros((4, *SHAPE), np.float32))
    b = pipe(PROMPTS, steps=4, height=H, width=W, latents=lat, step_noise=np.ones((4, *SHAPE), np.float32))
    assert rms(a, b) > 1.0


@pytest.mark.parametrize("steps", [1, 4])
def test_txt2img_fp16_within_reference_half_error(steps, xl_folder, xl_bundle, record_property):
    lat = np.random.default_rng(20 + steps).standard_normal(SHAPE, dtype=np.float32)
    ref32, _ = reference(xl_folder, steps, lat, seed=7, dtype=torch.float32)
    ref16, noise16 = reference(xl_folder, steps, lat, seed=7, dtype=torch.float16)
    ours = open_pipeline(xl_bundle, "onnxruntime", "fp16")(
        PROMPTS, steps=steps, height=H, width=W, latents=lat, step_noise=noise16
    )
    ours_err, ref_err = rms(ours, ref32), rms(ref16, ref32)
    record_property("rms_ours_vs_fp32", ours_err)
    record_property("rms_diffusers_fp16_vs_fp32", ref_err)
    print(f"SDXL txt2img fp16 {steps} step(s): RMS ours {ours_err:.3f}, diffusers fp16 {ref_err:.3f} (levels)")
    assert ours_err <= 2 * ref_err + 1.0


def test_img2img_fp32_matches_diffusers(xl_folder, xl_bundle, record_property):
    """strength 0.5, 2 steps: diffusers draws the posterior sample, the added noise, then one step's noise."""
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    pipe = AutoPipelineForImage2Image.from_pretrained(xl_folder, torch_dtype=torch.float32, add_watermarker=False)
    images = np.random.default_rng(7).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    images[:, : H // 2] //= 2
    seed = 1234
    g = torch.Generator().manual_seed(seed)
    posterior, added, step = (torch.randn(SHAPE, generator=g) for _ in range(3))
    ref = pipe(
        PROMPTS,
        image=[Image.fromarray(i) for i in images],
        strength=0.5,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    ours = open_pipeline(xl_bundle, "onnxruntime", "fp32")(
        PROMPTS,
        steps=2,
        height=H,
        width=W,
        image=images,
        strength=0.5,
        latents=added.numpy(),
        image_noise=posterior.numpy(),
        step_noise=step.numpy()[None],
    )
    ref = to_uint8(ref)
    assert ref.std() > 10
    value = psnr(ours, ref)
    record_property("psnr_db", value)
    print(f"SDXL img2img fp32 strength 0.5, 2 steps: PSNR {value:.1f} dB")
    assert value >= 40.0
