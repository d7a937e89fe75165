"""The documented noise contract (engine/request.py), pinned draw by draw.

Image i of a batch uses numpy's ``PCG64(seed + i)`` and draws, in this order: the initial noise (txt2img) or
the noise added to the encoded image (img2img); the VAE posterior's noise (drawn in txt2img too, unused);
then, for an ancestral scheduler (SDXL-Turbo), one draw per step run. The parity tests show which tensor
diffusers uses where when they are given explicitly; here a seeded request must equal the request given
those same draws explicitly, so a reordered, reused or re-seeded draw fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.request import draw_noise
from sdturbo.engine.runtime import open_pipeline
from sdturbo.engine.schedule import make_schedule

PROMPTS = ("a red cube on a table", "an astronaut riding a horse", "a lighthouse at dusk")
H, W = 32, 48
SEED = 41


def expected_draws(seed: int, shape: tuple[int, ...], draws: int) -> list[np.ndarray]:
    """The contract written out: image i's generator is PCG64(seed + i), its slices drawn one after another."""
    per_image = []
    for i in range(shape[0]):
        rng = np.random.Generator(np.random.PCG64(seed + i))
        per_image.append([rng.standard_normal(shape[1:], dtype=np.float32) for _ in range(draws)])
    return [np.stack([per_image[i][d] for i in range(shape[0])]) for d in range(draws)]


def test_draw_noise_is_pcg64_per_image_in_order():
    shape = (3, 4, 5, 6)
    got = draw_noise(SEED, shape, draws=4)
    want = expected_draws(SEED, shape, 4)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == shape
        np.testing.assert_array_equal(g, w)
    flat = [g.ravel() for g in got] + [g[i].ravel() for g in got for i in range(1, 3)]
    assert len({a.tobytes() for a in flat}) == len(flat), "a draw is reused"


@pytest.fixture(scope="module", params=["sd-turbo", "sdxl-turbo"])
def bundle_path(request, tiny_bundle, xl_bundle):
    return tiny_bundle if request.param == "sd-turbo" else xl_bundle


@pytest.fixture(scope="module")
def pipe(bundle_path):
    return open_pipeline(bundle_path, "onnxruntime", "fp32")


def image():
    return np.random.default_rng(3).integers(0, 256, (len(PROMPTS), H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize(("steps", "strength"), [(1, None), (4, None), (4, 0.5), (2, 1.0)])
def test_each_draw_feeds_its_tensor(pipe, steps, strength):
    """``Request.noises``: (first draw, second draw, the rest) = (initial or added noise, posterior noise,
    per-step noise); and the pipeline run from the seed equals the run given those draws explicitly."""
    b = pipe.bundle
    img2img = strength is not None
    kw = dict(steps=steps, height=H, width=W, **({"image": image(), "strength": strength} if img2img else {}))
    req = pipe.request(PROMPTS, seed=SEED, **kw)
    sched = make_schedule(b.scheduler, steps, strength or 1.0)
    n_steps = sched.steps if b.scheduler.ancestral else 0
    want = expected_draws(SEED, req.latent_shape(b), 2 + n_steps)
    noise, image_noise, step_noise = req.noises(b, sched)
    np.testing.assert_array_equal(noise, want[0])
    if img2img or n_steps:
        np.testing.assert_array_equal(image_noise, want[1])
    else:  # nothing follows the posterior slot, nothing uses it: not drawn
        assert image_noise is None
    assert len(step_noise) == n_steps
    for got, w in zip(step_noise, want[2:], strict=True):
        np.testing.assert_array_equal(got, w)

    explicit = dict(latents=want[0], **({"image_noise": want[1]} if img2img else {}))
    if n_steps:
        explicit["step_noise"] = np.stack(want[2:])
    seeded = pipe.run_float(req)
    np.testing.assert_array_equal(seeded, pipe.run_float(pipe.request(PROMPTS, seed=SEED + 1, **kw, **explicit)))
    assert not np.array_equal(seeded, pipe.run_float(pipe.request(PROMPTS, seed=SEED + 1, **kw)))


def test_given_noise_keeps_the_other_draws_in_place(bundle_path):
    """Noise the caller gives replaces its own draw only: the others stay where the contract puts them."""
    b = Bundle(bundle_path)
    pipe = open_pipeline(b, "onnxruntime", "fp32")
    req = pipe.request(PROMPTS, seed=SEED, steps=4, height=H, width=W)
    given = np.full(req.latent_shape(b), 0.5, np.float32)
    sched = make_schedule(b.scheduler, 4)
    n_steps = 4 if b.scheduler.ancestral else 0
    want = expected_draws(SEED, req.latent_shape(b), 2 + n_steps)
    noise, image_noise, step_noise = pipe.request(PROMPTS, seed=SEED, steps=4, height=H, width=W, latents=given).noises(
        b, sched
    )
    np.testing.assert_array_equal(noise, given)
    if n_steps:
        np.testing.assert_array_equal(image_noise, want[1])
    else:
        assert image_noise is None
    for got, w in zip(step_noise, want[2:], strict=True):
        np.testing.assert_array_equal(got, w)


def test_image_i_is_the_batch_of_one_with_seed_plus_i(pipe):
    b = pipe.bundle
    sched = make_schedule(b.scheduler, 4, 0.5)
    kw = dict(steps=4, height=H, width=W, strength=0.5)
    batch = pipe.request(PROMPTS, seed=SEED, image=image(), **kw).noises(b, sched)
    for i in range(len(PROMPTS)):
        one = pipe.request(PROMPTS[i], seed=SEED + i, image=image()[i], **kw).noises(b, sched)
        for slot_batch, slot_one in zip((batch[0], batch[1], *batch[2]), (one[0], one[1], *one[2]), strict=True):
            np.testing.assert_array_equal(slot_batch[i], slot_one[0])
