"""The ancestral Euler schedule against diffusers' EulerAncestralDiscreteScheduler, step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from sdturbo.engine.errors import InputError
from sdturbo.engine.schedule import SchedulerConfig, make_schedule
from sdturbo.export.random_models import SCHEDULER_XL

CONFIG = {**SCHEDULER_XL, "_class_name": "EulerAncestralDiscreteScheduler"}


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("strength", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ancestral_steps_match_diffusers(steps, strength, dtype):
    if int(steps * strength) < 1:
        return
    ref = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_XL)
    ref.set_timesteps(steps)
    start = steps - min(int(steps * strength), steps)
    ref.set_begin_index(start)
    ours = make_schedule(SchedulerConfig.from_dict(CONFIG), steps, strength)
    assert ours.ancestral
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps[start:].numpy())
    np.testing.assert_allclose(ours.sigmas, ref.sigmas[start:].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
    rng = np.random.default_rng(steps)
    shape = (2, 4, 8, 8)
    tdt = torch.float16 if dtype == np.float16 else torch.float32
    eps_rel = 2e-3 if dtype == np.float16 else 2e-6
    x = ours.noise_latents(rng.standard_normal(shape).astype(dtype))
    for i, t in enumerate(ref.timesteps[start:]):
        eps = rng.standard_normal(shape).astype(dtype)
        seed = 1000 * steps + i
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=tdt)
        want = ref.step(
            torch.from_numpy(eps), t, torch.from_numpy(x.copy()), generator=torch.Generator().manual_seed(seed)
        ).prev_sample.numpy()
        x_prev, x = x, ours.step(i, eps, x, noise.numpy())
        assert x.dtype == dtype
        scale = max(float(np.abs(x_prev).max()), float(np.abs(want).max()))
        np.testing.assert_allclose(x, want, rtol=eps_rel, atol=eps_rel * scale)


def test_one_step_is_deterministic():
    """sigma_to = 0: no noise is added, whatever the draw (SDXL-Turbo's default is one step)."""
    s = make_schedule(SchedulerConfig.from_dict(CONFIG), 1)
    up, down = s.sigma_up_down(0)
    assert up == 0 and down == 0
    x, eps = np.ones((1, 4, 2, 2), np.float32), np.full((1, 4, 2, 2), 0.5, np.float32)
    np.testing.assert_array_equal(s.step(0, eps, x, np.zeros_like(x)), s.step(0, eps, x, np.full_like(x, 9.0)))


def test_memoized_schedules_keep_the_scheduler_classes_apart():
    """Two configs that differ only in the class (Euler, ancestral Euler) in one process: each its own schedule."""
    for config, want in ((SCHEDULER_XL, False), (CONFIG, True), (SCHEDULER_XL, False)):
        assert make_schedule(SchedulerConfig.from_dict(config), 2).ancestral is want


def test_ancestral_step_needs_noise():
    s = make_schedule(SchedulerConfig.from_dict(CONFIG), 2)
    with pytest.raises(InputError, match="needs its noise"):
        s.step(0, np.zeros((1, 4, 2, 2), np.float32), np.zeros((1, 4, 2, 2), np.float32))


def test_unknown_scheduler_class():
    with pytest.raises(InputError, match="DPMSolverMultistepScheduler"):
        SchedulerConfig.from_dict({**SCHEDULER_XL, "_class_name": "DPMSolverMultistepScheduler"})
