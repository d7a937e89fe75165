"""The TensorRT runtime's orchestration on the CPU: TrtPipeline on an emulated GPU (tests/engine/emulated_gpu.py).

Engines are found in the bundle as on a GPU (real TensorRT-RTX builds for SM86), then run as ONNX Runtime
sessions of the same fp16 ONNX; kernels run as numpy translations of latents.cu. So every image must equal
the host pipeline's on the same fp16 ONNX bit for bit: any wrong binding, shape, offset, buffer size, cast,
step order or stale buffer shows. The real GPU path is tests/engine/test_gpu_pipeline.py.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'sdturbo[tensorrt-rtx]')")

from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.engine_store import Profile
from sdturbo.engine.errors import BackendError, BundleError, EngineCorrupt, EngineMissing, NonFiniteOutput
from sdturbo.engine.pipeline import Pipeline
from sdturbo.export.trt_build import build_engines

from tests.engine.emulated_gpu import EmulatedCuda, check_interleaved, emulated_pipeline, emulated_trt_class

PROMPTS = ["a red cube on a table", "an astronaut riding a horse"]
PROFILE = Profile.parse("1-2", "64-128")


def with_engines(bundle, tmp_path_factory, name):
    path = tmp_path_factory.mktemp(name) / "b"
    shutil.copytree(bundle, path)
    build_engines(path, "tensorrt-rtx", PROFILE, compute_capability=86, opt_level=0)
    return path


@pytest.fixture(scope="module", params=["sd-turbo", "sdxl-turbo"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def bundles(tiny_bundle, xl_bundle, tmp_path_factory):
    return {
        "sd-turbo": with_engines(tiny_bundle, tmp_path_factory, "trt-sd"),
        "sdxl-turbo": with_engines(xl_bundle, tmp_path_factory, "trt-xl"),
    }


@pytest.fixture(scope="module")
def pipes(bundles, family):
    path = bundles[family]
    cuda = EmulatedCuda()  # one device for both, as in a process
    return {
        "graph": emulated_pipeline(path, cuda, cuda_graph=True),
        "plain": emulated_pipeline(path, cuda, rtx=True, cuda_graph=False),
        "host": Pipeline(path, OnnxRuntimeBackend("fp16")),
    }


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_txt2img_equals_the_host_pipeline(pipes, steps):
    kw = dict(steps=steps, height=64, width=96, seed=11)
    want = pipes["host"](PROMPTS, **kw)
    for mode in ("graph", "plain"):
        np.testing.assert_array_equal(pipes[mode](PROMPTS, **kw), want, err_msg=mode)
    assert want.std() > 0  # an image, not a constant
    assert pipes["graph"].graph_status == "on", pipes["graph"].graph_status  # replays, not eager runs


def test_img2img_equals_the_host_pipeline(pipes):
    image = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    kw = dict(steps=4, height=64, width=64, image=image, strength=0.5, seed=9)
    want = pipes["host"](PROMPTS, **kw)
    np.testing.assert_array_equal(pipes["graph"](PROMPTS, **kw), want)
    np.testing.assert_array_equal(pipes["plain"](PROMPTS, **kw), want)


def test_interleaved_requests_leave_no_stale_state(pipes):
    """Prompts, seeds, sizes (up to the profile's maximum), batches and steps in turn, three times over: each
    replayed graph equals the host pipeline, so nothing from an earlier request leaks into a later one."""
    calls = [
        (PROMPTS, 1, 64, 96, 1),
        (PROMPTS[:1], 2, 64, 64, 2),
        (PROMPTS, 3, 128, 128, 1),
        (PROMPTS[::-1], 1, 64, 96, 1),
        (PROMPTS[:1], 4, 128, 64, 4),
    ]
    graph = pipes["graph"]
    check_interleaved(graph, pipes["host"], calls)


def test_the_graph_replays_engines_instead_of_rerunning_python(pipes):
    graph = pipes["graph"]
    for _ in range(2):  # the second, a prompt-cache hit, captures the graph without the text encoders
        graph(PROMPTS, height=64, width=64, seed=1)
    contexts = {n: c.context for n, c in graph.contexts[(2, 64, 64)].items()}
    before = {n: c.enqueued for n, c in contexts.items()}
    calls = graph.graphs.copy()
    assert calls and graph.graph_status == "on"  # (with no graph at all, what follows would hold as well)
    graph(PROMPTS, height=64, width=64, seed=2)
    assert graph.graphs == calls  # no new capture
    cached = {n for n in contexts if n.startswith("text_encoder")}  # a hit: the text encoders do not run
    assert all(c.enqueued == before[n] + (n not in cached) for n, c in contexts.items() if n != "vae_encoder")


def test_tensorrt_rtx_runtime_caches_are_saved_next_to_the_plans(pipes):
    pipes["plain"](PROMPTS[:1], height=64, width=64)
    for engine in pipes["plain"].engines.values():
        assert engine.cache_path.read_bytes() == b"emulated runtime cache"


def test_requests_outside_the_profile_are_refused(pipes):
    with pytest.raises(BundleError, match="outside the engines' profile"):
        pipes["graph"](PROMPTS, height=256, width=64)


def test_a_context_that_cannot_be_captured_turns_the_graph_off_loudly(bundles, caplog):
    """Were TensorRT to say a context cannot be stream-captured, the request still succeeds, enqueue by
    enqueue, with a warning naming the engines, and ``graph_status`` (shown by the benchmark) says why."""
    from tests.engine.emulated_gpu import EmulatedContext

    pipe = emulated_pipeline(bundles["sd-turbo"], EmulatedCuda(), rtx=True, cuda_graph=True)
    EmulatedContext.is_stream_capturable = lambda self, stream: self.name != "unet"
    try:
        with caplog.at_level("WARNING"):
            image = pipe(PROMPTS, height=64, width=64, seed=1)
    finally:
        del EmulatedContext.is_stream_capturable
    assert not pipe.graphs and pipe.graph_status.startswith("off: ") and "unet" in pipe.graph_status
    assert any("CUDA graph OFF" in r.message and "unet" in r.message for r in caplog.records)
    want = Pipeline(bundles["sd-turbo"], OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=1)
    np.testing.assert_array_equal(image, want)


def test_open_builds_one_static_profile_and_a_server_gets_every_batch_up_to_its_largest(tiny_bundle, tmp_path):
    """``open`` builds the engines a bundle lacks: for exactly the shape asked, or, with ``any_batch`` (what
    `sdturbo serve` asks for), for batches 1 to the largest: a static batch-2 profile does not do for a server,
    whose batches are as many requests as arrive."""
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    cls = emulated_trt_class(EmulatedCuda(), rtx=True)
    static = cls.open(path, (2, 64, 64))
    assert static.profile.tag == "b2_64x64"
    with pytest.raises(BundleError, match=r"batch 1 at 64x64 is outside the engines' profile b2_64x64"):
        static(PROMPTS[:1], height=64, width=64)
    server = cls.open(path, (2, 64, 64), any_batch=True)
    assert server.profile.tag == "b1-2_64x64"
    host = Pipeline(path, OnnxRuntimeBackend("fp16"))
    for prompts in (PROMPTS[:1], PROMPTS):
        want = host(prompts, height=64, width=64, seed=3)
        np.testing.assert_array_equal(server(prompts, height=64, width=64, seed=3), want)
    assert cls.open(path, (2, 64, 64)).profile.tag == "b2_64x64"  # the exact static one is still preferred
    assert cls.open(path, (1, 64, 64)).profile.tag == "b1-2_64x64"  # nothing built: the range covers it
    with pytest.raises(EngineMissing, match=r"for batch 1-2 at 96x64 \(built profiles: b1-2_64x64, b2_64x64\)"):
        cls.open(path, (2, 64, 96), any_batch=True, build=False)


def test_a_damaged_plan_is_built_again_when_a_pipeline_opens(bundles, tmp_path, monkeypatch):
    """A plan that fails its checksum (changed in place: same size, mtime set back) is an engine to build, as a
    missing one is, when a pipeline opens (never loaded, and no error the user must act on first)."""
    import os

    path = shutil.copytree(bundles["sd-turbo"], tmp_path / "b")
    plan = next((path / "engines").glob("tensorrt-rtx-*/*/unet.plan"))
    st = plan.stat()
    with open(plan, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(bytes(255 - b for b in f.read(256)))
    os.utime(plan, ns=(st.st_atime_ns, st.st_mtime_ns))
    cls = emulated_trt_class(EmulatedCuda(), rtx=True)
    built = []
    monkeypatch.setattr(cls, "_build", staticmethod(lambda root, profile: built.append(profile.tag)))
    with pytest.raises(EngineCorrupt, match="does not match its recorded sha256"):  # (nothing was built here)
        cls.open(path, (1, 64, 64))
    assert built == ["b1_64x64"]


def test_sdturbo_serve_on_tensorrt_builds_engines_for_batch_1_to_its_max_batch(tiny_bundle, tmp_path, monkeypatch):
    """`sdturbo serve --backend tensorrt` on a bundle without engines builds them for every batch the server
    may run (1 to --max-batch), and its warm-up runs batch 1 and the max batch (the server itself is not
    started here: tests/serve/test_triton.py serves for real on the CPU)."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'sdturbo[serve]')")
    from sdturbo.benchmarks.serve_load import free_ports
    from sdturbo.engine import cli, cuda, serve_triton, trt_pipeline

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    monkeypatch.setattr(trt_pipeline, "TrtPipeline", emulated_trt_class(EmulatedCuda(), rtx=True))
    monkeypatch.setattr(cuda, "gpu_problem", lambda: None)  # the emulated GPU is this test's GPU
    batchers, graphs = [], []  # the graphs as the server starts serving (it closes its pipeline as it stops)

    def _serve(triton, model_config, batcher, *rest):
        batchers.append(batcher)
        graphs.append({key[:3] for key in batcher.pipe.graphs})
        return 0

    monkeypatch.setattr(serve_triton, "_serve", _serve)
    ports = [str(p) for p in free_ports(3)]
    argv = ["serve", "--bundle", str(path), "--backend", "tensorrt", "--max-batch", "2", "--host", "127.0.0.1"]
    argv += ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    assert cli.main(argv) == 0
    pipe = batchers[0].pipe
    assert pipe.profile.tag == "b1-2_256x256"
    assert graphs[0] >= {(1, 256, 256), (2, 256, 256)}
    assert pipe.closed


