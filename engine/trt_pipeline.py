"""The TensorRT runtime: fp16 engines from the bundle, chained on the GPU by engine/device_pipeline.py.

Engines are found in the bundle for this library, version, GPU and shape profile (engine_store.py); each
captured shape gets execution contexts of its own on the engine's device memory. The orchestration
(buffers, kernels, the CUDA graph, the one host wait) is DevicePipeline's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import cuda as cuda_module
from .bundle import Bundle
from .device_buffers import bindings, spec_of
from .device_pipeline import DevicePipeline
from .engine_store import Profile, find_engine
from .errors import BackendError, BundleError, EngineMissing
from .integrity import read_checked, write_checked
from .prompt_cache import DEFAULT_SIZE, PromptCache
from .request import Request

log = logging.getLogger(__name__)
__all__ = ["PRECISION", "TrtContext", "TrtEngine", "TrtPipeline", "bindings", "spec_of"]
PRECISION = "fp16"  # TensorRT engines are built from the fp16 ONNX (strongly typed)


class TrtEngine:
    """One component's engine, its device memory, and execution contexts made on demand.

    Each captured shape gets contexts of its own (``context()``): a CUDA graph is tied to the state of the
    context it was captured with, and TensorRT's guidance is never to change that state afterwards. The
    contexts of one engine share its device memory (one stream: they never run at once)."""

    def __init__(self, trt, runtime, plan: Path, cuda=cuda_module, rtx: bool = False):
        """``rtx``: the library is TensorRT-RTX (TensorRT has ``create_runtime_config`` too since 10.11, with
        no runtime cache: the engine's attributes cannot tell them apart)."""
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {plan} (see the [TRT] messages above)")
        self.name = plan.stem
        self.cache_path = plan.with_suffix(".runtime-cache")
        self.runtime_cache = None
        self.rtx = rtx
        if self.rtx:  # TensorRT-RTX: its JIT kernels cached across runs (one cache for every context)
            self.runtime_cache = self.engine.create_runtime_config().create_runtime_cache()
            data = read_checked(self.cache_path, "the runtime cache")
            if data is not None and not self.runtime_cache.deserialize(data):
                log.warning("ignoring unreadable runtime cache %s", self.cache_path)
        size = getattr(self.engine, "device_memory_size_v2", None)  # TensorRT >= 10.1 and TensorRT-RTX
        if size is None:
            size = self.engine.device_memory_size
        self.memory = cuda.DeviceBuffer(size)

    def context(self, spec, dims: dict[str, int], addresses: dict[str, int]) -> TrtContext:
        """A new execution context on this engine's memory, its input shapes (``spec`` at ``dims``) and
        tensor addresses set once (the engine's inputs and outputs were checked when it loaded: check_io)."""
        c = self.new_context()
        for t in spec.inputs:
            c.set_shape(t.name, t.concrete(dims))
        for t in spec.outputs:  # what TensorRT will write, against the buffer made for it
            got, want = c.shape(t.name), t.concrete(dims)
            if got != want:
                raise BackendError(
                    f"{self.name}'s engine would write {t.name} as {got} where the bundle's graph gives {want}; "
                    "rebuild its engines (sdturbo build)"
                )
        for tensor, ptr in addresses.items():
            c.bind(tensor, ptr)
        return c

    def check_io(self, spec) -> None:
        """The engine's inputs and outputs are the bundle's graph's: the same names, each an input or an output
        as there, of the same element type. TensorRT binds tensors by address and checks none of this, so an
        engine built from another graph would read and write the pipeline's buffers as what they are not."""
        e, trt = self.engine, self.trt
        have = {e.get_tensor_name(i) for i in range(e.num_io_tensors)}
        want = {t.name: (t, trt.TensorIOMode.INPUT) for t in spec.inputs}
        want |= {t.name: (t, trt.TensorIOMode.OUTPUT) for t in spec.outputs}
        rebuild = "rebuild its engines (sdturbo build)"
        if have != set(want):
            raise BackendError(
                f"{self.name}'s engine has tensors {sorted(have)}, the bundle's graph {sorted(want)}; {rebuild}"
            )
        types = {"float32": trt.DataType.FLOAT, "float16": trt.DataType.HALF, "int32": trt.DataType.INT32}
        for name, (t, mode) in want.items():
            got_mode, got_type = e.get_tensor_mode(name), e.get_tensor_dtype(name)
            if got_mode != mode:
                raise BackendError(
                    f"{self.name}'s engine has {name} as {got_mode}, the bundle's graph as {mode}; {rebuild}"
                )
            if got_type != types.get(t.dtype):
                raise BackendError(
                    f"{self.name}'s engine has {name} as {got_type}, the bundle's graph as {t.dtype}; {rebuild}"
                )

    def new_context(self) -> TrtContext:
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

    def close(self) -> None:
        """The engine's device memory back, and the engine let go: after every context made on it (the
        pipeline drops them first)."""
        self.memory.free()
        self.engine = self.runtime_cache = None

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

    def shape(self, name: str) -> tuple[int, ...]:
        """``name``'s shape in this context (an output's, as inferred from the input shapes set)."""
        return tuple(int(d) for d in self.context.get_tensor_shape(name))

    def bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise BackendError(f"TensorRT refused the address of {self.name}.{name}")

    def enqueue(self, stream) -> None:
        if not self.context.execute_async_v3(stream.ptr):
            raise BackendError(f"TensorRT could not enqueue {self.name} (see the [TRT] messages above)")

    def capturable(self, stream) -> bool:
        check_fn = getattr(self.context, "is_stream_capturable", None)
        return True if check_fn is None else bool(check_fn(stream.ptr))


class TrtPipeline(DevicePipeline):
    """Same requests and results as ``Pipeline``; runs fp16 TensorRT engines on the GPU."""

    cuda = cuda_module
    name = "TensorRT"
    precision = PRECISION
    encoder_hint = "build its engine with `sdturbo build`"
    fp32_remedy = "--backend onnxruntime-cuda --precision fp32"  # TensorRT engines are fp16 only

    def __init__(
        self,
        bundle: Bundle | str | Path,
        flavour: str | None = None,
        profile: Profile | None = None,
        cuda_graph: bool = True,
        shape: tuple[int, int, int] | None = None,
        vae: str = "full",
        prompt_cache: int | PromptCache = DEFAULT_SIZE,
        any_batch: bool = False,
    ):
        """``profile``: the engines to load; else the narrowest built one that covers ``shape`` (batch, H, W),
        and with ``any_batch`` every batch from 1 up to it too (a server's, which batches what arrives).
        ``vae``: "full" or "tiny" (the bundle's tiny VAE, whose engines are built like the others');
        ``prompt_cache``: prompts whose text-encoder outputs are kept on the GPU (0: off)."""
        self._prepare(bundle, vae, prompt_cache)
        b = self.bundle
        cc = self.cuda.current_compute_capability()
        self.flavour, self.version, open_engine = self._engine_loader(flavour)
        why = self._unsupported(cc)
        if why:
            raise BackendError(why)
        self.device = f"sm{cc}"
        self.profile = profile or self._choose_profile(shape, any_batch)
        engines = {}
        for name in self.component_names:
            try:
                plan = find_engine(b, name, self.flavour, self.version, self.device, self.profile)
            except BundleError:
                if name == self.encoder:  # optional: only img2img needs it
                    continue
                raise
            engines[name] = open_engine(plan)
            engines[name].check_io(b.component(PRECISION, name).spec)  # at open: every context is made on these
        self._caches_saved = False
        self._setup(self.profile, cuda_graph, engines)

    @classmethod
    def open(
        cls,
        bundle: Bundle | str | Path,
        shape: tuple[int, int, int],
        any_batch: bool = False,
        build: bool = True,
        **kwargs,
    ):
        """A pipeline for requests up to ``shape`` (with ``any_batch``, of every batch from 1 up to its batch):
        with ``build``, the engines are built first when the bundle has none for it (once; kept in the bundle),
        for exactly that shape, or for the batch range 1 to its batch with ``any_batch``."""
        bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        try:
            return cls(bundle, shape=shape, any_batch=any_batch, **kwargs)
        except EngineMissing:
            if not build:
                raise
        b, h, w = (int(v) for v in shape)
        lo = 1 if any_batch else b
        profile = Profile((lo, lo, b), (h, h, h), (w, w, w))
        log.info("building TensorRT engines for profile %s (once; kept in the bundle)", profile.tag)
        cls._build(bundle.root, profile)
        return cls(Bundle(bundle.root), shape=shape, any_batch=any_batch, **kwargs)

    @staticmethod
    def _build(root: Path, profile: Profile) -> None:
        from ..export.trt_build import build_engines

        build_engines(root, profile=profile)

    def _engine_loader(self, flavour: str | None):
        """(flavour, library version, plan -> engine)."""
        from .backends.trt_lib import Logger, import_trt

        trt, flavour = import_trt(flavour)
        runtime = trt.Runtime(Logger.get(trt))
        rtx = flavour == "tensorrt-rtx"
        return flavour, trt.__version__, lambda plan: TrtEngine(trt, runtime, plan, self.cuda, rtx)

    def _unsupported(self, cc: int) -> str | None:
        from .backends.trt_lib import import_trt, unsupported_here

        return unsupported_here(import_trt(self.flavour)[0], self.flavour, cc)

    def _choose_profile(self, shape: tuple[int, int, int] | None, any_batch: bool = False) -> Profile:
        from .engine_store import built_profiles, select_profile

        profiles = built_profiles(self.bundle, self.flavour, self.version, self.device)
        if shape:
            chosen = select_profile(profiles, *shape, any_batch=any_batch)
        else:
            chosen = profiles[0] if len(profiles) == 1 else None
        if chosen is None:
            what = "this request"
            if shape:
                batches = f"1-{shape[0]}" if any_batch and shape[0] > 1 else str(shape[0])
                what = f"batch {batches} at {shape[2]}x{shape[1]}"
            have = ", ".join(p.tag for p in profiles) or "none"
            raise EngineMissing(
                f"no {self.flavour} {self.version} engines on {self.device} for {what} "
                f"(built profiles: {have}); run `sdturbo build {self.bundle.root} --batch --size`"
            )
        return chosen

    def _outside(self, req: Request) -> str:
        return (
            f"batch {req.batch} at {req.width}x{req.height} is outside the engines' profile "
            f"{self.profile.tag}; build engines for it with `sdturbo build --batch --size`"
        )

    def _capture_facts(self) -> dict[str, str]:
        return {**super()._capture_facts(), self.flavour: self.version}

    def _first_run_done(self) -> None:
        """Once: TensorRT-RTX's kernels compiled by the first run are kept beside the plans."""
        if not self._caches_saved:
            for engine in self.engines.values():
                engine.save_runtime_cache()
            self._caches_saved = True
