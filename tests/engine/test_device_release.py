"""What a device pipeline takes from the GPU goes back: by close(), or when the pipeline is collected.

engine/cuda.py's own DeviceBuffer, PinnedArray, Stream and Event run here on the emulated runtime of
tests/engine/emulated_gpu.py, which counts what is live and refuses a double free, the free of an address it
never gave, and a free during a capture (kept in ``faults`` too, as a finalizer swallows what it raises).
"""

from __future__ import annotations

import gc
import shutil
import weakref

import numpy as np
import pytest
from sdturbo.engine.engine_store import Profile
from sdturbo.engine.errors import BackendError

from tests.engine.emulated_gpu import EmulatedCuda, emulated_ort_pipeline, emulated_pipeline

SHAPE = (2, 64, 64)
NOTHING = {"cudaMalloc": 0, "cudaMallocHost": 0, "stream": 0, "event": 0}
KINDS = ["ort-chain", "ort-sessions", "ort-plain", "tensorrt"]


def held(cuda: EmulatedCuda) -> dict[str, int]:
    gc.collect()
    assert cuda.runtime.faults == []
    return cuda.live()


# -- engine/cuda.py ------------------------------------------------------------------------------


def make_each(cuda: EmulatedCuda) -> list:
    return [cuda.DeviceBuffer(100), cuda.PinnedArray((2, 3), np.float16), cuda.Stream(), cuda.Event()]


def test_each_kind_goes_back_when_collected():
    cuda = EmulatedCuda()
    each = make_each(cuda)
    assert cuda.live() == {"cudaMalloc": 1, "cudaMallocHost": 1, "stream": 1, "event": 1}
    del each
    assert held(cuda) == NOTHING


def test_free_gives_back_once_and_the_collection_after_it_nothing():
    cuda = EmulatedCuda()
    each = make_each(cuda)
    for thing in each:
        thing.free()
        thing.free()
    assert cuda.live() == NOTHING
    del each, thing
    assert held(cuda) == NOTHING  # no fault: nothing freed twice


def test_the_emulation_refuses_a_double_free_and_an_unknown_handle():
    cuda = EmulatedCuda()
    rt = cuda.runtime
    ptr = rt.cudaMalloc(64)[1]
    rt.cudaFree(ptr)
    for call, arg in ((rt.cudaFree, ptr), (rt.cudaFree, 0x1234), (rt.cudaFreeHost, 0x1234)):
        with pytest.raises(RuntimeError, match="freed already, or never allocated"):
            call(arg)
    stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)[1]
    rt.cudaStreamDestroy(stream)
    with pytest.raises(RuntimeError, match="not a live stream"):
        rt.cudaStreamDestroy(stream)
    assert len(rt.faults) == 4


def test_a_freed_pinned_array_cannot_be_read_and_its_views_keep_it_until_they_go():
    cuda = EmulatedCuda()
    pinned = cuda.PinnedArray((4,), np.float32)
    pinned.free()
    with pytest.raises(BackendError, match="freed"):
        pinned.array  # noqa: B018
    pinned = cuda.PinnedArray((4,), np.float32)
    view = pinned.array[1:]
    del pinned
    assert held(cuda)["cudaMallocHost"] == 1  # collected, but a view still reads it: kept
    del view
    assert held(cuda) == NOTHING


def test_what_is_collected_during_a_capture_goes_back_at_its_end():
    """A free during a capture would invalidate it: it waits for ``capturing()``'s end."""
    cuda = EmulatedCuda()
    stream, buffer = cuda.Stream(), cuda.DeviceBuffer(64)
    with cuda.capturing():
        stream.recording = []  # a capture under way on the stream
        del buffer
        gc.collect()
        assert cuda.live()["cudaMalloc"] == 1
        stream.recording = None
    assert held(cuda)["cudaMalloc"] == 0


