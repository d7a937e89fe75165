"""The tiny VAE and the prompt cache in the device pipelines (TensorRT, ONNX Runtime CUDA), on the emulated GPU
(tests/engine/emulated_gpu.py): every image equals the host pipeline's on the same fp16 ONNX bit for bit.

A prompt-cache hit copies the cached rows in from the cache's device pool and replays a second graph per shape,
captured without the text encoders; a miss runs the whole chain and copies its rows into the pool.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'sdturbo[tensorrt-rtx]')")

from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.engine_store import Profile
from sdturbo.engine.errors import InputError
from sdturbo.engine.pipeline import Pipeline
from sdturbo.export.trt_build import build_engines

from tests.engine.emulated_gpu import EmulatedCuda, emulated_ort_pipeline, emulated_pipeline

A, B, C = "a red cube on a table", "an astronaut riding a horse", "a bowl of soup"
SHAPE = (2, 64, 96)


# Both runtimes share DevicePipeline, where the two modes live; TensorRT's own part (which engines it opens) does
# not depend on the family, so SDXL-Turbo runs on the ONNX Runtime CUDA emulation only (no engines to build).
KINDS = [("sd-turbo", "tensorrt"), ("sd-turbo", "onnxruntime-cuda"), ("sdxl-turbo", "onnxruntime-cuda")]


@pytest.fixture(scope="module")
def trt_bundle(tiny_vae_bundle, tmp_path_factory):
    """The SD-Turbo tiny-VAE bundle with TensorRT-RTX engines for every component, the tiny VAE's included."""
    path = tmp_path_factory.mktemp("modes-trt") / "b"
    shutil.copytree(tiny_vae_bundle, path)
    build_engines(path, "tensorrt-rtx", Profile.parse("1-2", "64-96"), compute_capability=86, opt_level=0)
    return path


@pytest.fixture(params=KINDS, ids=["-".join(k) for k in KINDS])
def case(request, trt_bundle, xl_tiny_vae_bundle, tiny_vae_bundle):
    family, kind = request.param
    if kind == "tensorrt":
        return trt_bundle, kind
    return {"sd-turbo": tiny_vae_bundle, "sdxl-turbo": xl_tiny_vae_bundle}[family], kind


class CountingSession:
    """An onnxruntime session that counts its runs (a captured graph's replays run it too)."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def run_with_iobinding(self, *args):
        self.runs += 1
        return self.session.run_with_iobinding(*args)

    def __getattr__(self, name):
        return getattr(self.session, name)


def device(kind: str, bundle, **kw):
    if kind == "tensorrt":
        return emulated_pipeline(bundle, EmulatedCuda(), **kw)
    pipe = emulated_ort_pipeline(bundle, EmulatedCuda(), shape=SHAPE, **kw)
    for engine in pipe.engines.values():
        engine.session = CountingSession(engine.session)
    return pipe


def test_the_tiny_vae_equals_the_host_pipeline(case):
    bundle, kind = case
    host = Pipeline(bundle, OnnxRuntimeBackend("fp16"), vae="tiny", prompt_cache=0)
    host.vae_per_image = False  # the emulated GPU runs its tiny VAE on the CPU a batch at a time, as a GPU would
    graph = device(kind, bundle, vae="tiny", prompt_cache=0)
    assert {"tiny_vae_decoder", "tiny_vae_encoder"} <= set(graph.engines) and "vae_decoder" not in graph.engines
    kw = dict(height=64, width=96, seed=3, steps=2)
    np.testing.assert_array_equal(graph([A, B], **kw), host([A, B], **kw))
    image = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    kw = dict(height=64, width=96, seed=4, steps=4, image=image, strength=0.5)
    np.testing.assert_array_equal(graph([A, B], **kw), host([A, B], **kw))
    assert graph.graph_status == "on"
    with pytest.raises(InputError, match="image_noise"):
        graph.request([A], height=64, width=96, image=image[0], steps=2, image_noise=np.zeros((1, 4, 8, 12)))


def test_prompt_cache_hits_skip_the_text_encoders_and_change_no_pixel(case):
    """Hits, misses and an eviction in turn, replayed as graphs and enqueued without one: every image equals the
    host pipeline's without a cache; a hit runs no text encoder and captures its own graph once per shape."""
    bundle, kind = case
    host = Pipeline(bundle, OnnxRuntimeBackend("fp16"), prompt_cache=0)
    pipes = {
        "graph": device(kind, bundle, prompt_cache=3),
        "plain": device(kind, bundle, prompt_cache=3, cuda_graph=False),
    }
    requests = [  # (prompts, seed, a hit)
        ([A, B], 1, False),
        ([B, A], 2, True),  # both rows cached at batch 2, at the other positions
        ([A, A], 3, True),
        ([C, B], 4, False),  # C is new: the whole batch runs; the cache (3 rows) is full now
        ([A], 5, False),  # batch 1: not cached at this batch size; evicts the least recent row, A's at batch 2
        ([A], 6, True),
        ([B, C], 7, True),
        ([A, B], 8, False),  # A's batch-2 row was evicted: a miss, which evicts A's batch-1 row
    ]
    for mode, pipe in pipes.items():
        encoders = [e for n, e in pipe.engines.items() if n.startswith("text_encoder")]
        for prompts, seed, hit in requests:
            kw = dict(height=64, width=64, seed=seed)
            runs, graphs = [count_runs(pipe, e) for e in encoders], len(pipe.graphs)
            np.testing.assert_array_equal(pipe(prompts, **kw), host(prompts, **kw), err_msg=f"{mode} {prompts}")
            ran = [count_runs(pipe, e) - r for e, r in zip(encoders, runs, strict=True)]
            if len(pipe.graphs) == graphs:  # (a capture runs the chain eagerly too, for its checks)
                assert ran == [0 if hit else 1] * len(encoders), (mode, prompts, ran)
        stats = pipe.prompt_cache.stats()
        assert (stats["hits"], stats["evictions"], stats["size"]) == (4, 2, 3), (mode, stats)
    graphs = pipes["graph"].graphs
    assert {k[-1] for k in graphs} == {True, False} and pipes["graph"].graph_status == "on"
    assert len(graphs) == 4  # batch 2 and batch 1, each with and without the text encoders


def count_runs(pipe, engine) -> int:
    """How many times ``engine`` has run in ``pipe`` (TensorRT: every context of it, one per shape)."""
    if hasattr(pipe, "emulated_trt"):
        return sum(c.enqueued for c in pipe.emulated_trt.contexts.get(engine.name, []))
    return engine.session.runs
