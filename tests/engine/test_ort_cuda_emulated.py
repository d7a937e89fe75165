"""The ONNX Runtime CUDA runtime's orchestration on the CPU: OrtCudaPipeline on an emulated GPU.

Its sessions are the CPU provider's on the same fp16 ONNX, bound by IO binding to the host memory behind the
emulated device buffers (tests/engine/emulated_gpu.py); runs and kernels are enqueued on the emulated stream,
captured and replayed. So every image must equal the host pipeline's bit for bit: a wrong binding, shape,
offset, buffer size, cast, step order or stale buffer shows. The real GPU path is
tests/engine/test_gpu_onnxruntime.py.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.errors import BackendError, BundleError, InputError, NonFiniteOutput
from sdturbo.engine.images import psnr
from sdturbo.engine.pipeline import Pipeline

from tests import faults
from tests.engine.emulated_gpu import EmulatedCuda, check_interleaved, emulated_ort_pipeline, thread_key

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
        "sessions": emulated_ort_pipeline(path, cuda, shape=SHAPE, cuda_graph="sessions"),
        "plain": emulated_ort_pipeline(path, cuda, shape=SHAPE, cuda_graph=False),
        "host": Pipeline(path, OnnxRuntimeBackend("fp16")),
    }


@pytest.mark.parametrize("steps", [1, 4])
def test_txt2img_equals_the_host_pipeline(pipes, steps):
    kw = dict(steps=steps, height=64, width=96, seed=11)
    want = pipes["host"](PROMPTS, **kw)
    for mode in ("graph", "sessions", "plain"):
        np.testing.assert_array_equal(pipes[mode](PROMPTS, **kw), want, err_msg=mode)
    assert want.std() > 0  # an image, not a constant
    assert pipes["graph"].graph_status == "on"
    assert pipes["sessions"].graph_status.startswith("sessions: ")


def test_img2img_equals_the_host_pipeline(pipes):
    image = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    kw = dict(steps=4, height=64, width=64, image=image, strength=0.5, seed=9)
    want = pipes["host"](PROMPTS, **kw)
    for mode in ("graph", "sessions", "plain"):
        np.testing.assert_array_equal(pipes[mode](PROMPTS, **kw), want, err_msg=mode)


def spoil_decoder(pipe, monkeypatch, spoilt: dict) -> None:
    """After each run of ``pipe``'s VAE decoder, its output's first value of image b becomes ``spoilt[b]`` (NaN
    or an infinity; what an fp16 overflow leaves). ``spoilt`` is read at each run, replays included, so the
    test changes it between requests."""
    if isinstance(pipe, Pipeline):

        def wrap(stage):
            def call(**inputs):
                out = stage(**inputs).copy()
                for b, value in spoilt.items():
                    out[b, 0, 0, 0] = value
                return out

            return call

        faults._on_stage(pipe.decoder, wrap)(pipe, monkeypatch)
        return
    component = pipe.engines[pipe.decoder]
    session, (_, dtype) = component.session, pipe.buffer_specs["image_out"]

    class Spoilt:
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, binding, options):
            session.run_with_iobinding(binding, options)
            _, _, h, w = binding.get_outputs()[0].shape()
            for b, value in spoilt.items():
                first = pipe.dev["image_out"].ptr + b * 3 * h * w * dtype.itemsize
                pipe.cuda.memory.array(first, dtype, (1,))[0] = value

    monkeypatch.setattr(component, "session", Spoilt())


def test_an_image_that_is_not_finite_is_refused_and_the_others_kept(pipes, monkeypatch):
    """A NaN or an infinity in the decoder's output is hidden by uint8 (NaN clamps to black): every mode refuses
    the request, naming the images (in a batch of 2, image 1 alone, then both) and keeps every pixel, the good
    image's equal to a clean run's. The flags are cleared for each request: a clean request after it, at the same
    shape and graph, is not refused."""
    kw = dict(steps=1, height=64, width=96, seed=3)
    clean = pipes["host"](PROMPTS, **kw)
    for mode in ("host", "graph", "sessions", "plain"):
        spoilt: dict = {}
        spoil_decoder(pipes[mode], monkeypatch, spoilt)
        np.testing.assert_array_equal(pipes[mode](PROMPTS, **kw), clean, err_msg=mode)
        for value in (np.nan, np.inf, -np.inf):
            spoilt.update({1: value})
            with pytest.raises(NonFiniteOutput, match=r"^image 1 of 2 came out of the VAE decoder with NaN") as e:
                pipes[mode](PROMPTS, **kw)
            assert e.value.bad == [1], mode
            assert "(an fp16 overflow, most often; the fp32 graphs avoid it: --precision fp32)" in str(e.value)
            np.testing.assert_array_equal(e.value.images[0], clean[0], err_msg=mode)
        spoilt.update({0: np.nan})
        with pytest.raises(NonFiniteOutput, match=r"^images 0, 1 of 2 came out") as e:
            pipes[mode](PROMPTS, **kw)
        assert e.value.bad == [0, 1], mode
        spoilt.clear()
        np.testing.assert_array_equal(pipes[mode](PROMPTS, **kw), clean, err_msg=mode)
        monkeypatch.undo()


@pytest.mark.parametrize("mode", ["graph", "sessions"])
def test_interleaved_requests_leave_no_stale_state(pipes, mode):
    """Prompts, seeds, sizes (up to the allocated maximum), batches and steps in turn, three times over: each
    replayed graph equals the host pipeline, so nothing from an earlier request leaks into a later one. With
    onnxruntime's own graphs, each session replays the graph of its shape (one ``gpu_graph_id`` per shape:
    a graph replays the shapes and addresses it was captured with)."""
    calls = [
        (PROMPTS, 1, 64, 96, 1),
        (PROMPTS[:1], 2, 64, 64, 2),
        (PROMPTS, 3, 128, 128, 1),
        (PROMPTS[::-1], 1, 64, 96, 1),
    ]
    graph = pipes[mode]
    check_interleaved(graph, pipes["host"], calls)
    assert graph.graph_status == "on" if mode == "graph" else graph.graph_status.startswith("sessions: ")
    if mode == "sessions":
        for prompts, _, h, w, _ in calls:  # each shape's contexts: a graph each, under its own id, replayed
            for name, ctx in graph.contexts[(len(prompts), h, w)].items():
                if name in ("unet", "vae_decoder"):  # (the text encoders do not run on a prompt-cache hit)
                    graph_id = int(ctx.graph_options.get_run_config_entry("gpu_graph_id"))
                    assert ctx.component.session.replays[graph_id] > 0, (name, h, w)


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


def test_nhwc_asks_the_cuda_provider_for_channels_last_and_only_it(tiny_bundle):
    """``nhwc`` sets the CUDA provider's ``prefer_nhwc`` (the image is the same function: the GPU tests compare
    it with diffusers); it is off by default, and another backend refuses it by name."""
    from sdturbo.engine.runtime import open_pipeline

    cuda = EmulatedCuda()
    on = emulated_ort_pipeline(tiny_bundle, cuda, shape=(1, 64, 64), nhwc=True).provider_options()
    off = emulated_ort_pipeline(tiny_bundle, cuda, shape=(1, 64, 64)).provider_options()
    assert on["CUDAExecutionProvider"]["prefer_nhwc"] == "1"
    assert "prefer_nhwc" not in off["CUDAExecutionProvider"]
    for name in ("prefer_nhwc", "user_compute_stream"):  # (each pipeline has a stream of its own)
        on["CUDAExecutionProvider"].pop(name), off["CUDAExecutionProvider"].pop(name, None)
    assert on == off
    with pytest.raises(InputError, match="nhwc is an ONNX Runtime CUDA setting; backend 'onnxruntime' does not"):
        open_pipeline(tiny_bundle, "onnxruntime", nhwc=True)


def test_each_shape_has_its_own_graph_id_in_each_session(pipes):
    """onnxruntime keeps one CUDA graph per session and ``gpu_graph_id``, replayed at the shapes and addresses
    it was captured with: each context (component and shape) has an id of its own, its runs never wait."""
    pipe = pipes["sessions"]
    for shape in ((1, 64, 64), (2, 64, 96)):
        pipe(PROMPTS[: shape[0]], height=shape[1], width=shape[2], seed=1)
    for name in pipe.engines:
        options = [pipe.contexts[shape][name].graph_options for shape in pipe.contexts]
        ids = [int(o.get_run_config_entry("gpu_graph_id")) for o in options]
        assert len(set(ids)) == len(ids) and min(ids) > 0, (name, ids)
        assert all(o.get_run_config_entry("disable_synchronize_execution_providers") == "1" for o in options)


def test_a_shape_outside_the_bundle_is_refused_when_opened(tiny_bundle):
    with pytest.raises(InputError, match="height range"):
        emulated_ort_pipeline(tiny_bundle, shape=(1, 100, 64))
    with pytest.raises(InputError, match="precision 'int8'"):
        emulated_ort_pipeline(tiny_bundle, precision="int8")
    with pytest.raises(InputError, match=r"cuda_graph 'yes' is not allowed; use one of \(True, False, 'chain'"):
        emulated_ort_pipeline(tiny_bundle, cuda_graph="yes")


@pytest.mark.parametrize(
    "message",
    [  # onnxruntime's words, newer and older
        "This session cannot use the graph capture feature as requested by the user as all compute graph nodes "
        "have not been partitioned to the CUDAExecutionProvider",
        "This session cannot use the CUDA Graph feature as requested by the user as the model has control flow "
        "nodes which can't be supported by CUDA Graphs.",
    ],
)
def test_onnxruntimes_refusal_of_cuda_graphs_is_told_apart_from_a_bad_file(tiny_bundle, monkeypatch, message):
    from sdturbo.engine.bundle import Bundle
    from sdturbo.engine.errors import CaptureRefused

    def refuse(*args):
        raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {message}")

    monkeypatch.setattr(OnnxRuntimeBackend, "_session", refuse)
    with pytest.raises(CaptureRefused, match="onnxruntime will not run unet under a CUDA graph"):
        OnnxRuntimeBackend("fp16").session(Bundle(tiny_bundle), "unet")


def test_a_chain_capture_that_fails_falls_back_to_each_sessions_own_graph(tiny_bundle, caplog):
    """ONNX Runtime may refuse work under a capture from outside (an allocation, a host copy): the request
    still succeeds, with a warning, each session replaying onnxruntime's own CUDA graph from then on, and
    ``graph_status`` says why the chain is not one graph."""
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
    assert pipe.graph_status.startswith("sessions: capturing the chain failed: CUDA failure 900")
    assert any("whole-chain CUDA graph OFF" in r.message for r in caplog.records)
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=1)
    np.testing.assert_array_equal(image, want)
    np.testing.assert_array_equal(again, want)
    assert [type(g).__name__ for g in pipe.graphs.values()] == ["SessionGraphs"] * 2  # a miss's and a hit's
    unet = pipe.engines["unet"].session
    before = sum(unet.replays.values())
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=1), want)
    assert sum(unet.replays.values()) == before + 1  # the stored graphs replayed, nothing captured again


@pytest.mark.parametrize("broken", ["skips the UNet", "replays the first step only"])
def test_a_graph_whose_replay_differs_is_never_used(tiny_bundle, caplog, broken):
    """A graph that does not recompute what the eager run computed (here: one that leaves out the UNet's
    runs, or stops after the first of 2 steps) is caught on its first replay, against the eager pixels, and
    dropped: the image comes from the sessions' own graphs (checked the same way), with the reason."""
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
    assert pipe.graph_status.startswith("sessions: the captured graph's pixels differ from the eager run's")
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=3, steps=2)
    np.testing.assert_array_equal(image, want)


