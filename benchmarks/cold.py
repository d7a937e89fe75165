"""Cold start, from process start to the first image, run as its own process by the benchmark.

    python -m sdturbo.benchmarks.cold ours BUNDLE BACKEND PRECISION SIZE STEPS BATCH
    python -m sdturbo.benchmarks.cold diffusers FOLDER DEVICE DTYPE SIZE STEPS BATCH

Prints one JSON line: seconds to import (the contender's libraries: onnxruntime, or torch and diffusers), to
load (for the benchmark's batch and size), and to make the first image at that batch and size.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402


def main(argv: list[str]) -> None:
    kind, path, backend_or_device, precision, size, steps, batch = argv
    width, height = (int(v) for v in size.split("x"))
    batch = int(batch)
    from .contenders import Diffusers, Ours
    from .timers import StageTimer

    timer = StageTimer(cuda=kind == "diffusers" and backend_or_device == "cuda")
    if kind == "ours":  # the libraries each imports, timed as the import (not inside the load)
        if backend_or_device == "tensorrt":
            from sdturbo.engine.backends.trt_lib import import_trt

            import_trt()
        else:
            import onnxruntime  # noqa: F401
        import sdturbo.engine.runtime  # noqa: F401

        contender = Ours(path, backend_or_device, precision, timer)
    else:
        from sdturbo.export.random_models import quiet_torchvision_notice

        quiet_torchvision_notice()
        import diffusers  # noqa: F401
        import torch  # noqa: F401

        contender = Diffusers(path, backend_or_device, precision, timer)
    t_import = time.perf_counter()
    contender.load() if kind == "diffusers" else contender.load((batch, height, width))
    t_load = time.perf_counter()
    lat = np.random.default_rng(0).standard_normal((batch, 4, height // 8, width // 8), dtype=np.float32)
    contender(["a photo of a cat"] * batch, lat, int(steps), height, width)
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
