"""A host emulation of what the TensorRT runtime asks of a GPU, so the CPU suite runs its orchestration.

What is emulated, and how faithfully:
- device memory: each allocation is a numpy byte array at its own address, filled with 0xFF (NaN in fp16
  and fp32) so a read of memory nothing wrote shows up; every access is bounds-checked against the
  allocation its address falls in, so an undersized buffer or a wrong offset raises.
- what is given back: engine/cuda.py's own DeviceBuffer, PinnedArray, Stream and Event run on an emulated
  runtime (``EmulatedRuntime``) that counts what is live and refuses a double free, the free of an address it
  never gave, and a free during a capture (each also kept in ``faults``, as a finalizer swallows errors).
- one stream, in order: work runs when enqueued, except under capture, where it is recorded; a graph
  replays what was recorded, with the arguments and engine addresses as they were at capture.
- TensorRT: the runtime / engine / execution-context calls the runtime's TrtEngine makes (TensorRT 10/11,
  or TensorRT-RTX's runtime config and cache), each context an ONNX Runtime session on the bundle's fp16
  ONNX (the graphs the engines are built from) reading and writing the addresses bound, at the shapes set.
- kernels: kernels/latents.cu line by line in numpy, rounding where the CUDA code rounds
  (tests/kernels checks the real kernels against the same host twins on a GPU).
What this cannot show: TensorRT's own numerics, CUDA graph capture rules, timing.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref

import numpy as np
import onnx
from sdturbo.engine import cuda as cuda_module
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.ort_pipeline import OrtCudaPipeline
from sdturbo.engine.trt_pipeline import PRECISION, TrtEngine, TrtPipeline

F32 = np.float32
ONNX_TYPES = {1: "DataType.FLOAT", 10: "DataType.HALF", 6: "DataType.INT32", 7: "DataType.INT64"}  # as TensorRT's


class Memory:
    """The emulated device address space."""

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}
        self._next = 0x7F00_0000_0000

    def alloc(self, nbytes: int) -> int:
        base = self._next
        self._next += (nbytes + 4095) // 4096 * 4096 + 4096  # a gap, so running off the end never lands in a neighbour
        self.blocks[base] = np.full(nbytes, 0xFF, np.uint8)
        return base

    def free(self, ptr: int) -> None:
        if self.blocks.pop(ptr, None) is None:
            raise MemoryError(f"cudaFree({ptr:#x}): not an allocation (freed already, or never allocated)")

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, block in self.blocks.items():
            if base <= ptr < base + block.size:
                if ptr + nbytes > base + block.size:
                    raise MemoryError(f"access of {nbytes} bytes at +{ptr - base} overruns a {block.size}-byte buffer")
                return block[ptr - base : ptr - base + nbytes]
        raise MemoryError(f"address {ptr:#x} is in no allocation")

    def array(self, ptr: int, dtype, shape) -> np.ndarray:
        dtype = np.dtype(dtype)
        return self.view(ptr, int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)


class EmulatedRuntime:
    """The cuda-python runtime calls engine/cuda.py makes to allocate and give back, as (status, value) tuples.
    ``live()`` counts what is held. A double free, the free of a handle it never gave, or a free while a stream
    is captured (which would invalidate the capture) raises, and is kept in ``faults`` too: a finalizer
    swallows what it raises."""

    cudaStreamNonBlocking = 1

    def __init__(self, memory: Memory, streams):
        self.memory, self.streams = memory, streams
        self.pinned: dict[int, np.ndarray] = {}
        self.freed_pinned: list[np.ndarray] = []  # kept (poisoned): a view used after its free reads 0xFF, not junk
        self.handles = {"stream": set(), "event": set()}
        self.faults: list[str] = []
        self._handles = itertools.count(1)

    def live(self) -> dict[str, int]:
        return {
            "cudaMalloc": len(self.memory.blocks),
            "cudaMallocHost": len(self.pinned),
            **{k: len(v) for k, v in self.handles.items()},
        }

    def _fault(self, what: str):
        self.faults.append(what)
        raise RuntimeError(what)

    def _not_capturing(self, call: str) -> None:
        if any(s.recording is not None for s in list(self.streams.values())):
            self._fault(f"{call} during a stream capture (it would invalidate the capture)")

    def cudaMalloc(self, nbytes: int):
        return 0, self.memory.alloc(nbytes)

    def cudaFree(self, ptr: int):
        if ptr == 0:  # cudaFree(0): initialises the context, frees nothing
            return (0,)
        self._not_capturing("cudaFree")
        try:
            self.memory.free(ptr)
        except MemoryError as e:
            self._fault(str(e))
        return (0,)

    def cudaMallocHost(self, nbytes: int):
        block = np.zeros(nbytes, np.uint8)
        self.pinned[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFreeHost(self, ptr: int):
        self._not_capturing("cudaFreeHost")
        block = self.pinned.pop(ptr, None)
        if block is None:
            self._fault(f"cudaFreeHost({ptr:#x}): not a pinned allocation (freed already, or never allocated)")
        block[:] = 0xFF
        self.freed_pinned.append(block)
        return (0,)

    def _create(self, kind: str):
        handle = next(self._handles)
        self.handles[kind].add(handle)
        return 0, handle

    def _destroy(self, kind: str, handle: int):
        self._not_capturing(f"cuda{kind.title()}Destroy")
        if handle not in self.handles[kind]:
            self._fault(f"cuda{kind.title()}Destroy({handle}): not a live {kind}")
        self.handles[kind].discard(handle)
        return (0,)

    def cudaStreamCreateWithFlags(self, flags: int):
        return self._create("stream")

    def cudaStreamDestroy(self, handle: int):
        return self._destroy("stream", handle)

    def cudaEventCreate(self):
        return self._create("event")

    def cudaEventDestroy(self, handle: int):
        return self._destroy("event", handle)


class EmulatedCuda:
    """The parts of engine/cuda.py the TensorRT runtime uses: its own DeviceBuffer, PinnedArray, Stream and
    Event (their allocation and release) on ``runtime``, the rest emulated."""

    capturing = staticmethod(cuda_module.capturing)

    def __init__(self, compute_capability: int = 86):
        self.memory = mem = Memory()
        self.cc = compute_capability
        # the thread capturing in CUDA's global mode (onnxruntime's own graphs), and whether a call on another
        # thread spoilt it meanwhile
        self.global_capture: int | None = None
        self.global_capture_spoilt = False
        cuda = self
        self.context_current = False  # cudaSetDevice/cudaFree(0) in ensure_context; the driver API needs it
        # kernels are launched on a stream's address, as in CUDA (held weakly: a dropped stream is destroyed)
        self.streams: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
        streams = self.streams
        self.runtime = rt = EmulatedRuntime(mem, streams)

        class DeviceBuffer(cuda_module.DeviceBuffer):
            runtime = rt

        class PinnedArray(cuda_module.PinnedArray):
            runtime = rt

        class Stream(cuda_module.Stream):
            runtime = rt

            def __init__(self):
                super().__init__()
                self.recording: list | None = None
                self.captured_contexts: set = set()  # contexts enqueued during the capture under way
                streams[self.ptr] = self

            def do(self, op) -> None:
                if self.recording is None:
                    op()
                else:
                    self.recording.append(op)

            def copy_in(self, dst: int, src, nbytes: int) -> None:
                data = src.array.reshape(-1).view(np.uint8)[:nbytes].copy()  # as the bytes are when the copy runs
                self.do(lambda: mem.view(dst, nbytes).__setitem__(slice(None), data))

            def copy_out(self, dst, src: int, nbytes: int) -> None:
                def op():
                    dst.array.reshape(-1).view(np.uint8)[:nbytes] = mem.view(src, nbytes)

                self.do(op)

            def copy_d2d(self, dst: int, src: int, nbytes: int) -> None:
                self.do(lambda: mem.view(dst, nbytes).__setitem__(slice(None), mem.view(src, nbytes).copy()))

            def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
                def op():
                    for r in range(rows):
                        mem.view(dst + r * dst_pitch, width)[:] = mem.view(src + r * src_pitch, width)

                self.do(op)

            def fill(self, dst: int, byte: int, nbytes: int) -> None:
                self.do(lambda: mem.view(dst, nbytes).__setitem__(slice(None), byte))

            def enqueue(self, fn) -> None:
                self.do(fn)

            def synchronize(self) -> None:
                if self.recording is not None:
                    raise RuntimeError("synchronize inside a capture")
                if cuda.global_capture not in (None, threading.get_ident()):
                    cuda.global_capture_spoilt = True
                    raise RuntimeError("cudaStreamSynchronize: cudaErrorStreamCaptureImplicit (a global capture)")

            def end_capture(self) -> None:
                self.recording = None

        class Graph:
            def __init__(self, stream, fn):
                stream.recording = []
                try:
                    fn()
                finally:
                    self.ops, stream.recording = stream.recording, None
                for ctx in stream.captured_contexts:  # TensorRT: a captured context's state is frozen
                    ctx.captured = True
                stream.captured_contexts.clear()

            def launch(self) -> None:
                for op in self.ops:
                    op()

        class Event(cuda_module.Event):
            runtime = rt

            def __init__(self):
                super().__init__()
                self.time = None

            def record(self, stream) -> None:
                stream.do(lambda: setattr(self, "time", time.perf_counter()))

            def ms_since(self, start) -> float:
                return 1e3 * (self.time - start.time)

        self.DeviceBuffer, self.PinnedArray, self.Stream, self.Graph = DeviceBuffer, PinnedArray, Stream, Graph
        self.Event = Event

    def current_compute_capability(self, device: int = 0) -> int:
        return self.cc

    def device_summary(self, device: int = 0) -> str:
        return f"emulated GPU (SM{self.cc})"

    def ensure_context(self, device: int = 0) -> None:
        self.context_current = True

    def live(self) -> dict[str, int]:
        """What is allocated or created and not given back yet, by kind."""
        return self.runtime.live()


class EmulatedTensorRT:
    """The TensorRT API calls TrtEngine makes (TensorRT 10/11, or TensorRT-RTX with ``rtx``), with
    ONNX Runtime sessions of the fp16 ONNX behind the execution contexts."""

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "user-managed"

    class DynamicShapesKernelSpecializationStrategy:
        LAZY, EAGER, NONE = "lazy", "eager", "none"

    class TensorIOMode:
        NONE, INPUT, OUTPUT = "TensorIOMode.NONE", "TensorIOMode.INPUT", "TensorIOMode.OUTPUT"

    class DataType:
        FLOAT, HALF, INT32, INT64 = "DataType.FLOAT", "DataType.HALF", "DataType.INT32", "DataType.INT64"

    def __init__(self, bundle: Bundle, cuda: EmulatedCuda, rtx: bool = False):
        self.bundle, self.cuda, self.rtx = bundle, cuda, rtx
        self.contexts: dict[str, list[EmulatedContext]] = {}  # every context made, per component

    def runtime(self, component: str):
        """A Runtime whose next deserialized plan is ``component``'s (the plan bytes themselves are not read)."""
        trt = self

        class Runtime:
            def deserialize_cuda_engine(self, data: bytes):
                return EmulatedCudaEngine(trt, component)

        return Runtime()


