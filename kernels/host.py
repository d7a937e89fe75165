"""latents.cu compiled for the CPU with a C++ compiler, so tests without a GPU run the kernel source itself.

``host_shim.h`` stands in for CUDA (keywords, the grid loop, fp16 conversions that round as the PTX ones);
``build`` compiles latents.cu with it into a shared library, and ``HostKernels`` is ``Kernels`` with only the
launch replaced: the same launchers, argument checks and argument types, with host addresses for pointers.
Nothing runs at import; nothing here is used on the GPU path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import BLOCK, SOURCE, TYPES, Kernels

SHIM = SOURCE.with_name("host_shim.h")
# -ffp-contract=off: no fused multiply-add, as NVRTC's --fmad=false; IEEE arithmetic otherwise (no fast-math).
FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")


def find_compiler() -> str | None:
    """$CXX, else g++, c++ or clang++ on the PATH; None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def launcher_source() -> str:
    """latents.cu behind the shim, and one ``sdt_launch_<kernel>`` per kernel ``Kernels`` launches."""
    lines = ['#include "host_shim.h"', '#include "latents.cu"', *(f"SDT_LAUNCHER({n})" for n in Kernels.NAMES)]
    return "\n".join(lines) + "\n"


def build(dtype: str, directory: str | os.PathLike, compiler: str | None = None) -> Path:
    """The shared library of latents.cu with T = ``dtype``, in ``directory``; named by a hash of the sources,
    flags and compiler, so it is compiled once and rebuilt when any of them changes."""
    if dtype not in TYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed; use one of {sorted(TYPES)}")
    cxx = compiler or find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    flags = (*FLAGS, f"-DSDT_HALF={TYPES[dtype]}", f"-I{SOURCE.parent}")
    src = launcher_source()
    parts = [SOURCE.read_bytes(), SHIM.read_bytes(), src.encode(), cxx.encode(), *(f.encode() for f in flags)]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = Path(directory) / f"latents-{dtype}-{digest}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cpp, lib = Path(tmp) / "latents_host.cpp", Path(tmp) / out.name
        cpp.write_text(src)
        done = subprocess.run([cxx, *flags, "-o", str(lib), str(cpp)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} could not compile {SOURCE.name} for the host ({dtype}):\n{done.stderr}")
        os.replace(lib, out)
    return out


class HostKernels(Kernels):
    """``Kernels`` on the CPU: each launch runs the grid at once, in order; ``stream`` is ignored."""

    def __init__(self, dtype: str, library: str | os.PathLike):
        self.dtype = dtype
        self._lib = ctypes.CDLL(str(library))
        self._fn = {}
        for name in self.NAMES:
            fn = getattr(self._lib, f"sdt_launch_{name}")
            fn.argtypes, fn.restype = (ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)), None
            self._fn[name] = fn

    def _enqueue(self, name: str, grid: int, stream: int, args: tuple, types: tuple) -> None:
        values = [t(a) for a, t in zip(args, types, strict=True)]  # each argument in its C type, kept alive
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        self._fn[name](grid, BLOCK, pointers)
