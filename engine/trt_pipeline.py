"""The TensorRT runtime: prompt to pixels on the GPU, the whole chain replayed as one CUDA graph.

Lifecycle (STYLE.md): load engines -> allocate every buffer once (at the profile's maximum) -> per
(batch, size, steps, strength): set shapes, warm up, capture -> each request copies ids and noise in,
launches the graph, and copies pixels out; the only host wait is for those pixels.

Serves both families. SDXL-Turbo adds: a second text encoder whose hidden states are placed beside the
first's (two strided device copies), its pooled output bound straight to the UNet's ``text_embeds``, the
``time_ids`` buffer, per-step noise for the ancestral step, and casts around the fp32 VAE.

Every buffer's dtype and shape comes from the manifest's I/O specs, and every engine tensor is bound to a
named buffer (``bindings``), so a component whose precision differs from the latents' is cast, not
misread. The CUDA calls go through ``self.cuda`` (engine/cuda.py); tests/engine/emulated_gpu.py puts a
host emulation there so the CPU test suite runs this orchestration against ONNX Runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import cuda as cuda_module
from .bundle import Bundle
from .engine_store import Profile, find_engine
from .errors import BackendError, BundleError, EngineMissing
from .images import to_model_image
from .integrity import read_checked, write_checked
from .request import Request, build_request
from .schedule import MAX_STEPS, make_schedule
from .spec import TensorSpec, axis_values

log = logging.getLogger(__name__)
WARMUP_RUNS = 3  # lazy initialisation (and TensorRT-RTX's JIT) must never land inside a capture
PRECISION = "fp16"  # TensorRT engines are built from the fp16 ONNX (strongly typed)


class TrtEngine:
    """One component's engine, its device memory, and execution contexts made on demand.

    Each captured shape gets contexts of its own (``context()``): a CUDA graph is tied to the state of the
    context it was captured with, and TensorRT's guidance is never to change that state afterwards. The
    contexts of one engine share its device memory (one stream: they never run at once)."""

    def __init__(self, trt, runtime, plan: Path, cuda=cuda_module):
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {plan} (see the [TRT] messages above)")
        self.name = plan.stem
        self.cache_path = plan.with_suffix(".runtime-cache")
        self.runtime_cache = None
        self.rtx = hasattr(self.engine, "create_runtime_config")
        if self.rtx:  # TensorRT-RTX: its JIT kernels cached across runs (one cache for every context)
            self.runtime_cache = self.engine.create_runtime_config().create_runtime_cache()
            data = read_checked(self.cache_path, "the runtime cache")
            if data is not None and not self.runtime_cache.deserialize(data):
                log.warning("ignoring unreadable runtime cache %s", self.cache_path)
        size = getattr(self.engine, "device_memory_size_v2", None)  # TensorRT >= 10.1 and TensorRT-RTX
        if size is None:
            size = self.engine.device_memory_size
        self.memory = cuda.DeviceBuffer(size)

    def context(self) -> TrtContext:
        """A new execution context on this engine's memory."""
        strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
        config = None
        if self.rtx:
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(strategy)
            config.set_runtime_cache(self.runtime_cache)
            eager = getattr(getattr(self.trt, "DynamicShapesKernelSpecializationStrategy", None), "EAGER", None)
            if eager is not None:  # compile the shape-specialised kernels before the first enqueue returns,
                config.dynamic_shapes_kernel_specialization_strategy = eager  # so no generic one is captured
            context = self.engine.create_execution_context(config)
        else:
            context = self.engine.create_execution_context(strategy)
        if context is None:
            raise BackendError(
                f"TensorRT could not create an execution context for {self.name} (see the [TRT] messages above)"
            )
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self.memory.ptr, self.memory.nbytes)
        else:
            context.device_memory = self.memory.ptr
        return TrtContext(self.name, context, config)

    def save_runtime_cache(self) -> None:
        """TensorRT-RTX: keep the kernels it compiled for this GPU, so the next load skips that work."""
        if self.runtime_cache is not None:
            write_checked(self.cache_path, bytes(memoryview(self.runtime_cache.serialize())))


class TrtContext:
    """An execution context, with the runtime config it was made from kept alive as long as it is."""

    def __init__(self, name: str, context, config=None):
        self.name, self.context, self._config = name, context, config

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise BackendError(f"TensorRT refused shape {shape} for {self.name}.{name}")

    def bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise BackendError(f"TensorRT refused the address of {self.name}.{name}")

    def enqueue(self, stream) -> None:
        if not self.context.execute_async_v3(stream.ptr):
            raise BackendError(f"TensorRT could not enqueue {self.name} (see the [TRT] messages above)")

    def capturable(self, stream) -> bool:
        check_fn = getattr(self.context, "is_stream_capturable", None)
        return True if check_fn is None else bool(check_fn(stream.ptr))


