"""The chain: prompt -> text encoder -> UNet x steps with Euler updates -> VAE decoder -> uint8 pixels.

This is the host-driven pipeline used by host backends (ONNX Runtime). Each stage's arrays are numpy;
the schedule is computed before any stage runs. Two switches, each off the reference path only when asked:
``vae="tiny"`` decodes (and encodes) with the tiny autoencoder instead of the full VAE (a different, blurrier
image: diffusers' with ``vae=AutoencoderTiny``), and the prompt cache (on by default: the same image bit for
bit) skips the text encoders for prompts seen recently (prompt_cache.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import FP32_REMEDY, BackendError, InputError, NonFiniteOutput
from .images import nonfinite_images, to_model_image, to_uint8
from .prompt_cache import DEFAULT_SIZE, PromptCache, as_prompt_cache
from .request import Request, build_request
from .schedule import make_schedule

log = logging.getLogger(__name__)
# On the CPU a batch runs in parts of at most this many pixels: peak memory grows with the batch while the
# CPU's speed does not (random:tiny at 1024x1024, whose UNet attends over 128x128 latents: peak RSS 3.4 GB at
# batch 1, 6.8 GB at batch 2 run whole; in parts, 6.9 GB at batch 4 in 15.3 s against 4.3 s for one). Each part
# makes the same images as the whole batch would, bit for bit (tested).
CPU_PART_PIXELS = 1024 * 1024


def check_vae_request(vae: str, req: Request) -> None:
    """What only the full VAE takes: noise for its posterior (the tiny VAE's encoder draws none)."""
    if vae == "tiny" and req.image_noise is not None:
        raise InputError(
            "image_noise (--image-noise) samples the full VAE's posterior; the tiny VAE's encoder draws no noise: "
            "leave it out with the tiny VAE"
        )


class Pipeline:
    """Generate images from a bundle with a host backend. Stages load on first use."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        backend,
        vae: str = "full",
        prompt_cache: int | PromptCache = DEFAULT_SIZE,
    ):
        """``vae``: "full" (the model's own VAE) or "tiny" (the bundle's tiny autoencoder, `export --tiny-vae`).
        ``prompt_cache``: how many prompts' text-encoder outputs to keep (0: off), or a cache to share."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.backend = backend
        b = self.bundle
        self.vae = vae
        self.decoder, self.encoder = b.vae_components(vae)
        for name in (self.decoder, self.encoder):
            b.component(backend.precision, name)  # present in this precision (a clear error now, not at first use)
        self.tokenizers = b.prompt_tokenizers()
        self.text_encoders = [n for n in b.component_names if n.startswith("text_encoder")]
        self.prompt_cache = as_prompt_cache(prompt_cache)
        shas = tuple(b.components[backend.precision][n].sha256 for n in self.text_encoders)
        self.encoder_id = (backend.name, backend.precision, *shas)  # whose outputs the cache holds
        self._stages: dict = {}
        self.closed = False
        self._runs = 0  # runs under way: close() waits for them (several threads may run at once)
        self._idle = threading.Condition()
        latent_spec = b.component(backend.precision, "unet").spec.inputs[0]
        self.dtype = np.dtype(latent_spec.dtype)  # latents live in the UNet's float type between steps
        on_cpu = tuple(getattr(backend, "providers", ())) == ("CPUExecutionProvider",)
        self.part_pixels = CPU_PART_PIXELS if on_cpu else None  # None: a batch runs whole
        # onnxruntime's CPU fp16 convolutions of the tiny VAE round a batch differently from one image (up to
        # 5e-4, a level in a few pixels): there it runs one image at a time, so each image of a batch gets the
        # pixels it gets alone
        vae_dtype = np.dtype(b.component(backend.precision, self.decoder).spec.inputs[0].dtype)
        self.vae_per_image = on_cpu and vae == "tiny" and vae_dtype == np.float16

    def stage(self, name: str):
        if self.closed and not self._runs:  # (a run that was under way when close() came still finishes)
            raise BackendError("this pipeline is closed; open another one")
        if name not in self._stages:
            log.info("loading %s (%s, %s)", name, self.backend.name, self.backend.precision)
            self._stages[name] = self.backend.load(self.bundle, name)
        return self._stages[name]

    def load(self, img2img: bool = False) -> Pipeline:
        """Load every stage now instead of on first use."""
        for name in (*self.text_encoders, "unet", self.decoder, *([self.encoder] if img2img else [])):
            self.stage(name)
        return self

    def close(self) -> None:
        """Let go of the loaded stages (their sessions, and a GPU provider's memory), for good, once the runs
        under way (on other threads) have finished: a request after it raises, as on the device pipelines."""
        with self._idle:
            self.closed = True
            self._idle.wait_for(lambda: self._runs == 0)
            self._stages.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, prompts: str | Sequence[str], **kwargs) -> np.ndarray:
        """Images as [B, H, W, 3] uint8; the keyword arguments are ``request``'s."""
        return self.run(self.request(prompts, **kwargs))

    def request(self, prompts: str | Sequence[str], **kwargs) -> Request:
        """A checked Request for this bundle; the keyword arguments are ``build_request``'s."""
        req = build_request(self.bundle, prompts, **kwargs)
        check_vae_request(self.vae, req)
        return req

    def run(self, req: Request) -> np.ndarray:
        """Images as [B, H, W, 3] uint8: ``run_float``'s image, rounded. NonFiniteOutput where some image is
        NaN or infinite (it holds all the pixels)."""
        image = self.run_float(req)
        with np.errstate(invalid="ignore"):  # NaN casts anyhow, as on a GPU: such an image is refused here
            pixels, bad = to_uint8(image), nonfinite_images(image)
        if bad:
            raise NonFiniteOutput(pixels, bad, FP32_REMEDY if self.dtype == np.float16 else None)
        return pixels

    def run_float(self, req: Request) -> np.ndarray:
        """The decoder's image before uint8: [B, 3, H, W] in about [-1, 1], in the VAE's float type (in parts
        of at most ``part_pixels`` pixels when set, each at least one image)."""
        per = req.batch if self.part_pixels is None else max(1, self.part_pixels // (req.height * req.width))
        with self._idle:
            if self.closed:
                raise BackendError("this pipeline is closed; open another one")
            self._runs += 1
        try:
            if per >= req.batch:
                return self._run_float(req)
            return np.concatenate([self._run_float(req.part(i, i + per)) for i in range(0, req.batch, per)])
        finally:
            with self._idle:
                self._runs -= 1
                self._idle.notify_all()

    def _run_float(self, req: Request) -> np.ndarray:
        b, dt = self.bundle, self.dtype
        img2img = req.image is not None
        sched = make_schedule(b.scheduler, req.steps, req.strength if img2img else 1.0)
        noise, enc_noise, step_noise = req.noises(b, sched)
        noise = noise.astype(dt)
        hidden, cond = self.encode_prompts(req)
        if not img2img:
            x = sched.noise_latents(noise)  # [B, 4, h, w]
        else:
            inputs = {"image": to_model_image(req.image, dt)}
            if self.vae == "full":  # the tiny encoder is deterministic: its posterior draw goes unused
                inputs["noise"] = enc_noise
            init = self.run_vae(self.encoder, inputs).astype(dt)
            x = sched.add_noise(init, noise)
        unet = self.stage("unet")
        for i in range(sched.steps):
            t = np.full((req.batch,), sched.timesteps[i], np.float32)
            eps = unet(sample=sched.scale_input(i, x), timestep=t, hidden_states=hidden, **cond)
            x = sched.step(i, eps, x, step_noise[i] if sched.ancestral else None)
        return self.run_vae(self.decoder, {"latents": x})

    def run_vae(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The VAE's encoder or decoder on the batch, or one image at a time (``vae_per_image``)."""
        stage = self.stage(name)
        batch = len(next(iter(inputs.values())))
        if not self.vae_per_image or batch == 1:
            return stage(**inputs)
        return np.concatenate([stage(**{k: v[i : i + 1] for k, v in inputs.items()}) for i in range(batch)])

    def encode_prompts(self, req: Request) -> tuple[np.ndarray, dict]:
        """Text conditioning: SD-Turbo's hidden states; SDXL's two encoders' hidden states side by side,
        the second one's pooled projection, and its size conditioning (original, crop, target). From the
        prompt cache when every prompt of the request is there."""
        prompts = list(req.prompts)
        ids = [tok(prompts) for tok in self.tokenizers]  # [B, 77] int32 each
        keys = self.prompt_cache.keys(self.encoder_id, ids)
        cached = self.prompt_cache.lookup(keys)
        if cached is not None:
            outputs = tuple(np.stack(rows) for rows in zip(*(e.value for e in cached), strict=True))
        else:
            outputs = self.run_text_encoders(ids)
            for i, key in enumerate(keys if self.prompt_cache.enabled else ()):
                self.prompt_cache.store(key, tuple(o[i].copy() for o in outputs))  # copies: the cache's own
        if self.bundle.family == "sd-turbo":
            return outputs[0], {}  # [B, 77, D]
        hidden, pooled = outputs
        return hidden, {"text_embeds": pooled, "time_ids": req.time_ids().astype(self.dtype)}

    def run_text_encoders(self, ids: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """(hidden states,) for SD-Turbo; (both encoders' hidden states side by side, pooled) for SDXL."""
        if self.bundle.family == "sd-turbo":
            return (self.stage("text_encoder")(input_ids=ids[0]),)
        h1 = self.stage("text_encoder")(input_ids=ids[0])
        h2, pooled = self.stage("text_encoder_2")(input_ids=ids[1])
        return np.concatenate([h1, h2], axis=-1), pooled  # [B, 77, D1 + D2], [B, P]
