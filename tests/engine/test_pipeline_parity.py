"""The oracle: our images against diffusers' pipelines on the same weights, noise and settings, as floats.

The measure (tests/reference.py): the largest error of our decoded image (in [0, 1], before uint8) against
diffusers run in float64 must be at most twice diffusers' own error at our precision against that float64
run (flash-attention's rule), for fp32 and for fp16 alike. Measured on random:tiny, batch 2 at 64x96 (our
largest error / diffusers'; the bar is 2):
    fp32: txt2img 1 step 0.50, 4 steps 0.53, img2img 0.45 (diffusers' own: 1.1e-6, 1.1e-6, 2.2e-6): margin 3.8-4.4x
    fp16: txt2img 1 step 0.52, 4 steps 0.63, img2img 0.63 (diffusers' own: 1.8e-3, 1.5e-3, 2.6e-3): margin 3.2-3.8x
A 0.1% error at any one point of the chain lands 11x (img2img's input image) to 3400x (the UNet's timestep)
over the fp32 bar (``test_a_small_error_anywhere_fails``; tests/faults.py). uint8 PSNR against diffusers is
reported, not asserted; the pixels are held to the float error instead: no further from 255 x diffusers'
float64 image than half a level (the rounding) plus 255 x our float error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.pipeline import Pipeline

from tests.faults import FAULTS
from tests.reference import CASES, PROMPTS, H, References, W, check_fault_fails, check_precision


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return References(tiny_folder, ancestral=False)


@pytest.fixture(scope="module")
def pipes(tiny_bundle):
    return {p: Pipeline(tiny_bundle, OnnxRuntimeBackend(precision=p)) for p in ("fp32", "fp16")}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_within_twice_diffusers_fp32_error(case, pipes, reference, record_property):
    check_precision(pipes["fp32"], reference, case, torch.float32, "SD", record_property)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp16_within_twice_diffusers_fp16_error(case, pipes, reference, record_property):
    check_precision(pipes["fp16"], reference, case, torch.float16, "SD", record_property)


@pytest.mark.parametrize("where", FAULTS)
def test_a_small_error_anywhere_fails(where, pipes, reference, monkeypatch):
    """A 0.1% error at each point of the chain, injected alone, fails the fp32 parity check."""
    check_fault_fails(pipes["fp32"], reference, FAULTS, where, "SD", monkeypatch)


def test_seeded_noise_is_per_image(pipes):
    """Image i of a batch equals a batch-1 request with seed + i."""
    both = pipes["fp32"](PROMPTS, height=H, width=W, seed=5)
    second = pipes["fp32"](PROMPTS[1:], height=H, width=W, seed=6)
    np.testing.assert_array_equal(both[1], second[0])
    assert not np.array_equal(both[0], pipes["fp32"](PROMPTS[:1], height=H, width=W, seed=6)[0])
