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