def nondeterministic(pipe, cuda: EmulatedCuda, fraction: float = 0.05) -> None:
    """Make the UNet's runs vary as a kernel that adds partial sums with atomics, in no fixed order, does
    (onnxruntime's fused GroupNorm): each run, eager or replayed, a random ``fraction`` of its fp16 output
    moves by one unit in the last place."""
    component = pipe.engines["unet"]
    run, rng = component.session.run_with_iobinding, np.random.default_rng()
    eps = pipe.dev["eps"]

    def varying(binding, options):
        run(binding, options)
        bits = cuda.memory.view(eps.ptr, eps.nbytes).view(np.uint16)
        bits[rng.random(bits.size) < fraction] ^= 1

    component.session.run_with_iobinding = varying


def test_a_graph_varying_as_the_eager_runs_vary_is_used(tiny_bundle, caplog):
    """Kernels that are not deterministic make every run differ a little, eager ones too: a replay is then
    held to the eager runs' own variation, not to their bytes, and the graph is used."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)
    nondeterministic(pipe, cuda)
    with caplog.at_level("INFO"):
        image = pipe(PROMPTS, height=64, width=64, seed=3, steps=2)
    assert pipe.graph_status == "on"
    assert "no more than eager runs differ from each other" in caplog.text  # (the variation reached the pixels)
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=3, steps=2)
    assert psnr(image, want) > 40, psnr(image, want)  # one unit in the last place here and there, not another image


def test_a_broken_graph_is_caught_however_the_eager_runs_vary(tiny_bundle, caplog):
    """The same variation does not hide a replay that skips the UNet: far outside it, the chain's graph is
    dropped (onnxruntime's own graphs per session, which vary as the eager runs do, are used)."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)
    nondeterministic(pipe, cuda)
    unet = pipe.engines["unet"]
    real_graph = cuda.Graph

    class SkipsTheUnet(real_graph):
        def __init__(self, stream, fn):
            super().__init__(stream, fn)
            self.ops = [op for op in self.ops if getattr(op, "__closure__", None) is None or unet not in _cells(op)]

    cuda.Graph = SkipsTheUnet
    with caplog.at_level("WARNING"):
        pipe(PROMPTS, height=64, width=64, seed=3, steps=2)
    assert pipe.graph_status.startswith("sessions: the captured graph's pixels differ from the eager run's on the")
    assert "eager runs differ by MSE" in pipe.graph_status


def test_a_graph_whose_replay_fails_is_dropped_and_the_request_still_served(tiny_bundle, caplog):
    """A replay can fail where its capture did not (CUDA refuses a second launch of a graph that allocates and
    never frees; a library's replay may raise): during the check that is the end of that graph, not of the
    request, and the next request of the shape does not try it again."""
    from sdturbo.engine.errors import BackendError

    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)
    launches = []

    class SecondLaunchFails(cuda.Graph):
        def launch(self):
            launches.append(self)
            if len(launches) == 2:
                raise BackendError("cudaGraphLaunch failed: <cudaError_t.cudaErrorInvalidValue: 1>")
            super().launch()

    cuda.Graph = SecondLaunchFails
    with caplog.at_level("WARNING"):
        image = pipe(PROMPTS, height=64, width=64, seed=3)
        again = pipe(PROMPTS, height=64, width=64, seed=3)
    assert pipe.graph_status == (
        "sessions: replaying the chain failed on the request: cudaGraphLaunch failed: "
        "<cudaError_t.cudaErrorInvalidValue: 1>"
    )
    assert len(launches) == 2  # the chain's graph is not tried again
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=3)
    np.testing.assert_array_equal(image, want)
    np.testing.assert_array_equal(again, want)