def bindings(family: str, latent_dtype: str, specs: dict) -> dict[str, dict[str, str]]:
    """Each engine tensor -> the device buffer it reads or writes (every address fixed once per context).

    A VAE whose latents are not in the latents' dtype (SDXL's fp32 VAE) gets buffers of its own,
    filled and drained by cast kernels."""
    xl = family == "sdxl-turbo"
    out = {
        "text_encoder": {"input_ids": "ids", "hidden_states": "hidden_1" if xl else "hidden"},
        "unet": {"sample": "x_in", "timestep": "timestep", "hidden_states": "hidden", "noise_pred": "eps"},
        "vae_decoder": {"image": "image_out"},
        "vae_encoder": {"image": "image_in", "noise": "image_noise"},
    }
    if xl:
        out["text_encoder_2"] = {"input_ids": "ids_2", "hidden_states": "hidden_2", "text_embeds": "pooled"}
        out["unet"].update(text_embeds="pooled", time_ids="time_ids")
    dec_in = spec_of(specs["vae_decoder"], "latents").dtype
    out["vae_decoder"]["latents"] = "x" if dec_in == latent_dtype else "x_vae"
    if "vae_encoder" in specs:
        enc_out = spec_of(specs["vae_encoder"], "latents").dtype
        out["vae_encoder"]["latents"] = "encoded" if enc_out == latent_dtype else "encoded_vae"
    return out


def spec_of(component_spec, name: str) -> TensorSpec:
    for t in (*component_spec.inputs, *component_spec.outputs):
        if t.name == name:
            return t
    raise BundleError(f"the manifest's {component_spec.name} has no tensor {name!r}")


