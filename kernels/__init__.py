"""Device code between the engines, compiled at run time with NVRTC (cuda-python); nothing runs at import.

``load_kernels(dtype, compute_capability)`` compiles ``latents.cu`` once per (dtype, arch) to a cubin for
exactly that SM (no PTX: a driver older than NVRTC cannot JIT its PTX) and returns launchers that check
their arguments. Host twins of every kernel: engine/schedule.py, engine/images.py. kernels/host.py builds the
same source for the CPU (tests/kernels checks it against the host twins bit for bit without a GPU).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("latents.cu")
TYPES = {"float16": "1", "float32": "0"}  # -DSDT_HALF=
BLOCK = 256


def _compile(dtype: str, arch: str, output: str) -> bytes:
    """NVRTC: latents.cu with T = ``dtype`` for ``--gpu-architecture=arch``; ``output`` is "PTX" or "CUBIN"."""
    from sdturbo.engine.cuda import bindings, check
    from sdturbo.engine.errors import BackendError, first_line

    if dtype not in TYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed; use one of {sorted(TYPES)}")
    _, _, nvrtc = bindings()
    src = SOURCE.read_bytes()
    try:
        created = nvrtc.nvrtcCreateProgram(src, b"latents.cu", 0, [], [])
    except Exception as e:  # cuda-python opens libnvrtc on first use: not found is its own error type
        raise BackendError(
            f"NVRTC, which compiles this engine's kernels, cannot be loaded ({first_line(e)}): install it "
            "from pip (nvidia-cuda-nvrtc for cuda-python 13, nvidia-cuda-nvrtc-cu12 for cuda-python 12) or with "
            "the CUDA toolkit"
        ) from e
    prog = check(created, "nvrtcCreateProgram")
    try:
        opts = [
            f"--gpu-architecture={arch}".encode(),
            f"-DSDT_HALF={TYPES[dtype]}".encode(),
            b"--fmad=false",
            b"--std=c++17",
        ]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        # NVRTC writes into the buffers it is given: bytearrays, never bytes. (``b" " * size``, as cuda-python's
        # examples write it, is at size 1, an empty log, Python's one shared b" ", which NVRTC's NUL overwrote:
        # every b" " in the process was b"\x00" from then on.)
        log = bytearray(check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize"))
        check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        check(status, f"NVRTC compile of {SOURCE.name} ({dtype}, {arch}): {log.decode(errors='replace')}")
        out = bytearray(check(getattr(nvrtc, f"nvrtcGet{output}Size")(prog), f"nvrtcGet{output}Size"))
        check(getattr(nvrtc, f"nvrtcGet{output}")(prog, out), f"nvrtcGet{output}")
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")
    return bytes(out)


def compile_ptx(dtype: str, compute_capability: int) -> bytes:
    """PTX for ``compute_<cc>`` (for inspection: what runs is the cubin). Needs no GPU."""
    return _compile(dtype, f"compute_{compute_capability}", "PTX")


def compile_cubin(dtype: str, compute_capability: int) -> bytes:
    """Machine code for exactly ``sm_<cc>``. Loading it needs no PTX JIT in the driver, so a driver older
    than this NVRTC (which emits a PTX ISA that driver cannot read) still runs it. Needs no GPU."""
    return _compile(dtype, f"sm_{compute_capability}", "CUBIN")


class Kernels:
    """Launchers for latents.cu on one stream; pointers are device addresses (ints)."""

    NAMES = (
        "init_latents",
        "add_noise",
        "scale_input",
        "euler_step",
        "ancestral_step",
        "to_float32",
        "from_float32",
        "to_uint8",
    )

    def __init__(self, dtype: str, compute_capability: int):
        from sdturbo.engine.cuda import bindings, check, ensure_context

        driver, _, _ = bindings()
        self._driver, self._check = driver, check
        self.dtype = dtype
        ensure_context()  # the driver API loads a module into the current context: make sure there is one
        cubin = compile_cubin(dtype, compute_capability)
        module = check(
            driver.cuModuleLoadData(cubin), f"cuModuleLoadData (latents.cu, {dtype}, sm_{compute_capability})"
        )
        self._fn = {
            n: check(driver.cuModuleGetFunction(module, n.encode()), f"cuModuleGetFunction({n})") for n in self.NAMES
        }

    def _launch(self, name: str, n: int, stream: int, args: tuple, types: tuple) -> None:
        if n <= 0:
            raise ValueError(f"{name}: element count {n} must be positive")
        self._enqueue(name, (n + BLOCK - 1) // BLOCK, stream, args, types)

    def _enqueue(self, name: str, grid: int, stream: int, args: tuple, types: tuple) -> None:
        """``grid`` blocks of BLOCK threads on ``stream`` (kernels/host.py runs them on the CPU instead)."""
        self._check(
            self._driver.cuLaunchKernel(self._fn[name], grid, 1, 1, BLOCK, 1, 1, 0, stream, (args, types), 0),
            f"launch {name}",
        )

    def init_latents(self, noise: int, x: int, init_sigma: float, n: int, stream: int) -> None:
        p = ctypes.c_void_p
        self._launch("init_latents", n, stream, (noise, x, init_sigma, n), (p, p, ctypes.c_float, ctypes.c_int))

    def add_noise(self, encoded: int, noise: int, x: int, sigma0: float, n: int, stream: int) -> None:
        p = ctypes.c_void_p
        self._launch("add_noise", n, stream, (encoded, noise, x, sigma0, n), (p, p, p, ctypes.c_float, ctypes.c_int))

    def scale_input(self, x: int, out: int, denominator: float, n: int, stream: int) -> None:
        p = ctypes.c_void_p
        self._launch("scale_input", n, stream, (x, out, denominator, n), (p, p, ctypes.c_float, ctypes.c_int))

    def euler_step(self, x: int, eps: int, sigma: float, sigma_next: float, n: int, stream: int) -> None:
        if sigma <= 0:
            raise ValueError(f"euler_step: sigma {sigma} must be positive")
        p, fl = ctypes.c_void_p, ctypes.c_float
        self._launch("euler_step", n, stream, (x, eps, sigma, sigma_next, n), (p, p, fl, fl, ctypes.c_int))

    def ancestral_step(
        self, x: int, eps: int, noise: int, sigma: float, sigma_down: float, sigma_up: float, n: int, stream: int
    ) -> None:
        if sigma <= 0:
            raise ValueError(f"ancestral_step: sigma {sigma} must be positive")
        p, fl = ctypes.c_void_p, ctypes.c_float
        self._launch(
            "ancestral_step",
            n,
            stream,
            (x, eps, noise, sigma, sigma_down, sigma_up, n),
            (p, p, p, fl, fl, fl, ctypes.c_int),
        )

    def to_float32(self, src: int, dst: int, n: int, stream: int) -> None:
        p = ctypes.c_void_p
        self._launch("to_float32", n, stream, (src, dst, n), (p, p, ctypes.c_int))

    def from_float32(self, src: int, dst: int, n: int, stream: int) -> None:
        p = ctypes.c_void_p
        self._launch("from_float32", n, stream, (src, dst, n), (p, p, ctypes.c_int))

    def to_uint8(
        self, image: int, pixels: int, nonfinite: int, batch: int, height: int, width: int, stream: int
    ) -> None:
        """``nonfinite``: ``batch`` bytes, zeroed before; byte b becomes 1 where image b is NaN or infinite."""
        p, i = ctypes.c_void_p, ctypes.c_int
        self._launch(
            "to_uint8",
            batch * height * width * 3,
            stream,
            (image, pixels, nonfinite, batch, height, width),
            (p, p, p, i, i, i),
        )


@lru_cache(maxsize=8)
def load_kernels(dtype: str, compute_capability: int) -> Kernels:
    return Kernels(dtype, compute_capability)
