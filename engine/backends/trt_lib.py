"""One import point for both TensorRT flavours: ``tensorrt`` (10.x/11.x) and ``tensorrt_rtx``.

Their Python APIs are nearly the same; the differences this project meets are handled here.
"""

from __future__ import annotations

import importlib
import logging

from packaging.version import Version

from ..errors import BackendError

log = logging.getLogger(__name__)
FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = {"tensorrt": "pip install 'sdturbo[tensorrt]'", "tensorrt-rtx": "pip install 'sdturbo[tensorrt-rtx]'"}


def import_trt(flavour: str | None = None):
    """(module, flavour). ``None`` takes ``tensorrt`` when it is a real install, else ``tensorrt_rtx``."""
    if flavour is not None and flavour not in FLAVOURS:
        raise BackendError(f"--trt {flavour!r} is not known; allowed: {', '.join(FLAVOURS)}")
    errors = []
    for name in [flavour] if flavour else list(FLAVOURS):
        try:
            trt = importlib.import_module(FLAVOURS[name])
            if not hasattr(trt, "Builder"):  # PyPI's 'tensorrt' stub without the real bindings
                raise ImportError(f"{FLAVOURS[name]} has no Builder (an incomplete install)")
        except Exception as e:  # a broken install raises more than ImportError
            errors.append(f"{name}: {e}")
            continue
        if name == "tensorrt" and not Version("10") <= Version(trt.__version__) < Version("12"):
            errors.append(f"tensorrt {trt.__version__} is not supported (use 10.x or 11.x)")
            continue
        return trt, name
    hint = INSTALL[flavour] if flavour else f"{INSTALL['tensorrt']} or {INSTALL['tensorrt-rtx']}"
    raise BackendError(f"no usable TensorRT ({'; '.join(errors)}); {hint}")


def network_flags(trt) -> int:
    """Strongly typed networks: precision comes from the ONNX. (TensorRT 11 and RTX are always strongly typed.)"""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def compute_capability_enum(trt, cc: int):
    """TensorRT-RTX's ComputeCapability member for e.g. 86, or an error listing the ones it has."""
    name = f"SM{cc}"
    members = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
    if name not in members:
        allowed = ", ".join(m[2:] for m in members)
        raise BackendError(
            f"compute capability {cc} is not a target of {trt.__name__} {trt.__version__}; allowed: {allowed}"
        )
    return trt.ComputeCapability.__members__[name]


def unsupported_here(trt, flavour: str, compute_capability: int) -> str | None:
    """Why engines of ``flavour`` cannot run on a GPU of ``compute_capability`` (None: they can).

    TensorRT-RTX runs only on the GPUs its ``ComputeCapability`` enum names (RTX GPUs; SM80 too). Measured on
    an H100 (SM90) with 1.7.1: an engine built there with CURRENT is refused at load with "The engine cannot
    run on this GPU, which has compute capability 9.0. Supported compute capabilities: None"."""
    if flavour != "tensorrt-rtx":
        return None
    members = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
    if f"SM{compute_capability}" in members:
        return None
    return (
        f"{trt.__name__} {trt.__version__} does not run on compute capability {compute_capability / 10:.1f} "
        f"(it runs on {', '.join(f'{int(m[2:]) / 10:.1f}' for m in members)}); on this GPU use "
        f"--backend onnxruntime-cuda, or TensorRT 10/11 from NVIDIA"
    )


class Logger:
    """A TensorRT logger that forwards to Python logging (created once per process: TensorRT keeps the first)."""

    _instance = None

    @classmethod
    def get(cls, trt):
        if cls._instance is None:

            class _Logger(trt.ILogger):
                def log(self, severity, msg):
                    level = {
                        trt.ILogger.INTERNAL_ERROR: logging.ERROR,
                        trt.ILogger.ERROR: logging.ERROR,
                        trt.ILogger.WARNING: logging.WARNING,
                        trt.ILogger.INFO: logging.DEBUG,
                    }
                    log.log(level.get(severity, logging.DEBUG), "[TRT] %s", msg)

            cls._instance = _Logger()
            trt.ILogger.__init__(cls._instance)
        return cls._instance
