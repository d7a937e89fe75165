"""One seed per image (a server's batch of requests): image i of the batch is the batch-1 request with seed i."""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import InputError
from sdturbo.engine.request import build_request, draw_noise
from sdturbo.engine.runtime import open_pipeline
from sdturbo.engine.schedule import make_schedule

SEEDS = (7, 3, 2**40)


def test_draw_noise_with_a_seed_per_image_is_each_seeds_own_draw():
    shape = (3, 4, 5, 6)
    got = draw_noise(SEEDS, shape, draws=3)
    for i, seed in enumerate(SEEDS):
        one = draw_noise(seed, (1, *shape[1:]), draws=3)
        for g, o in zip(got, one, strict=True):
            np.testing.assert_array_equal(g[i], o[0])
    np.testing.assert_array_equal(draw_noise([5, 6], (2, 4, 5, 6))[0], draw_noise(5, (2, 4, 5, 6))[0])  # = seed + i


@pytest.mark.parametrize("family", ["sd-turbo", "sdxl-turbo"])
def test_a_batch_with_seeds_equals_its_requests_one_by_one(family, tiny_bundle, xl_bundle):
    """Every draw (initial, posterior, SDXL's per-step) and the pipeline's pixels, img2img with 4 steps."""
    pipe = open_pipeline(tiny_bundle if family == "sd-turbo" else xl_bundle, "onnxruntime", "fp32")
    prompts = ["a red cube", "a lighthouse", "a red cube"]
    image = np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    kw = dict(steps=4, height=32, width=40, image=image, strength=0.75)
    batch = pipe.request(prompts, seed=list(SEEDS), **kw)
    assert batch.seed == SEEDS
    images = pipe.run(batch)
    sched = make_schedule(pipe.bundle.scheduler, 4, 0.75)
    drawn = batch.noises(pipe.bundle, sched)
    for i, (prompt, seed) in enumerate(zip(prompts, SEEDS, strict=True)):
        one = pipe.request(prompt, seed=seed, **kw)
        np.testing.assert_array_equal(images[i], pipe.run(one)[0])
        for slot_batch, slot_one in zip(
            (drawn[0], drawn[1], *drawn[2]), _flat(one.noises(pipe.bundle, sched)), strict=True
        ):
            np.testing.assert_array_equal(slot_batch[i], slot_one[0])


def _flat(noises):
    return (noises[0], noises[1], *noises[2])


@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ((1, 2), r"2 seeds for 3 prompts; give one seed, or one per prompt"),
        ((1, -2, 3), r"seed -2 is not allowed"),
        ([1, 2, "3"], r"seed '3' is not allowed"),
    ],
)
def test_bad_seeds_name_the_value(tiny_bundle, seed, message):
    with pytest.raises(InputError, match=message):
        build_request(Bundle(tiny_bundle), ["a", "b", "c"], seed=seed, height=32, width=32)
