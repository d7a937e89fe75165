"""The ONNX Runtime CUDA runtime's orchestration on the CPU: OrtCudaPipeline on an emulated GPU.

Its sessions are the CPU provider's on the same fp16 ONNX, bound by IO binding to the host memory behind the
emulated device buffers (tests/engine/emulated_gpu.py); runs and kernels are enqueued on the emulated stream,
captured and replayed. So every image must equal the host pipeline's bit for bit: a wrong binding, shape,
offset, buffer size, cast, step order or stale buffer shows. The real GPU path is
tests/engine/test_gpu_onnxruntime.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.errors import BundleError, InputError
from sdturbo.engine.pipeline import Pipeline

from tests.engine.emulated_gpu import EmulatedCuda, emulated_ort_pipeline

PROMPTS = ["a red cube on a table", "an astronaut riding a horse"]
SHAPE = (2, 128, 128)  # the largest request: every buffer is allocated for it


@pytest.fixture(scope="module", params=["sd-turbo", "sdxl-turbo"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipes(tiny_bundle, xl_bundle, family):
    path = {"sd-turbo": tiny_bundle, "sdxl-turbo": xl_bundle}[family]
    cuda = EmulatedCuda()
    return {
        "graph": emulated_ort_pipeline(path, cuda, shape=SHAPE, cuda_graph=True),
        "plain": emulated_ort_pipeline(path, cuda, shape=SHAPE, cuda_graph=False),
        "host": Pipeline(path, OnnxRuntimeBackend("fp16")),
    }


@pytest.mark.parametrize("steps", [1, 4])
def test_txt2img_equals_the_host_pipeline(pipes, steps):
    kw = dict(steps=steps, height=64, width=96, seed=11)
    want = pipes["host"](PROMPTS, **kw)
    for mode in ("graph", "plain"):
        np.testing.assert_array_equal(pipes[mode](PROMPTS, **kw), want, err_msg=mode)
    assert want.std() > 0  # an image, not a constant
    assert pipes["graph"].graph_status == "on"


def test_img2img_equals_the_host_pipeline(pipes):
    image = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    kw = dict(steps=4, height=64, width=64, image=image, strength=0.5, seed=9)
    want = pipes["host"](PROMPTS, **kw)
    np.testing.assert_array_equal(pipes["graph"](PROMPTS, **kw), want)
    np.testing.assert_array_equal(pipes["plain"](PROMPTS, **kw), want)


def test_interleaved_requests_leave_no_stale_state(pipes):
    """Prompts, seeds, sizes (up to the allocated maximum), batches and steps in turn, twice over: each
    replayed graph equals the host pipeline, so nothing from an earlier request leaks into a later one."""
    calls = [
        (PROMPTS, 1, 64, 96, 1),
        (PROMPTS[:1], 2, 64, 64, 2),
        (PROMPTS, 3, 128, 128, 1),
        (PROMPTS[::-1], 1, 64, 96, 1),
    ]
    graph = pipes["graph"]
    captured = []
    for _ in range(3):  # round 1 fills the prompt cache; round 2 captures its hits' graphs too
        for prompts, seed, h, w, steps in calls:
            got = graph(prompts, height=h, width=w, seed=seed, steps=steps)
            np.testing.assert_array_equal(got, pipes["host"](prompts, height=h, width=w, seed=seed, steps=steps))
        captured.append(set(graph.graphs))
    assert captured[1] == captured[2]  # the third round only replays


def test_a_captured_request_replays_without_enqueueing_again(pipes, monkeypatch):
    graph = pipes["graph"]
    graph(PROMPTS, height=64, width=64, seed=1)  # then a prompt-cache hit: its graph is captured next
    want = graph(PROMPTS, height=64, width=64, seed=1)
    calls = graph.graphs.copy()

    def no_enqueue(*args):
        raise AssertionError("a request with a captured graph enqueued the chain from Python again")

    monkeypatch.setattr(graph, "_enqueue", no_enqueue)
    np.testing.assert_array_equal(graph(PROMPTS, height=64, width=64, seed=1), want)
    assert graph.graphs == calls


def test_requests_beyond_the_buffers_are_refused(pipes):
    with pytest.raises(BundleError, match="larger than this pipeline's buffers"):
        pipes["graph"](PROMPTS, height=256, width=64)
    with pytest.raises(BundleError, match="larger than this pipeline's buffers"):
        pipes["graph"](PROMPTS * 2, height=64, width=64)


def test_sessions_run_on_the_pipelines_stream_without_a_sync(pipes):
    pipe = pipes["graph"]
    options = pipe.provider_options()["CUDAExecutionProvider"]
    assert options["user_compute_stream"] == str(pipe.stream.ptr)
    assert options["enable_cuda_graph"] == "1"  # for its checks: every run opts out of onnxruntime's own capture
    run_options = next(iter(pipe.engines.values())).run_options
    assert run_options.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    assert run_options.get_run_config_entry("gpu_graph_id") == "-1"


def test_a_shape_outside_the_bundle_is_refused_when_opened(tiny_bundle):
    with pytest.raises(InputError, match="height range"):
        emulated_ort_pipeline(tiny_bundle, shape=(1, 100, 64))
    with pytest.raises(InputError, match="precision 'int8'"):
        emulated_ort_pipeline(tiny_bundle, precision="int8")


def test_a_capture_that_fails_turns_the_graph_off_loudly(tiny_bundle, caplog):
    """ONNX Runtime may refuse work under a capture (an allocation, a host copy): the request still
    succeeds, enqueue by enqueue, with a warning, and ``graph_status`` says why."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)
    stream_type = type(pipe.stream)
    plain = stream_type.enqueue

    def refuse_under_capture(self, fn):
        if self.recording is not None:
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
        plain(self, fn)

    stream_type.enqueue = refuse_under_capture
    try:
        with caplog.at_level("WARNING"):
            image = pipe(PROMPTS, height=64, width=64, seed=1)
            again = pipe(PROMPTS, height=64, width=64, seed=1)
    finally:
        stream_type.enqueue = plain
    assert not pipe.graphs and pipe.graph_status.startswith("off: capturing the chain failed: CUDA failure 900")
    assert any("CUDA graph OFF" in r.message for r in caplog.records)
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=1)
    np.testing.assert_array_equal(image, want)
    np.testing.assert_array_equal(again, want)