class EmulatedCudaEngine:
    """An engine built from ``component``'s fp16 ONNX: its input and output tensors are that graph's (names,
    roles, element types, axes), read from the file, not from the bundle's spec that the runtime checks them by."""

    def __init__(self, trt: EmulatedTensorRT, component: str):
        self.trt, self.component = trt, component
        if not trt.cuda.context_current:
            raise RuntimeError("deserialize_cuda_engine without a current CUDA context")
        graph = onnx.load(str(trt.bundle.component(PRECISION, component).onnx), load_external_data=False).graph
        mode = trt.TensorIOMode
        self.io = {  # name -> (mode, data type, axes: int or the symbolic name)
            v.name: (m, ONNX_TYPES[v.type.tensor_type.elem_type], [d.dim_param or d.dim_value for d in dims])
            for m, values in ((mode.INPUT, graph.input), (mode.OUTPUT, graph.output))
            for v in values
            for dims in [v.type.tensor_type.shape.dim]
        }
        self.num_io_tensors = len(self.io)
        if trt.rtx:  # TensorRT-RTX engines have device_memory_size_v2 only
            self.create_runtime_config = self._runtime_config
            self.device_memory_size_v2 = 1 << 20
        else:  # TensorRT >= 10.11: a runtime config too, but with the allocation strategy only (no runtime cache)
            self.create_runtime_config = self._trt_runtime_config
            self.device_memory_size = 1 << 20

    @staticmethod
    def _trt_runtime_config():
        class RuntimeConfig:
            def set_execution_context_allocation_strategy(self, strategy):
                self.strategy = strategy

        return RuntimeConfig()

    def _runtime_config(self):
        class RuntimeCache:
            def deserialize(self, data: bytes) -> bool:
                return data == b"emulated runtime cache"

            def serialize(self) -> bytes:
                return b"emulated runtime cache"

        class RuntimeConfig:
            dynamic_shapes_kernel_specialization_strategy = "lazy"

            def set_execution_context_allocation_strategy(self, strategy):
                self.strategy = strategy

            def create_runtime_cache(self):
                return RuntimeCache()

            def set_runtime_cache(self, cache):
                self.cache = cache

        return RuntimeConfig()

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str):
        return self.io[name][0] if name in self.io else self.trt.TensorIOMode.NONE

    def get_tensor_dtype(self, name: str):
        return self.io[name][1]

    def create_execution_context(self, strategy_or_config):
        if self.trt.rtx and strategy_or_config.dynamic_shapes_kernel_specialization_strategy != "eager":
            raise AssertionError(
                "TensorRT-RTX context without EAGER kernel specialisation: a generic kernel would be captured"
            )
        ctx = EmulatedContext(self.trt.bundle, self.component, self.trt.cuda, self.io)
        self.trt.contexts.setdefault(self.component, []).append(ctx)
        return ctx


