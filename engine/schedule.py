"""Euler "trailing" schedule, computed on the host before any model runs.

Mirrors diffusers' ``EulerDiscreteScheduler`` (prediction_type "epsilon", timestep_spacing "trailing",
no Karras sigmas, linear interpolation, s_churn = 0) step for step, in numpy, so the runtime needs no
torch. The values are fixed per (steps, strength): a request never computes them on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import InputError

MAX_STEPS = 4


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "trailing"
    prediction_type: str = "epsilon"
    steps_offset: int = 1
    ancestral: bool = False  # EulerAncestralDiscreteScheduler (SDXL-Turbo): fresh noise at every step

    @classmethod
    def from_dict(cls, cfg: dict) -> SchedulerConfig:
        """Take the fields this runtime implements; refuse settings it would silently get wrong."""
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        name = cfg.get("_class_name", "EulerDiscreteScheduler")
        if name not in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
            raise InputError(
                f"scheduler {name!r} is not supported; allowed: EulerDiscreteScheduler, EulerAncestralDiscreteScheduler"
            )
        out = cls(**fields, ancestral=name == "EulerAncestralDiscreteScheduler")
        n = out.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"scheduler num_train_timesteps={n!r} is not allowed; it must be a whole number >= 1")
        if not 0 < out.beta_start < out.beta_end < 1:
            raise InputError(
                f"scheduler beta_start={out.beta_start!r}, beta_end={out.beta_end!r} are not allowed; "
                f"they must satisfy 0 < beta_start < beta_end < 1"
            )
        supported = {
            "beta_schedule": ("scaled_linear", "linear"),
            "timestep_spacing": ("trailing",),
            "prediction_type": ("epsilon",),
        }
        for key, allowed in supported.items():
            if getattr(out, key) not in allowed:
                raise InputError(f"scheduler {key}={getattr(out, key)!r} is not supported; allowed: {allowed}")
        unsupported = {
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "rescale_betas_zero_snr": False,
            "trained_betas": None,
            "interpolation_type": "linear",
            "final_sigmas_type": "zero",
            "timestep_type": "discrete",
        }
        for key, default in unsupported.items():
            if cfg.get(key, default) != default:
                raise InputError(f"scheduler {key}={cfg[key]!r} is not supported; this runtime needs {default!r}")
        return out

    def alphas_cumprod(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        return np.cumprod(1.0 - betas, dtype=np.float32)


@dataclass(frozen=True)
class Schedule:
    """What one request runs: ``timesteps[i]`` with ``sigmas[i]`` -> ``sigmas[i + 1]`` for each step."""

    timesteps: np.ndarray  # [S] float32, passed to the UNet
    sigmas: np.ndarray  # [S + 1] float32, the last one 0
    init_noise_sigma: float  # txt2img: noise is multiplied by this
    ancestral: bool = False

    def sigma_up_down(self, i: int) -> tuple[np.float32, np.float32]:
        """Ancestral step i: the noise added (sigma_up) and the deterministic target (sigma_down)."""
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]
        up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** np.float32(0.5)
        return up, (s_to**2 - up**2) ** np.float32(0.5)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def noise_latents(self, noise: np.ndarray) -> np.ndarray:
        """txt2img start: unit noise times the initial sigma, in noise's dtype."""
        return noise * np.asarray(self.init_noise_sigma, noise.dtype)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """img2img start: encoded latents plus noise at the first kept sigma, in x0's dtype."""
        return x0 + noise * self.sigmas[0].astype(x0.dtype)

    def scale_input(self, i: int, x: np.ndarray) -> np.ndarray:
        """UNet input = x / sqrt(sigma_i^2 + 1), computed in x's dtype as diffusers does."""
        return x / np.sqrt(self.sigmas[i] ** 2 + np.float32(1.0)).astype(x.dtype)

    def step(self, i: int, eps: np.ndarray, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """One (ancestral) Euler step, written as diffusers writes it so the rounding is the same.

        The sample is upcast to float32 but ``sigma * eps`` (and the ancestral ``noise * sigma_up``) is
        formed in eps's dtype (fp16 for an fp16 UNet); the result is returned in x's dtype, as the
        pipeline stores it between steps. ``noise``: this step's unit noise (ancestral only).
        """
        sigma = self.sigmas[i]
        target = self.sigma_up_down(i)[1] if self.ancestral else self.sigmas[i + 1]
        x32 = x.astype(np.float32, copy=False)
        x0 = x32 - (sigma.astype(eps.dtype) * eps).astype(np.float32, copy=False)
        derivative = (x32 - x0) / sigma
        out = x32 + derivative * (target - sigma)
        if self.ancestral:
            if noise is None:
                raise InputError("an ancestral step needs its noise")
            up = self.sigma_up_down(i)[0]
            out = out + (noise.astype(eps.dtype) * up.astype(eps.dtype)).astype(np.float32)
        return out.astype(x.dtype, copy=False)


def check_steps(steps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps={steps!r} is not allowed; use an integer from 1 to {MAX_STEPS}")


def _strength_ok(strength) -> bool:
    number = isinstance(strength, (int, float, np.integer, np.floating)) and not isinstance(strength, (bool, np.bool_))
    return number and 0.0 < strength <= 1.0


def default_steps(strength: float = 1.0) -> int:
    """The steps a request runs when it names none: 1 (txt2img, or img2img at strength 1); img2img at a lower
    strength, the fewest whose ``int(steps * strength)`` runs a step (2 at the default 0.5: diffusers' own
    SD-Turbo img2img example), at most ``MAX_STEPS`` (make_schedule then says what to raise)."""
    if not _strength_ok(strength):
        return 1  # (make_schedule names the bad strength)
    return next((n for n in range(1, MAX_STEPS + 1) if int(n * strength) >= 1), MAX_STEPS)


def make_schedule(config: SchedulerConfig, steps: int, strength: float = 1.0) -> Schedule:
    """The schedule for ``steps`` inference steps; img2img keeps the last int(steps * strength) of them.

    Checked here on every call, then memoized by value (its arrays are shared; nothing writes to them)."""
    return _schedule(config, int(steps), steps_kept(steps, strength))


def steps_kept(steps: int, strength: float = 1.0) -> int:
    """How many of ``steps`` an img2img request at ``strength`` runs (all at 1.0); InputError when the values
    are not allowed or run no step. Needs no model: the CLI asks before a bundle is exported or loaded."""
    check_steps(steps)
    if not _strength_ok(strength):
        raise InputError(f"strength={strength!r} is not allowed; use a number in (0, 1]")
    kept = min(int(steps * strength), steps)
    if kept < 1:
        shown = f"{1 / steps:g}"  # the least strength that runs a step, as a number that does when typed
        shown = shown if int(steps * float(shown)) >= 1 else f"{math.ceil(1e6 / steps) / 1e6:g}"
        least = f"at {steps} step{'s' * (steps > 1)}, strength must be at least {shown}"
        more = f", or more steps (up to {MAX_STEPS})" if steps < MAX_STEPS else ""
        raise InputError(
            f"steps * strength = {steps} * {_exact(strength)} = {_below_one(steps * strength)} runs no step; "
            f"int(steps * strength) must be at least 1: {least}{more}"
        )
    return kept


def _below_one(x: float) -> str:
    """``x`` (< 1) as %g shows it, unless that rounds it up to 1 (0.99999999999): then every digit it has."""
    shown = f"{float(x):g}"
    return shown if float(shown) < 1 else repr(float(x))


def _exact(x: float) -> str:
    """``x`` as %g shows it where that is its value, else every digit it has (0.2499999999 is not "0.25", nor
    0.9999999996 "1": the refused value must not read as the one it is told to reach)."""
    shown = f"{float(x):g}"
    return shown if float(shown) == float(x) else repr(float(x))


@lru_cache(maxsize=64)
def _schedule(config: SchedulerConfig, steps: int, kept: int) -> Schedule:
    n = config.num_train_timesteps
    timesteps = (np.round(np.arange(n, 0, -n / steps)) - 1).astype(np.float32)
    ac = config.alphas_cumprod()
    all_sigmas = ((1 - ac) / ac) ** 0.5
    sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    init_sigma = float(sigmas.max())  # "trailing" spacing: sigma_max, not sqrt(sigma_max^2 + 1)
    start = steps - kept
    timesteps, sigmas = timesteps[start:], sigmas[start:]
    timesteps.setflags(write=False)  # shared by every request with these settings
    sigmas.setflags(write=False)
    return Schedule(timesteps, sigmas, init_sigma, ancestral=config.ancestral)
