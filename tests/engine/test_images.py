"""engine/images.py: the host uint8 conversion equals diffusers' arithmetic on every fp16 value."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sdturbo.engine.images import to_uint8


def diffusers_uint8(image: np.ndarray) -> np.ndarray:
    """diffusers itself: ``VaeImageProcessor.postprocess`` to PIL, as its pipelines end (``(x * 0.5 + 0.5).clamp(0,
    1)`` in torch in the image's dtype, then ``(x * 255).round()`` in fp32 numpy). Its own arithmetic, not a copy of
    ours: a copy in numpy would share numpy's type promotion (under numpy 1, a 0-d fp32 array leaves fp16 fp16)."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN and inf to uint8, as on our side
        pils = VaeImageProcessor().postprocess(torch.from_numpy(image.copy()), output_type="pil")
    return np.stack([np.asarray(p) for p in pils])


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


def fp32_ties() -> np.ndarray:
    """fp32 image values whose ``x * 255`` lands exactly on k + 0.5 (no fp16 value does), at even k and odd k."""
    near = [((np.arange(255) * 2 + 1) / 255.0 - 1).astype(np.float32)]  # where x * 255 = k + 0.5 exactly
    down = up = near[0]
    for _ in range(32):  # and the 32 floats either side of each, where the fp32 arithmetic lands on it
        down, up = np.nextafter(down, np.float32(-2)), np.nextafter(up, np.float32(2))
        near += [down, up]
    values = np.concatenate(near)
    x = np.clip(values / np.float32(2) + np.float32(0.5), 0, 1) * np.float32(255)
    tie = x == np.floor(x) + 0.5
    assert np.any(tie & (np.floor(x) % 2 == 0)), "no tie at an even level: a test of ties would test nothing"
    return values[tie]


def test_fp32_ties_round_half_to_even():
    """numpy's round, as diffusers' ``numpy_to_pil``, takes k at k + 0.5 when k is even: rounding half up would be
    one level off at these pixels."""
    ties = fp32_ties()
    image = np.resize(ties, (1, 3, 1, ties.size))
    np.testing.assert_array_equal(to_uint8(image), diffusers_uint8(image))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_model_image_is_diffusers_preprocess_then_cast(dtype):
    """img2img's input: diffusers' ``VaeImageProcessor.preprocess`` (``x / 255 * 2 - 1`` in fp32), then the
    pipeline's cast to the model's dtype, for every pixel value: exactly, as it is one fp32 rounding then a cast."""
    import torch
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    from sdturbo.engine.images import to_model_image

    pixels = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)[None]
    pixels = np.concatenate([pixels, pixels[:, ::-1]])  # [2, 16, 16, 3]
    want = VaeImageProcessor().preprocess([Image.fromarray(p) for p in pixels])
    want = want.to(torch.float16 if dtype == np.float16 else torch.float32).numpy()
    got = to_model_image(pixels, dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