class EmulatedContext:
    """An execution context: shapes and addresses as set, read when enqueued (as TensorRT records them).
    Once enqueued into a captured graph its shapes and addresses may not change (TensorRT's CUDA-graph rule)."""

    def __init__(self, bundle: Bundle, name: str, cuda: EmulatedCuda, io: dict):
        """``io``: its engine's tensors (not the engine: a context kept by the test must not keep it alive)."""
        self.name, self.cuda, self.io, self.scale = name, cuda, io, bundle.vae_scale_factor
        self.spec = bundle.component(PRECISION, name).spec
        self.stage = OnnxRuntimeBackend(PRECISION).load(bundle, name)
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory = None
        self.enqueued = 0
        self.captured = False

    def _frozen(self, what: str) -> None:
        if self.captured:
            raise AssertionError(f"{self.name}: {what} changed on a context a CUDA graph was captured with")

    def set_input_shape(self, name: str, shape) -> bool:
        spec = {t.name: t for t in self.spec.inputs}.get(name)
        if spec is None or len(shape) != len(spec.shape):
            return False
        if self.shapes.get(name) != tuple(shape):
            self._frozen(f"input shape {name}")
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """As TensorRT infers it from the input shapes set: the graph's axes, the pixel and latent sides from
        each other by the VAE's scale factor; -1 where unknown (TensorRT's answer before every input is set)."""
        values = {}
        for tensor, shape in self.shapes.items():
            values |= {a: v for a, v in zip(self.io[tensor][2], shape, strict=True) if isinstance(a, str)}
        for pixels in ("height", "width"):
            latent = f"latent_{pixels}"
            if latent in values:
                values.setdefault(pixels, values[latent] * self.scale)
            elif pixels in values:
                values[latent] = values[pixels] // self.scale
        return tuple(a if isinstance(a, int) else values.get(a, -1) for a in self.io[name][2])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in {t.name for t in (*self.spec.inputs, *self.spec.outputs)}:
            return False
        if self.addresses.get(name) != ptr:
            self._frozen(f"address of {name}")
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_ptr: int) -> bool:
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        missing = [t.name for t in (*self.spec.inputs, *self.spec.outputs) if t.name not in addresses]
        missing += [t.name for t in self.spec.inputs if t.name not in shapes]
        if missing or self.device_memory is None:
            raise AssertionError(f"{self.name} enqueued without context memory, shape or address for {missing}")
        mem = self.cuda.memory
        stream = self.cuda.streams[stream_ptr]
        if stream.recording is not None:
            stream.captured_contexts.add(self)

        def op():
            feeds = {t.name: mem.array(addresses[t.name], t.dtype, shapes[t.name]).copy() for t in self.spec.inputs}
            outs = self.stage(**feeds)
            outs = outs if isinstance(outs, tuple) else (outs,)
            for t, value in zip(self.spec.outputs, outs, strict=True):
                mem.array(addresses[t.name], t.dtype, value.shape)[...] = value
            self.enqueued += 1

        stream.do(op)
        return True