def test_a_captured_graph_with_host_callbacks_is_never_used(tiny_bundle, caplog):
    """A library may leave host work in a capture from outside (a host function that frees its staging
    buffers, an allocation): every replay would run it again. The graph's nodes are listed after capture
    (cuda.node_types) and such a graph is dropped before its first replay, with what it held."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)

    class WithHostNodes(cuda.Graph):
        def __init__(self, stream, fn):
            super().__init__(stream, fn)
            self.node_types = {"Kernel": 40, "Memcpy": 3, "Host": 2}

    cuda.Graph = WithHostNodes
    with caplog.at_level("WARNING"):
        image = pipe(PROMPTS, height=64, width=64, seed=3)
    assert pipe.graph_status == (
        "sessions: the captured graph of the chain has 2 host callbacks, which every replay would redo"
    )
    np.testing.assert_array_equal(
        image, Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=3)
    )


def test_graph_nodes_that_cannot_be_listed_skip_that_check_only():
    from sdturbo.engine import cuda
    from sdturbo.engine.device_pipeline import unsafe_nodes

    assert cuda.node_types(object()) is None  # not a graph (or no driver): no list, no exception
    assert unsafe_nodes(None) == "" and unsafe_nodes({"Kernel": 3, "Memcpy": 1}) == ""
    assert unsafe_nodes({"MemAlloc": 1, "Host": 2}) == "2 host callbacks, 1 memory allocations"


def test_no_pipeline_is_opened_while_another_thread_captures(tiny_bundle):
    """onnxruntime captures its own graphs in CUDA's global mode, which an allocation or a session being made on
    another thread breaks: a pipeline opened meanwhile waits for the capture (and its check) to end."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=(1, 64, 64))
    capturing, release = threading.Event(), threading.Event()

    class SlowCapture(cuda.Graph):
        def __init__(self, stream, fn):
            capturing.set()
            release.wait(30)
            super().__init__(stream, fn)

    cuda.Graph = SlowCapture
    first = threading.Thread(target=lambda: pipe(PROMPTS[:1], height=64, width=64, seed=1))
    first.start()
    assert capturing.wait(60)
    opened = []
    second = threading.Thread(target=lambda: opened.append(emulated_ort_pipeline(tiny_bundle, shape=(1, 64, 64))))
    second.start()
    second.join(3)
    assert second.is_alive() and not opened  # waiting for the capture
    release.set()
    first.join(60)
    second.join(60)
    assert len(opened) == 1 and pipe.graph_status == "on"


