"""diffusers as the oracle, compared as floats: its decoded image in float64, float32 and float16 on given noise.

The parity measure (flash-attention's rule, on the image before uint8): our largest error against diffusers
run in float64 must be at most a small multiple of diffusers' own float32 (or float16) error against that
float64 run. The reference's own precision sets the bar, so the bar is as fine as the code: a 0.1% error
anywhere in the chain is tens to thousands of times the fp32 noise of these tiny models, and fails.

Every random tensor diffusers draws comes from a list the test gives (``given_noise``), in the order
diffusers draws them, so the float64, float32 and float16 runs and ours all see the same noise.

What the "float64" run still rounds to float32, as diffusers writes it: the sigmas and timesteps, the sample
inside each scheduler step, the timestep embedding, and img2img's input image; each is part of what diffusers
computes (ours does the same) or far below the models' fp32 error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

PROMPTS = ("a cinematic shot of a baby racoon wearing an intricate italian priest robe", "a red fox in the snow")
H, W = 64, 96  # not square: a height/width swap anywhere shows
SHAPE = (2, 4, H // 8, W // 8)


@dataclass(frozen=True)
class Case:
    """One request, run by diffusers and by us on the same noise: txt2img, or img2img at ``strength``."""

    name: str
    steps: int
    strength: float | None = None  # None: txt2img

    def __str__(self) -> str:
        return self.name

    @property
    def steps_run(self) -> int:
        return self.steps if self.strength is None else int(self.steps * self.strength)

    def noise(self, ancestral: bool, posterior: bool = True) -> list[np.ndarray]:
        """The unit-normal tensors diffusers draws, in its order: img2img's posterior sample (not with the tiny
        VAE, ``posterior`` False: its encoder has no distribution) and added noise (txt2img: the initial
        latents), then one per step run for an ancestral scheduler."""
        count = (1 if self.strength is None else 1 + posterior) + self.steps_run * ancestral
        rng = np.random.default_rng(self.steps)
        return [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(count)]

    def diffusers_kwargs(self) -> dict:
        from PIL import Image

        kw = dict(num_inference_steps=self.steps, height=H, width=W)
        if self.strength is not None:
            kw.update(image=[Image.fromarray(i) for i in input_images()], strength=self.strength)
        return kw

    def our_kwargs(self, noise: list[np.ndarray], posterior: bool = True) -> dict:
        """``build_request``'s arguments that put each of diffusers' draws where diffusers uses it."""
        kw = dict(steps=self.steps, height=H, width=W)
        if self.strength is None:
            kw["latents"], step_noise = noise[0], noise[1:]
        elif posterior:
            kw.update(image=input_images(), strength=self.strength, image_noise=noise[0], latents=noise[1])
            step_noise = noise[2:]
        else:
            kw.update(image=input_images(), strength=self.strength, latents=noise[0])
            step_noise = noise[1:]
        if step_noise:
            kw["step_noise"] = np.stack(step_noise)
        return kw


def input_images() -> np.ndarray:
    """img2img's input, [2, H, W, 3] uint8: noise with a darker top half (some structure, not only noise)."""
    images = np.random.default_rng(7).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    images[:, : H // 2] //= 2
    return images


TXT2IMG_1 = Case("txt2img-1", 1)
TXT2IMG_4 = Case("txt2img-4", 4)
IMG2IMG = Case("img2img", 2, strength=0.5)
CASES = (TXT2IMG_1, TXT2IMG_4, IMG2IMG)


class References:
    """diffusers' images for a model folder, each computed once: ``image(case, dtype)``. With ``tiny_vae`` (an
    AutoencoderTiny folder), diffusers' pipelines given ``vae=AutoencoderTiny`` of it, in the same dtype."""

    def __init__(self, folder, ancestral: bool, tiny_vae=None):
        self.folder, self.ancestral, self.tiny_vae = folder, ancestral, tiny_vae
        self.posterior = tiny_vae is None  # the full VAE's encoder samples a posterior; the tiny one's does not
        self._pipes: dict = {}
        self._images: dict = {}

    def image(self, case: Case, dtype: torch.dtype) -> np.ndarray:
        key = (case, dtype)
        if key not in self._images:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

            cls = AutoPipelineForText2Image if case.strength is None else AutoPipelineForImage2Image
            if (cls, dtype) not in self._pipes:
                self._pipes[(cls, dtype)] = load(cls, self.folder, dtype, tiny_vae=self.tiny_vae)
            pipe = self._pipes[(cls, dtype)]
            noise = case.noise(self.ancestral, self.posterior)
            self._images[key] = diffusers_image(pipe, PROMPTS, noise, **case.diffusers_kwargs())
        return self._images[key]


@contextmanager
def given_noise(tensors: Sequence[np.ndarray]) -> Iterator[None]:
    """Every ``randn_tensor`` call in diffusers returns the next of ``tensors`` (cast to the dtype asked for);
    on leaving, all of them must have been used, each with the shape it was asked for."""
    import diffusers.utils.torch_utils as tu

    original = tu.randn_tensor
    queue = list(tensors)

    def next_noise(shape, generator=None, device=None, dtype=None, layout=None):
        if not queue:
            raise AssertionError(f"diffusers drew more noise than the test gave (a tensor of shape {tuple(shape)})")
        arr = queue.pop(0)
        assert tuple(shape) == arr.shape, f"diffusers drew {tuple(shape)} where the test gave {arr.shape}"
        return torch.from_numpy(arr).to(device=device or "cpu", dtype=dtype)

    modules = [m for name, m in sys.modules.items() if name.startswith("diffusers") and m is not None]
    patched = [m for m in modules if getattr(m, "randn_tensor", None) is original]
    for m in patched:
        m.randn_tensor = next_noise
    try:
        yield
    finally:
        for m in patched:
            m.randn_tensor = original
    assert not queue, f"diffusers drew {len(tensors) - len(queue)} of the {len(tensors)} noise tensors given"


def load(pipeline_class, folder, dtype: torch.dtype, device: str = "cpu", tiny_vae=None):
    """A diffusers pipeline in ``dtype`` (with ``vae=AutoencoderTiny`` from the folder ``tiny_vae``, if given). In
    float64 its VAE stays in float64 for img2img's encoding too (``force_upcast`` is there for float16's
    overflow, and would make the float64 reference's encoder fp32)."""
    kw = {}
    if tiny_vae is not None:
        from diffusers import AutoencoderTiny

        kw["vae"] = AutoencoderTiny.from_pretrained(tiny_vae, torch_dtype=dtype)
    pipe = pipeline_class.from_pretrained(folder, torch_dtype=dtype, add_watermarker=False, **kw).to(device)
    if dtype == torch.float64:
        pipe.vae.register_to_config(force_upcast=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, prompts: Sequence[str], noise: Sequence[np.ndarray], **kwargs) -> np.ndarray:
    """diffusers' image [B, 3, H, W] in [0, 1] as float64, each draw taken from ``noise`` in order."""
    with given_noise(noise), torch.no_grad():
        out = pipe(list(prompts), guidance_scale=0.0, output_type="pt", **kwargs).images
    return out.to(torch.float64).cpu().numpy()


def diffusers_uint8(pipe, prompts: Sequence[str], noise: Sequence[np.ndarray], **kwargs) -> np.ndarray:
    """diffusers' image [B, H, W, 3] uint8, rounded as its PIL output rounds it."""
    return (diffusers_image(pipe, prompts, noise, **kwargs).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def unit_image(decoded: np.ndarray) -> np.ndarray:
    """Our decoder output [B, 3, H, W] in [-1, 1] -> [0, 1] as diffusers' postprocessing makes it, in float64."""
    return np.clip(decoded.astype(np.float64) / 2 + 0.5, 0.0, 1.0)


def rounding_error(pixels: np.ndarray, exact: np.ndarray) -> float:
    """The largest distance, in uint8 levels, of our pixels [B, H, W, 3] from 255 x diffusers' float64 image
    [B, 3, H, W]: at most half a level plus 255 x our float error when they are that image, rounded."""
    return max_error(pixels.astype(np.float64), 255 * exact.transpose(0, 2, 3, 1))


def max_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@dataclass(frozen=True)
class Parity:
    """Our error and the reference's, both largest absolute differences from diffusers' float64 image."""

    ours: float
    reference: float
    factor: float

    @property
    def bar(self) -> float:
        return self.factor * self.reference

    @property
    def ok(self) -> bool:
        return self.ours <= self.bar

    def __str__(self) -> str:
        return (
            f"ours {self.ours:.3g}, diffusers {self.reference:.3g} (x{self.ours / self.reference:.2f}); "
            f"bar {self.bar:.3g}: {'pass' if self.ok else 'FAIL'}"
        )


def parity(ours: np.ndarray, reference: np.ndarray, exact: np.ndarray, factor: float) -> Parity:
    """``ours``: our decoder output; ``reference``: diffusers at the same precision; ``exact``: diffusers in
    float64 (both [0, 1])."""
    assert exact.std() > 0.05, "the reference image is nearly flat; the comparison would prove little"
    return Parity(max_error(unit_image(ours), exact), max_error(reference, exact), factor)


# -- the three parity checks both families run (tests/engine/test_pipeline_parity.py, tests/sdxl/...) ----------

FACTOR = 2.0  # flash-attention's: no more than twice the reference's own error at the same precision


def our_request(pipe, case: Case, reference: References):
    noise = case.noise(reference.ancestral, reference.posterior)
    return pipe.request(PROMPTS, **case.our_kwargs(noise, reference.posterior))


def check_precision(pipe, reference: References, case: Case, dtype: torch.dtype, label: str, record_property):
    """Our float image within FACTOR x diffusers' own error at ``dtype``; for fp32 also the uint8 pixels held to
    the float error (PSNR against diffusers reported, not asserted)."""
    req = our_request(pipe, case, reference)
    exact, ref = reference.image(case, torch.float64), reference.image(case, dtype)
    result = parity(pipe.run_float(req), ref, exact, FACTOR)
    record_property("error_ratio", result.ours / result.reference)
    message = f"{label} {case} {dtype}: {result}"
    if dtype == torch.float32:
        from sdturbo.engine.images import psnr

        pixels = pipe.run(req)
        value = psnr(pixels, (ref * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))
        record_property("psnr_db", value)
        message += f"; uint8 PSNR against diffusers fp32 {value:.1f} dB"
        assert rounding_error(pixels, exact) <= 0.5 + 255 * (result.ours + 2**-23)
    print(message)
    assert result.ok, str(result)


def check_fault_fails(pipe, reference: References, faults: dict, where: str, label: str, monkeypatch):
    """A 0.1% error injected at ``where`` alone fails the fp32 parity check."""
    inject, kind = faults[where]
    case = TXT2IMG_4 if kind == "txt2img" else IMG2IMG
    req = our_request(pipe, case, reference)
    exact, ref = reference.image(case, torch.float64), reference.image(case, torch.float32)
    inject(pipe, monkeypatch)
    result = parity(pipe.run_float(req), ref, exact, FACTOR)
    print(f"{label} {where} off by 0.1%: {result} ({result.ours / result.bar:.0f}x the bar)")
    assert not result.ok, f"a 0.1% error in the {where} passes the parity check: {result}"
