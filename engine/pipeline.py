"""The chain: prompt -> text encoder -> UNet x steps with Euler updates -> VAE decoder -> uint8 pixels.

This is the host-driven pipeline used by host backends (ONNX Runtime). Each stage's arrays are numpy;
the schedule is computed before any stage runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .images import to_model_image, to_uint8
from .request import Request, build_request
from .schedule import make_schedule

log = logging.getLogger(__name__)


class Pipeline:
    """Generate images from a bundle with a host backend. Stages load on first use."""

    def __init__(self, bundle: Bundle | str | Path, backend):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.backend = backend
        b = self.bundle
        self.tokenizers = b.prompt_tokenizers()
        self._stages: dict = {}
        latent_spec = b.component(backend.precision, "unet").spec.inputs[0]
        self.dtype = np.dtype(latent_spec.dtype)  # latents live in the UNet's float type between steps

    def stage(self, name: str):
        if name not in self._stages:
            log.info("loading %s (%s, %s)", name, self.backend.name, self.backend.precision)
            self._stages[name] = self.backend.load(self.bundle, name)
        return self._stages[name]

    def load(self, img2img: bool = False) -> Pipeline:
        """Load every stage now instead of on first use."""
        for name in self.bundle.component_names:
            if name != "vae_encoder" or img2img:
                self.stage(name)
        return self

    def __call__(self, prompts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Images as [B, H, W, 3] uint8; the keyword arguments are ``request``'s."""
        return self.run(self.request(prompts, **kwargs))

    def request(self, prompts: str | Sequence[str], **kwargs) -> Request:
        """A checked Request for this bundle; the keyword arguments are ``build_request``'s."""
        return build_request(self.bundle, prompts, **kwargs)

    def run(self, req: Request) -> np.ndarray:
        """Images as [B, H, W, 3] uint8: ``run_float``'s image, rounded."""
        return to_uint8(self.run_float(req))

    def run_float(self, req: Request) -> np.ndarray:
        """The decoder's image before uint8: [B, 3, H, W] in about [-1, 1], in the VAE's float type."""
        b, dt = self.bundle, self.dtype
        img2img = req.image is not None
        sched = make_schedule(b.scheduler, req.steps, req.strength if img2img else 1.0)
        noise, enc_noise, step_noise = req.noises(b, sched)
        noise = noise.astype(dt)
        hidden, cond = self.encode_prompts(req)
        if not img2img:
            x = sched.noise_latents(noise)  # [B, 4, h, w]
        else:
            init = self.stage("vae_encoder")(image=to_model_image(req.image, dt), noise=enc_noise).astype(dt)
            x = sched.add_noise(init, noise)
        unet = self.stage("unet")
        for i in range(sched.steps):
            t = np.full((req.batch,), sched.timesteps[i], np.float32)
            eps = unet(sample=sched.scale_input(i, x), timestep=t, hidden_states=hidden, **cond)
            x = sched.step(i, eps, x, step_noise[i] if sched.ancestral else None)
        return self.stage("vae_decoder")(latents=x)

    def encode_prompts(self, req: Request) -> tuple[np.ndarray, dict]:
        """Text conditioning: SD-Turbo's hidden states; SDXL's two encoders' hidden states side by side,
        the second one's pooled projection, and its size conditioning (original, crop, target)."""
        prompts = list(req.prompts)
        if self.bundle.family == "sd-turbo":
            return self.stage("text_encoder")(input_ids=self.tokenizers[0](prompts)), {}  # [B, 77, D]
        h1 = self.stage("text_encoder")(input_ids=self.tokenizers[0](prompts))
        h2, pooled = self.stage("text_encoder_2")(input_ids=self.tokenizers[1](prompts))
        hidden = np.concatenate([h1, h2], axis=-1)  # [B, 77, D1 + D2]
        return hidden, {"text_embeds": pooled, "time_ids": req.time_ids().astype(self.dtype)}