def test_another_pipelines_request_waits_for_onnxruntimes_own_capture(tiny_bundle):
    """onnxruntime captures a session's graph in CUDA's global mode: a request of another pipeline of the process
    that synchronised meanwhile would fail, and spoil the capture. It waits for the capture instead; both come out
    as the host pipeline's, and the capturing pipeline keeps its graphs."""
    cuda = EmulatedCuda()
    capturing = emulated_ort_pipeline(tiny_bundle, cuda, shape=(1, 64, 64), cuda_graph="sessions")
    other = emulated_ort_pipeline(tiny_bundle, cuda, shape=(1, 64, 64), cuda_graph=False)
    kw = dict(height=64, width=64, steps=2)
    host = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))
    want = {seed: host(PROMPTS[:1], seed=seed, **kw) for seed in (1, 2)}
    np.testing.assert_array_equal(other(PROMPTS[:1], seed=2, **kw), want[2])  # (its own first run, before)
    inside, release = threading.Event(), threading.Event()

    def slow(thread, graph_id):
        inside.set()
        release.wait(30)

    capturing.engines["unet"].session.fail_capture = slow
    got: dict = {}

    def run(name, pipe, seed):
        try:
            got[name] = pipe(PROMPTS[:1], seed=seed, **kw)
        except Exception as e:
            got[name] = e

    first = threading.Thread(target=run, args=("capturing", capturing, 1))
    first.start()
    assert inside.wait(60)
    second = threading.Thread(target=run, args=("other", other, 2))
    second.start()
    second.join(2)
    assert second.is_alive() and "other" not in got  # held back while onnxruntime captures
    release.set()
    first.join(60)
    second.join(60)
    np.testing.assert_array_equal(got["capturing"], want[1])
    np.testing.assert_array_equal(got["other"], want[2])
    assert capturing.graph_status.startswith("sessions: "), capturing.graph_status


