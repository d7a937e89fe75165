"""kernels/latents.cu: compiles with NVRTC on any machine; equals its host twins bit for bit on a GPU, and on
the CPU as compiled by a C++ compiler (kernels/host.py), so the CPU suite runs the kernel source itself."""

from __future__ import annotations

import ctypes

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


def test_a_missing_nvrtc_library_says_what_to_install(monkeypatch):
    """cuda-python opens libnvrtc on first use and raises its own error when it is not there (a `[cuda]`
    install on a machine without the CUDA toolkit): one line naming the packages, as a BackendError."""
    from sdturbo.engine import cuda
    from sdturbo.engine.errors import BackendError

    class NoLibrary:
        def nvrtcCreateProgram(self, *args):
            raise RuntimeError("Failure finding libnvrtc.so.13: not found")

    monkeypatch.setattr(cuda, "bindings", lambda: (None, None, NoLibrary()))
    with pytest.raises(BackendError, match=r"NVRTC.*loaded \(Failure finding libnvrtc.so.13: .*nvidia-cuda-nvrtc"):
        compile_ptx("float16", 86)


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


class HostCuda:
    """What check_against_host_twins asks of engine/cuda.py, in host memory: addresses are real ones, so the
    host-compiled kernels read and write them. Every buffer lives as long as this object (nothing is freed
    under a kernel); new ones are filled with 0xFF (NaN) so a read of memory nothing wrote shows."""

    def __init__(self):
        self.buffers: list[np.ndarray] = []
        cuda = self

        class DeviceBuffer:
            def __init__(self, nbytes: int):
                cuda.buffers.append(np.full(max(int(nbytes), 1), 0xFF, np.uint8))
                self.ptr, self.nbytes = cuda.buffers[-1].ctypes.data, int(nbytes)

        class PinnedArray:
            def __init__(self, shape, dtype):
                self.dtype = np.dtype(dtype)
                self.array = np.zeros(shape, self.dtype)
                self.nbytes = self.array.nbytes

        class Stream:
            ptr = 0

            @staticmethod
            def copy_in(dst: int, host: PinnedArray, nbytes: int) -> None:
                ctypes.memmove(dst, host.array.ctypes.data, nbytes)

            @staticmethod
            def copy_out(host: PinnedArray, src: int, nbytes: int) -> None:
                ctypes.memmove(host.array.ctypes.data, src, nbytes)

            @staticmethod
            def synchronize() -> None:
                pass

        self.DeviceBuffer, self.PinnedArray, self.Stream = DeviceBuffer, PinnedArray, Stream


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory):
    """latents.cu built for the CPU, once per session, for each float type."""
    from sdturbo.kernels.host import HostKernels, build, find_compiler

    cxx = find_compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++ on the PATH, or $CXX): latents.cu cannot run on the CPU")
    folder = tmp_path_factory.mktemp("latents-host")
    return {dt: HostKernels(dt, build(dt, folder, cxx)) for dt in ("float16", "float32")}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_host_compiled_kernels_equal_host_twins(dtype, host_kernels):
    """The same latents.cu a GPU runs, compiled by the host's C++ compiler: same host twins, bit for bit."""
    check_against_host_twins(lambda dt: host_kernels[np.dtype(dt).name], HostCuda(), dtype)