class TrtPipeline:
    """Same requests and results as ``Pipeline``; runs fp16 TensorRT engines on the GPU."""

    cuda = cuda_module  # device memory, streams, graphs

    def __init__(
        self,
        bundle: Bundle | str | Path,
        flavour: str | None = None,
        profile: Profile | None = None,
        cuda_graph: bool = True,
        shape: tuple[int, int, int] | None = None,
    ):
        """``profile``: the engines to load; else the narrowest built one that covers ``shape`` (batch, H, W)."""
        self.bundle = b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.tokenizers = b.prompt_tokenizers()
        self.seq = self.tokenizers[0].max_length
        self.cuda.ensure_context()  # before TensorRT, the runtime cache and the kernels touch the GPU
        cc = self.cuda.current_compute_capability()
        self.flavour, self.version, open_engine = self._engine_loader(flavour)
        why = self._unsupported(cc)
        if why:
            raise BackendError(why)
        self.device = f"sm{cc}"
        self.profile = profile or self._choose_profile(shape)
        self.cuda_graph = cuda_graph
        self.graph_off_reason = None if cuda_graph else "turned off by the caller"
        self.engines = {}
        for name in b.component_names:
            try:
                plan = find_engine(b, name, self.flavour, self.version, self.device, self.profile)
            except BundleError:
                if name == "vae_encoder":  # optional: only img2img needs it
                    continue
                raise
            self.engines[name] = open_engine(plan)
        self.specs = {name: b.component(PRECISION, name).spec for name in self.engines}
        self.dtype = np.dtype(spec_of(self.specs["unet"], "sample").dtype)
        self.binds = bindings(b.family, self.dtype.name, self.specs)
        self.ancestral = b.scheduler.ancestral
        float_types = {self.dtype.name, spec_of(self.specs["vae_decoder"], "image").dtype}
        self.kernels = {dt: self._kernels(dt, cc) for dt in sorted(float_types)}
        self._caches_saved = False
        self.stream = self.cuda.Stream()
        self._allocate()
        self.graphs: dict[tuple, object] = {}
        self.contexts: dict[tuple, dict[str, TrtContext]] = {}  # (batch, height, width) -> one per engine

    def _engine_loader(self, flavour: str | None):
        """(flavour, library version, plan -> engine)."""
        from .backends.trt_lib import Logger, import_trt

        trt, flavour = import_trt(flavour)
        runtime = trt.Runtime(Logger.get(trt))
        return flavour, trt.__version__, lambda plan: TrtEngine(trt, runtime, plan, self.cuda)

    def _unsupported(self, cc: int) -> str | None:
        from .backends.trt_lib import import_trt, unsupported_here

        return unsupported_here(import_trt(self.flavour)[0], self.flavour, cc)

    def _kernels(self, dtype: str, cc: int):
        from sdturbo.kernels import load_kernels

        return load_kernels(dtype, cc)

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

    # -- buffers ----------------------------------------------------------------------------------

    def _allocate(self) -> None:
        """Every buffer once, at the profile's maximum: the engine-bound ones sized from their specs."""
        p, c, dt = self.profile, self.bundle.latent_channels, self.dtype
        bmax = p.batch[2]
        dmax = p.dims(2, self.bundle.vae_scale_factor)
        lat = (bmax, c, dmax["latent_height"], dmax["latent_width"])
        self.latent_max = int(np.prod(lat))
        sizes = {
            "noise": (lat, dt),
            "x": (lat, dt),
            "encoded": (lat, dt),
            "timesteps": ((MAX_STEPS, bmax), np.float32),
            "timestep": ((bmax,), np.float32),  # this step's row of timesteps, copied in on the device
            "pixels": ((bmax, p.height[2], p.width[2], 3), np.uint8),
        }
        if self.ancestral:
            sizes["step_noise"] = ((MAX_STEPS, *lat), dt)
        for comp, binds in self.binds.items():
            if comp not in self.engines:
                continue
            for tensor, buf in binds.items():
                t = spec_of(self.specs[comp], tensor)
                sizes.setdefault(buf, (t.concrete(dmax), np.dtype(t.dtype)))
        self.buffer_specs = sizes
        self.dev = {k: self.cuda.DeviceBuffer(int(np.prod(s)) * np.dtype(d).itemsize) for k, (s, d) in sizes.items()}
        host = ("ids", "ids_2", "noise", "image_noise", "step_noise", "timesteps", "time_ids", "image_in", "pixels")
        self.host = {k: self.cuda.PinnedArray(*sizes[k]) for k in host if k in sizes}

    def _put(self, name: str, values: np.ndarray) -> None:
        """Copy ``values`` into the front of device buffer ``name``, through its pinned twin."""
        host = self.host[name]
        host.array.reshape(-1)[: values.size] = values.astype(host.dtype, copy=False).ravel()
        self.stream.copy_in(self.dev[name].ptr, host, values.size * host.dtype.itemsize)

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
        b, s = self.bundle, self.stream
        B, H, W = req.batch, req.height, req.width
        img2img = req.image is not None
        sched = make_schedule(b.scheduler, req.steps, req.strength if img2img else 1.0)
        noise, image_noise, step_noise = req.noises(b, sched)
        prompts = list(req.prompts)
        self._put("ids", self.tokenizers[0](prompts))
        if "ids_2" in self.host:
            self._put("ids_2", self.tokenizers[1](prompts))
            self._put("time_ids", req.time_ids())
        self._put("noise", noise)
        timesteps = self.host["timesteps"].array
        timesteps[: sched.steps, :B] = sched.timesteps[:, None]
        s.copy_in(self.dev["timesteps"].ptr, self.host["timesteps"], self.host["timesteps"].nbytes)
        if sched.ancestral:
            steps = self.host["step_noise"].array.reshape(MAX_STEPS, -1)
            for i, step in enumerate(step_noise):
                steps[i, : step.size] = step.ravel()
            s.copy_in(self.dev["step_noise"].ptr, self.host["step_noise"], sched.steps * steps[0].nbytes)
        if img2img:
            self._put("image_noise", image_noise)
            self._put("image_in", to_model_image(req.image, self.dtype))  # then to the encoder's dtype, as diffusers
        key = (B, H, W, sched.steps, req.strength if img2img else None)
        ctx = self._contexts(B, H, W)
        if not self.cuda_graph:
            self._enqueue(ctx, sched, B, H, W, img2img)
        else:
            if key not in self.graphs:
                for _ in range(WARMUP_RUNS):
                    self._enqueue(ctx, sched, B, H, W, img2img)
                s.synchronize()
                refused = [name for name, c in ctx.items() if not c.capturable(s)]
                if refused:
                    self._graph_off(
                        f"TensorRT says the {', '.join(refused)} context(s) cannot be stream-captured "
                        f"(engines built without REQUIRE_USER_ALLOCATION?)"
                    )
                    return self.run(req)
                self.graphs[key] = self.cuda.Graph(s, lambda: self._enqueue(ctx, sched, B, H, W, img2img))
            self.graphs[key].launch()
        pixels = self.host["pixels"]
        s.copy_out(pixels, self.dev["pixels"].ptr, B * H * W * 3)
        s.synchronize()  # the one host wait: for the pixels
        self._save_caches()  # once: TensorRT-RTX's kernels compiled by the first run
        return pixels.array.reshape(-1)[: B * H * W * 3].reshape(B, H, W, 3).copy()

    def _save_caches(self) -> None:
        if not self._caches_saved:
            for engine in self.engines.values():
                engine.save_runtime_cache()
            self._caches_saved = True

    def _graph_off(self, reason: str) -> None:
        log.warning(
            "CUDA graph OFF for %s: %s; running every request enqueue by enqueue (slower)", self.bundle.root, reason
        )
        self.cuda_graph, self.graph_off_reason = False, reason

    @property
    def graph_status(self) -> str:
        """Either "on" or "off: why" (the benchmark's JSON reports it)."""
        return "on" if self.cuda_graph else f"off: {self.graph_off_reason}"

    def _contexts(self, B: int, H: int, W: int) -> dict[str, TrtContext]:
        """This shape's execution contexts, one per engine: shapes (from the specs) and addresses set once,
        never changed after (a graph captured with them stays valid)."""
        key = (B, H, W)
        if key not in self.contexts:
            dims = axis_values(B, H, W, self.bundle.vae_scale_factor)
            contexts = {}
            for name, engine in self.engines.items():
                contexts[name] = c = engine.context()
                for t in self.specs[name].inputs:
                    c.set_shape(t.name, t.concrete(dims))
                for tensor, buf in self.binds[name].items():
                    c.bind(tensor, self.dev[buf].ptr)
            self.contexts[key] = contexts
        return self.contexts[key]

    def _enqueue(self, e: dict[str, TrtContext], sched, B: int, H: int, W: int, img2img: bool) -> None:
        """Everything one request does on the stream, in order, with this shape's contexts ``e``; captured once."""
        s, d = self.stream, self.dev
        k = self.kernels[self.dtype.name]
        f = self.bundle.vae_scale_factor
        n = B * self.bundle.latent_channels * (H // f) * (W // f)
        e["text_encoder"].enqueue(s)
        if "text_encoder_2" in e:
            e["text_encoder_2"].enqueue(s)
            self._concat_hidden(B)
        if img2img:
            e["vae_encoder"].enqueue(s)
            if self.binds["vae_encoder"]["latents"] != "encoded":
                k.from_float32(d["encoded_vae"].ptr, d["encoded"].ptr, n, s.ptr)
            k.add_noise(d["encoded"].ptr, d["noise"].ptr, d["x"].ptr, float(sched.sigmas[0]), n, s.ptr)
        else:
            k.init_latents(d["noise"].ptr, d["x"].ptr, sched.init_noise_sigma, n, s.ptr)
        bmax = self.profile.batch[2]
        for i in range(sched.steps):
            sigma = sched.sigmas[i]
            k.scale_input(d["x"].ptr, d["x_in"].ptr, float(np.sqrt(sigma**2 + np.float32(1))), n, s.ptr)
            s.copy_d2d(d["timestep"].ptr, d["timesteps"].ptr + i * bmax * 4, B * 4)
            e["unet"].enqueue(s)
            if sched.ancestral:
                up, down = sched.sigma_up_down(i)
                noise_ptr = d["step_noise"].ptr + i * self.latent_max * self.dtype.itemsize
                k.ancestral_step(d["x"].ptr, d["eps"].ptr, noise_ptr, float(sigma), float(down), float(up), n, s.ptr)
            else:
                k.euler_step(d["x"].ptr, d["eps"].ptr, float(sigma), float(sched.sigmas[i + 1]), n, s.ptr)
        if self.binds["vae_decoder"]["latents"] != "x":
            k.to_float32(d["x"].ptr, d["x_vae"].ptr, n, s.ptr)
        e["vae_decoder"].enqueue(s)
        image_dtype = self.buffer_specs["image_out"][1]
        self.kernels[np.dtype(image_dtype).name].to_uint8(d["image_out"].ptr, d["pixels"].ptr, B, H, W, s.ptr)

    def _concat_hidden(self, B: int) -> None:
        """hidden[..., :D1] = hidden_1, hidden[..., D1:] = hidden_2: two row-strided device copies."""
        item = self.dtype.itemsize
        d1 = self.buffer_specs["hidden_1"][0][-1] * item
        d2 = self.buffer_specs["hidden_2"][0][-1] * item
        rows, hidden = B * self.seq, self.dev["hidden"].ptr
        self.stream.copy_2d(hidden, d1 + d2, self.dev["hidden_1"].ptr, d1, d1, rows)
        self.stream.copy_2d(hidden + d1, d1 + d2, self.dev["hidden_2"].ptr, d2, d2, rows)
