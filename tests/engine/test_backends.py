"""Backend selection on the CPU: a GPU backend that would quietly run on the CPU is refused."""

from __future__ import annotations

import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import BackendError


def test_a_cuda_session_that_falls_back_to_the_cpu_is_refused(tiny_bundle, monkeypatch):
    """ONNX Runtime, asked for CUDA where the CUDA provider cannot load, makes a CPU session and says so only
    in a log line. Here the provider is listed but cannot load (the CPU build), as with a missing cuDNN."""
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    backend = OnnxRuntimeBackend("fp32", ("CUDAExecutionProvider",))
    with pytest.raises(BackendError, match="could not use CUDA for text_encoder"):
        backend.load(Bundle(tiny_bundle), "text_encoder")