def test_host_fp16_conversions_round_to_nearest_even(host_kernels):
    """The shim's fp16 conversions, through the cast kernels, against numpy's: every fp16 value widened;
    every fp16 value, every midpoint between neighbours (ties go to even) and the floats either side of
    each midpoint narrowed, with overflow to inf around 65520, subnormals and a sample of all fp32 bits."""
    k, cuda = host_kernels["float16"], HostCuda()
    s = cuda.Stream()

    def run(kernel, values: np.ndarray, out_dtype) -> np.ndarray:
        src, dst = cuda.DeviceBuffer(values.nbytes), cuda.DeviceBuffer(values.size * np.dtype(out_dtype).itemsize)
        ctypes.memmove(src.ptr, values.ctypes.data, values.nbytes)
        kernel(src.ptr, dst.ptr, values.size, s.ptr)
        out = np.empty(values.size, out_dtype)
        ctypes.memmove(out.ctypes.data, dst.ptr, out.nbytes)
        return out

    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    np.testing.assert_array_equal(run(k.to_float32, halves, np.float32), halves.astype(np.float32))

    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    finite = np.unique(np.concatenate([finite, [65520.0]]))  # the midpoint past the largest half
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact in fp32
    above, below = np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))
    sample = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30, 65504, 65519.996, 70000, 2.0**-24], np.float32)
    floats = np.concatenate([halves.astype(np.float32), mids, above, below, sample, special])
    with np.errstate(over="ignore", invalid="ignore"):
        want = floats.astype(np.float16)
    np.testing.assert_array_equal(run(k.from_float32, floats, np.float16), want)


def check_against_host_twins(kernels, cuda, dtype):
    """Each kernel on device buffers equals engine/schedule.py's or engine/images.py's numpy, bit for bit."""
    from sdturbo.engine.images import to_uint8
    from sdturbo.engine.schedule import SchedulerConfig, make_schedule

    from tests.engine.test_images import fp32_ties

    k = kernels(dtype)
    s = cuda.Stream()
    rng = np.random.default_rng(0)
    shape = (2, 4, 16, 24)
    n = int(np.prod(shape))
    sched = make_schedule(SchedulerConfig(), 4, 0.75)

    kept = []  # every buffer lives to the end: one collected goes back at once (``dev(x).ptr`` would dangle)

    def dev(arr):
        host = cuda.PinnedArray(arr.shape, arr.dtype)
        host.array[...] = arr
        buf = cuda.DeviceBuffer(arr.nbytes)
        s.copy_in(buf.ptr, host, arr.nbytes)
        kept.append((host, buf))
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
    ties = fp32_ties()[: image.size]  # x * 255 exactly k + 0.5 in fp32: rounded half to even
    image.reshape(-1)[: ties.size] = ties
    pixels = cuda.DeviceBuffer(2 * 16 * 24 * 3)
    clear = dev(np.zeros(2, np.uint8))
    k.to_uint8(dev(image).ptr, pixels.ptr, clear.ptr, 2, 16, 24, s.ptr)
    np.testing.assert_array_equal(back(pixels, (2, 16, 24, 3), np.uint8), to_uint8(image))
    np.testing.assert_array_equal(back(clear, (2,), np.uint8), [0, 0])  # finite: the flags stay clear

    for value, where in ((np.nan, (1, 2, 15, 23)), (np.inf, (0, 0, 0, 0)), (-np.inf, (1, 1, 7, 3))):
        bad = image.copy()
        bad[where] = value  # one value, anywhere: its image alone is flagged; the pixels are as before
        flags = dev(np.zeros(3, np.uint8))  # one byte more than the batch: never written
        k.to_uint8(dev(bad).ptr, pixels.ptr, flags.ptr, 2, 16, 24, s.ptr)
        np.testing.assert_array_equal(back(flags, (3,), np.uint8), [where[0] == 0, where[0] == 1, 0])
        with np.errstate(invalid="ignore"):
            want = to_uint8(bad)
        np.testing.assert_array_equal(back(pixels, (2, 16, 24, 3), np.uint8), want)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_a_step_from_a_sigma_that_is_not_positive_is_refused_before_launch(host_kernels, sigma):
    """A schedule's current sigma is always positive (only the last sigma_next is 0): a step from 0 or below is
    a caller's bug, refused before anything is enqueued."""
    k, cuda = host_kernels["float32"], HostCuda()
    s = cuda.Stream()
    buf = cuda.DeviceBuffer(64)
    with pytest.raises(ValueError, match=f"euler_step: sigma {sigma} must be positive"):
        k.euler_step(buf.ptr, buf.ptr, sigma, 0.0, 16, s.ptr)
    with pytest.raises(ValueError, match=f"ancestral_step: sigma {sigma} must be positive"):
        k.ancestral_step(buf.ptr, buf.ptr, buf.ptr, sigma, 0.0, 0.0, 16, s.ptr)


