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
- the whole chain (sessions and kernels) is captured as one CUDA graph per (batch, size, steps,
  strength), not ONNX Runtime's own per-session graphs: each of those replays with a stream
  synchronisation after it, a host wait per session run. Sessions are still created with
  ``enable_cuda_graph`` (and never capture themselves): onnxruntime then refuses a graph that needs host
  copies, and frees its staging buffers in a way a capture cannot record (``provider_options``). ONNX
  Runtime does not promise that a run can be captured from outside; so a refused session, a capture that
  fails, or a graph whose replays do not give the eager runs' pixels byte for byte (DevicePipeline._capture)
  turns the graph off with a warning, and ``graph_status`` says why.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import cuda as cuda_module
from .bundle import Bundle
from .device_pipeline import DevicePipeline
from .engine_store import Profile
from .errors import CaptureRefused
from .prompt_cache import DEFAULT_SIZE, PromptCache
from .request import Request

log = logging.getLogger(__name__)
PRECISIONS = ("fp16", "fp32")


class OrtComponent:
    """One component's onnxruntime session; each shape's context is an IO binding made once."""

    def __init__(self, name: str, session, run_options, device: str, address):
        self.name, self.session, self.run_options = name, session, run_options
        self.device, self.address = device, address

    def context(self, spec, dims: dict[str, int], addresses: dict[str, int]) -> OrtContext:
        binding = self.session.io_binding()
        for tensors, bind in ((spec.inputs, binding.bind_input), (spec.outputs, binding.bind_output)):
            for t in tensors:
                shape = t.concrete(dims)
                dtype = np.dtype(t.dtype)
                ptr = self.address(addresses[t.name], int(np.prod(shape)) * dtype.itemsize)
                bind(t.name, self.device, 0, dtype, list(shape), ptr)
        return OrtContext(self, binding)


class OrtContext:
    def __init__(self, component: OrtComponent, binding):
        self.component, self.binding = component, binding
        self.name = component.name

    def enqueue(self, stream) -> None:
        c = self.component
        stream.enqueue(lambda: c.session.run_with_iobinding(self.binding, c.run_options))

    def capturable(self, stream) -> bool:
        return True  # ONNX Runtime cannot say in advance; a failed capture turns the graph off instead


class OrtCudaPipeline(DevicePipeline):
    """Same requests and results as ``Pipeline``; runs the bundle's ONNX with ONNX Runtime's CUDA provider,
    device-resident, replayed as one CUDA graph."""

    cuda = cuda_module
    name = "ONNX Runtime CUDA"
    providers: tuple[str, ...] = ("CUDAExecutionProvider",)
    ort_device = "cuda"  # where the IO bindings say the buffers are
    encoder_hint = "export the bundle again to add it"
    # onnxruntime reports a run it could not complete under capture with its own exception types
    capture_errors = (Exception,)

    def __init__(
        self,
        bundle: Bundle | str | Path,
        precision: str = "fp16",
        shape: tuple[int, int, int] = (1, 512, 512),
        cuda_graph: bool = True,
        fused: bool = True,
        vae: str = "full",
        prompt_cache: int | PromptCache = DEFAULT_SIZE,
    ):
        """``shape``: the largest (batch, height, width) a request may have; every buffer is allocated
        for it once. ``fused``: the bundle's ``--ort-optimize`` graphs for CUDA where valid. ``vae``: "full" or
        "tiny"; ``prompt_cache``: prompts whose text-encoder outputs are kept on the GPU (0: off)."""
        from .errors import InputError

        if precision not in PRECISIONS:
            raise InputError(f"precision {precision!r} is not allowed for onnxruntime-cuda; use one of {PRECISIONS}")
        self.precision = precision
        self._prepare(bundle, vae, prompt_cache)
        b = self.bundle
        batch, height, width = (int(v) for v in shape)
        lo = b.limits.min_size
        profile = Profile((1, batch, batch), (min(lo, height), height, height), (min(lo, width), width, width))
        profile.check(b)
        backend = self._backend(precision, fused, capture=cuda_graph)
        run_options = backend._ort.RunOptions()
        run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        run_options.add_run_config_entry("gpu_graph_id", "-1")  # onnxruntime's own capture: never
        components, refused, plain = {}, [], None
        for name in self.component_names:
            log.info("loading %s (%s, %s)", name, self.name, precision)
            try:
                session = backend.session(b, name)
            except CaptureRefused as e:
                log.warning("%s; %s runs without the CUDA graph", e, name)
                refused.append((name, str(e)))
                plain = plain or self._backend(precision, fused, capture=False)
                session = plain.session(b, name)
            components[name] = OrtComponent(name, session, run_options, self.ort_device, self._address)
        self.graphs_used = backend.graphs  # component -> "optimized" or "plain" (the benchmark reports it)
        self._setup(profile, cuda_graph, components)
        if refused and self.cuda_graph:
            names = ", ".join(name for name, _ in refused)
            self._graph_off(f"onnxruntime refuses CUDA graphs for {names} (host copies in the graph): {refused[0][1]}")

    def provider_options(self, capture: bool = True) -> dict[str, dict[str, str]]:
        """The CUDA provider on this pipeline's stream; its arena grows only as much as asked (no doubling).

        ``capture``: ``enable_cuda_graph``, for what it checks and changes, not for onnxruntime's own graphs
        (every run passes ``gpu_graph_id`` -1: onnxruntime never captures; the whole chain is captured
        instead). With it, onnxruntime refuses to create a session whose graph needs host copies (Memcpy
        nodes: values that would be replayed stale) or other providers (CaptureRefused), and it frees the
        pinned staging buffers of a run after a stream synchronisation instead of from a host callback on
        the stream, which a capture would record and every replay would run again (a double free); that
        synchronisation fails under capture, which turns the graph off cleanly."""
        return {
            "CUDAExecutionProvider": {
                "device_id": "0",
                "user_compute_stream": str(self.stream.ptr),
                "has_user_compute_stream": "1",
                "enable_cuda_graph": "1" if capture else "0",
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "EXHAUSTIVE",  # once, during warm-up, before any capture
            }
        }

    def _backend(self, precision: str, fused: bool, capture: bool):
        from .backends.onnxruntime import OnnxRuntimeBackend

        options = self.provider_options(capture)
        return OnnxRuntimeBackend(precision, self.providers, fused=fused, provider_options=options)

    def _address(self, ptr: int, nbytes: int) -> int:
        """The address onnxruntime is given for ``nbytes`` at device address ``ptr`` (the same, on a GPU)."""
        return ptr

    def _outside(self, req: Request) -> str:
        p = self.profile
        return (
            f"batch {req.batch} at {req.width}x{req.height} is larger than this pipeline's buffers (batch up to "
            f"{p.batch[2]}, up to {p.width[2]}x{p.height[2]}); open it with a larger shape "
            f"(open_pipeline(..., shape=(batch, height, width)) or `--batch`/`--size`)"
        )
