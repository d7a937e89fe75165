"""Schedule parity with diffusers' EulerDiscreteScheduler built from SD-Turbo's scheduler config."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from sdturbo.engine.errors import InputError
from sdturbo.engine.schedule import MAX_STEPS, SchedulerConfig, default_steps, make_schedule
from sdturbo.export.random_models import SCHEDULER  # SD-Turbo's scheduler_config.json values

STRENGTHS = [0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0]


def reference(steps: int, strength: float):
    """diffusers' scheduler, set up the way the txt2img / img2img pipelines set it up."""
    sched = EulerDiscreteScheduler.from_config(SCHEDULER)
    sched.set_timesteps(steps)
    kept = min(int(steps * strength), steps)
    start = steps - kept
    sched.set_begin_index(start)
    return sched, start


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_schedule_matches_diffusers_step_for_step(steps, strength, dtype):
    if int(steps * strength) < 1:
        with pytest.raises(InputError, match="at least 1"):
            make_schedule(SchedulerConfig.from_dict(SCHEDULER), steps, strength)
        return
    ref, start = reference(steps, strength)
    ours = make_schedule(SchedulerConfig.from_dict(SCHEDULER), steps, strength)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps[start:].numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas[start:].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)

    rng = np.random.default_rng(steps * 100 + int(strength * 10))
    shape = (2, 4, 8, 8)
    x0, noise = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    tdt = torch.float16 if dtype == np.float16 else torch.float32
    if strength < 1.0:  # img2img start: encoded latents plus noise at the first kept timestep
        x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[start : start + 1])
        x = ours.add_noise(x0, noise)
    else:  # txt2img start
        x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
        x = ours.noise_latents(noise)
    # A few units in the last place of the dtype: diffusers' own noise. torch multiplies an fp16 tensor by a 0-d
    # fp32 sigma with the sigma rounded to fp16 or not depending on operand order and device (CPU rounds it as the
    # left operand, CUDA never does): one fp16 ulp in up to a quarter of the elements, between diffusers and itself.
    eps_rel = 2e-3 if dtype == np.float16 else 2e-6

    def tol(*operands):
        # An Euler step cancels large terms (x ~ 15 -> x0 ~ 0.1): rounding scales with the operands.
        return dict(rtol=eps_rel, atol=eps_rel * max(float(np.abs(o).max()) for o in operands))

    assert x.dtype == dtype  # each result in the latents' dtype (numpy 2 would promote an fp16 array by an fp32 scalar)
    np.testing.assert_allclose(x, x_ref.numpy(), **tol(x))
    x_ref = torch.from_numpy(x.copy())  # compare each step from the same state
    for i, t in enumerate(ref.timesteps[start:]):
        scaled, scaled_ours = ref.scale_model_input(x_ref, t), ours.scale_input(i, x)
        assert scaled_ours.dtype == dtype
        np.testing.assert_allclose(scaled_ours, scaled.numpy(), **tol(scaled))
        eps = rng.standard_normal(shape).astype(dtype)
        x_ref = ref.step(torch.from_numpy(eps).to(tdt), t, x_ref).prev_sample
        x_prev, x = x, ours.step(i, eps, x)
        assert x.dtype == dtype
        np.testing.assert_allclose(x, x_ref.numpy(), **tol(x_prev, ours.sigmas[i] * eps))
        x_ref = torch.from_numpy(x.copy())


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_linear_betas_match_diffusers(steps):
    """The other beta schedule the config may name ("linear": betas spaced linearly, not their square roots)."""
    config = {**SCHEDULER, "beta_schedule": "linear"}
    ref = EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps)
    ours = make_schedule(SchedulerConfig.from_dict(config), steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)


def test_one_step_values():
    """The facts model-facts.md states for one step: t = 999, sigma_max ~ 14.6146, init sigma = sigma_max."""
    s = make_schedule(SchedulerConfig.from_dict(SCHEDULER), 1)
    assert s.timesteps.tolist() == [999.0]
    assert s.sigmas[-1] == 0 and abs(s.sigmas[0] - 14.6146) < 1e-3
    assert s.init_noise_sigma == pytest.approx(float(s.sigmas[0]))


def test_a_memoized_schedule_cannot_be_changed_by_one_request():
    """make_schedule returns the same arrays to every request with those settings: they are read-only, so a
    caller that writes to them gets an error instead of changing every later request's schedule."""
    config = SchedulerConfig.from_dict(SCHEDULER)
    first = make_schedule(config, 2, 1.0)
    assert make_schedule(config, 2, 1.0) is first
    for values in (first.timesteps, first.sigmas):
        with pytest.raises(ValueError, match="read-only"):
            values[0] = 0


@pytest.mark.parametrize("steps", [0, 5, -1, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(InputError, match="steps"):
        make_schedule(SchedulerConfig(), steps)


@pytest.mark.parametrize(
    "key,value",
    [
        ("timestep_spacing", "leading"),
        ("prediction_type", "v_prediction"),
        ("use_karras_sigmas", True),
        ("rescale_betas_zero_snr", True),
    ],
)
def test_unsupported_scheduler_config(key, value):
    with pytest.raises(InputError, match=key):
        SchedulerConfig.from_dict({**SCHEDULER, key: value})


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.5, 0.4, 0.34, 0.3, 0.26, 0.25, 0.2, 0.05])
def test_img2img_steps_default_to_the_fewest_that_run_a_step(strength):
    """A request naming no steps: img2img at ``strength`` runs the fewest steps that leave it one to run (2 at the
    default 0.5, diffusers' own SD-Turbo img2img example), not 1, which would run none; below 0.25 none of 1 to 4
    does, and the schedule says so."""
    config = SchedulerConfig.from_dict(SCHEDULER)
    n = default_steps(strength)
    assert 1 <= n <= MAX_STEPS
    if n > 1:
        with pytest.raises(InputError, match="runs no step"):
            make_schedule(config, n - 1, strength)
    if strength >= 1 / MAX_STEPS:
        assert make_schedule(config, n, strength).steps >= 1
    else:
        assert n == MAX_STEPS
        with pytest.raises(InputError, match="runs no step"):
            make_schedule(config, n, strength)
    assert default_steps(0.5) == 2 and default_steps(1.0) == 1


@pytest.mark.parametrize(
    ("steps", "strength", "shown"),
    [(1, 0.5, "1 * 0.5 = 0.5"), (3, 0.3, "3 * 0.3 = 0.9"), (1, 0.99999999999, "1 * 0.99999999999 = 0.99999999999")],
)
def test_a_strength_that_runs_no_step_is_shown_below_one(steps, strength, shown):
    """The product that runs no step is shown as it is, never rounded up to a 1 that would run one."""
    with pytest.raises(InputError, match=f"steps \\* strength = {re.escape(shown)} runs no step"):
        make_schedule(SchedulerConfig.from_dict(SCHEDULER), steps, strength)
