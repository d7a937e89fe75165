"""ONNX Runtime backend: the CPU execution provider (the embedded default and the test suite's runtime)."""

from __future__ import annotations

import logging

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError, BundleError, CaptureRefused
from .ort_cache import load_session
from .ort_optimized import find_optimized, provider_key

log = logging.getLogger(__name__)

# Distributions that install the same ``onnxruntime`` module. Two of them in one environment share its files: pip
# keeps each one's record and the files of the one it wrote last (measured, onnxruntime and onnxruntime-gpu
# 1.31.1 in one `pip install`: the CPU one's, so no CUDA provider), and uninstalling either then removes the
# module's code, leaving an empty package for both.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)
INSTALL_HINT = "pip install 'sdturbo[cpu]' (or 'sdturbo[cuda]' for an NVIDIA GPU; never both)"


def ort_distributions() -> list[str]:
    """Those of ORT_DISTRIBUTIONS installed here."""
    from importlib import metadata

    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _reinstall_gpu(found: list[str]) -> str:
    return f"pip uninstall -y {' '.join(found or ['onnxruntime'])} && pip install 'onnxruntime-gpu[cuda,cudnn]'"


def import_onnxruntime():
    """The onnxruntime module, or a BackendError saying how to install it (missing), or how to mend it (the empty
    package two distributions leave when one of them is uninstalled)."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendError(f"onnxruntime is not installed: {INSTALL_HINT}") from e
    if not hasattr(onnxruntime, "get_available_providers"):
        found = ort_distributions()
        raise BackendError(
            f"onnxruntime here is broken: its folder {list(getattr(onnxruntime, '__path__', []))} holds no module "
            f"(what is left when one of two onnxruntime packages installed together is uninstalled; installed: "
            f"{', '.join(found) or 'none'}); reinstall one: pip uninstall -y {' '.join(found or ['onnxruntime'])} "
            f"&& {INSTALL_HINT}"
        )
    return onnxruntime


def cuda_provider_hint() -> str:
    """How to get onnxruntime's CUDA provider here: the words for the end of an error."""
    found = ort_distributions()
    if len(found) > 1:
        together = f"{' and '.join(found)} are both" if len(found) == 2 else f"{', '.join(found)} are all"
        return (
            f"{together} installed: they install the same module, and the one here is not onnxruntime-gpu's; "
            f"uninstalling one alone breaks it, so: {_reinstall_gpu(found)}"
        )
    if found == ["onnxruntime-gpu"]:  # its record, another build's files (a copy earlier on the path)
        import onnxruntime

        return (
            f"onnxruntime-gpu is installed, but the module imported ({onnxruntime.__file__}) is another build: "
            f"{_reinstall_gpu(found)}"
        )
    return f"for CUDA install onnxruntime-gpu in place of {' '.join(found) or 'it'}: {_reinstall_gpu(found)}"