def test_a_capture_begun_during_a_release_on_another_thread_waits_for_its_end():
    """A collection on one thread checks that no capture is under way, then frees; a capture another thread
    begins in between must not see those frees (they would invalidate it): it starts once the release is done."""
    import threading

    from sdturbo.engine import cuda

    started, go, order = threading.Event(), threading.Event(), []

    def slow_release(handle):
        started.set()
        go.wait(10)
        order.append("released")

    def capture():
        with cuda.capturing():
            order.append("capture begins")

    releasing = threading.Thread(target=cuda._give_back, args=(slow_release, None))
    releasing.start()
    assert started.wait(10)
    capturing = threading.Thread(target=capture)
    capturing.start()
    capturing.join(0.5)
    assert order == []  # still waiting for the release
    go.set()
    releasing.join(10)
    capturing.join(10)
    assert order == ["released", "capture begins"]


# -- the pipelines -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle, tmp_path_factory):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'sdturbo[tensorrt-rtx]')")
    from sdturbo.export.trt_build import build_engines

    path = tmp_path_factory.mktemp("trt-release") / "b"
    shutil.copytree(tiny_bundle, path)
    build_engines(path, "tensorrt-rtx", Profile.parse("1-2", "64"), compute_capability=86, opt_level=0)
    return path


@pytest.fixture
def open_pipe(request, tiny_bundle):
    """``open_pipe(kind, cuda)``: a device pipeline of ``kind`` (KINDS) on the emulated GPU ``cuda``."""

    def open_pipe(kind: str, cuda: EmulatedCuda):
        if kind == "tensorrt":
            return emulated_pipeline(request.getfixturevalue("trt_bundle"), cuda, rtx=True, cuda_graph=True)
        graph = {"ort-chain": True, "ort-sessions": "sessions", "ort-plain": False}[kind]
        return emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE, cuda_graph=graph)

    return open_pipe


def use(pipe) -> np.ndarray:
    """Everything that allocates: a prompt-cache miss and hit (a graph each where captured), img2img (the VAE
    encoder's contexts) and the per-stage events."""
    pipe(["a red cube", "a horse"], height=64, width=64, seed=1)
    image = np.zeros((64, 64, 3), np.uint8)
    pipe("a red cube", height=64, width=64, image=image, strength=0.5, steps=2)
    pipe.stage_times(pipe.request("a red cube", height=64, width=64))
    return pipe(["a red cube", "a horse"], height=64, width=64, seed=1)


@pytest.mark.parametrize("kind", KINDS)
def test_close_gives_back_everything_the_pipeline_took(open_pipe, kind):
    cuda = EmulatedCuda()
    pipe = open_pipe(kind, cuda)
    images = use(pipe)
    assert cuda.live()["cudaMalloc"] > 0 and cuda.live()["stream"] == 1
    assert not np.shares_memory(images, pipe.host["pixels"].array)  # the caller's images are copies
    kept = images.copy()
    # held elsewhere (a caller's reference to a component, a buffer): close gives them back all the same
    parts = (dict(pipe.engines), dict(pipe.contexts), dict(pipe.dev), dict(pipe.host), pipe.cached_rows, pipe.stream)
    libraries = [weakref.ref(getattr(c, "session", None) or c.engine) for c in pipe.engines.values()]
    pipe.close()
    assert cuda.live() == NOTHING
    gc.collect()
    assert [r() for r in libraries] == [None] * len(libraries)  # the sessions, or the engines, let go of
    np.testing.assert_array_equal(images, kept)  # and outlive the pipeline
    pipe.close()  # a second close gives back nothing again
    del pipe, parts
    assert held(cuda) == NOTHING  # and the collection after it neither (no fault: nothing freed twice)


@pytest.mark.parametrize("kind", KINDS)
def test_a_pipeline_dropped_without_close_gives_back_when_collected(open_pipe, kind):
    cuda = EmulatedCuda()
    pipe = open_pipe(kind, cuda)
    use(pipe)
    del pipe
    assert held(cuda) == NOTHING