def test_two_pipelines_capturing_at_once_on_two_threads_both_finish(tiny_bundle):
    """Each request waits for the other's capture, never for a request that waits for its own (no deadlock):
    four first requests at once, two shapes each on two pipelines, all as the host pipeline's, graphs kept."""
    cuda = EmulatedCuda()
    pipes = [
        emulated_ort_pipeline(tiny_bundle, cuda, shape=(1, 64, 64), cuda_graph=mode) for mode in (True, "sessions")
    ]
    host = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))
    jobs = [(pipe, size) for pipe in pipes for size in (32, 64)]
    got: dict = {}

    def run(k, pipe, size):
        try:
            got[k] = pipe(PROMPTS[:1], seed=k, height=size, width=size, steps=2)
        except Exception as e:
            got[k] = e

    threads = [threading.Thread(target=run, args=(k, *job), daemon=True) for k, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for k, (_, size) in enumerate(jobs):
        np.testing.assert_array_equal(got[k], host(PROMPTS[:1], seed=k, height=size, width=size, steps=2))
    assert pipes[0].graph_status == "on" and pipes[1].graph_status.startswith("sessions: ")


class BoundOnce:
    """A session whose IO binding copies each input when it is bound and runs on that copy ever after, as
    onnxruntime does for an input bound on another device than the node that reads it: the chain then no
    longer reads what is put in its buffers."""

    def __init__(self, session):
        self.session, self.kept = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def io_binding(self):
        binding = self.session.io_binding()
        bind_input = binding.bind_input

        def bound_once(name, device, device_id, dtype, shape, ptr):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            copy = np.frombuffer(ctypes.string_at(ptr, nbytes), np.uint8).copy()
            self.kept.append(copy)
            bind_input(name, device, device_id, dtype, shape, copy.ctypes.data)

        binding.bind_input = bound_once
        return binding


@pytest.mark.parametrize("img2img", [False, True])
def test_a_chain_that_does_not_read_its_inputs_is_refused_not_served(tiny_bundle, img2img):
    """Every session's inputs copied once, when bound: each request would give the first one's image (the eager
    runs too, so a replay's check against them passes). The probe (other prompts, noise, image) gives the same
    pixels as the request: refused, with the reason, and again on the next request."""
    pipe = emulated_ort_pipeline(tiny_bundle, shape=(1, 64, 64))
    for component in pipe.engines.values():
        component.session = BoundOnce(component.session)
    for buffer in pipe.dev.values():  # zeros, as fresh device memory often holds (else NaN: refused as such)
        pipe.stream.fill(buffer.ptr, 0, buffer.nbytes)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8) if img2img else None
    for seed in (1, 2):
        with pytest.raises(BackendError, match="gave the same pixels as this one: the chain does not read its inputs"):
            pipe(PROMPTS[:1], height=64, width=64, seed=seed, image=image, steps=2)


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
    catches it, and the image comes from the sessions' own graphs."""
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
    assert pipe.graph_status.startswith("sessions: the captured graph's pixels differ from the eager run's on the")
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=5)
    np.testing.assert_array_equal(image, want)


def test_a_graph_reading_what_an_eager_run_left_behind_is_never_used(tiny_bundle, caplog):
    """A graph of 1 step that leaves out a copy whose value the probe and the request share (the step's timestep)
    replays right on both from what the eager runs left in the buffer, and wrong once a graph of 2 steps has run
    (the next request of 1 step and new prompts replays it). The check's poisoned buffers catch it before use."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE)
    timestep = pipe.dev["timestep"].ptr
    real_graph = cuda.Graph

    def copies_the_timestep(op) -> bool:
        cells = dict(zip(op.__code__.co_freevars, (c.cell_contents for c in op.__closure__ or ()), strict=True))
        return "src" in cells and cells.get("dst") == timestep

    class NoTimestepCopyAtOneStep(real_graph):
        def __init__(self, stream, fn):
            super().__init__(stream, fn)
            if sum(map(copies_the_timestep, self.ops)) == 1:
                self.ops = [op for op in self.ops if not copies_the_timestep(op)]

    cuda.Graph = NoTimestepCopyAtOneStep
    host = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))
    with caplog.at_level("WARNING"):
        image = pipe(PROMPTS, height=64, width=64, seed=5, steps=1)
        assert pipe.graph_status.startswith("sessions: the captured graph's pixels differ from the eager run's on")
        pipe(PROMPTS, height=64, width=64, seed=5, steps=2)
        other = ["a blue sphere", "a green cone"]  # not in the prompt cache: the first graph's shape and steps
        again = pipe(other, height=64, width=64, seed=5, steps=1)
    np.testing.assert_array_equal(image, host(PROMPTS, height=64, width=64, seed=5, steps=1))
    np.testing.assert_array_equal(again, host(other, height=64, width=64, seed=5, steps=1))


def test_stage_times_cover_every_stage_and_leave_the_next_image_alone(pipes):
    """The benchmark's per-stage times for a device pipeline: one eager run with events between the stages."""
    pipe = pipes["graph"]
    want = pipe(PROMPTS, height=64, width=64, seed=4, steps=2)
    times = pipe.stage_times(pipe.request(PROMPTS, height=64, width=64, seed=4, steps=2))
    assert set(times) == {"text_encoder", "scheduler", "unet", "vae_decoder", "other"}
    assert all(v >= 0 for v in times.values()) and times["unet"] > 0
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=4, steps=2), want)


def test_stage_times_without_encoding_run_no_text_encoder_as_a_cache_hit(pipes, monkeypatch):
    """The benchmark's stages of a prompt-cache contender (every timed run a hit): ``encode=False`` runs the chain
    without the text encoders, on the outputs the last run left in place, and the next image is unchanged."""
    pipe = pipes["graph"]
    want = pipe(PROMPTS, height=64, width=64, seed=4, steps=2)
    encoded = []
    real = pipe._encode_text
    monkeypatch.setattr(pipe, "_encode_text", lambda *a: (encoded.append(a), real(*a))[1])
    req = pipe.request(PROMPTS, height=64, width=64, seed=4, steps=2)
    pipe.stage_times(req, encode=False)
    assert encoded == []
    pipe.stage_times(req)
    assert len(encoded) == 1
    monkeypatch.undo()
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=4, steps=2), want)


