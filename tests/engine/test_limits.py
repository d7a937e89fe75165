"""Every size limit of a request, at the limit, just inside it and just outside it, at both ends.

The limits are the bundle's (``manifest.json``'s ``limits``: here max_batch 4, sides 32-256 px, as the test
bundles are exported) and the VAE's scale factor (sides are multiples of 8). A request at a limit is
accepted and runs; one step past it is refused with an InputError naming the value, before anything loads.
"""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import InputError
from sdturbo.engine.request import build_request
from sdturbo.engine.runtime import open_pipeline
from sdturbo.engine.schedule import MAX_STEPS


@pytest.fixture(scope="module", params=["sd-turbo", "sdxl-turbo"])
def bundle(request, tiny_bundle, xl_bundle):
    return Bundle(tiny_bundle if request.param == "sd-turbo" else xl_bundle)


def test_the_test_bundles_limits(bundle):
    """The values the cases below step around (conftest.py exports with these)."""
    assert (bundle.limits.max_batch, bundle.limits.min_size, bundle.limits.max_size) == (4, 32, 256)
    assert bundle.vae_scale_factor == 8


def sizes(bundle) -> dict[str, list[int]]:
    """Sides accepted and refused: each end, one multiple of 8 inside and outside, one pixel either side."""
    lo, hi, f = bundle.limits.min_size, bundle.limits.max_size, bundle.vae_scale_factor
    return {
        "ok": [lo, lo + f, hi - f, hi],
        "outside": [lo - f, hi + f],
        "not a multiple": [lo - 1, lo + 1, hi - 1, hi + 1],
    }


@pytest.mark.parametrize("side", ["height", "width"])
def test_sides(bundle, side):
    other = "width" if side == "height" else "height"
    s = sizes(bundle)
    for v in s["ok"]:
        req = build_request(bundle, "a cat", **{side: v, other: 64})
        assert getattr(req, side) == v
    for v in s["outside"]:
        with pytest.raises(InputError, match=rf"{side} {v}\b.*{bundle.limits.min_size}.*{bundle.limits.max_size}"):
            build_request(bundle, "a cat", **{side: v, other: 64})
    for v in s["not a multiple"]:
        with pytest.raises(InputError, match=rf"{side} {v}\b.*multiple of {bundle.vae_scale_factor}"):
            build_request(bundle, "a cat", **{side: v, other: 64})


def test_batch(bundle):
    top = bundle.limits.max_batch
    for n in (1, 2, top - 1, top):
        assert build_request(bundle, ["a cat"] * n, height=64, width=64).batch == n
    with pytest.raises(InputError, match=rf"batch {top + 1}\b.*max_batch {top}"):
        build_request(bundle, ["a cat"] * (top + 1), height=64, width=64)
    with pytest.raises(InputError, match="prompt list is empty"):
        build_request(bundle, [], height=64, width=64)


def test_image_batch_follows_the_prompts(bundle):
    """img2img at the largest batch: one image per prompt, or one for all; one image too many is refused."""
    top = bundle.limits.max_batch
    images = np.zeros((top + 1, 64, 64, 3), np.uint8)
    assert build_request(bundle, ["a cat"] * top, steps=2, height=64, width=64, image=images[:top]).batch == top
    assert build_request(bundle, ["a cat"] * top, steps=2, height=64, width=64, image=images[0]).image.shape[0] == top
    with pytest.raises(InputError, match="image"):
        build_request(bundle, ["a cat"] * top, steps=2, height=64, width=64, image=images)


def test_steps(bundle):
    for n in (1, MAX_STEPS):
        assert build_request(bundle, "a cat", steps=n, height=64, width=64).steps == n
    for n in (0, MAX_STEPS + 1):
        with pytest.raises(InputError, match=rf"steps={n}\b.*1 to {MAX_STEPS}"):
            build_request(bundle, "a cat", steps=n, height=64, width=64)


@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(4, 256, 256), (1, 32, 32), (1, 32, 256), (4, 256, 32)],
    ids=["largest", "smallest", "tall-thin", "wide-flat"],
)
def test_the_corners_run(tiny_bundle, batch, height, width):
    """The extreme requests the bundle allows produce images of their size (the ONNX axes take them)."""
    pipe = open_pipeline(tiny_bundle, "onnxruntime", "fp32")
    images = pipe(["a cat"] * batch, height=height, width=width, seed=1)
    assert images.shape == (batch, height, width, 3) and images.dtype == np.uint8
    assert images.std() > 0