class EmulatedKernels:
    """kernels/latents.cu in numpy, for one float type T: ``f`` widens to fp32, ``t`` rounds to T."""

    def __init__(self, dtype: str, cuda: EmulatedCuda):
        if not cuda.context_current:
            raise RuntimeError("cuModuleLoadData without a current CUDA context")
        self.T, self.mem, self.streams = np.dtype(dtype), cuda.memory, cuda.streams

    def t(self, v):
        with np.errstate(over="ignore"):  # beyond fp16's range is inf, as cvt.rn.f16.f32 gives
            return np.asarray(v, F32).astype(self.T)

    @staticmethod
    def f(v):
        return np.asarray(v).astype(F32)

    def _v(self, ptr: int, n: int, dtype=None) -> np.ndarray:
        return self.mem.array(ptr, dtype or self.T, (n,))

    def init_latents(self, noise, x, init_sigma, n, stream):
        f, t = self.f, self.t
        self.streams[stream].do(lambda: self._v(x, n).__setitem__(..., t(f(self._v(noise, n)) * f(t(init_sigma)))))

    def add_noise(self, encoded, noise, x, sigma0, n, stream):
        f, t = self.f, self.t

        def op():
            self._v(x, n)[...] = t(f(self._v(encoded, n)) + f(t(f(self._v(noise, n)) * f(t(sigma0)))))

        self.streams[stream].do(op)

    def scale_input(self, x, out, denominator, n, stream):
        f, t = self.f, self.t
        self.streams[stream].do(lambda: self._v(out, n).__setitem__(..., t(f(self._v(x, n)) / f(t(denominator)))))

    def _euler(self, x, eps, sigma, target):
        f, t = self.f, self.t
        sigma, target = F32(sigma), F32(target)
        xv = f(x)
        x0 = xv - f(t(f(t(sigma)) * f(eps)))
        d = (xv - x0) / sigma
        return xv + d * (target - sigma)

    def euler_step(self, x, eps, sigma, sigma_next, n, stream):
        def op():
            self._v(x, n)[...] = self.t(self._euler(self._v(x, n), self._v(eps, n), sigma, sigma_next))

        self.streams[stream].do(op)

    def ancestral_step(self, x, eps, noise, sigma, sigma_down, sigma_up, n, stream):
        f, t = self.f, self.t

        def op():
            out = self._euler(self._v(x, n), self._v(eps, n), sigma, sigma_down)
            self._v(x, n)[...] = t(out + f(t(f(self._v(noise, n)) * f(t(sigma_up)))))

        self.streams[stream].do(op)

    def to_float32(self, src, dst, n, stream):
        self.streams[stream].do(lambda: self._v(dst, n, F32).__setitem__(..., self.f(self._v(src, n))))

    def from_float32(self, src, dst, n, stream):
        self.streams[stream].do(lambda: self._v(dst, n).__setitem__(..., self.t(self._v(src, n, F32))))

    def to_uint8(self, image, pixels, nonfinite, batch, height, width, stream):
        f, t = self.f, self.t

        def op():
            img = self.mem.array(image, self.T, (batch, 3, height, width)).transpose(0, 2, 3, 1)
            v = np.clip(f(t(f(t(f(img) / F32(2))) + F32(0.5))), 0, 1)
            out = self.mem.array(pixels, np.uint8, (batch, height, width, 3))
            with np.errstate(invalid="ignore"):  # NaN (a poisoned buffer a broken graph never wrote) casts anyhow
                out[...] = np.rint(v * F32(255)).astype(np.uint8)
            flags = self.mem.array(nonfinite, np.uint8, (batch,))
            flags[~np.isfinite(f(img)).reshape(batch, -1).all(axis=1)] = 1

        self.streams[stream].do(op)