@pytest.mark.parametrize("kind", KINDS)
def test_a_dropped_pipeline_gives_back_in_closes_order(open_pipe, kind):
    """Collected, a pipeline gives back as close() does: its sessions or engines are let go of, and every
    buffer freed, before the stream they ran on is destroyed, whichever it holds first (and however
    a collection happens to order its attributes)."""
    cuda = EmulatedCuda()
    rt, seen = cuda.runtime, []
    destroy = rt.cudaStreamDestroy

    def destroy_stream(handle):
        gc.collect()  # a session held only by a context would go now: what is still alive is held elsewhere
        seen.append(([r() is not None for r in libraries], cuda.live()["cudaMalloc"], cuda.live()["cudaMallocHost"]))
        return destroy(handle)

    rt.cudaStreamDestroy = destroy_stream  # before the stream is made: its release is the runtime's, bound then
    pipe = open_pipe(kind, cuda)
    use(pipe)
    libraries = [weakref.ref(getattr(c, "session", None) or c.engine) for c in pipe.engines.values()]
    del pipe
    assert held(cuda) == NOTHING
    assert seen == [([False] * len(libraries), 0, 0)]


def test_a_step_of_close_that_fails_is_logged_and_the_rest_still_goes_back(open_pipe, caplog):
    cuda = EmulatedCuda()
    pipe = open_pipe("ort-chain", cuda)
    use(pipe)
    component = pipe.engines["unet"]

    def broken():
        raise RuntimeError("the library refused\nsecond line")

    component.close = broken
    with caplog.at_level("WARNING", logger="sdturbo.engine.device_pipeline"):
        pipe.close()
    assert cuda.live() == NOTHING
    closing = [r.getMessage() for r in caplog.records if r.name == "sdturbo.engine.device_pipeline"]
    assert closing == [f"closing {pipe.name}: closing unet: the library refused"]
    del component.close  # (the instance attribute refers to nothing of the pipeline's; tidy all the same)
    del pipe, component
    assert held(cuda) == NOTHING


@pytest.mark.parametrize("kind", ["ort-chain", "tensorrt"])
def test_a_request_after_close_raises_one_line(open_pipe, kind):
    cuda = EmulatedCuda()
    with open_pipe(kind, cuda) as pipe:
        req = pipe.request("a red cube", height=64, width=64)
        pipe.run(req)
    assert cuda.live() == NOTHING  # closed on leaving the block
    for call in (lambda: pipe("a red cube", height=64, width=64), lambda: pipe.run(req), lambda: pipe.stage_times(req)):
        with pytest.raises(BackendError, match="pipeline is closed; open another one") as e:
            call()
        assert "\n" not in str(e.value)


def test_the_host_pipeline_after_close_raises_too(tiny_bundle):
    """As the README says of every pipeline: closed means closed (it used to load its sessions again)."""
    from sdturbo.engine.runtime import open_pipeline

    with open_pipeline(tiny_bundle, "onnxruntime", "fp32") as pipe:
        req = pipe.request("a red cube", height=64, width=64)
        pipe.run(req)
    for call in (lambda: pipe("a red cube", height=64, width=64), lambda: pipe.run(req), pipe.load):
        with pytest.raises(BackendError, match="pipeline is closed; open another one"):
            call()
    assert not pipe._stages  # nothing loaded again