@pytest.mark.parametrize("broken", ["skips the UNet", "replays the first step only"])
def test_a_graph_whose_replay_differs_is_never_used(tiny_bundle, caplog, broken):
    """A graph that does not recompute what the eager run computed (here: one that leaves out the UNet's
    runs, or stops after the first of 2 steps) is caught on its first replay, against the eager pixels, and
    dropped: the image comes from the eager chain, and the graph is off, with the reason."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)
    unet = pipe.engines["unet"]
    real_graph = cuda.Graph

    class BrokenGraph(real_graph):
        def __init__(self, stream, fn):
            super().__init__(stream, fn)
            if broken == "skips the UNet":
                self.ops = [op for op in self.ops if getattr(op, "__closure__", None) is None or unet not in _cells(op)]
            else:
                self.ops = self.ops[: len(self.ops) // 2]

    cuda.Graph = BrokenGraph
    with caplog.at_level("WARNING"):
        image = pipe(PROMPTS, height=64, width=64, seed=3, steps=2)
    assert not pipe.graphs and "differ from the eager run" in pipe.graph_status
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=3, steps=2)
    np.testing.assert_array_equal(image, want)


def _cells(fn) -> list:
    """What a recorded op's closure holds, one level into the context it was enqueued by."""
    out = []
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        out.append(value)
        out.append(getattr(value, "component", None))
    return out


def test_a_graph_replaying_a_value_computed_at_capture_is_never_used(tiny_bundle, caplog):
    """The failure a replay of the same request cannot show: a step that ran on the host during the capture
    (here the text encoder, whose hidden states the graph then restores as they were at capture) replays
    correctly for the inputs it was captured with only. The probe request (other prompts, other noise)
    catches it, and the image comes from the eager chain."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)
    text_encoder = pipe.engines["text_encoder"]
    stream_type = type(pipe.stream)
    plain = stream_type.enqueue

    def host_step_under_capture(self, fn):
        if self.recording is None or text_encoder not in _cells(fn):
            return plain(self, fn)
        fn()  # runs now, on the inputs in the buffers at capture time
        hidden = cuda.memory.view(pipe.dev["hidden"].ptr, pipe.dev["hidden"].nbytes)
        snapshot = hidden.copy()
        self.recording.append(lambda: hidden.__setitem__(slice(None), snapshot))

    stream_type.enqueue = host_step_under_capture
    try:
        with caplog.at_level("WARNING"):
            image = pipe(PROMPTS, height=64, width=64, seed=5)
    finally:
        stream_type.enqueue = plain
    assert not pipe.graphs and "differ from the eager run's on the request" in pipe.graph_status
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=5)
    np.testing.assert_array_equal(image, want)


def test_stage_times_cover_every_stage_and_leave_the_next_image_alone(pipes):
    """The benchmark's per-stage times for a device pipeline: one eager run with events between the stages."""
    pipe = pipes["graph"]
    want = pipe(PROMPTS, height=64, width=64, seed=4, steps=2)
    times = pipe.stage_times(pipe.request(PROMPTS, height=64, width=64, seed=4, steps=2))
    assert set(times) == {"text_encoder", "scheduler", "unet", "vae_decoder", "other"}
    assert all(v >= 0 for v in times.values()) and times["unet"] > 0
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=4, steps=2), want)


def test_onnxruntime_cuda_without_onnxruntime_gpu_says_how_to_install_it(tiny_bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from sdturbo.engine.errors import BackendError

    with pytest.raises(BackendError, match=r"lacks CUDAExecutionProvider.*pip install 'sdturbo\[cuda\]'"):
        OnnxRuntimeBackend("fp16", ("CUDAExecutionProvider",))


def test_a_session_onnxruntime_refuses_for_cuda_graphs_turns_the_graph_off(tiny_bundle, monkeypatch, caplog):
    """onnxruntime refuses to create a session with ``enable_cuda_graph`` when its graph needs host copies
    (values a replay would reuse stale): that component is opened without it, the chain runs enqueue by
    enqueue, and ``graph_status`` names the component."""
    from sdturbo.engine.errors import CaptureRefused

    opened = []
    session = OnnxRuntimeBackend.session

    def refuse_unet(self, bundle, component):
        capture = self.provider_options.get("CUDAExecutionProvider", {}).get("enable_cuda_graph") == "1"
        opened.append((component, capture))
        if component == "unet" and capture:
            raise CaptureRefused("onnxruntime will not run unet under a CUDA graph: ... have not been partitioned")
        return session(self, bundle, component)

    monkeypatch.setattr(OnnxRuntimeBackend, "session", refuse_unet)
    with caplog.at_level("WARNING"):
        pipe = emulated_ort_pipeline(tiny_bundle, shape=SHAPE)
    assert ("unet", True) in opened and ("unet", False) in opened and ("text_encoder", False) not in opened
    assert pipe.graph_status.startswith("off: onnxruntime refuses CUDA graphs for unet")
    image = pipe(PROMPTS, height=64, width=64, seed=2)
    assert not pipe.graphs
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=2)
    np.testing.assert_array_equal(image, want)
