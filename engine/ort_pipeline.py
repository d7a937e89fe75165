"""ONNX Runtime on CUDA, device-resident: the bundle's graphs (the transformer-optimized ones where
`sdturbo build --ort-optimize` wrote them) chained on the GPU by engine/device_pipeline.py.

For GPUs without TensorRT (A100, H100: TensorRT-RTX runs on RTX GPUs only). What it does, as the
TensorRT runtime does:
- every session runs on the pipeline's own CUDA stream (the CUDA provider's ``user_compute_stream``), and
  each run returns without waiting for the GPU (``disable_synchronize_execution_providers``); the NVRTC
  kernels of kernels/latents.cu run between the sessions on the same stream;
- inputs and outputs are bound by address to buffers allocated once (an IO binding per shape and
  component, made once), so nothing is copied between the host and the device but ids and noise in and
  pixels out, and the host waits once per request;
- CUDA graphs, in two tiers. First the whole chain (sessions and kernels) as one CUDA graph per (batch,
  size, steps, strength): one launch per request. ONNX Runtime does not promise that a run can be captured
  from outside, so the sessions are created with ``enable_cuda_graph`` (which makes onnxruntime refuse a
  graph that needs host copies, and free its staging buffers in a way a capture cannot record) and every run
  passes ``gpu_graph_id`` -1 (onnxruntime never captures on its own). A refused session, a capture that
  fails, or a graph whose replays do not give the eager runs' pixels (DevicePipeline._capture)
  ends that tier, with a warning; then each session replays onnxruntime's own CUDA graph (one per session
  and shape: the context's ``gpu_graph_id``), with the kernels launched between them and still one host
  wait (onnxruntime releases since mid-2026 honour ``disable_synchronize_execution_providers`` on a replay,
  onnxruntime PR #28686: no wait after each), checked the same way. If that fails too, every run is
  enqueued as it comes. ``graph_status`` says which tier runs and why.
"""

from __future__ import annotations

import itertools
import logging
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from . import cuda as cuda_module
from .bundle import Bundle
from .device_pipeline import CAPTURE_LOCK, DevicePipeline
from .engine_store import Profile
from .errors import CaptureRefused, InputError
from .prompt_cache import DEFAULT_SIZE, PromptCache
from .request import Request

log = logging.getLogger(__name__)
PRECISIONS = ("fp16", "fp32")
GRAPH_MODES = (True, False, "chain", "sessions")  # True is "chain": the whole chain, else per-session graphs
_GRAPH_IDS = itertools.count(1)  # onnxruntime's gpu_graph_id: one per session and shape (-1: none, 0: its default)


_THREADS = threading.local()
_THREAD_TOKENS = itertools.count()


def _thread_token() -> int:
    """This thread's number, never given to another thread of this process (``threading.get_ident`` is reused
    once a thread ends, and a new thread would then find graphs that onnxruntime keeps only for the old one)."""
    if not hasattr(_THREADS, "token"):
        _THREADS.token = next(_THREAD_TOKENS)
    return _THREADS.token


class OrtComponent:
    """One component's onnxruntime session; each shape's context is an IO binding made once. ``graph_options``
    (graph id -> run options) where the session was created with ``enable_cuda_graph``, so it may keep a CUDA
    graph of its own per shape (one id per context), else None; ``graphs_on``: runs use them now."""

    def __init__(self, name: str, session, run_options, device: str, address, graph_options=None):
        self.name, self.session, self.run_options = name, session, run_options
        self.device, self.address = device, address
        self.graph_options = graph_options
        self.graphs_on = False

    def context(self, spec, dims: dict[str, int], addresses: dict[str, int]) -> OrtContext:
        binding = self.session.io_binding()
        for tensors, bind in ((spec.inputs, binding.bind_input), (spec.outputs, binding.bind_output)):
            for t in tensors:
                shape = t.concrete(dims)
                dtype = np.dtype(t.dtype)
                ptr = self.address(addresses[t.name], int(np.prod(shape)) * dtype.itemsize)
                bind(t.name, self.device, 0, dtype, list(shape), ptr)
        own = self.graph_options(next(_GRAPH_IDS)) if self.graph_options else None
        return OrtContext(self, binding, own)

    def close(self) -> None:
        """Let go of the session (its memory, and onnxruntime's own graphs), after the contexts' IO bindings:
        the pipeline that owns it closes it before freeing the buffers and the stream the session was given."""
        self.session = self.graph_options = None


