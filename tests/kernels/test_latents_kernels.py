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

NAMES = ("init_latents", "add_noise", "scale_input", "euler_step", "to_uint8")


@pytest.mark.skipif(NVRTC is not None, reason=f"NVRTC unavailable: {NVRTC}")
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("cc", [75, 80, 86, 89, 90])
def test_compiles_without_fused_multiply_add(dtype, cc):
    ptx = compile_ptx(dtype, cc).decode()
    assert all(f".entry {n}(" in ptx for n in NAMES)
    assert f".target sm_{cc}" in ptx
    assert "fma." not in ptx  # --fmad=false: the rounding of the reference's separate multiply and add


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
    from sdturbo.engine.cuda import DeviceBuffer, PinnedArray, Stream, current_compute_capability
    from sdturbo.engine.images import to_uint8
    from sdturbo.engine.schedule import SchedulerConfig, make_schedule
    from sdturbo.kernels import load_kernels

    k = load_kernels(np.dtype(dtype).name, current_compute_capability())
    s = Stream()
    rng = np.random.default_rng(0)
    shape = (2, 4, 16, 24)
    n = int(np.prod(shape))
    sched = make_schedule(SchedulerConfig(), 4, 0.75)

    def dev(arr):
        host = PinnedArray(arr.shape, arr.dtype)
        host.array[...] = arr
        buf = DeviceBuffer(arr.nbytes)
        s.copy_in(buf.ptr, host, arr.nbytes)
        return buf

    def back(buf, shp, dt):
        host = PinnedArray(shp, dt)
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
    np.testing.assert_array_equal(back(x, shape, dtype), sched.step(0, eps, want))
    image = (rng.standard_normal((2, 3, 16, 24)) * 1.2).astype(dtype)
    pixels = DeviceBuffer(2 * 16 * 24 * 3)
    k.to_uint8(dev(image).ptr, pixels.ptr, 2, 16, 24, s.ptr)
    np.testing.assert_array_equal(back(pixels, (2, 16, 24, 3), np.uint8), to_uint8(image))
