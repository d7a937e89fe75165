"""One seed per image (a server's batch of requests): image i of the batch is the batch-1 request with seed i."""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import InputError
from sdturbo.engine.pipeline import CPU_PART_PIXELS, Pipeline
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
        ((1, 2, 2**63), r"^seed 9223372036854775808 is not allowed; use an integer from 0 to 2\*\*63 - 1$"),
    ],
)
def test_bad_seeds_name_the_value(tiny_bundle, seed, message):
    with pytest.raises(InputError, match=message):
        build_request(Bundle(tiny_bundle), ["a", "b", "c"], seed=seed, height=32, width=32)


def part_batches(pipe: Pipeline) -> list[int]:
    """The batch of each part ``pipe`` runs from now on, in order (a list it appends to)."""
    calls = []
    run = pipe._run_float
    pipe._run_float = lambda req: calls.append(req.batch) or run(req)
    return calls


def test_an_image_larger_than_a_part_runs_alone(tiny_bundle):
    """A bundle may allow sides up to 4096: an image of more pixels than part_pixels (1024x1024 on the CPU) is a
    part of its own, not a part of no images."""
    whole, parted = (Pipeline(tiny_bundle, OnnxRuntimeBackend("fp32"), prompt_cache=0) for _ in range(2))
    whole.part_pixels, parted.part_pixels = None, 64 * 64 - 1
    calls = part_batches(parted)
    kw = dict(height=64, width=64, seed=3)
    np.testing.assert_array_equal(parted(["a", "b"], **kw), whole(["a", "b"], **kw))
    assert calls == [1, 1]


@pytest.mark.parametrize("family", ["sd-turbo", "sdxl-turbo"])
@pytest.mark.parametrize("img2img", [False, True])
def test_a_cpu_batch_run_in_parts_makes_the_whole_batchs_images(tiny_bundle, xl_bundle, family, img2img):
    """The CPU runs a batch in parts of at most part_pixels pixels (peak memory): every part makes, bit for
    bit, the images the whole batch makes, with seeds and given noise (txt2img latents, img2img's image and
    posterior noise, SDXL's ancestral step noise) cut to its images."""
    bundle = tiny_bundle if family == "sd-turbo" else xl_bundle
    whole, parted = (Pipeline(bundle, OnnxRuntimeBackend("fp32"), prompt_cache=0) for _ in range(2))
    assert whole.part_pixels == CPU_PART_PIXELS  # the CPU's default: a batch of 1024x1024 images runs one by one
    whole.part_pixels, parted.part_pixels = None, 3 * 64 * 64  # three images a part: parts of 3 and 1
    rng = np.random.default_rng(5)
    kw = dict(height=64, width=64, steps=2, seed=11)
    if img2img:
        kw |= dict(image=rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), strength=1.0)
        kw["image_noise"] = rng.standard_normal((4, 4, 8, 8), dtype=np.float32)
    else:
        kw["latents"] = rng.standard_normal((4, 4, 8, 8), dtype=np.float32)
    if family == "sdxl-turbo":
        kw["step_noise"] = rng.standard_normal((2, 4, 4, 8, 8), dtype=np.float32)
    prompts = [f"prompt {i}" for i in range(4)]
    calls = part_batches(parted)
    np.testing.assert_array_equal(
        parted.run_float(parted.request(prompts, **kw)), whole.run_float(whole.request(prompts, **kw))
    )
    assert calls == [3, 1]
    seeded = {k: v for k, v in kw.items() if k in ("height", "width", "steps", "seed")}  # noise drawn from seeds
    np.testing.assert_array_equal(parted(prompts, **seeded), whole(prompts, **seeded))