def test_the_benchmarks_tensorrt_sweep_gets_engines_for_every_batch(tiny_bundle, tmp_path, monkeypatch):
    """The latency run's TensorRT engines are static (its batch only): the throughput sweep gets engines for
    batch 1 to its largest (built once), each batch measured, and the report names their profile."""
    from sdturbo.benchmarks.bench import BenchConfig, throughput
    from sdturbo.benchmarks.contenders import Ours
    from sdturbo.benchmarks.timers import StageTimer
    from sdturbo.engine import trt_pipeline

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    monkeypatch.setattr(trt_pipeline, "TrtPipeline", emulated_trt_class(EmulatedCuda(), rtx=True))
    ours = Ours(path, "tensorrt", "fp16", StageTimer())
    ours.load((1, 64, 64), max_batch=2)
    assert ours.pipe.profile.tag == "b1_64x64"
    cfg = BenchConfig(height=64, width=64, batches=(1, 2), contenders=("sdturbo-tensorrt-fp16",))
    rows = throughput(ours, cfg, lambda: None)
    assert [r["batch"] for r in rows] == [1, 2] and all(r["images_per_s"] for r in rows), rows
    assert ours.sweep_profile == "b1-2_64x64" == ours.pipe.profile.tag


def test_an_image_that_is_not_finite_says_how_to_run_fp32_graphs(pipes, monkeypatch):
    """TensorRT engines are fp16 only: an image that comes out NaN is refused (the other kept) with ONNX
    Runtime's fp32 graphs as the remedy, not a --precision fp32 that this backend refuses."""
    from sdturbo.engine.trt_pipeline import TrtContext

    pipe, kw = pipes["plain"], dict(steps=1, height=64, width=64, seed=3)
    clean = pipe(PROMPTS, **kw)
    enqueue, (_, dtype) = TrtContext.enqueue, pipe.buffer_specs["image_out"]

    def spoilt(self, stream):  # image 1's first value of the decoder's output becomes NaN, on the stream
        enqueue(self, stream)
        if self.name == pipe.decoder:
            first = pipe.dev["image_out"].ptr + 3 * 64 * 64 * dtype.itemsize
            stream.enqueue(lambda: pipe.cuda.memory.array(first, dtype, (1,)).__setitem__(0, np.nan))

    monkeypatch.setattr(TrtContext, "enqueue", spoilt)
    with pytest.raises(NonFiniteOutput) as e:
        pipe(PROMPTS, **kw)
    assert str(e.value) == (
        "image 1 of 2 came out of the VAE decoder with NaN or infinite values (an fp16 overflow, most often; the "
        "fp32 graphs avoid it: --backend onnxruntime-cuda --precision fp32): its pixels are no image"
    )
    np.testing.assert_array_equal(e.value.images[0], clean[0])


