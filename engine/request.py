"""One generation request, checked once before any work starts."""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, replace

import numpy as np

from .bundle import Bundle
from .errors import InputError
from .images import check_pixels
from .schedule import check_steps, default_steps, make_schedule, steps_kept

# The largest |value| allowed in caller's noise (latents, image_noise, step_noise). They are unit-variance
# normal draws, whose peak over a billion values is about 6; a value past this bound is not noise and only
# makes a garbage image.
MAX_NOISE = 100.0
DEFAULT_SIDE = 512  # a request's width and height where none is given (img2img: its image's)
DEFAULT_STRENGTH = 0.5  # img2img's (SD-Turbo's model card runs img2img at 0.5, 2 steps)


@dataclass(frozen=True)
class Request:
    prompts: tuple[str, ...]
    height: int
    width: int
    steps: int = 1
    seed: int | tuple[int, ...] = 0  # image i uses seed + i; or one seed per image (a server's batch of requests)
    latents: np.ndarray | None = None  # [B, C, h, w] unit-variance noise (txt2img) / added noise (img2img)
    image: np.ndarray | None = None  # img2img: [B, H, W, 3] uint8
    strength: float = DEFAULT_STRENGTH
    image_noise: np.ndarray | None = None  # img2img: [B, C, h, w] noise for sampling the VAE posterior
    step_noise: np.ndarray | None = None  # ancestral schedulers: [steps run, B, C, h, w], one draw per step

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def noises(self, bundle: Bundle, sched) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        """(initial or added noise, posterior noise, per-step noise) in float32: the caller's where given,
        else drawn from the seed in that order (see ``draw_noise``). Per-step noise only for ancestral
        schedules; the posterior slot is drawn in txt2img too when step noise follows it, so step noise sits
        after it either way. Where nothing needs it (txt2img, one deterministic schedule) it is not drawn
        (None): the other draws are the same, and the host has one draw less to make (0.18 ms at 512x512 here)."""
        posterior = self.image is not None or sched.ancestral
        drawn = draw_noise(self.seed, self.latent_shape(bundle), draws=1 + posterior + sched.steps * sched.ancestral)
        noise = drawn[0] if self.latents is None else self.latents
        image_noise = self.image_noise if self.image_noise is not None else drawn[1] if posterior else None
        step_noise = drawn[2:] if self.step_noise is None else list(self.step_noise)
        return noise, image_noise, step_noise

    def time_ids(self) -> np.ndarray:
        """SDXL's size conditioning, [B, 6] float32: original size (height, width), crop corner (0, 0), target
        size (height, width), as diffusers builds it with no crop and original = target = the request's size.
        Both pipelines (host and TensorRT) take it from here."""
        return np.tile(np.array([self.height, self.width, 0, 0, self.height, self.width], np.float32), (self.batch, 1))

    def latent_shape(self, bundle: Bundle) -> tuple[int, int, int, int]:
        f = bundle.vae_scale_factor
        return (self.batch, bundle.latent_channels, self.height // f, self.width // f)

    def part(self, lo: int, hi: int) -> Request:
        """Images ``lo`` to ``hi - 1`` as a request of their own, which makes the same images: image i's seed
        stays seed + i, and the noise given is cut to them."""
        seed = self.seed[lo:hi] if isinstance(self.seed, tuple) else int(self.seed) + lo
        cut = {n: getattr(self, n)[lo:hi] for n in ("latents", "image", "image_noise") if getattr(self, n) is not None}
        steps = None if self.step_noise is None else self.step_noise[:, lo:hi]
        return replace(self, prompts=self.prompts[lo:hi], seed=seed, step_noise=steps, **cut)

    def check(self, bundle: Bundle) -> None:
        """Raise InputError naming the first bad value; nothing has run yet."""
        f = bundle.vae_scale_factor
        self.check_values(f)
        bundle.check_request(self.batch, self.height, self.width)
        shape = self.latent_shape(bundle)
        for name in ("latents", "image_noise"):
            if getattr(self, name) is not None:
                check_noise(name, getattr(self, name), shape, f"[batch, channels, height/{f}, width/{f}]")
        if self.image is not None:
            check_pixels(self.image)
            want = (self.batch, self.height, self.width, 3)
            if self.image.shape != want:
                raise InputError(
                    f"image has shape {self.image.shape}; img2img needs {want} [batch, height, width, RGB]"
                )
        elif self.image_noise is not None:
            raise InputError("image_noise is only used with an image (img2img)")
        sched = make_schedule(bundle.scheduler, self.steps, self.strength if self.image is not None else 1.0)
        if self.step_noise is not None:
            if not sched.ancestral:
                raise InputError("step_noise is only used by ancestral schedulers (SDXL-Turbo)")
            check_noise("step_noise", self.step_noise, (sched.steps, *shape), "[steps run, batch, ...]")

    def check_values(self, scale: int) -> None:
        """The checks that need no bundle: prompts, steps, sides (multiples of ``scale``, the VAE's), seeds;
        InputError naming the first bad value. (img2img's strength: ``steps_kept``, with the schedule.)"""
        if not self.prompts:
            raise InputError("the prompt list is empty; give at least one prompt")
        bad = [p for p in self.prompts if not isinstance(p, str)]
        if bad:
            raise InputError(f"prompts must be strings; got {type(bad[0]).__name__} {bad[0]!r}")
        for i, p in enumerate(self.prompts):
            check_utf8(i, p)
        check_steps(self.steps)
        bad = [
            f"{side} {v!r}"
            for side, v in (("width", self.width), ("height", self.height))  # (as --size WIDTHxHEIGHT names them)
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % scale
        ]
        if bad:
            each = " for each" if len(bad) > 1 else ""
            raise InputError(
                f"{' and '.join(bad)} {'are' if each else 'is'} not allowed; use a positive multiple of {scale}{each}"
            )
        seeds = self.seed if isinstance(self.seed, tuple) else (self.seed,)
        if isinstance(self.seed, tuple) and len(seeds) != self.batch:
            raise InputError(f"{len(seeds)} seeds for {self.batch} prompts; give one seed, or one per prompt")
        for s in seeds:
            # int(s): numpy < 2 compares np.int64 with 2**63 as floats (2**63 - 1 would be refused)
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < 2**63:
                raise InputError(f"seed {s!r} is not allowed; use an integer from 0 to 2**63 - 1")
        if not isinstance(self.seed, tuple) and int(self.seed) + self.batch - 1 >= 2**63:  # image i: seed + i
            raise InputError(
                f"seed {self.seed} is not allowed for a batch of {self.batch}: image i uses seed + i; "
                f"use an integer from 0 to 2**63 - {self.batch}"
            )


def check_utf8(index: int, prompt: str) -> None:
    """Refuse a prompt that is not valid Unicode text: a command-line argument that was not UTF-8 reaches
    Python with its bad bytes as lone surrogates, which the tokenizer cannot take."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        try:
            shown = prompt.encode("utf-8", "surrogateescape")  # the bytes as given on the command line
        except UnicodeEncodeError:
            shown = prompt.encode("utf-8", "backslashreplace")
        raise InputError(f"prompt {index} is not valid UTF-8: {shown!r}; give prompts as UTF-8 text") from None


def check_noise(name: str, arr, want: tuple[int, ...], layout: str) -> None:
    """Caller's noise: a float array of shape ``want``, finite, and no larger than unit-variance noise can be."""
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{name} is a {type(arr).__name__}; give a float numpy array of shape {want} {layout}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{name} has dtype {arr.dtype}; noise must be a float array (float32, float16 or float64)")
    if arr.shape != want:
        raise InputError(f"{name} has shape {arr.shape}; this request needs {want} {layout}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} holds NaN or infinite values")
    peak = arr.flat[np.abs(arr).argmax()] if arr.size else 0
    if abs(peak) > MAX_NOISE:
        raise InputError(
            f"{name} holds a value of {peak!s}; noise is unit-variance, so |x| <= {MAX_NOISE:g} is allowed "
            f"(pass the noise before any sigma is applied)"
        )


def build_request(
    bundle: Bundle,
    prompts: str | Sequence[str],
    *,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int | Sequence[int] = 0,
    latents: np.ndarray | None = None,
    image: np.ndarray | None = None,
    strength: float | None = None,
    image_noise: np.ndarray | None = None,
    step_noise: np.ndarray | None = None,
) -> Request:
    """A checked Request (InputError names the first bad value); nothing is loaded or run.

    txt2img: ``latents`` is diffusers' ``latents`` argument (unit-variance noise before the initial
    sigma is applied). img2img (``image`` [B, H, W, 3] or [H, W, 3] uint8): ``latents`` is the noise
    added to the encoded image and ``image_noise`` samples the VAE posterior. Noise not given is drawn
    from ``seed`` (see ``draw_noise``; a sequence of seeds gives each prompt its own). ``step_noise``:
    ancestral schedulers' per-step noise. Noise given must be a float array, finite, with |x| <= ``MAX_NOISE``;
    ``image`` must be uint8. ``height``/``width`` None: 512, or for img2img the image's. ``strength`` (img2img
    only; None: 0.5). ``steps`` None: 1, or for img2img the fewest that run a step at ``strength``
    (``schedule.default_steps``: 2 at the default 0.5).
    """
    strength = img2img_strength(strength, image is not None)
    img = isinstance(image, np.ndarray) and image.ndim in (3, 4)
    from_image = tuple(side for side, v in (("height", height), ("width", width)) if img and v is None)
    if img:  # img2img: the image's size, as the CLI and serve
        height = image.shape[-3] if height is None else height
        width = image.shape[-2] if width is None else width
    height, width = (DEFAULT_SIDE if v is None else v for v in (height, width))
    if steps is None:
        steps = default_steps(strength) if image is not None else 1
    if isinstance(prompts, (bytes, bytearray)):  # (a sequence too: of ints)
        raise InputError(f"prompts must be strings; got bytes {bytes(prompts[:60])!r}: decode them first")
    prompts = (prompts,) if isinstance(prompts, str) else _prompt_sequence(prompts)
    if isinstance(image, np.ndarray) and image.ndim == 3:
        image = np.broadcast_to(image, (len(prompts), *image.shape))
    seed = _seed_values(seed)
    req = Request(prompts, height, width, steps, seed, latents, image, strength, image_noise, step_noise)
    try:
        req.check(bundle)
    except InputError as e:
        raise size_refused(e, "the image", width, height, "resize it", from_image) from None
    return req


def _prompt_sequence(prompts) -> tuple:
    """The prompts of a list, a tuple or another ordered sequence (an iterator too); InputError for what is none
    (None, a number) or has no order of its own (a dict, whose keys would be taken, or a set)."""
    if isinstance(prompts, (Mapping, Set)) or not isinstance(prompts, Iterable):
        raise InputError(
            f"prompts must be a string or a list of strings; got {type(prompts).__name__} {reprlib.repr(prompts)}"
        )
    return tuple(prompts)


def size_refused(e: InputError, what: str, width: int, height: int, advice: str, sides=("height", "width")):
    """``e`` where it refuses one of ``sides``, the ones the request took from ``what`` (an image): said of the
    image, as the user never gave that side. Other errors as they are."""
    if str(e).split(" ", 1)[0] not in sides:
        return e
    return InputError(f"{what} is {width}x{height}, and that size is not allowed: {e}; {advice}")


def img2img_strength(strength: float | None, img2img: bool) -> float:
    """The strength a request runs (None: the default 0.5); InputError for one given without an image, which
    txt2img would ignore."""
    if strength is None:
        return DEFAULT_STRENGTH
    if not img2img:
        raise InputError(f"strength={strength!r} is for img2img; give an image too, or leave strength out")
    return strength


def _seed_values(seed):
    """numpy's integers as Python's (numpy 1's ``uint64 + int`` is a float, which no generator takes), a 0-d array
    as its value, a sequence as a tuple; what is not an integer is left for ``check_values`` to name."""
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed[()]
    if isinstance(seed, (list, tuple, np.ndarray)):
        return tuple(_seed_values(s) for s in seed)
    return int(seed) if isinstance(seed, np.integer) else seed


def check_settings(
    prompts: Sequence[str],
    *,
    steps: int | None,
    height: int,
    width: int,
    seed: int,
    strength: float | None,
    img2img: bool,
) -> None:
    """build_request's checks that need no bundle (sides by 8: every family's VAE's), for a request of
    ``prompts``: the CLI asks before a model is exported or loaded, so a mistyped value costs neither."""
    strength = img2img_strength(strength, img2img)
    if steps is None:
        steps = default_steps(strength) if img2img else 1
    Request(tuple(prompts), height, width, steps, seed).check_values(8)
    if img2img:
        steps_kept(steps, strength)


def draw_noise(seed: int | Sequence[int], shape: tuple[int, ...], draws: int = 1) -> list[np.ndarray]:
    """``draws`` float32 standard-normal arrays of ``shape`` [B, ...].

    Image i of a batch uses numpy's PCG64 generator seeded with ``seed + i`` (or ``seed[i]`` when given one
    seed per image) and draws its slices in order, so image i equals a batch-1 request with that seed.
    (diffusers draws with torch's generator instead; pass ``latents`` to reproduce one of its images exactly.)
    """
    seeds = [seed + i for i in range(shape[0])] if isinstance(seed, (int, np.integer)) else list(seed)
    out = [np.empty(shape, np.float32) for _ in range(draws)]
    for i in range(shape[0]):
        rng = np.random.Generator(np.random.PCG64(seeds[i]))
        for arr in out:
            arr[i] = rng.standard_normal(shape[1:], dtype=np.float32)
    return out