def test_the_host_pipeline_s_close_waits_for_the_runs_under_way(tiny_bundle, monkeypatch):
    """close() from another thread while a run is under way (README: after the run under way): the run finishes
    with its image, then the stages go; a run after it raises."""
    import threading

    from sdturbo.engine.pipeline import Pipeline
    from sdturbo.engine.runtime import open_pipeline

    pipe = open_pipeline(tiny_bundle, "onnxruntime", "fp32")
    want = pipe("a red cube", height=64, width=64)
    started, release, results = threading.Event(), threading.Event(), []
    real = Pipeline._run_float

    def slow(self, req):  # the run under way holds here until close() has been called
        started.set()
        assert release.wait(30)
        return real(self, req)

    monkeypatch.setattr(Pipeline, "_run_float", slow)
    worker = threading.Thread(target=lambda: results.append(pipe("a red cube", height=64, width=64)))
    worker.start()
    assert started.wait(30)
    closer = threading.Thread(target=pipe.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive() and pipe._stages  # waiting for the run; its stages still there
    release.set()
    worker.join(30)
    closer.join(30)
    assert not closer.is_alive() and not pipe._stages
    np.testing.assert_array_equal(results[0], want)
    with pytest.raises(BackendError, match="pipeline is closed"):
        pipe("a red cube", height=64, width=64)


def test_a_pipeline_collected_during_anothers_capture_waits_for_its_end(open_pipe):
    """A collection can run in the middle of a capture (here: forced there); what it frees is given back after
    the capture, which stays valid (the emulation faults on a free while a stream records)."""
    cuda = EmulatedCuda()
    dropped = open_pipe("ort-chain", cuda)
    use(dropped)
    dropped.itself = dropped  # in a reference cycle: freed by a collection, whenever one runs
    pipe = open_pipe("ort-chain", cuda)
    both, during = cuda.live(), []
    capture = cuda.Graph

    class CollectingCapture(capture):
        def __init__(self, stream, fn):
            def collecting():
                fn()
                gc.collect()
                during.append(cuda.live())

            super().__init__(stream, collecting)

    cuda.Graph = CollectingCapture
    gc.disable()  # the one collection: the capture's
    try:
        del dropped
        pipe("a red cube", height=64, width=64)
    finally:
        gc.enable()
    assert during == [both]  # held back while the capture was under way
    assert pipe.graph_status == "on"
    assert cuda.runtime.faults == []
    pipe.close()
    assert held(cuda) == NOTHING


def test_a_dropped_graph_is_destroyed_once_and_never_during_a_capture(monkeypatch):
    """engine/cuda.py's own Graph (the emulation has its own), on a runtime that records what it is asked."""
    import types

    from sdturbo.engine import cuda

    calls = []

    def ok(name, value=None):
        return lambda *a: calls.append((name, *a)) or ((0, value) if value is not None else (0,))

    rt = types.SimpleNamespace(
        cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=0),
        cudaStreamBeginCapture=ok("begin"),
        cudaStreamEndCapture=ok("end", "graph"),
        cudaGraphGetNodes=lambda *a: (0, [], 0),  # none
        cudaGraphInstantiate=ok("instantiate", "exec"),
        cudaGraphExecDestroy=ok("destroy exec"),
        cudaGraphDestroy=ok("destroy graph"),
    )
    monkeypatch.setattr(cuda, "bindings", lambda: (None, rt, None))
    stream = types.SimpleNamespace(handle="stream")
    destroyed = [("destroy exec", "exec"), ("destroy graph", "graph")]
    graph = cuda.Graph(stream, lambda: None)
    with cuda.capturing():  # another capture under way: a collection then must not destroy anything
        del graph
        gc.collect()
        assert [c for c in calls if c[0].startswith("destroy")] == []
    assert [c for c in calls if c[0].startswith("destroy")] == destroyed  # at its end, once
    calls.clear()
    graph = cuda.Graph(stream, lambda: None)
    del graph
    gc.collect()
    assert [c for c in calls if c[0].startswith("destroy")] == destroyed


@pytest.mark.parametrize("kind", KINDS)
def test_sessions_and_engines_go_before_the_buffers_bound_to_them(open_pipe, kind):
    """close() lets go of the sessions (or engines) before it frees the buffers their tensors are bound to: no
    library is left holding an address already given back."""
    cuda = EmulatedCuda()
    rt, bound, seen = cuda.runtime, set(), []
    free = rt.cudaFree

    def free_buffer(ptr):
        if ptr in bound:
            gc.collect()  # what is still alive now is held by the pipeline
            seen.append([r() is not None for r in libraries])
        return free(ptr)

    rt.cudaFree = free_buffer  # before the buffers are made: their release is the runtime's, bound then
    pipe = open_pipe(kind, cuda)
    use(pipe)
    bound.update(b.ptr for b in pipe.dev.values())
    libraries = [weakref.ref(getattr(c, "session", None) or c.engine) for c in pipe.engines.values()]
    pipe.close()
    assert held(cuda) == NOTHING
    assert seen == [[False] * len(libraries)] * len(bound)