def run_options(ort, graph_id: int):
    """Run options: no wait for the GPU at the end of a run; ``graph_id`` -1: onnxruntime captures and
    replays nothing of its own; another: the CUDA graph it keeps under that id (captured on first use)."""
    options = ort.RunOptions()
    options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


class OrtContext:
    def __init__(self, component: OrtComponent, binding, graph_options=None):
        self.component, self.binding, self.graph_options = component, binding, graph_options
        self.name = component.name

    def enqueue(self, stream) -> None:
        c = self.component
        options = self.graph_options if c.graphs_on and self.graph_options is not None else c.run_options
        stream.enqueue(lambda: c.session.run_with_iobinding(self.binding, options))

    def capturable(self, stream) -> bool:
        return True  # ONNX Runtime cannot say in advance; a failed capture turns the graph off instead


class SessionGraphs:
    """The second tier: onnxruntime's own CUDA graph per session at this shape, the kernels launched between
    them. The first launch is each session's warm-up runs and capture (onnxruntime does both within the run
    of a new ``gpu_graph_id``); later ones replay them. Checked before use like a chain graph."""

    def __init__(self, pipe: OrtCudaPipeline, enqueue):
        self.pipe, self.enqueue = pipe, enqueue
        try:
            self.launch()
        except BaseException:
            pipe.stream.end_capture()  # a run that failed during onnxruntime's own capture may leave it open
            raise

    def launch(self) -> None:
        with self.pipe.session_graphs():
            self.enqueue()


