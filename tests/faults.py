"""Small errors injected into the host pipeline, one place at a time, for the parity tests to show they fail.

Each fault multiplies one value of the chain by ``1 + ERROR`` (0.1%): a stage's output or one of its inputs,
or what one of the schedule's steps returns. Faults are applied with pytest's monkeypatch, so they end with
the test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sdturbo.engine.prompt_cache import PromptCache
from sdturbo.engine.schedule import Schedule

ERROR = 1e-3


def scaled(value):
    """``value`` (an array, or a tuple of them) times 1 + ERROR, in its own dtype."""
    if isinstance(value, tuple):
        return tuple(scaled(v) for v in value)
    return value * np.asarray(1 + ERROR, value.dtype)


def stage_output(component: str, index: int | None = None) -> Callable:
    """The output of ``component`` (or its output number ``index``) is off by ERROR."""

    def wrap(stage):
        def call(**inputs):
            out = stage(**inputs)
            if index is None:
                return scaled(out)
            return tuple(scaled(o) if i == index else o for i, o in enumerate(out))

        return call

    return _on_stage(component, wrap)


def stage_input(component: str, name: str) -> Callable:
    """The input ``name`` of ``component`` is off by ERROR."""

    def wrap(stage):
        return lambda **inputs: stage(**{**inputs, name: scaled(inputs[name])})

    return _on_stage(component, wrap)


def _on_stage(component: str, wrap) -> Callable:
    def apply(pipe, monkeypatch) -> None:
        monkeypatch.setattr(pipe, "prompt_cache", PromptCache(0))  # a cached prompt would skip the faulty stage
        original = pipe.stage
        monkeypatch.setattr(pipe, "stage", lambda name: wrap(original(name)) if name == component else original(name))

    return apply


def schedule_output(method: str) -> Callable:
    """What ``Schedule.<method>`` returns is off by ERROR."""

    def apply(pipe, monkeypatch) -> None:
        original = getattr(Schedule, method)
        monkeypatch.setattr(Schedule, method, lambda self, *a, **kw: scaled(original(self, *a, **kw)))

    return apply


def step_noise(pipe, monkeypatch) -> None:
    """The ancestral step's fresh noise is off by ERROR."""
    original = Schedule.step

    def step(self, i, eps, x, noise=None):
        return original(self, i, eps, x, None if noise is None else scaled(noise))

    monkeypatch.setattr(Schedule, "step", step)


# Where an error goes -> (how to inject it, the request it shows in: "txt2img" or "img2img").
FAULTS = {
    "text encoder output": (stage_output("text_encoder"), "txt2img"),
    "UNet timestep": (stage_input("unet", "timestep"), "txt2img"),
    "UNet input scaling": (schedule_output("scale_input"), "txt2img"),
    "initial latents": (schedule_output("noise_latents"), "txt2img"),
    "UNet output": (stage_output("unet"), "txt2img"),
    "Euler step": (schedule_output("step"), "txt2img"),
    "VAE decoder input": (stage_input("vae_decoder", "latents"), "txt2img"),
    "decoded image scale": (stage_output("vae_decoder"), "txt2img"),
    "img2img input image scale": (stage_input("vae_encoder", "image"), "img2img"),
    "img2img posterior noise": (stage_input("vae_encoder", "noise"), "img2img"),
    "img2img noised latents": (schedule_output("add_noise"), "img2img"),
}
FAULTS_XL = {
    **FAULTS,
    "text encoder 2 hidden states": (stage_output("text_encoder_2", 0), "txt2img"),
    "text encoder 2 pooled output": (stage_output("text_encoder_2", 1), "txt2img"),
    "time_ids": (stage_input("unet", "time_ids"), "txt2img"),
    "ancestral step noise": (step_noise, "txt2img"),
}