def check_interleaved(pipe, host, calls) -> None:
    """``calls`` ((prompts, seed, height, width, steps) each) in turn, three times over on ``pipe``: each image
    equal to ``host``'s. Round 1 fills the prompt cache, round 2 captures its hits' graphs too, and round 3
    only replays (no new graph)."""
    captured = []
    for _ in range(3):
        for prompts, seed, h, w, steps in calls:
            got = pipe(prompts, height=h, width=w, seed=seed, steps=steps)
            np.testing.assert_array_equal(got, host(prompts, height=h, width=w, seed=seed, steps=steps))
        captured.append(set(pipe.graphs))
    assert captured[1] == captured[2]


def emulated_pipeline(bundle, cuda: EmulatedCuda | None = None, rtx: bool = False, **kwargs) -> TrtPipeline:
    """A TrtPipeline whose GPU is ``cuda`` (a fresh emulation by default) and whose TensorRT is
    ``EmulatedTensorRT``: engines are found and checked in the bundle as usual (built with TensorRT-RTX
    for the emulated compute capability) and loaded through the runtime's own TrtEngine."""
    return emulated_trt_class(cuda, rtx)(bundle, **kwargs)


def emulated_trt_class(cuda: EmulatedCuda | None = None, rtx: bool = False) -> type[TrtPipeline]:
    """TrtPipeline on the emulated GPU ``cuda``, as a class (``open`` builds missing engines with TensorRT-RTX
    for the emulated compute capability, as on a GPU for the GPU's)."""
    cuda = cuda or EmulatedCuda()

    class EmulatedTrtPipeline(TrtPipeline):
        def _engine_loader(self, flavour):
            import tensorrt_rtx

            trt = self.emulated_trt = EmulatedTensorRT(self.bundle, cuda, rtx)
            return "tensorrt-rtx", tensorrt_rtx.__version__, lambda p: TrtEngine(trt, trt.runtime(p.stem), p, cuda, rtx)

        def _kernels(self, dtype, cc):
            return EmulatedKernels(dtype, cuda)

        @staticmethod
        def _build(root, profile):
            from sdturbo.export.trt_build import build_engines

            cc = cuda.current_compute_capability()
            build_engines(root, "tensorrt-rtx", profile, compute_capability=cc, opt_level=0)

    EmulatedTrtPipeline.cuda = cuda
    return EmulatedTrtPipeline


