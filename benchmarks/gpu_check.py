"""Validate and benchmark this engine on an NVIDIA GPU, into one results folder.

    python -m sdturbo.benchmarks.gpu_check --out benchmarks/results/<gpu>     (from a checkout, for the tests)

Steps, each recorded even when it fails (a failed step never stops the next):
  1. device.json: the GPU, driver, CUDA, NVRTC and library versions;
  2. tensorrt_probe.json: whether TensorRT (or TensorRT-RTX) builds and runs an engine for this GPU, with
     the library's exact message if not (TensorRT-RTX lists RTX GPUs only: 7.5, 8.6, 8.9, 12.0);
  3. gpu-tests.log: ``pytest -m gpu -rs`` (kernels vs host twins, TensorRT and ONNX Runtime CUDA vs
     diffusers, graph replay, interleaved shapes, img2img, SDXL);
  4. the benchmark (``sdturbo bench``) at 512x512 with every backend that runs here;
  5. bench-ort-demo/: diffusers fp16, ours on ONNX Runtime CUDA and ONNX Runtime's own Stable Diffusion pipeline
     (``onnxruntime-demo-fp16``, benchmarks/ort_demo.py) in one run, 1 step; its first load exports and
     optimizes the demo's own graphs (minutes).
The tests and each benchmark run in processes of their own, once more if a signal killed them (a crash inside
a library); a CUDA-graph capture that killed one is recorded in capture-trials/ and skipped the second time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..engine.cuda import gpu_problem
from ..engine.errors import InputError
from .ort_demo import NAME as ORT_DEMO
from .report import results_folder

log = logging.getLogger(__name__)


def device_info() -> dict:
    from sdturbo.engine.cuda import bindings, check, current_compute_capability

    from ..export.bundle_writer import tool_versions
    from .bench import BENCH_TOOLS

    info: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        r = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    driver, rt, nvrtc = bindings()
    info["compute_capability"] = current_compute_capability()
    info["cuda_driver_version"] = check(driver.cuDriverGetVersion())
    info["cuda_runtime_version"] = check(rt.cudaRuntimeGetVersion())
    info["nvrtc_version"] = ".".join(str(v) for v in check(nvrtc.nvrtcVersion()))
    info["versions"] = tool_versions((*BENCH_TOOLS, "cuda-python", "cuda-bindings", "nvidia-cuda-nvrtc"))
    return info


def tensorrt_probe() -> dict:
    """Build a one-layer engine for this GPU with the installed TensorRT flavour and run it."""
    import numpy as np
    from sdturbo.engine import cuda
    from sdturbo.engine.backends.trt_lib import Logger, import_trt, network_flags

    out: dict = {}
    messages: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Capture(level=logging.DEBUG)
    trt_log = logging.getLogger("sdturbo.engine.backends.trt_lib")
    trt_log.addHandler(handler)
    old_level = trt_log.level
    trt_log.setLevel(logging.DEBUG)
    try:
        trt, flavour = import_trt()
        out.update(library=flavour, version=trt.__version__)
        cuda.ensure_context()
        logger = Logger.get(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        x = network.add_input("x", trt.float16, (4, 256))
        y = network.add_elementwise(x, x, trt.ElementWiseOperation.SUM).get_output(0)
        y.name = "y"
        network.mark_output(y)
        config = builder.create_builder_config()
        if flavour == "tensorrt-rtx":
            # CURRENT, not our own check (engine/backends/trt_lib.py unsupported_here): the library's own answer
            config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
            config.num_compute_capabilities = 1
            config.set_compute_capability(trt.ComputeCapability.CURRENT, 0)
        plan = builder.build_serialized_network(network, config)
        out["built"] = plan is not None
        if plan is None:
            raise RuntimeError("build_serialized_network returned None")
        engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(memoryview(plan)))
        out["deserialized"] = engine is not None
        if engine is None:
            errors = [m for m in messages if "ERROR" in m or "Error" in m]
            raise RuntimeError(f"deserialize_cuda_engine returned None: {errors[-1] if errors else 'no message'}")
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError("create_execution_context returned None")
        stream = cuda.Stream()
        host = cuda.PinnedArray((4, 256), np.float16)
        host.array[...] = np.arange(4 * 256, dtype=np.float16).reshape(4, 256) / 256
        dx, dy = cuda.DeviceBuffer(host.nbytes), cuda.DeviceBuffer(host.nbytes)
        stream.copy_in(dx.ptr, host, host.nbytes)
        context.set_tensor_address("x", dx.ptr)
        context.set_tensor_address("y", dy.ptr)
        out["enqueued"] = bool(context.execute_async_v3(stream.ptr))
        result = cuda.PinnedArray((4, 256), np.float16)
        stream.copy_out(result, dy.ptr, host.nbytes)
        stream.synchronize()
        out["correct"] = bool(np.array_equal(result.array, host.array * 2))
        out["capturable"] = (
            bool(context.is_stream_capturable(stream.ptr)) if hasattr(context, "is_stream_capturable") else None
        )
        out["runs"] = out["correct"]
    except Exception as e:
        out["runs"] = False
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    finally:
        trt_log.removeHandler(handler)
        trt_log.setLevel(old_level)
    out["messages"] = messages[-40:]
    return out


def run_again_if_killed(cmd: list[str], env: dict[str, str], timeout: float, killed, **kwargs) -> int:
    """Run ``cmd`` in a process of its own (a crash inside a library takes only it), once more if a signal killed
    it: a CUDA-graph capture that killed it is recorded (``env``'s SDTURBO_CAPTURE_TRIALS) and skipped the
    second time (engine/capture_guard.py). ``killed(signal, again)`` hears of each kill; ``timeout`` (0: none)
    is for both runs together. The last exit status (negative: the signal)."""
    deadline = time.monotonic() + timeout
    for again in (True, False):
        left = max(deadline - time.monotonic(), 1) if timeout else None
        rc = subprocess.run(cmd, timeout=left, env=env, **kwargs).returncode
        if rc >= 0:
            break
        killed(-rc, again)
    return rc


def step(name: str, out: Path, fn, failed: list[str]) -> None:
    """Run one step; one that fails writes its error to ``<name>.error.txt`` and is added to ``failed``, and the
    next step still runs."""
    log.info("== %s", name)
    t = time.perf_counter()
    try:
        fn()
        log.info("== %s: done in %.0f s", name, time.perf_counter() - t)
    except Exception:
        log.exception("== %s failed after %.0f s", name, time.perf_counter() - t)
        (out / f"{name}.error.txt").write_text(traceback.format_exc())
        failed.append(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdturbo.benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--model", default="random:sd-turbo", help="benchmark model (default random:sd-turbo)")
    p.add_argument("--batches", default="1,4,8,16", help="throughput sweep (default 1,4,8,16)")
    p.add_argument("--steps", default="1,4", help="latency runs, one benchmark per step count (default 1,4)")
    p.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode of diffusers-fp16-compile")
    p.add_argument("--contenders", default="", help="comma-separated, as for sdturbo bench (default: all that run)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: device,probe,tests,bench,ort-demo")
    p.add_argument("--demo-batches", default="1,4", help="throughput sweep of the ort-demo step (default 1,4)")
    p.add_argument(
        "--tests-timeout", type=float, default=0, help="stop the gpu tests after this many s in all (0: never)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        out = results_folder(args.out)
    except InputError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    failed: list[str] = []  # the steps that failed: the exit status is 1 if any did
    why = gpu_problem()
    if why is not None:
        log.warning("no GPU can be used here (%s): nothing this run measures is a GPU's", why)

    def env(step: str) -> dict[str, str]:
        """A CUDA-graph capture that kills a process is recorded and skipped by the runs after it (a killed step's
        second attempt, the later benchmarks); kept with the results as evidence, apart for the tests and the
        benchmarks (a test killed by the timeout in a capture must not turn the benchmarks' graphs off)."""
        return {**os.environ, "SDTURBO_CAPTURE_TRIALS": str((out / "capture-trials" / step).resolve())}

    def write(name, data):
        (out / name).write_text(json.dumps(data, indent=2, default=str))

    if "device" not in skip:
        step("device", out, lambda: write("device.json", device_info()), failed)
    if "probe" not in skip:
        step("probe", out, lambda: write("tensorrt_probe.json", tensorrt_probe()), failed)
    if "tests" not in skip:

        def tests():
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-v", "-p", "no:cacheprovider", "tests"]
            with open(out / "gpu-tests.log", "w") as f:

                def killed(signal: int, again: bool) -> None:
                    f.write(f"\n== the gpu tests were killed by signal {signal}: in the last test above\n")
                    if again:
                        f.write("== running them once more\n\n")
                        f.flush()

                try:
                    rc = run_again_if_killed(
                        cmd, env("tests"), args.tests_timeout, killed, stdout=f, stderr=subprocess.STDOUT
                    )
                except subprocess.TimeoutExpired:  # a hung test must not take the benchmark's time too
                    f.write(f"\n== gpu tests stopped after {args.tests_timeout} s (--tests-timeout)\n")
                    raise RuntimeError(f"the gpu tests ran past {args.tests_timeout} s") from None
            log.info("gpu tests: exit %d (see %s)", rc, out / "gpu-tests.log")
            if rc != 0:
                raise RuntimeError(f"the gpu tests failed (exit {rc}): see {out / 'gpu-tests.log'}")

        step("tests", out, tests, failed)

    def run_bench(argv: list[str], what: str) -> None:
        def killed(signal: int, again: bool) -> None:
            if again:
                log.warning("%s was killed by signal %d; running it once more", what, signal)

        rc = run_again_if_killed([sys.executable, "-m", "sdturbo.engine.cli", *argv], env("bench"), 0, killed)
        if rc != 0:
            raise RuntimeError(f"sdturbo {' '.join(argv)} failed (exit {rc})")

    if "bench" not in skip:
        for steps in (int(s) for s in args.steps.split(",")):

            def bench(steps=steps):
                argv = ["bench", "--model", args.model, "--steps", str(steps), "--out", str(out / f"bench-{steps}step")]
                argv += ["--compile-mode", args.compile_mode]
                if args.contenders:
                    argv += ["--contenders", args.contenders]
                argv += ["--batches", args.batches] if steps == 1 else ["--no-cold"]
                run_bench(argv, f"the {steps}-step benchmark")

            step(f"bench-{steps}step", out, bench, failed)
    if "ort-demo" not in skip:  # a process of its own: its first load exports and optimizes for minutes

        def ort_demo():
            names = ["diffusers-fp16", "sdturbo-onnxruntime-cuda-fp16", ORT_DEMO]
            argv = ["bench", "--model", args.model, "--steps", "1", "--out", str(out / "bench-ort-demo"), "--no-cold"]
            argv += ["--contenders", ",".join(names), "--batches", args.demo_batches]
            run_bench(argv, "the ort-demo benchmark")

        step("bench-ort-demo", out, ort_demo, failed)
    if failed:
        log.error("%d step(s) failed: %s (each one's error: %s/<step>.error.txt)", len(failed), ", ".join(failed), out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
