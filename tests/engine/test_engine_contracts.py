"""Engine behaviours no other test pinned down (found by a mutation-testing pass): how an engine profile is named,
``auto``'s choice on a GPU without a usable TensorRT, and which truncation warnings are remembered."""

from __future__ import annotations

import pytest
from sdturbo.engine.errors import BackendError

# --- engine_store.Profile: sizes named as --size takes them, width x height ------------------------------------


@pytest.mark.parametrize(
    "batch,size,tag",
    [
        ("1", "768x512", "b1_768x512"),
        ("1", "512x768", "b1_512x768"),
        ("1-4", "512x256", "b1-4_512x256"),
        ("2", "256-1024", "b2_256-1024x256-1024"),
    ],
)
def test_a_profiles_tag_names_its_sizes_as_size_takes_them(batch, size, tag):
    """``--size WxH`` (README); the profile's folder and the messages naming it say the sizes the same way, so
    a 768-wide, 512-high profile is ``..._768x512`` and not the 512-wide, 768-high one."""
    from sdturbo.engine.engine_store import Profile

    p = Profile.parse(batch, size)
    if "x" in size:
        w, h = (int(s) for s in size.split("x"))
        assert (p.width[2], p.height[2]) == (w, h)
    assert p.tag == tag


def test_two_transposed_profiles_have_distinct_tags():
    from sdturbo.engine.engine_store import Profile

    wide, tall = Profile.parse("1", "768x512"), Profile.parse("1", "512x768")
    assert wide.tag != tall.tag and wide.tag.endswith(f"{wide.width[0]}x{wide.height[0]}")


# --- runtime.choose_backend: a GPU, no usable TensorRT ----------------------------------------------------------


@pytest.fixture
def gpu_without_tensorrt(monkeypatch):
    """A GPU is there; no TensorRT can be imported."""
    from sdturbo.engine import cuda
    from sdturbo.engine.backends import trt_lib

    def no_trt(flavour=None):
        raise BackendError("no TensorRT here")

    monkeypatch.setattr(cuda, "gpu_available", lambda: True)
    monkeypatch.setattr(trt_lib, "import_trt", no_trt)
    return monkeypatch


def test_auto_without_tensorrt_or_onnxruntime_gpu_runs_on_the_cpu(gpu_without_tensorrt):
    """``auto``: TensorRT, else ONNX Runtime on CUDA, else ONNX Runtime on the CPU (engine/runtime.py). A GPU
    with neither TensorRT nor the CUDA provider (onnxruntime, not onnxruntime-gpu) leaves the CPU."""
    import onnxruntime
    from sdturbo.engine import runtime

    gpu_without_tensorrt.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert runtime.choose_backend("auto") == "onnxruntime"
    assert runtime.default_precision(runtime.choose_backend("auto")) == "fp32"


def test_auto_without_tensorrt_takes_onnxruntime_cuda_where_it_has_the_provider(gpu_without_tensorrt):
    import onnxruntime
    from sdturbo.engine import runtime

    gpu_without_tensorrt.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert runtime.choose_backend("auto") == "onnxruntime-cuda"


# --- tokenizer.Warned: the latest WARNED truncations, each warned of once while among them ----------------------


def test_warned_remembers_the_latest_and_forgets_the_oldest():
    """``first`` is True the first time a key comes while it is among the latest ``WARNED``: a new key is
    remembered (not warned of twice in a row), and room is made by forgetting the oldest."""
    from sdturbo.engine.tokenizer import WARNED, Warned

    w = Warned()
    keys = [("prompt", i) for i in range(WARNED)]
    assert all(w.first(k) for k in keys)
    assert not any(w.first(k) for k in keys)  # all WARNED of them remembered
    assert w.first(("new", 0))  # one more: the oldest, keys[0], is forgotten
    assert not w.first(("new", 0))
    assert not w.first(keys[-1])
    assert w.first(keys[0])  # forgotten, so warned of again (now the newest; keys[1] goes)
    assert w.first(keys[1])
    assert not w.first(("new", 0)) and not w.first(keys[0])


def test_a_prompt_truncated_again_after_many_others_is_warned_of_once_per_run(tiny_bundle, caplog):
    """With more than ``WARNED`` distinct truncations, the latest one is still remembered: asked again at once, it
    is not warned of a second time."""
    import logging

    from sdturbo.engine.bundle import Bundle
    from sdturbo.engine.tokenizer import WARNED, PromptTokenizer

    b = Bundle(tiny_bundle)
    t = PromptTokenizer(b.tokenizer_file, b.max_length, b.pad_id, b.pad_token)
    long = " ".join(["cat"] * (2 * b.max_length))
    prompts = [f"{long} number {i}" for i in range(WARNED + 1)]
    with caplog.at_level(logging.WARNING):
        for p in prompts:
            t([p])
        caplog.clear()
        t([prompts[-1]])
    assert "longer than the text encoder" not in caplog.text