def emulated_ort_pipeline(bundle, cuda: EmulatedCuda | None = None, **kwargs) -> OrtCudaPipeline:
    """An OrtCudaPipeline whose GPU is ``cuda``: its sessions are the CPU provider's, bound by IO binding to
    the host addresses behind the emulated device buffers (bounds-checked when bound), and each run is
    enqueued on the emulated stream, so a capture records it and a graph replays it."""
    cuda = cuda or EmulatedCuda()

    class EmulatedOrtCudaPipeline(OrtCudaPipeline):
        providers = ("CPUExecutionProvider",)
        ort_device = "cpu"

        def _open(self, backend, name, graphs):
            session = super()._open(backend, name, graphs)
            return EmulatedOrtGraphs(session, cuda) if graphs else session

        @staticmethod
        def _address(ptr, nbytes):
            return cuda.memory.view(ptr, nbytes).ctypes.data

        def _kernels(self, dtype, cc):
            return EmulatedKernels(dtype, cuda)

    EmulatedOrtCudaPipeline.cuda = cuda
    return EmulatedOrtCudaPipeline(bundle, **kwargs)


_THREADS = threading.local()
_THREAD_KEYS = itertools.count()


def thread_key() -> int:
    """This thread's own number, as onnxruntime's thread-local state is this thread's own: a later thread that
    gets the same ``threading.get_ident`` (Linux reuses them) starts afresh."""
    if not hasattr(_THREADS, "key"):
        _THREADS.key = next(_THREAD_KEYS)
    return _THREADS.key


