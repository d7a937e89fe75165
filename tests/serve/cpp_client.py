"""engine/cpp's example client, compiled here: the C++ user's way to call `sdturbo serve` (sdturbo_client.hpp)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sdturbo.engine
from PIL import Image

SOURCE = Path(sdturbo.engine.__file__).parent / "cpp" / "sdturbo_request.cpp"
WARNINGS = ["-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion", "-Werror"]


def compiler() -> str:
    """The C++ compiler; skips the test without one."""
    found = shutil.which("g++") or shutil.which("c++")
    if found is None:
        pytest.skip("no C++ compiler (g++ or c++) on this machine")
    return found


SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def build(folder: Path) -> Path:
    """sdturbo_request compiled as README says (C++17), with every warning an error, and where the compiler has
    them with AddressSanitizer and UndefinedBehaviorSanitizer, so that a reply that would make it read out of
    bounds or overflow stops it (exit status 1 and the sanitizer's report) instead of passing unseen."""
    exe = folder / "sdturbo_request"
    cmd = [compiler(), "-std=c++17", "-O1", *WARNINGS, "-o", str(exe), str(SOURCE)]
    done = subprocess.run([*cmd, *SANITIZERS], capture_output=True)
    if done.returncode != 0:  # (a compiler without the sanitizers' libraries)
        done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"sdturbo_request.cpp does not compile:\n{done.stderr.decode()[-4000:]}")
    return exe


def request(exe: Path, url: str, prompt: str, out: Path, *args: str, timeout: float = 120):
    """Runs it; returns (exit status, stderr)."""
    done = subprocess.run(
        [str(exe), prompt, "--url", url, "--out", str(out), *args], capture_output=True, timeout=timeout
    )
    return done.returncode, done.stderr.decode()


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PPM" and image.mode == "RGB"
        return np.asarray(image)


def write(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path, format="PPM")
    return path
