"""Backends run the bundle's components. ``create_backend`` picks one by name ("auto" picks the best here)."""

from __future__ import annotations

import logging

from ..errors import BackendError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime")


def create_backend(name: str = "auto", precision: str | None = None):
    """A backend by name. On a CPU the default precision is fp32 (fp16 is slow there)."""
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r} is not known; allowed: {', '.join(BACKENDS)}")
    if precision not in (None, "fp32", "fp16"):
        raise BackendError(f"precision {precision!r} is not allowed; use fp32 or fp16")
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(precision=precision or "fp32")