def test_onnxruntime_cuda_without_onnxruntime_gpu_says_how_to_install_it(tiny_bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from sdturbo.engine.errors import BackendError

    with pytest.raises(BackendError, match=r"lacks CUDAExecutionProvider.*pip install 'onnxruntime-gpu\[cuda,cudnn\]'"):
        OnnxRuntimeBackend("fp16", ("CUDAExecutionProvider",))


@pytest.mark.parametrize("cuda_graph", [True, "sessions"])
def test_a_session_onnxruntime_refuses_for_cuda_graphs_runs_without(tiny_bundle, monkeypatch, caplog, cuda_graph):
    """onnxruntime refuses to create a session with ``enable_cuda_graph`` when its graph needs host copies
    (values a replay would reuse stale): that component is opened without it and runs as it comes, the
    chain is not one graph, the other sessions replay their own, and ``graph_status`` names the component."""
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
        pipe = emulated_ort_pipeline(tiny_bundle, shape=SHAPE, cuda_graph=cuda_graph)
    assert ("unet", True) in opened and ("unet", False) in opened and ("text_encoder", False) not in opened
    assert pipe.graph_status.startswith("sessions: onnxruntime refuses CUDA graphs for unet")
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=2)
    for _ in range(2):
        np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=2), want)
    assert pipe.engines["unet"].graph_options is None and not hasattr(pipe.engines["unet"].session, "replays")
    assert sum(pipe.engines["vae_decoder"].session.replays.values()) > 0
    assert pipe.graphs_used["unet"] == "plain"  # the refused one's graph is reported too


@pytest.mark.parametrize("cuda_graph", [True, "sessions"])
def test_every_session_refused_turns_graphs_off(tiny_bundle, monkeypatch, caplog, cuda_graph):
    """onnxruntime refuses CUDA graphs for every component: no graph is left, neither the chain's nor a
    session's, and ``graph_status`` says off (not "sessions"); the images are the host pipeline's."""
    from sdturbo.engine.errors import CaptureRefused

    session = OnnxRuntimeBackend.session

    def refuse_all(self, bundle, component):
        if self.provider_options.get("CUDAExecutionProvider", {}).get("enable_cuda_graph") == "1":
            raise CaptureRefused(f"onnxruntime will not run {component} under a CUDA graph: ... not partitioned")
        return session(self, bundle, component)

    monkeypatch.setattr(OnnxRuntimeBackend, "session", refuse_all)
    with caplog.at_level("WARNING"):
        pipe = emulated_ort_pipeline(tiny_bundle, shape=SHAPE, cuda_graph=cuda_graph)
    assert pipe.graph_status.startswith("off: onnxruntime refuses CUDA graphs for "), pipe.graph_status
    assert pipe.graph_kind is None and all(e.graph_options is None for e in pipe.engines.values())
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=2)
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=2), want)
    assert set(pipe.graphs_used.values()) == {"plain"}


def test_a_refused_text_encoder_of_an_older_bundle_says_how_to_renew_it(xl_bundle, monkeypatch, caplog):
    """SDXL bundles exported before the pooled-token ArgMax was made float keep an integer one, which
    onnxruntime's CUDA provider runs on the CPU (so it refuses CUDA graphs for that session): the warning says
    so and gives the commands that renew the bundle."""
    from sdturbo.engine.errors import CaptureRefused
    from sdturbo.export import graph_fixes

    session = OnnxRuntimeBackend.session

    def refuse(self, bundle, component):
        if component == "text_encoder_2" and self.provider_options["CUDAExecutionProvider"]["enable_cuda_graph"] == "1":
            raise CaptureRefused("onnxruntime will not run text_encoder_2 under a CUDA graph: ... not partitioned")
        return session(self, bundle, component)

    monkeypatch.setattr(OnnxRuntimeBackend, "session", refuse)
    monkeypatch.setattr(graph_fixes, "integer_argmax", lambda path: path.name == "text_encoder_2.onnx")
    with caplog.at_level("WARNING"):
        emulated_ort_pipeline(xl_bundle, shape=(1, 64, 64))
    (warning,) = [r.getMessage() for r in caplog.records if "runs without CUDA graphs" in r.getMessage()]
    assert "text_encoder_2 runs without CUDA graphs (its pooled-token ArgMax is over integers" in warning
    assert (
        f"`sdturbo export random:sdxl-tiny --out {xl_bundle} --force`, then `sdturbo build {xl_bundle} --ort" in warning
    )


