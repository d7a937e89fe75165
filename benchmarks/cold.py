"""Cold start, from process start to the first image, run as its own process by the benchmark.

    python -m sdturbo.benchmarks.cold ours BUNDLE BACKEND PRECISION SIZE STEPS
    python -m sdturbo.benchmarks.cold diffusers FOLDER DEVICE DTYPE SIZE STEPS

Prints one JSON line: seconds to import, to load, and to make the first image.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402


def main(argv: list[str]) -> None:
    kind, path, backend_or_device, precision, size, steps = argv
    width, height = (int(v) for v in size.split("x"))
    from .contenders import Diffusers, Ours
    from .timers import StageTimer

    timer = StageTimer(cuda=kind == "diffusers" and backend_or_device == "cuda")
    if kind == "ours":
        contender = Ours(path, backend_or_device, precision, timer)
    else:
        contender = Diffusers(path, backend_or_device, precision, timer)
    t_import = time.perf_counter()
    contender.load()
    t_load = time.perf_counter()
    lat = np.random.default_rng(0).standard_normal((1, 4, height // 8, width // 8), dtype=np.float32)
    contender(["a photo of a cat"], lat, int(steps), height, width)
    t_image = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": t_import - T0,
                "load_s": t_load - t_import,
                "first_image_s": t_image - t_load,
                "in_process_s": t_image - T0,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
