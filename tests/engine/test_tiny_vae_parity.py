"""The tiny VAE against diffusers doing the same: its pipelines given ``vae=AutoencoderTiny`` of the same weights.

The measure is the full VAE's (tests/reference.py, tests/engine/test_pipeline_parity.py): our decoded image's
largest error against diffusers in float64 at most twice diffusers' own error at our precision. diffusers'
img2img with AutoencoderTiny reads the encoder's ``latents`` and draws no posterior noise, so the reference
gets one tensor fewer (``References(..., tiny_vae=...)``). A 0.1% error at the tiny decoder's input or output,
or the tiny encoder's, fails the fp32 bar.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.pipeline import Pipeline

from tests.faults import stage_input, stage_output
from tests.reference import CASES, PROMPTS, H, References, W, check_fault_fails, check_precision

FAULTS_TINY = {
    "tiny VAE decoder input": (stage_input("tiny_vae_decoder", "latents"), "txt2img"),
    "tiny VAE decoded image scale": (stage_output("tiny_vae_decoder"), "txt2img"),
    "img2img input image scale (tiny encoder)": (stage_input("tiny_vae_encoder", "image"), "img2img"),
    "tiny VAE encoder output": (stage_output("tiny_vae_encoder"), "img2img"),
}


@pytest.fixture(scope="module")
def reference(tiny_folder, taesd_folder):
    return References(tiny_folder, ancestral=False, tiny_vae=taesd_folder)


@pytest.fixture(scope="module")
def pipes(tiny_vae_bundle):
    return {p: Pipeline(tiny_vae_bundle, OnnxRuntimeBackend(precision=p), vae="tiny") for p in ("fp32", "fp16")}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_within_twice_diffusers_fp32_error(case, pipes, reference, record_property):
    check_precision(pipes["fp32"], reference, case, torch.float32, "SD tiny VAE", record_property)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp16_within_twice_diffusers_fp16_error(case, pipes, reference, record_property):
    check_precision(pipes["fp16"], reference, case, torch.float16, "SD tiny VAE", record_property)


@pytest.mark.parametrize("where", FAULTS_TINY)
def test_a_small_error_in_the_tiny_vae_fails(where, pipes, reference, monkeypatch):
    check_fault_fails(pipes["fp32"], reference, FAULTS_TINY, where, "SD tiny VAE", monkeypatch)


def test_the_tiny_vae_is_what_decodes(tiny_vae_bundle, pipes):
    """The same request through the full VAE gives another image: the switch changes the decoder."""
    full = Pipeline(tiny_vae_bundle, OnnxRuntimeBackend("fp32"))
    kw = dict(height=H, width=W, seed=3)
    assert not np.array_equal(full(PROMPTS, **kw), pipes["fp32"](PROMPTS, **kw))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_a_batch_makes_each_images_own_pixels(pipes, precision, img2img):
    """Image i of a batch is the batch-1 call with seed + i, bit for bit, as with the full VAE (README, Noise).
    onnxruntime's CPU fp16 convolutions round the tiny VAE's batch differently from one image (up to a level in
    a few pixels), so there it encodes and decodes one image at a time."""
    pipe, prompts = pipes[precision], ["a red cube", "a lighthouse", "a cat"]
    kw = dict(height=H, width=W)
    if img2img:
        kw |= dict(image=np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8), strength=0.75, steps=4)
    batch = pipe(prompts, seed=5, **kw)
    for i, prompt in enumerate(prompts):
        np.testing.assert_array_equal(batch[i], pipe(prompt, seed=5 + i, **kw)[0])
