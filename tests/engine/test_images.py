"""engine/images.py: the host uint8 conversion equals diffusers' arithmetic on every fp16 value."""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.images import to_uint8


def diffusers_uint8(image: np.ndarray) -> np.ndarray:
    """diffusers' postprocess, op by op in the image's dtype: (x / 2 + 0.5).clamp(0, 1), then * 255 in fp32, rounded."""
    x = np.clip(image / np.asarray(2, image.dtype) + np.asarray(0.5, image.dtype), 0, 1)
    return np.round(x.transpose(0, 2, 3, 1).astype(np.float32) * 255).astype(np.uint8)


def test_every_fp16_value_converts_as_diffusers_does():
    """All 65,536 fp16 bit patterns (NaN and inf included) laid out as an image."""
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(1, 4, 128, 128)[:, :3]
    with np.errstate(invalid="ignore", over="ignore"):
        want = diffusers_uint8(values)
        got = to_uint8(values)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_layout_and_rounding(dtype):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1.2, 1.2, (2, 3, 8, 16)).astype(dtype)
    got = to_uint8(image)
    assert got.shape == (2, 8, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, diffusers_uint8(image))
