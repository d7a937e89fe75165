"""GPU-only: ONNX Runtime on CUDA (onnxruntime-gpu), device-resident and host-driven, against diffusers.

Skipped with a reason without an NVIDIA GPU, onnxruntime-gpu's CUDA provider or CUDA torch. The CPU check that
a CUDA session quietly falling back to the CPU is refused is in tests/engine/test_backends.py.
"""

from __future__ import annotations

import numpy as np
import pytest


def reason() -> str | None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return f"needs onnxruntime-gpu (this onnxruntime has {onnxruntime.get_available_providers()})"
    import torch

    return None if torch.cuda.is_available() else "needs an NVIDIA GPU and a CUDA build of torch"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(reason() is not None, reason=str(reason()))]
from tests.engine.test_gpu_pipeline import diffusers_fp16_bar, latents, rms  # noqa: E402
from tests.reference import PROMPTS, H, W  # noqa: E402


@pytest.fixture(scope="module")
def pipes(tiny_bundle):
    """The device-resident pipeline, replayed as one CUDA graph, with onnxruntime's own graph per session, and
    enqueued run by run; with channels-last convolutions (prefer_nhwc); and the host-driven one (stage by stage,
    IO binding per call) on the same fp16 graphs."""
    from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
    from sdturbo.engine.ort_pipeline import OrtCudaPipeline
    from sdturbo.engine.pipeline import Pipeline

    shape = (2, 128, 128)
    return {
        "graph": OrtCudaPipeline(tiny_bundle, "fp16", shape=shape, cuda_graph=True),
        "sessions": OrtCudaPipeline(tiny_bundle, "fp16", shape=shape, cuda_graph="sessions"),
        "plain": OrtCudaPipeline(tiny_bundle, "fp16", shape=shape, cuda_graph=False),
        "nhwc": OrtCudaPipeline(tiny_bundle, "fp16", shape=shape, nhwc=True),
        "host": Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16", ("CUDAExecutionProvider",))),
    }


def test_open_pipeline_gives_the_device_resident_pipeline(tiny_bundle):
    from sdturbo.engine.ort_pipeline import OrtCudaPipeline
    from sdturbo.engine.runtime import open_pipeline

    assert isinstance(open_pipeline(tiny_bundle, "onnxruntime-cuda", shape=(1, 64, 64)), OrtCudaPipeline)


@pytest.mark.parametrize("steps", [1, 4])
def test_onnxruntime_cuda_matches_diffusers(steps, pipes, tiny_folder):
    """fp16 on CUDA: no further from diffusers fp32 than twice diffusers' own fp16 error, plus a level."""
    lat = latents(steps)
    ref32, bound = diffusers_fp16_bar(tiny_folder, steps, lat)
    for mode in ("graph", "sessions", "nhwc", "host"):
        ours = pipes[mode](PROMPTS, steps=steps, height=H, width=W, latents=lat)
        print(f"{steps} step(s), {mode}: RMS ORT-CUDA vs diffusers fp32 {rms(ours, ref32):.3f}, bound {bound:.3f}")
        assert rms(ours, ref32) <= bound, mode


def test_other_prompts_at_a_captured_shape_give_their_own_images(pipes):
    """After a shape's graphs are captured, other prompts (same shape, latents and steps) must give their own
    image, not the captured one: onnxruntime copies a bound input once, at bind time, where it wants it on
    another device, and a replay would then read that copy for ever. The random model's prompts move its image
    little (RMS about 2 levels), so each image is held to the host-driven pipeline's (IO bound per call) for
    the same prompts, and must be several times closer to it than to the first prompts' image."""
    lat = latents(1)
    others = ["a lighthouse on a cliff at dusk, oil painting", "a bowl of ramen"]
    host = {p: pipes["host"](list(p), height=H, width=W, latents=lat) for p in (tuple(PROMPTS), tuple(others))}
    for mode in ("graph", "sessions"):
        pipes[mode](list(PROMPTS), height=H, width=W, latents=lat)  # captured (or replayed) at this shape
        ours = pipes[mode](others, height=H, width=W, latents=lat)
        right, first = rms(ours, host[tuple(others)]), rms(ours, host[tuple(PROMPTS)])
        print(f"{mode}: RMS to the host image of these prompts {right:.3f}, of the first prompts {first:.3f}")
        assert 4 * right < first, (mode, right, first)