def test_plain_graphs_where_fused_ones_were_asked_for_say_how_to_build_them(tiny_bundle, tmp_path, caplog):
    """The fused graphs are the fast path: a pipeline that runs the plain ones for want of them says which, and
    the command that builds them (here the UNet's are built, for the provider the emulation runs)."""
    import shutil

    from sdturbo.export.ort_optimize import optimize_bundle

    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    optimize_bundle(path, ("unet",), provider="cpu")
    with caplog.at_level("WARNING"):
        pipe = emulated_ort_pipeline(path, shape=(1, 64, 64))
    assert pipe.graphs_used == {
        "text_encoder": "plain",
        "unet": "optimized",
        "vae_decoder": "plain",
        "vae_encoder": "plain",
    }
    (hint,) = [r.getMessage() for r in caplog.records if "plain fp16 graphs" in r.getMessage()]
    assert hint.startswith("text_encoder, vae_decoder, vae_encoder run the plain fp16 graphs: ")
    assert hint.endswith(f"`sdturbo build {path} --ort-optimize`")
    caplog.clear()
    with caplog.at_level("WARNING"):
        emulated_ort_pipeline(path, shape=(1, 64, 64), fused=False)  # plain graphs asked for: nothing to say
    assert "plain fp16 graphs" not in caplog.text


def test_a_sessions_graph_whose_replay_differs_is_never_used(tiny_bundle, caplog, monkeypatch):
    """Were onnxruntime's own graph of a session to replay wrong (here: the UNet's replays do nothing), the
    check catches it as it catches a chain graph: no graph is used from then on, and the image is right."""
    from tests.engine.emulated_gpu import EmulatedOrtGraphs

    pipe = emulated_ort_pipeline(tiny_bundle, shape=SHAPE, cuda_graph="sessions")
    unet, real = pipe.engines["unet"].session, EmulatedOrtGraphs.run_with_iobinding

    def unet_replays_nothing(self, binding, run_options):
        graph_id = int(run_options.get_run_config_entry("gpu_graph_id"))
        if self is unet and (thread_key(), graph_id) in self.captured:
            return None
        return real(self, binding, run_options)

    monkeypatch.setattr(EmulatedOrtGraphs, "run_with_iobinding", unet_replays_nothing)
    with caplog.at_level("WARNING"):
        images = [pipe(PROMPTS, height=64, width=64, seed=6, steps=2) for _ in range(2)]
    assert pipe.graph_status.startswith("off: the captured graph's pixels differ from the eager run's")
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=6, steps=2)
    for image in images:
        np.testing.assert_array_equal(image, want)


def test_a_session_whose_own_capture_fails_leaves_no_capture_open(tiny_bundle, caplog, monkeypatch):
    """A session whose run fails during onnxruntime's own capture (say, an allocation it may not make then)
    can leave the stream capturing: the capture is ended, no graph is used, and the image is right."""

    pipe = emulated_ort_pipeline(tiny_bundle, shape=SHAPE, cuda_graph="sessions")

    def fail_in_capture(thread, graph_id):
        pipe.stream.recording = []  # onnxruntime began its capture on the stream, then failed
        raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing; expr=cudaMalloc")

    pipe.engines["unet"].session.fail_capture = fail_in_capture
    with caplog.at_level("WARNING"):
        image = pipe(PROMPTS, height=64, width=64, seed=8)
    assert pipe.graph_status.startswith("off: capturing the sessions' own graphs failed: CUDA failure 900")
    assert pipe.stream.recording is None
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=8)
    np.testing.assert_array_equal(image, want)


def test_a_later_thread_never_takes_an_ended_threads_graphs():
    """Linux gives a new thread the ``threading.get_ident`` of one that ended, but onnxruntime's per-thread graphs
    are not the new thread's: the sessions tier keys its graphs by a number no other thread ever gets."""
    from sdturbo.engine.ort_pipeline import _thread_token

    seen = []
    for _ in range(3):
        worker = threading.Thread(target=lambda: seen.append((threading.get_ident(), _thread_token(), _thread_token())))
        worker.start()
        worker.join()
    assert len({token for _, token, _ in seen}) == 3  # whether or not the idents repeat (they usually do)
    assert all(a == b for _, a, b in seen)  # and the same all through a thread


def test_another_thread_checks_its_own_session_graphs(tiny_bundle):
    """onnxruntime keeps its graphs per thread: a server warms up on its main thread and serves on a worker,
    where each session captures afresh. That capture is checked there too (the graphs are keyed by thread),
    so one that fails there (here: the UNet's) falls back, and the request still gets its image."""
    pipe = emulated_ort_pipeline(tiny_bundle, shape=SHAPE, cuda_graph="sessions", prompt_cache=0)  # one key
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=7)
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=7), want)  # the main thread's graphs
    main = thread_key()

    def fail_elsewhere(thread, graph_id):
        if thread != main:
            raise RuntimeError("CUDA failure 2: out of memory; expr=cudaMalloc (during capture)")

    pipe.engines["unet"].session.fail_capture = fail_elsewhere
    out = {}
    worker = threading.Thread(target=lambda: out.update(image=pipe(PROMPTS, height=64, width=64, seed=7)))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(out["image"], want)
    assert pipe.graph_status.startswith("off: capturing the sessions' own graphs failed: CUDA failure 2")