class OrtStage:
    def __init__(self, session, input_dtypes: dict[str, np.dtype]):
        self._session = session
        self._dtypes = input_dtypes

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        feeds = {k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in inputs.items()}
        outputs = self._session.run(None, feeds)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class OrtCudaStage(OrtStage):
    """CUDA execution provider with IO binding: the output stays on the device until it is read back."""

    def __init__(self, session, input_dtypes: dict[str, np.dtype]):
        super().__init__(session, input_dtypes)
        self._outputs = [o.name for o in session.get_outputs()]

    def __call__(self, **inputs: np.ndarray):
        binding = self._session.io_binding()
        for k, v in inputs.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v, dtype=self._dtypes[k]))
        for name in self._outputs:
            binding.bind_output(name, "cuda")
        self._session.run_with_iobinding(binding)
        outputs = binding.copy_outputs_to_cpu()
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class OnnxRuntimeBackend:
    """Runs the bundle's ONNX with onnxruntime on the given execution providers."""

    name = "onnxruntime"

    def __init__(
        self,
        precision: str = "fp32",
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        threads: int = 0,
        cache_optimized: bool = True,
        fused: bool = True,
        provider_options: dict[str, dict[str, str]] | None = None,
    ):
        """``cache_optimized``: on the CPU, keep onnxruntime's optimized graphs in the bundle (ort_cache.py).
        ``fused``: run the transformer-optimized graphs that `sdturbo build --ort-optimize` wrote for this
        onnxruntime and provider where the bundle has valid ones (ort_optimized.py), else the plain graphs.
        They compute the same function with fused kernels; `sdturbo check --optimized` measures how close.
        ``provider_options``: per provider name, its options (the device pipeline's CUDA stream)."""
        onnxruntime = import_onnxruntime()
        missing = [p for p in providers if p not in onnxruntime.get_available_providers()]
        if missing:
            how = f"; {cuda_provider_hint()}" if "CUDAExecutionProvider" in missing else ""
            raise BackendError(
                f"onnxruntime {onnxruntime.__version__} here lacks {', '.join(missing)}; it has "
                f"{', '.join(onnxruntime.get_available_providers())}{how}"
            )
        if "CUDAExecutionProvider" in providers and hasattr(onnxruntime, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN from NVIDIA's pip packages only once they are loaded
            # (importing torch does it too; a lean runtime has no torch).
            try:
                onnxruntime.preload_dlls()
            except Exception as e:  # the session's own check below says what is missing
                log.debug("onnxruntime.preload_dlls: %s", e)
        self._ort = onnxruntime
        self.name = "onnxruntime-cuda" if "CUDAExecutionProvider" in providers else "onnxruntime"
        self.precision = precision
        self.providers = providers
        self.threads = threads
        self.cache_optimized = cache_optimized and providers == ("CPUExecutionProvider",)
        self.fused = fused
        self.provider_options = provider_options or {}
        self.graphs: dict[str, str] = {}  # component -> the graph its session runs ("optimized" or "plain")

    def _session(self, bundle: Bundle, comp, opts):
        providers = [(p, self.provider_options[p]) if p in self.provider_options else p for p in self.providers]
        if self.fused:
            key = provider_key(self.providers)
            fused = find_optimized(bundle, comp.spec.name, self._ort.__version__, key, self.precision)
            if fused is not None:
                log.info("%s: the optimized graph for %s (%s)", comp.spec.name, key, fused)
                self.graphs[comp.spec.name] = "optimized"
                return self._ort.InferenceSession(str(fused), opts, providers=providers)
        self.graphs[comp.spec.name] = "plain"
        if not self.cache_optimized:
            return self._ort.InferenceSession(str(comp.onnx), opts, providers=providers)
        return load_session(self._ort, opts, bundle, comp, self._ort.__version__, self.precision, providers)

    def load(self, bundle: Bundle, component: str) -> OrtStage:
        session = self.session(bundle, component)
        dtypes = {t.name: np.dtype(t.dtype) for t in bundle.component(self.precision, component).spec.inputs}
        cuda = "CUDAExecutionProvider" in session.get_providers()
        return (OrtCudaStage if cuda else OrtStage)(session, dtypes)

    def session(self, bundle: Bundle, component: str):
        """The checked onnxruntime session of ``component``: on CUDA when CUDA was asked for, else an error."""
        comp = bundle.component(self.precision, component)
        opts = self._ort.SessionOptions()
        opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        if self.providers == ("CPUExecutionProvider",):
            # Each session has its own worker threads, which by default spin a while after each run, taking the
            # cores from the next session (and from anything else in the process). Off: measured on 2 cores, fp32,
            # random:tiny 256x256 1 step 56 -> 35 ms, 512x512 4 steps 614 -> 561 ms, random:sdxl-tiny 256x256
            # 2 steps 74 -> 47 ms, full-size random:sd-turbo 256x256 4.68 -> 4.64 s (medians).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = self._session(bundle, comp, opts)
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            # onnxruntime's words: nodes on other providers (host copies), or control flow nodes
            if "graph capture feature" in str(e) or "CUDA Graph feature" in str(e):
                raise CaptureRefused(f"onnxruntime will not run {component} under a CUDA graph: {e}") from e
            raise BundleError(f"cannot load {comp.onnx}: {e}; the file is corrupt, {bundle.export_hint}") from e
        log.debug("loaded %s (%s) on %s", component, self.precision, session.get_providers())
        if "CUDAExecutionProvider" in self.providers and "CUDAExecutionProvider" not in session.get_providers():
            # ONNX Runtime falls back to the CPU when the CUDA provider fails to load (a missing cuDNN or
            # CUDA library); a GPU backend that quietly runs on the CPU is refused instead.
            raise BackendError(
                f"onnxruntime could not use CUDA for {component} (the session runs on {session.get_providers()}); "
                "see onnxruntime's messages above for the library it could not load "
                "(onnxruntime-gpu needs CUDA 12/13 and cuDNN 9: pip install 'sdturbo[cuda]')"
            )
        return session