def test_every_session_runs_on_cuda_on_the_pipelines_stream(pipes):
    for mode in ("graph", "nhwc"):
        pipe = pipes[mode]
        for name, component in pipe.engines.items():
            assert component.session.get_providers()[0] == "CUDAExecutionProvider", name
            options = component.session.get_provider_options()["CUDAExecutionProvider"]
            assert int(options["user_compute_stream"]) == pipe.stream.ptr, name
            assert options.get("prefer_nhwc", "0") == ("1" if mode == "nhwc" else "0"), (mode, name)


def eager(pipe, prompts, **kw) -> np.ndarray:
    """``pipe``'s own sessions enqueued run by run, no graph: the reference its replays must equal. (Not another
    pipeline's: its sessions run cuDNN's exhaustive algorithm search of their own, and where two algorithms
    time alike each may pick another, with other last bits.)"""
    graphs = pipe.cuda_graph
    pipe.cuda_graph = False
    try:
        return pipe(prompts, **kw)
    finally:
        pipe.cuda_graph = graphs


def test_the_whole_chain_is_captured_and_replays_as_it_ran(pipes):
    """The capture itself must work on this onnxruntime (else graph_status says why), and every replay equals
    the run-by-run enqueue, byte for byte, across steps."""
    pipe = pipes["graph"]
    for steps in (1, 2, 4):
        a = pipe(PROMPTS, steps=steps, height=H, width=W, seed=3)
        np.testing.assert_array_equal(a, eager(pipe, PROMPTS, steps=steps, height=H, width=W, seed=3))
    assert pipe.graph_status == "on"
    assert len(pipe.graphs) >= 3  # (one per step count: replayed, not enqueued)


def test_each_sessions_own_graph_replays_as_it_ran(pipes):
    """The second tier: onnxruntime's own CUDA graph per session and shape, captured by onnxruntime and checked
    by us; every replay equals the run-by-run enqueue, byte for byte, across steps."""
    pipe = pipes["sessions"]
    for steps in (1, 2, 4):
        a = pipe(PROMPTS, steps=steps, height=H, width=W, seed=3)
        np.testing.assert_array_equal(a, eager(pipe, PROMPTS, steps=steps, height=H, width=W, seed=3))
    assert pipe.graph_status.startswith("sessions: ")


def test_repeated_calls_have_no_stale_buffers(pipes):
    """Interleave prompts, seeds, sizes and batch sizes; each replay equals the same pipeline's eager run."""
    calls = [(PROMPTS, 1, 64, 96), (PROMPTS[:1], 2, 64, 64), (PROMPTS, 3, 128, 64), (PROMPTS[::-1], 1, 64, 96)]
    for _ in range(2):
        for prompts, seed, h, w in calls:
            for mode in ("graph", "sessions"):
                got = pipes[mode](prompts, height=h, width=w, seed=seed)
                want = eager(pipes[mode], prompts, height=h, width=w, seed=seed)
                np.testing.assert_array_equal(got, want, err_msg=mode)
    assert not np.array_equal(
        pipes["graph"](PROMPTS[:1], height=64, width=64, seed=1),
        pipes["graph"](PROMPTS[:1], height=64, width=64, seed=2),
    )


def test_onnxruntime_cuda_img2img_replays_as_it_ran(pipes):
    image = np.random.default_rng(0).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    kw = dict(steps=2, height=H, width=W, image=image, strength=0.5, seed=9)
    for mode in ("graph", "sessions"):
        a = pipes[mode](PROMPTS, **kw)
        np.testing.assert_array_equal(a, eager(pipes[mode], PROMPTS, **kw), err_msg=mode)
        assert a.std() > 0


