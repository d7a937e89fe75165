"""kernels/latents.cu: compiles with NVRTC on any machine; on a GPU, equals its host twins bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from sdturbo.engine.errors import BackendError

try:
    from sdturbo.kernels import compile_ptx

    compile_ptx("float32", 86)
    NVRTC = None
except BackendError as e:  # cuda-python or libnvrtc missing
    NVRTC = str(e)

from sdturbo.kernels import Kernels

NAMES = Kernels.NAMES


@pytest.mark.skipif(NVRTC is not None, reason=f"NVRTC unavailable: {NVRTC}")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("cc", [75, 80, 86, 89, 90])
def test_compiles_without_fused_multiply_add(dtype, cc):
    ptx = compile_ptx(dtype, cc).decode()
    assert all(f".entry {n}(" in ptx for n in NAMES)
    assert f".target sm_{cc}" in ptx
    assert "fma." not in ptx  # --fmad=false: the rounding of the reference's separate multiply and add


@pytest.mark.skipif(NVRTC is not None, reason=f"NVRTC unavailable: {NVRTC}")
@pytest.mark.parametrize("cc", [86, 90])
def test_runs_from_a_cubin_for_the_exact_sm(cc):
    """What is loaded is machine code for sm_<cc>, not PTX: a driver older than NVRTC cannot JIT NVRTC's PTX
    (NVRTC 13.5 emits PTX ISA 9.5; a CUDA 13.0 driver reads up to 9.0), but runs a cubin for its own SM."""
    from sdturbo.kernels import compile_cubin

    cubin = compile_cubin("float16", cc)
    assert cubin[:4] == b"\x7fELF"
    assert all(n.encode() in cubin for n in NAMES)
    assert b".version" not in cubin[:4096]  # no PTX text inside


def test_bad_dtype():
    with pytest.raises(ValueError, match="bfloat16"):
        compile_ptx("bfloat16", 86)


def gpu_reason() -> str | None:
    if NVRTC is not None:
        return f"NVRTC unavailable: {NVRTC}"
    from sdturbo.engine.cuda import gpu_available

    return None if gpu_available() else "needs an NVIDIA GPU with a CUDA driver"


@pytest.mark.gpu
@pytest.mark.skipif(gpu_reason() is not None, reason=str(gpu_reason()))
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_kernels_equal_host_twins(dtype):
    from sdturbo.engine import cuda
    from sdturbo.kernels import load_kernels

    cc = cuda.current_compute_capability()
    check_against_host_twins(lambda dt: load_kernels(np.dtype(dt).name, cc), cuda, dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_emulated_kernels_equal_host_twins(dtype):
    """The numpy translation of latents.cu that tests/engine/test_trt_emulated.py runs: same host twins."""
    from tests.engine.emulated_gpu import EmulatedCuda, EmulatedKernels

    cuda = EmulatedCuda()
    cuda.ensure_context()
    check_against_host_twins(lambda dt: EmulatedKernels(np.dtype(dt).name, cuda), cuda, dtype)


def check_against_host_twins(kernels, cuda, dtype):
    """Each kernel on device buffers equals engine/schedule.py's or engine/images.py's numpy, bit for bit."""
    from sdturbo.engine.images import to_uint8
    from sdturbo.engine.schedule import SchedulerConfig, make_schedule

    k = kernels(dtype)
    s = cuda.Stream()
    rng = np.random.default_rng(0)
    shape = (2, 4, 16, 24)
    n = int(np.prod(shape))
    sched = make_schedule(SchedulerConfig(), 4, 0.75)

    def dev(arr):
        host = cuda.PinnedArray(arr.shape, arr.dtype)
        host.array[...] = arr
        buf = cuda.DeviceBuffer(arr.nbytes)
        s.copy_in(buf.ptr, host, arr.nbytes)
        return buf

    def back(buf, shp, dt):
        host = cuda.PinnedArray(shp, dt)
        s.copy_out(host, buf.ptr, host.nbytes)
        s.synchronize()
        return host.array.copy()

    noise, enc, eps = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    x = dev(np.zeros(shape, dtype))
    k.init_latents(dev(noise).ptr, x.ptr, sched.init_noise_sigma, n, s.ptr)
    np.testing.assert_array_equal(back(x, shape, dtype), sched.noise_latents(noise))
    k.add_noise(dev(enc).ptr, dev(noise).ptr, x.ptr, float(sched.sigmas[0]), n, s.ptr)
    want = sched.add_noise(enc, noise)
    np.testing.assert_array_equal(back(x, shape, dtype), want)
    out = dev(np.zeros(shape, dtype))
    denom = float(np.sqrt(sched.sigmas[0] ** 2 + np.float32(1)))
    k.scale_input(x.ptr, out.ptr, denom, n, s.ptr)
    np.testing.assert_array_equal(back(out, shape, dtype), sched.scale_input(0, want))
    k.euler_step(x.ptr, dev(eps).ptr, float(sched.sigmas[0]), float(sched.sigmas[1]), n, s.ptr)
    stepped = sched.step(0, eps, want)
    np.testing.assert_array_equal(back(x, shape, dtype), stepped)

    ancestral = make_schedule(SchedulerConfig(ancestral=True), 4, 0.75)
    up, down = ancestral.sigma_up_down(1)
    step_noise = rng.standard_normal(shape).astype(dtype)
    sigma = float(ancestral.sigmas[1])
    k.ancestral_step(x.ptr, dev(eps).ptr, dev(step_noise).ptr, sigma, float(down), float(up), n, s.ptr)
    np.testing.assert_array_equal(back(x, shape, dtype), ancestral.step(1, eps, stepped, step_noise))

    wide = (rng.standard_normal(shape) * 3e4).astype(np.float32)  # some beyond fp16's range: inf, as numpy
    with np.errstate(over="ignore"):
        narrowed = wide.astype(dtype)
    narrow = cuda.DeviceBuffer(n * np.dtype(dtype).itemsize)
    k.from_float32(dev(wide).ptr, narrow.ptr, n, s.ptr)
    np.testing.assert_array_equal(back(narrow, shape, dtype), narrowed)
    widened = cuda.DeviceBuffer(n * 4)
    k.to_float32(narrow.ptr, widened.ptr, n, s.ptr)
    np.testing.assert_array_equal(back(widened, shape, np.float32), narrowed.astype(np.float32))

    image = (rng.standard_normal((2, 3, 16, 24)) * 1.2).astype(dtype)
    pixels = cuda.DeviceBuffer(2 * 16 * 24 * 3)
    k.to_uint8(dev(image).ptr, pixels.ptr, 2, 16, 24, s.ptr)
    np.testing.assert_array_equal(back(pixels, (2, 16, 24, 3), np.uint8), to_uint8(image))