class OrtCudaPipeline(DevicePipeline):
    """Same requests and results as ``Pipeline``; runs the bundle's ONNX with ONNX Runtime's CUDA provider,
    device-resident, replayed as one CUDA graph (or, where that cannot be, with onnxruntime's own per session)."""

    cuda = cuda_module
    name = "ONNX Runtime CUDA"
    providers: tuple[str, ...] = ("CUDAExecutionProvider",)
    ort_device = "cuda"  # where the IO bindings say the buffers are
    encoder_hint = "{export_hint} (adds it)"
    # onnxruntime reports a run it could not complete under capture with its own exception types
    capture_errors = (Exception,)

    def __init__(
        self,
        bundle: Bundle | str | Path,
        precision: str = "fp16",
        shape: tuple[int, int, int] = (1, 512, 512),
        cuda_graph: bool | str = True,
        fused: bool = True,
        vae: str = "full",
        prompt_cache: int | PromptCache = DEFAULT_SIZE,
        nhwc: bool = False,
    ):
        """``shape``: the largest (batch, height, width) a request may have; every buffer is allocated
        for it once. ``cuda_graph``: True (or "chain"): the whole chain as one graph, else onnxruntime's own
        per session; "sessions": those only; False: none. ``fused``: the bundle's ``--ort-optimize`` graphs
        for CUDA where valid. ``vae``: "full" or "tiny"; ``prompt_cache``: prompts whose text-encoder
        outputs are kept on the GPU (0: off). ``nhwc``: the CUDA provider's ``prefer_nhwc`` (convolutions in
        the channels-last layout that tensor cores prefer, transposes inserted by onnxruntime where needed;
        the same function). It matters for the plain graphs: the fused ones' convolutions are NhwcConv
        already. Not measured yet: the benchmark's ``-nhwc-`` contender (plain graphs) compares it."""
        if not any(cuda_graph is m for m in GRAPH_MODES[:2]) and cuda_graph not in GRAPH_MODES[2:]:
            raise InputError(f"cuda_graph {cuda_graph!r} is not allowed; use one of {GRAPH_MODES}")
        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} is not allowed for onnxruntime-cuda; use one of {PRECISIONS}")
        self.precision = precision
        self.nhwc = bool(nhwc)
        self._prepare(bundle, vae, prompt_cache)
        b = self.bundle
        batch, height, width = (int(v) for v in shape)
        lo = b.limits.min_size
        profile = Profile((1, batch, batch), (min(lo, height), height, height), (min(lo, width), width, width))
        profile.check(b)
        capture = cuda_graph is not False
        # onnxruntime captures its own graphs in CUDA's global capture mode, which a session or an allocation
        # being made on another thread would break: none is made while a capture runs in this process
        with CAPTURE_LOCK:
            backend = self._backend(precision, fused, capture=capture)
            components, refused, plain = {}, [], None
            for name in self.component_names:
                log.info("loading %s (%s, %s)", name, self.name, precision)
                try:
                    session, own = self._open(backend, name, capture), capture
                except CaptureRefused as e:
                    log.warning("%s; %s runs without CUDA graphs%s", e, name, self._refusal_hint(name))
                    refused.append((name, str(e)))
                    plain = plain or self._backend(precision, fused, capture=False)
                    session, own = self._open(plain, name, False), False
                # (nothing a component holds refers to this pipeline: its close() is also its collection's)
                options = partial(run_options, self._ort)
                graphs = options if own else None
                components[name] = OrtComponent(name, session, options(-1), self.ort_device, self._address, graphs)
            self._setup(profile, capture, components)
        # component -> "optimized" or "plain" (the benchmark reports it)
        self.graphs_used = {**backend.graphs, **(plain.graphs if plain else {})}
        unfused = [name for name, graph in self.graphs_used.items() if graph == "plain"]
        if fused and unfused and precision == "fp16":
            log.warning(
                "%s run%s the plain fp16 graphs: %s has no fused graphs for onnxruntime %s on CUDA; build them "
                "once (they need the fp32 ONNX too) with `sdturbo build %s --ort-optimize`",
                ", ".join(unfused),
                "s" if len(unfused) == 1 else "",
                self.bundle.root,
                self._ort.__version__,
                self.bundle.root,
            )
        self.graph_kind = ("chain" if cuda_graph in (True, "chain") else "sessions") if capture else None
        if self.graph_kind == "sessions":
            self.graph_off_reason = "the whole chain's graph was not asked for (cuda_graph='sessions')"
        if refused and capture:  # the chain cannot be one graph; the other sessions keep their own
            names = ", ".join(name for name, _ in refused)
            reason = f"onnxruntime refuses CUDA graphs for {names}: {refused[0][1]}"
            if self.graph_kind == "sessions" and any(c.graph_options for c in components.values()):
                self.graph_off_reason = reason
            else:
                self._graph_off(reason)

    def _refusal_hint(self, name: str) -> str:
        """What to do about a refused component, where this code knows: a text encoder exported before its
        pooled-token ArgMax was made float (onnxruntime's CUDA provider has no integer ArgMax; SDXL's second
        text encoder) gets one by exporting the bundle again."""
        try:
            from ..export.graph_fixes import integer_argmax
        except ImportError:  # (no onnx in a lean runtime: no hint)
            return ""
        if not name.startswith("text_encoder") or not integer_argmax(self.bundle.component(self.precision, name).onnx):
            return ""
        root = self.bundle.root
        return (
            f" (its pooled-token ArgMax is over integers, which onnxruntime's CUDA provider runs on the CPU: this "
            f"bundle was exported before that was fixed; `sdturbo export {self.bundle.model_id} --out {root} --force`,"
            f" then `sdturbo build {root} --ort-optimize` again, gives it CUDA graphs)"
        )

    def _open(self, backend, name: str, graphs: bool):
        """``name``'s session; ``graphs``: it was asked to keep CUDA graphs of its own (``enable_cuda_graph``)."""
        return backend.session(self.bundle, name)

    @contextmanager
    def session_graphs(self):
        """Runs enqueued in this block use each session's own CUDA graph (where it may have one)."""
        for c in self.engines.values():
            c.graphs_on = True
        try:
            yield
        finally:
            for c in self.engines.values():
                c.graphs_on = False

    def _graph_scope(self) -> tuple:
        """onnxruntime keeps its own graphs per thread: on another thread (a server's worker after a warm-up on
        the main one) a session captures afresh, so that thread's graphs are checked afresh too."""
        return (_thread_token(),) if self.graph_kind == "sessions" else ()

    def _make_graph(self, enqueue):
        return SessionGraphs(self, enqueue) if self.graph_kind == "sessions" else super()._make_graph(enqueue)

    def _capture_facts(self) -> dict[str, str]:
        fused = sorted({graph for graph in self.graphs_used.values()})
        settings = f"{'+'.join(fused)} graphs{', prefer_nhwc' if self.nhwc else ''}"
        return {**super()._capture_facts(), "onnxruntime": f"{self._ort.__version__} ({settings})"}

    def _graph_label(self) -> str:
        return "the sessions' own graphs" if self.graph_kind == "sessions" else super()._graph_label()

    def _graph_off(self, reason: str) -> None:
        """The whole chain's graph off: onnxruntime's own per session instead, where a session may have them;
        those off too: none."""
        if self.graph_kind == "chain" and any(c.graph_options for c in self.engines.values()):
            log.warning(
                "whole-chain CUDA graph OFF for %s: %s; using onnxruntime's own CUDA graph per session instead",
                self.bundle.root,
                reason,
            )
            self.graph_kind, self.graph_off_reason = "sessions", reason
            self.graphs.clear()
            return
        self.graph_kind = None
        super()._graph_off(reason)

    @property
    def graph_status(self) -> str:
        """ "on" (the whole chain, one graph), "sessions: why the chain is not" (onnxruntime's own graph per
        session) or "off: why"."""
        if self.graph_kind == "sessions":  # (a tier turned off is None: graph_kind and cuda_graph go together)
            return f"sessions: {self.graph_off_reason}"
        return super().graph_status

    def provider_options(self, capture: bool = True) -> dict[str, dict[str, str]]:
        """The CUDA provider on this pipeline's stream; its arena grows only as much as asked (no doubling).

        ``capture``: ``enable_cuda_graph``. For the whole chain's graph, for what it checks and changes (its
        runs pass ``gpu_graph_id`` -1: onnxruntime captures nothing of its own); for the second tier, for
        onnxruntime's own graph per session and shape. With it, onnxruntime refuses to create a session
        whose graph needs host copies (Memcpy nodes: values that would be replayed stale) or other providers
        (CaptureRefused), and it frees the pinned staging buffers of a run after a stream synchronisation
        instead of from a host callback on the stream, which a capture would record and every replay would
        run again (a double free); that synchronisation fails under capture, which ends the chain's graph
        cleanly."""
        options = {
            "device_id": "0",
            "user_compute_stream": str(self.stream.ptr),
            "has_user_compute_stream": "1",
            "enable_cuda_graph": "1" if capture else "0",
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "EXHAUSTIVE",  # once, during warm-up, before any capture
        }
        if self.nhwc:
            options["prefer_nhwc"] = "1"
        return {"CUDAExecutionProvider": options}

    def _backend(self, precision: str, fused: bool, capture: bool):
        from .backends.onnxruntime import OnnxRuntimeBackend

        options = self.provider_options(capture)
        backend = OnnxRuntimeBackend(precision, self.providers, fused=fused, provider_options=options)
        self._ort = backend._ort
        return backend

    @staticmethod
    def _address(ptr: int, nbytes: int) -> int:
        """The address onnxruntime is given for ``nbytes`` at device address ``ptr`` (the same, on a GPU)."""
        return ptr

    def _outside(self, req: Request) -> str:
        p = self.profile
        return (
            f"batch {req.batch} at {req.width}x{req.height} is larger than this pipeline's buffers (batch up to "
            f"{p.batch[2]}, up to {p.width[2]}x{p.height[2]}); open it with a larger shape "
            f"(open_pipeline(..., shape=(batch, height, width)) or `--batch`/`--size`)"
        )