def test_pipelines_closed_or_dropped_give_the_gpu_memory_back(tiny_bundle):
    """A server reloading a model, the benchmark's contenders one after another: a pipeline opened, used
    (whole-chain graph, img2img) and closed, or dropped, gives back what it took: its buffers, and its sessions'
    memory (onnxruntime's arenas, its own graphs). The first cycle loads what stays loaded for the process
    (CUDA modules, libraries' handles); after it, free memory must not fall by half of what one open pipeline
    holds, over three more cycles (one pipeline leaked is all of it, each time)."""
    import gc

    from sdturbo.engine.cuda import bindings, check
    from sdturbo.engine.ort_pipeline import OrtCudaPipeline

    rt = bindings()[1]

    def free() -> int:
        gc.collect()
        check(rt.cudaDeviceSynchronize())
        return int(check(rt.cudaMemGetInfo())[0])

    def cycle(close: bool) -> int:
        pipe = OrtCudaPipeline(tiny_bundle, "fp16", shape=(2, 128, 128), cuda_graph=True)
        pipe(PROMPTS, height=H, width=W, seed=1)
        image = np.zeros((H, W, 3), np.uint8)
        pipe(PROMPTS[:1], height=H, width=W, image=image, strength=0.5, steps=2)
        held = free()
        if close:
            pipe.close()
        del pipe
        return held

    cycle(close=True)
    before = free()
    footprint = before - cycle(close=True)
    after = [free()]
    for close in (False, True):  # dropped without close(), then closed
        cycle(close)
        after.append(free())
    assert footprint > 0
    lost = before - min(after)
    assert lost < footprint / 2, f"{lost / 2**20:.1f} MiB not given back; one open pipeline: {footprint / 2**20:.1f}"


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_on_onnxruntime_cuda_matches_diffusers(steps, xl_bundle, xl_folder):
    """SDXL-Turbo (fp16 UNet, fp32 VAE cast around, ancestral noise replayed): the fp16 bar as for SD-Turbo."""
    from sdturbo.engine.ort_pipeline import OrtCudaPipeline

    from tests.engine.test_gpu_pipeline import sdxl_fp16_reference

    pipe = OrtCudaPipeline(xl_bundle, "fp16", shape=(2, H, W))
    kw, ref32, bound = sdxl_fp16_reference(xl_folder, steps)
    ours = pipe(PROMPTS, **kw)
    print(f"SDXL {steps} step(s): RMS ORT-CUDA vs diffusers fp32 {rms(ours, ref32):.3f}, bound {bound:.3f}")
    print(f"SDXL graph_status: {pipe.graph_status}")
    assert rms(ours, ref32) <= bound
    # every session on CUDA alone (no host copies), so onnxruntime let each keep CUDA graphs: the second text
    # encoder's pooled-token ArgMax is exported over floats (tests/export/test_cuda_kernels.py)
    refused = [name for name, c in pipe.engines.items() if c.graph_options is None]
    assert refused == [], refused


def optimized_copy(bundle, tmp_path_factory, name: str):
    """A copy of ``bundle`` with ONNX Runtime's optimized fp16 graphs for CUDA (``sdturbo build --ort-optimize``,
    what the benchmark's default ONNX Runtime CUDA contender runs): fused GroupNorm (NHWC), NhwcConv,
    MultiHeadAttention (onnxruntime's in the UNet; ours in the text encoders and the VAE, export/attention.py)."""
    import shutil

    from sdturbo.export.ort_optimize import optimize_bundle

    path = shutil.copytree(bundle, tmp_path_factory.mktemp(name) / "b")
    optimize_bundle(path, provider="cuda")
    return path


@pytest.fixture(scope="module")
def optimized(tiny_bundle, tmp_path_factory):
    return optimized_copy(tiny_bundle, tmp_path_factory, "fused")


@pytest.fixture(scope="module")
def xl_optimized(xl_bundle, tmp_path_factory):
    return optimized_copy(xl_bundle, tmp_path_factory, "xl-fused")


@pytest.mark.parametrize("steps", [1, 4])
def test_the_optimized_graphs_match_diffusers(steps, optimized, tiny_folder):
    """The fused kernels on the GPU, in the chain's CUDA graph (the image is the checked replay's), held to the
    same fp16 bar as the plain graphs."""
    from sdturbo.engine.ort_pipeline import OrtCudaPipeline

    pipe = OrtCudaPipeline(optimized, "fp16", shape=(2, H, W))
    assert set(pipe.graphs_used.values()) == {"optimized"}, pipe.graphs_used
    lat = latents(steps)
    ref32, bound = diffusers_fp16_bar(tiny_folder, steps, lat)
    ours = pipe(PROMPTS, steps=steps, height=H, width=W, latents=lat)
    print(f"optimized, {steps} step(s): RMS vs diffusers fp32 {rms(ours, ref32):.3f}, bound {bound:.3f}")
    print(f"optimized graph_status: {pipe.graph_status}")
    assert rms(ours, ref32) <= bound


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_optimized_graphs_match_diffusers(steps, xl_optimized, xl_folder):
    from sdturbo.engine.ort_pipeline import OrtCudaPipeline

    from tests.engine.test_gpu_pipeline import sdxl_fp16_reference

    pipe = OrtCudaPipeline(xl_optimized, "fp16", shape=(2, H, W))
    assert set(pipe.graphs_used.values()) == {"optimized"}, pipe.graphs_used
    kw, ref32, bound = sdxl_fp16_reference(xl_folder, steps)
    ours = pipe(PROMPTS, **kw)
    print(f"SDXL optimized {steps} step(s): RMS vs diffusers fp32 {rms(ours, ref32):.3f}, bound {bound:.3f}")
    print(f"SDXL optimized graph_status: {pipe.graph_status}")
    assert rms(ours, ref32) <= bound
