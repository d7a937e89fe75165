"""The TensorRT runtime: prompt to pixels on the GPU, the whole chain replayed as one CUDA graph.

Lifecycle (STYLE.md): load engines -> allocate every buffer once (at the profile's maximum) -> per
(batch, size, steps, strength): set shapes, warm up, capture -> each request copies ids and noise in,
launches the graph, and copies pixels out; the only host wait is for those pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bundle import Bundle, atomic_write
from .cuda import DeviceBuffer, Graph, PinnedArray, Stream, current_compute_capability
from .engine_store import Profile, find_engine
from .errors import BackendError, BundleError, EngineMissing
from .images import to_model_image
from .request import Request, build_request
from .schedule import MAX_STEPS, make_schedule
from .tokenizer import PromptTokenizer

log = logging.getLogger(__name__)
WARMUP_RUNS = 3  # lazy initialisation (and TensorRT-RTX's JIT) must never land inside a capture


class TrtEngine:
    """One component's engine and execution context, with context memory that never moves."""

    def __init__(self, trt, runtime, plan: Path):
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {plan} (see the [TRT] messages above)")
        self.cache_path = plan.with_suffix(".runtime-cache")
        self.runtime_cache = None
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(self.engine, "create_runtime_config"):  # TensorRT-RTX: its JIT kernels cached across runs
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            self.runtime_cache = config.create_runtime_cache()
            if self.cache_path.is_file() and not self.runtime_cache.deserialize(self.cache_path.read_bytes()):
                log.warning("ignoring unreadable runtime cache %s", self.cache_path)
            config.set_runtime_cache(self.runtime_cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context(strategy)
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        self.memory = DeviceBuffer(size)
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(self.memory.ptr, self.memory.nbytes)
        else:
            self.context.device_memory = self.memory.ptr

    def save_runtime_cache(self) -> None:
        """TensorRT-RTX: keep the kernels it compiled for this GPU, so the next load skips that work."""
        if self.runtime_cache is not None:
            atomic_write(self.cache_path, bytes(memoryview(self.runtime_cache.serialize())))

    def capturable(self, stream: Stream) -> bool:
        check_fn = getattr(self.context, "is_stream_capturable", None)
        return True if check_fn is None else bool(check_fn(stream.ptr))


class TrtPipeline:
    """Same requests and results as ``Pipeline``; runs fp16 TensorRT engines on the GPU."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        flavour: str | None = None,
        profile: Profile | None = None,
        cuda_graph: bool = True,
        shape: tuple[int, int, int] | None = None,
    ):
        """``profile``: the engines to load; else the narrowest built one that covers ``shape`` (batch, H, W)."""
        from sdturbo.kernels import load_kernels

        from .backends.trt_lib import Logger, import_trt

        self.bundle = b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        if b.family != "sd-turbo":
            raise BackendError(f"the TensorRT runtime serves SD-Turbo only so far, not {b.family}")
        self.tokenizer = PromptTokenizer(b.tokenizer_file, b.max_length, b.pad_id, b.pad_token)
        trt, self.flavour = import_trt(flavour)
        cc = current_compute_capability()
        self.device, self.version = f"sm{cc}", trt.__version__
        self.profile = profile or self._choose_profile(shape)
        self.cuda_graph = cuda_graph
        runtime = trt.Runtime(Logger.get(trt))
        self.engines: dict[str, TrtEngine] = {}
        for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
            try:
                plan = find_engine(b, name, self.flavour, self.version, self.device, self.profile)
            except BundleError:
                if name == "vae_encoder":  # optional: only img2img needs it
                    continue
                raise
            self.engines[name] = TrtEngine(trt, runtime, plan)
        self._caches_saved = False
        spec = b.component("fp16", "unet").spec
        self.dtype = np.dtype(spec.inputs[0].dtype)
        self.kernels = load_kernels(self.dtype.name, cc)
        self.stream = Stream()
        self._allocate(spec.inputs[2].shape[1:])
        self.graphs: dict[tuple, Graph] = {}

    def _choose_profile(self, shape: tuple[int, int, int] | None) -> Profile:
        from .engine_store import built_profiles, select_profile

        profiles = built_profiles(self.bundle, self.flavour, self.version, self.device)
        chosen = select_profile(profiles, *shape) if shape else (profiles[0] if len(profiles) == 1 else None)
        if chosen is None:
            have = ", ".join(p.tag for p in profiles) or "none"
            raise EngineMissing(
                f"no {self.flavour} {self.version} engines on {self.device} for "
                f"{f'batch {shape[0]} at {shape[2]}x{shape[1]}' if shape else 'this request'} "
                f"(built profiles: {have}); run `sdturbo build {self.bundle.root} --batch --size`"
            )
        return chosen

    def _allocate(self, hidden_shape) -> None:
        p, f, c = self.profile, self.bundle.vae_scale_factor, self.bundle.latent_channels
        bmax, hmax, wmax = p.batch[2], p.height[2], p.width[2]
        item = self.dtype.itemsize
        lat = bmax * c * (hmax // f) * (wmax // f) * item
        img = bmax * 3 * hmax * wmax * item
        self.dev = {
            "ids": DeviceBuffer(bmax * self.tokenizer.max_length * 4),
            "hidden": DeviceBuffer(bmax * int(np.prod(hidden_shape)) * item),
            "noise": DeviceBuffer(lat),
            "image_noise": DeviceBuffer(lat),
            "encoded": DeviceBuffer(lat),
            "x": DeviceBuffer(lat),
            "x_in": DeviceBuffer(lat),
            "eps": DeviceBuffer(lat),
            "timesteps": DeviceBuffer(MAX_STEPS * bmax * 4),
            "image_in": DeviceBuffer(img),
            "image_out": DeviceBuffer(img),
            "pixels": DeviceBuffer(bmax * hmax * wmax * 3),
        }
        lshape = (bmax, c, hmax // f, wmax // f)
        self.host = {
            "ids": PinnedArray((bmax, self.tokenizer.max_length), np.int32),
            "noise": PinnedArray(lshape, self.dtype),
            "image_noise": PinnedArray(lshape, self.dtype),
            "timesteps": PinnedArray((MAX_STEPS, bmax), np.float32),
            "image_in": PinnedArray((bmax, 3, hmax, wmax), self.dtype),
            "pixels": PinnedArray((bmax, hmax, wmax, 3), np.uint8),
        }

    # -- requests ---------------------------------------------------------------------------------

    def request(self, prompts: str | Sequence[str], **kwargs) -> Request:
        req = build_request(self.bundle, prompts, **kwargs)
        if not self.profile.covers(req.batch, req.height, req.width):
            raise BundleError(
                f"batch {req.batch} at {req.width}x{req.height} is outside the engines' profile "
                f"{self.profile.tag}; build engines for it with `sdturbo build --batch --size`"
            )
        if req.image is not None and "vae_encoder" not in self.engines:
            raise BundleError("img2img needs the vae_encoder engine; build it with `sdturbo build`")
        return req

    def __call__(self, prompts, **kwargs) -> np.ndarray:
        return self.run(self.request(prompts, **kwargs))

    def load(self, img2img: bool = False) -> TrtPipeline:
        return self  # engines load in __init__

    def run(self, req: Request) -> np.ndarray:
        b, dt, s = self.bundle, self.dtype, self.stream
        B, H, W = req.batch, req.height, req.width
        img2img = req.image is not None
        sched = make_schedule(b.scheduler, req.steps, req.strength if img2img else 1.0)
        noise, given, _ = req.noises(b, sched)
        h = self.host
        h["ids"].array[:B] = self.tokenizer(list(req.prompts))
        h["noise"].array.reshape(-1)[: noise.size] = noise.astype(dt).ravel()
        bmax = self.profile.batch[2]
        h["timesteps"].array[: sched.steps, :B] = sched.timesteps[:, None]
        s.copy_in(self.dev["ids"].ptr, h["ids"], h["ids"].nbytes)
        s.copy_in(self.dev["noise"].ptr, h["noise"], noise.size * dt.itemsize)
        s.copy_in(self.dev["timesteps"].ptr, h["timesteps"], MAX_STEPS * bmax * 4)
        if img2img:
            h["image_noise"].array.reshape(-1)[: given.size] = given.astype(dt).ravel()
            model_image = to_model_image(req.image, dt)
            h["image_in"].array.reshape(-1)[: model_image.size] = model_image.ravel()
            s.copy_in(self.dev["image_noise"].ptr, h["image_noise"], given.size * dt.itemsize)
            s.copy_in(self.dev["image_in"].ptr, h["image_in"], model_image.size * dt.itemsize)
        key = (B, H, W, sched.steps, req.strength if img2img else None)
        if not self.cuda_graph:
            self._prepare(key)
            self._enqueue(sched, B, H, W, img2img)
        else:
            if key not in self.graphs:
                self._prepare(key)
                for _ in range(WARMUP_RUNS):
                    self._enqueue(sched, B, H, W, img2img)
                s.synchronize()
                self._save_caches()
                if not all(e.capturable(s) for e in self.engines.values()):
                    log.warning("TensorRT reports a context that cannot be captured; running without a CUDA graph")
                    self.cuda_graph = False
                    return self.run(req)
                self.graphs[key] = Graph(s, lambda: self._enqueue(sched, B, H, W, img2img))
            self.graphs[key].launch()
        s.copy_out(h["pixels"], self.dev["pixels"].ptr, B * H * W * 3)
        s.synchronize()  # the one host wait: for the pixels
        return h["pixels"].array.reshape(-1)[: B * H * W * 3].reshape(B, H, W, 3).copy()

    def _save_caches(self) -> None:
        if not self._caches_saved:
            for engine in self.engines.values():
                engine.save_runtime_cache()
            self._caches_saved = True

    def _prepare(self, key) -> None:
        """Shapes and addresses for one (batch, size, steps, strength)."""
        B, H, W = key[:3]
        f, c, d = self.bundle.vae_scale_factor, self.bundle.latent_channels, self.dev
        lat = (B, c, H // f, W // f)
        te, unet, dec = self.engines["text_encoder"], self.engines["unet"], self.engines["vae_decoder"]
        te.set_shape("input_ids", (B, self.tokenizer.max_length))
        te.bind("input_ids", d["ids"].ptr)
        te.bind("hidden_states", d["hidden"].ptr)
        unet.set_shape("sample", lat)
        unet.set_shape("timestep", (B,))
        unet.set_shape("hidden_states", (B, self.tokenizer.max_length, self._hidden_size()))
        unet.bind("sample", d["x_in"].ptr)
        unet.bind("hidden_states", d["hidden"].ptr)
        unet.bind("noise_pred", d["eps"].ptr)
        dec.set_shape("latents", lat)
        dec.bind("latents", d["x"].ptr)
        dec.bind("image", d["image_out"].ptr)
        if "vae_encoder" in self.engines:
            enc = self.engines["vae_encoder"]
            enc.set_shape("image", (B, 3, H, W))
            enc.set_shape("noise", lat)
            enc.bind("image", d["image_in"].ptr)
            enc.bind("noise", d["image_noise"].ptr)
            enc.bind("latents", d["encoded"].ptr)

    def _hidden_size(self) -> int:
        return int(self.bundle.component("fp16", "text_encoder").spec.outputs[0].shape[2])

    def _enqueue(self, sched, B: int, H: int, W: int, img2img: bool) -> None:
        """Everything one request does on the stream, in order; captured once per shape."""
        s, k, d, e = self.stream, self.kernels, self.dev, self.engines
        n = B * self.bundle.latent_channels * (H // self.bundle.vae_scale_factor) * (W // self.bundle.vae_scale_factor)
        e["text_encoder"].enqueue(s)
        if img2img:
            e["vae_encoder"].enqueue(s)
            k.add_noise(d["encoded"].ptr, d["noise"].ptr, d["x"].ptr, float(sched.sigmas[0]), n, s.ptr)
        else:
            k.init_latents(d["noise"].ptr, d["x"].ptr, sched.init_noise_sigma, n, s.ptr)
        bmax = self.profile.batch[2]
        for i in range(sched.steps):
            sigma, sigma_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
            k.scale_input(d["x"].ptr, d["x_in"].ptr, float(np.sqrt(np.float32(sigma) ** 2 + np.float32(1))), n, s.ptr)
            e["unet"].bind("timestep", d["timesteps"].ptr + i * bmax * 4)
            e["unet"].enqueue(s)
            k.euler_step(d["x"].ptr, d["eps"].ptr, sigma, sigma_next, n, s.ptr)
        e["vae_decoder"].enqueue(s)
        k.to_uint8(d["image_out"].ptr, d["pixels"].ptr, B, H, W, s.ptr)