@pytest.mark.skipif(NVRTC is not None, reason=f"NVRTC unavailable: {NVRTC}")
def test_compiling_leaves_python_s_shared_bytes_alone():
    """NVRTC writes its log and output into buffers it is given: at an empty log (size 1) a ``b" " * size`` buffer
    is CPython's one shared b" ", and every b" " of the process became b"\\x00" (this module's import compiles)."""
    compile_ptx("float16", 90)
    assert all(bytes([i])[0] == i for i in range(256))  # (b" " == bytes([32]) would hold: the same object)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_no_thread_writes_past_its_count(host_kernels, dtype):
    """A count that is not a whole number of blocks: the last block's spare threads write nothing. Each output
    buffer has a block's worth of room past the count, filled with 0xA5, which must come back untouched (on a
    GPU a write there would land in another buffer, silently)."""
    from sdturbo.kernels import BLOCK

    k, cuda = host_kernels[dtype], HostCuda()
    s, size = cuda.Stream(), np.dtype(dtype).itemsize
    height, width = 3, 29  # uint8: 1 * 3 * 29 * 3 = 261 bytes, a block and 5
    n = BLOCK + 5

    def buffer(count: int, itemsize: int, spare_byte: int = 0xFF):
        """``count`` zeros (finite inputs), then a block of ``spare_byte``: 0xFF (NaN) past an input; past an
        output 0xA5, which no kernel writes (NaN from a NaN is 0xFF... or 0x7E00 / 0x7FC00000)."""
        buf = cuda.DeviceBuffer((count + BLOCK) * itemsize)
        ctypes.memset(buf.ptr, 0, count * itemsize)
        ctypes.memset(buf.ptr + count * itemsize, spare_byte, BLOCK * itemsize)
        return buf

    def spare(buf, count: int, itemsize: int) -> np.ndarray:
        tail = np.empty(BLOCK * itemsize, np.uint8)
        ctypes.memmove(tail.ctypes.data, buf.ptr + count * itemsize, tail.nbytes)
        return tail

    a, b, flags = buffer(n, size), buffer(n, size), buffer(1, 1)
    floats = buffer(n, 4)  # from_float32's input
    runs = {
        "init_latents": (lambda out: k.init_latents(a.ptr, out.ptr, 14.6, n, s.ptr), n, size),
        "add_noise": (lambda out: k.add_noise(a.ptr, b.ptr, out.ptr, 14.6, n, s.ptr), n, size),
        "scale_input": (lambda out: k.scale_input(a.ptr, out.ptr, 14.6, n, s.ptr), n, size),
        "euler_step": (lambda out: k.euler_step(out.ptr, a.ptr, 14.6, 0.0, n, s.ptr), n, size),
        "ancestral_step": (lambda out: k.ancestral_step(out.ptr, a.ptr, b.ptr, 14.6, 1.0, 2.0, n, s.ptr), n, size),
        "to_float32": (lambda out: k.to_float32(a.ptr, out.ptr, n, s.ptr), n, 4),
        "from_float32": (lambda out: k.from_float32(floats.ptr, out.ptr, n, s.ptr), n, size),
        "to_uint8": (lambda out: k.to_uint8(a.ptr, out.ptr, flags.ptr, 1, height, width, s.ptr), 3 * height * width, 1),
    }
    assert set(runs) == set(k.NAMES), "a kernel left out of this test"
    for name, (launch, count, itemsize) in runs.items():
        assert count % BLOCK, "a whole number of blocks has no spare threads to test"
        out = buffer(count, itemsize, 0xA5)
        launch(out)
        assert (spare(out, count, itemsize) == 0xA5).all(), f"{name} wrote past element {count}"
