"""Open the right pipeline for this machine: TensorRT, ONNX Runtime on CUDA, or ONNX Runtime on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

from .bundle import Bundle
from .errors import BackendError, InputError
from .prompt_cache import DEFAULT_SIZE as DEFAULT_PROMPT_CACHE

log = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime")


def choose_backend(requested: str = "auto") -> str:
    """The backend a request for ``requested`` runs on here. Probes the GPU only when called."""
    if requested not in BACKENDS:
        raise BackendError(f"backend {requested!r} is not known; allowed: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    from .cuda import gpu_available

    try:
        if not gpu_available():
            _say_why_not_the_gpu()
            return "onnxruntime"
    except BackendError:  # no cuda-python: no GPU backend either
        return "onnxruntime"
    try:
        from .backends.trt_lib import import_trt, unsupported_here
        from .cuda import current_compute_capability

        trt, flavour = import_trt()
        why = unsupported_here(trt, flavour, current_compute_capability())
        if why is None:
            return "tensorrt"
        log.info("not using TensorRT: %s", why)
    except BackendError:
        pass
    why = _ort_cuda_problem()
    if why is None:
        return "onnxruntime-cuda"
    log.warning("a CUDA GPU is here, but %s: running on the CPU", why)
    return "onnxruntime"


def _say_why_not_the_gpu() -> None:
    """Where the NVIDIA driver loads but its GPU cannot be used (no cuda-python, a driver older than this CUDA, no
    device visible), ``auto`` says why as it takes the CPU: seconds where the GPU takes milliseconds. Without a
    driver (a machine with no NVIDIA GPU) it says nothing."""
    from .cuda import driver_unloadable, gpu_problem

    if driver_unloadable() is None:
        log.warning("an NVIDIA driver is here, but its GPU cannot be used (%s): running on the CPU", gpu_problem())


GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda")


def check_gpu_backend(backend: str) -> None:
    """A GPU backend asked for where no GPU can be used fails now, in one line, before a model is exported or
    loaded for it."""
    if backend not in GPU_BACKENDS:
        return
    from .cuda import gpu_problem

    why = gpu_problem()
    if why is not None:
        raise BackendError(
            f"--backend {backend} needs an NVIDIA GPU, and none can be used here ({why}); "
            f"--backend onnxruntime runs on the CPU (auto picks it where there is no GPU)"
        )


def _ort_cuda_problem() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, with how to mend it; None if it can."""
    from .backends.onnxruntime import cuda_provider_hint, import_onnxruntime

    try:
        onnxruntime = import_onnxruntime()
    except BackendError as e:
        return str(e)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return None
    return f"onnxruntime {onnxruntime.__version__} here has no CUDA provider ({cuda_provider_hint()})"


def default_precision(backend: str) -> str:
    """fp16 on GPUs (TensorRT builds from the fp16 ONNX); fp32 on a CPU, where fp16 is slow."""
    return "fp32" if backend == "onnxruntime" else "fp16"


def open_pipeline(
    bundle: str | Path | Bundle,
    backend: str = "auto",
    precision: str | None = None,
    shape: tuple[int, int, int] = (1, 512, 512),
    build: bool = True,
    cuda_graph: bool | str = True,
    fused: bool = True,
    vae: str = "full",
    prompt_cache=DEFAULT_PROMPT_CACHE,
    any_batch: bool = False,
    nhwc: bool = False,
):
    """A loaded pipeline for ``bundle``. ``vae``: "full" (the default) or "tiny" (the bundle's tiny autoencoder);
    ``prompt_cache``: prompts whose text-encoder outputs are kept (0: off), or a PromptCache to share.
    With TensorRT and ``build``, engines missing for ``shape``
    (batch, height, width) are built first (static profile; with ``any_batch``, the batch range 1 to its
    batch, for servers), then loaded. On ONNX Runtime CUDA, ``shape``
    is the largest request: the device-resident pipeline allocates its buffers for it once, and
    ``cuda_graph`` may also be "sessions" (onnxruntime's own graph per session, not the whole chain's). ``fused``: ONNX
    Runtime runs the bundle's `--ort-optimize` graphs where valid (False: the plain graphs). ``nhwc``: ONNX Runtime
    CUDA's ``prefer_nhwc`` (channels-last convolutions; not allowed on other backends)."""
    backend = choose_backend(backend)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    modes = {"vae": vae, "prompt_cache": prompt_cache}
    if precision not in (None, "fp32", "fp16"):
        raise InputError(f"precision {precision!r} is not allowed; use 'fp32' or 'fp16' (None: the backend's default)")
    if nhwc and backend != "onnxruntime-cuda":
        raise InputError(f"nhwc is an ONNX Runtime CUDA setting; backend {backend!r} does not take it")
    if backend == "tensorrt":
        if precision not in (None, "fp16"):
            raise BackendError(f"TensorRT engines are built from the fp16 ONNX; precision {precision!r} is not allowed")
        from .trt_pipeline import TrtPipeline

        return TrtPipeline.open(bundle, shape, any_batch=any_batch, build=build, cuda_graph=cuda_graph, **modes)
    if backend == "onnxruntime-cuda":
        from .ort_pipeline import OrtCudaPipeline

        return OrtCudaPipeline(
            bundle, precision or "fp16", shape=shape, cuda_graph=cuda_graph, fused=fused, nhwc=nhwc, **modes
        )
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .pipeline import Pipeline

    return Pipeline(bundle, OnnxRuntimeBackend(precision or default_precision(backend), fused=fused), **modes)