def test_img2img_at_another_strength_gets_a_graph_of_its_own(tiny_bundle):
    """Two img2img requests of one shape whose strengths run the same number of steps (4 at 0.5, 2 at 1.0) still
    differ in every sigma the graph replays: each gets its own graph, and each image equals the host pipeline's."""
    pipe = emulated_ort_pipeline(tiny_bundle, EmulatedCuda(), shape=SHAPE, prompt_cache=0)
    host = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))
    image = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    calls = [dict(steps=4, strength=0.5), dict(steps=2, strength=1.0)]
    for _ in range(2):  # captured, then replayed
        for kw in calls:
            kw = dict(kw, height=64, width=64, image=image, seed=9)
            np.testing.assert_array_equal(pipe(PROMPTS, **kw), host(PROMPTS, **kw), err_msg=str(kw))
    assert pipe.graph_status == "on" and len(pipe.graphs) == len(calls)


def test_a_graph_replaying_start_noise_made_at_capture_is_never_used(tiny_bundle, caplog):
    """As with the text encoder's outputs: a graph that replays the start latents as they were made from the noise
    in the buffers at capture (a step run on the host then) is right for that noise only. The probe's other seed
    catches it; the image, and that of a later request with another seed, equal the host pipeline's."""
    cuda = EmulatedCuda()
    pipe = emulated_ort_pipeline(tiny_bundle, cuda, shape=SHAPE, prompt_cache=0)  # one graph per shape
    kernels = pipe.kernels[pipe.dtype.name]
    real = kernels.init_latents

    def init_on_the_host_under_capture(noise, x, init_sigma, n, stream):
        s = cuda.streams[stream]
        if s.recording is None:
            return real(noise, x, init_sigma, n, stream)
        recording, s.recording = s.recording, None
        real(noise, x, init_sigma, n, stream)  # runs now, on the noise in the buffer at capture time
        s.recording = recording
        latents = cuda.memory.view(x, n * pipe.dtype.itemsize)
        snapshot = latents.copy()
        s.recording.append(lambda: latents.__setitem__(slice(None), snapshot))

    kernels.init_latents = init_on_the_host_under_capture
    host = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))
    with caplog.at_level("WARNING"):
        image = pipe(PROMPTS, height=64, width=64, seed=5)
        assert pipe.graph_status.startswith("sessions: the captured graph's pixels differ from the eager run's on")
        other = pipe(PROMPTS, height=64, width=64, seed=6)
    np.testing.assert_array_equal(image, host(PROMPTS, height=64, width=64, seed=5))
    np.testing.assert_array_equal(other, host(PROMPTS, height=64, width=64, seed=6))


def test_a_prompt_cache_hit_whose_capture_fails_runs_with_its_own_rows(tiny_bundle, caplog):
    """A hit's capture check runs the text encoders on the probe's prompts into the buffers the hit reads; where
    that capture fails and no graph is left, the request runs eagerly from its own cached rows again (here the
    sessions' own graphs of a new shape fail to capture on a hit), and its image equals the host pipeline's."""
    pipe = emulated_ort_pipeline(tiny_bundle, EmulatedCuda(), shape=SHAPE, cuda_graph="sessions")
    host = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))
    kw = dict(height=64, width=64, seed=2)
    np.testing.assert_array_equal(pipe(PROMPTS, **kw), host(PROMPTS, **kw))  # a miss: its rows are cached

    def fail(thread, graph_id):
        raise RuntimeError("CUDA failure 2: out of memory; expr=cudaMalloc (during capture)")

    pipe.engines["unet"].session.fail_capture = fail
    with caplog.at_level("WARNING"):
        image = pipe(PROMPTS, height=64, width=96, seed=3)  # the same prompts: a hit, at a shape not captured yet
    assert pipe.prompt_cache.stats()["hits"] == 1
    assert pipe.graph_status.startswith("off: capturing the sessions' own graphs failed: CUDA failure 2")
    np.testing.assert_array_equal(image, host(PROMPTS, height=64, width=96, seed=3))


def test_chain_is_the_whole_chain_as_true_is(tiny_bundle):
    """``cuda_graph="chain"`` (the documented other name of True) captures the whole chain as one graph."""
    pipe = emulated_ort_pipeline(tiny_bundle, EmulatedCuda(), shape=(2, 64, 64), cuda_graph="chain")
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=1)
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=1), want)
    assert pipe.graph_status == "on"
    assert [type(g).__name__ for g in pipe.graphs.values()] == ["Graph"]


@pytest.mark.parametrize("seed", [np.int64(3), (np.int64(2**63 - 1), np.int64(4))], ids=["numpy", "numpy-per-image"])
def test_numpy_integer_seeds_are_seeds_on_the_device_too(tiny_bundle, seed):
    """Seeds from numpy (``rng.integers``) are taken as the host pipeline takes them, the largest included:
    the graph check's probe request (the seed plus one) once raised a TypeError on them."""
    pipe = emulated_ort_pipeline(tiny_bundle, EmulatedCuda(), shape=SHAPE)
    prompts = PROMPTS[: 1 if isinstance(seed, np.integer) else 2]
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(prompts, height=64, width=64, seed=seed)
    np.testing.assert_array_equal(pipe(prompts, height=64, width=64, seed=seed), want)
    assert pipe.graph_status == "on"