ENGINE_NOT_THE_GRAPH = {  # component, how its engine differs from the bundle's graph, what the error names
    "element type": (
        "unet",
        lambda io: io["noise_pred"].__setitem__(1, "DataType.FLOAT"),
        "noise_pred as DataType.FLOAT",
    ),
    "tensor names": (
        "vae_decoder",
        lambda io: io.__setitem__("sample", io.pop("image")),
        "tensors ['latents', 'sample']",
    ),
    "roles": ("text_encoder", lambda io: io["hidden_states"].__setitem__(0, "TensorIOMode.INPUT"), "hidden_states as"),
}


def built_otherwise(monkeypatch, component: str, change) -> None:
    """Engines loaded from now on are as built, except ``component``'s, whose tensor table (name -> [role,
    type, axes]) ``change`` edits in place: an engine built from another graph."""
    from tests.engine.emulated_gpu import EmulatedCudaEngine

    built = EmulatedCudaEngine.__init__

    def engine(self, trt, name):
        built(self, trt, name)
        self.io = {k: list(v) for k, v in self.io.items()}
        if name == component:
            change(self.io)

    monkeypatch.setattr(EmulatedCudaEngine, "__init__", engine)


@pytest.mark.parametrize("case", sorted(ENGINE_NOT_THE_GRAPH))
def test_an_engine_that_is_not_the_bundles_graph_is_refused_at_open(bundles, monkeypatch, case):
    """TensorRT binds by address and checks no type or name: an engine whose inputs and outputs are not the
    bundle's graph's would read and write the buffers as what they are not. Refused when the engines load."""
    component, change, named = ENGINE_NOT_THE_GRAPH[case]
    built_otherwise(monkeypatch, component, change)
    with pytest.raises(BackendError, match=f"{component}'s engine has .*{re.escape(named)}.*sdturbo build"):
        emulated_pipeline(bundles["sd-turbo"], EmulatedCuda(), rtx=True)