class EmulatedOrtGraphs:
    """An onnxruntime session created with ``enable_cuda_graph``, as the CUDA provider treats its runs: a run
    with ``gpu_graph_id`` -1 just runs; the first run with another id on a thread runs ``MIN_RUNS`` times
    (onnxruntime's warm-up) and then captures, keeping what that run's IO binding held (shapes, addresses);
    every later run with that id on that thread replays the capture: the session again on the captured
    binding, whatever is bound now (a graph reads and writes the addresses it was captured with). Graphs are
    kept per thread, as onnxruntime keeps them. ``fail_capture(thread, graph_id)``, where set, may raise (or
    wait: it runs inside the capture). The capture is in CUDA's global mode, as onnxruntime's: a stream
    synchronised on another thread meanwhile fails there, and the capture fails at its end (``cuda``'s
    ``global_capture``)."""

    MIN_RUNS = 2

    def __init__(self, session, cuda: EmulatedCuda | None = None):
        self.session, self.cuda = session, cuda
        self.captured: dict[tuple[int, int], object] = {}  # (thread, graph id) -> the binding captured
        self.replays: collections.Counter = collections.Counter()  # graph id -> replays, on any thread
        self.fail_capture = None

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, binding, run_options):
        graph_id = int(run_options.get_run_config_entry("gpu_graph_id"))
        if graph_id == -1:
            return self.session.run_with_iobinding(binding, run_options)
        key = (thread_key(), graph_id)
        if key in self.captured:
            self.replays[graph_id] += 1
            return self.session.run_with_iobinding(self.captured[key], run_options)
        for _ in range(self.MIN_RUNS):  # the warm-up runs, then the captured one (replayed at once)
            self.session.run_with_iobinding(binding, run_options)
        cuda = self.cuda
        if cuda is not None:
            cuda.global_capture, cuda.global_capture_spoilt = threading.get_ident(), False
        try:
            if self.fail_capture is not None:
                self.fail_capture(*key)
            self.session.run_with_iobinding(binding, run_options)
        finally:
            spoilt = cuda is not None and cuda.global_capture_spoilt
            if cuda is not None:
                cuda.global_capture = None
        if spoilt:
            raise RuntimeError("cudaStreamEndCapture: cudaErrorStreamCaptureInvalidated (another thread's call)")
        self.captured[key] = binding
        return None