def test_an_engine_whose_output_shape_is_not_the_buffers_is_refused_before_it_runs(bundles, monkeypatch):
    """An engine that would write more (or less) than the buffer made for its output (here: a decoder that
    does not upsample) is refused when its shape's context is made, before any enqueue writes past it."""
    from tests.engine.emulated_gpu import EmulatedContext

    built_otherwise(
        monkeypatch, "vae_decoder", lambda io: io["image"].__setitem__(2, ["batch", 3, "latent_height", "latent_width"])
    )
    pipe = emulated_pipeline(bundles["sd-turbo"], EmulatedCuda(), rtx=True)
    monkeypatch.setattr(EmulatedContext, "execute_async_v3", lambda *a: pytest.fail("an engine was enqueued"))
    with pytest.raises(
        BackendError, match=r"vae_decoder's engine would write image as \(1, 3, 8, 8\) where .* \(1, 3, 64, 64\)"
    ):
        pipe(PROMPTS[:1], height=64, width=64, seed=1)


def test_a_capture_that_killed_a_process_is_tried_again_with_another_tensorrt(bundles, tmp_path, monkeypatch):
    """A capture that killed a process is skipped while the facts it depends on stay the same, the library's
    version among them: a record left under another TensorRT-RTX version does not keep the graph off (a newer
    library is tried again); one left under this version does. The image is the host pipeline's either way."""
    from sdturbo.engine import capture_guard
    from sdturbo.engine.capture_guard import CaptureGuard

    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDTURBO_CAPTURE_TRIALS", raising=False)
    path = bundles["sd-turbo"]
    want = Pipeline(path, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=1)
    for other_version in (True, False):
        pipe = emulated_pipeline(path, EmulatedCuda(), cuda_graph=True)
        version = pipe.version
        if other_version:
            pipe.version = f"{version}.older"
        guard = CaptureGuard(f"{pipe._graph_label()} ({pipe.name})", pipe._capture_facts())
        pipe.version = version
        folder = capture_guard.trials_folder()  # a marker no process holds: its process died in that capture
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{guard.key}.{capture_guard._host()}-1-dead.pending").write_text("{}")
        np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=1), want)
        assert (pipe.graph_status == "on") == other_version, pipe.graph_status
