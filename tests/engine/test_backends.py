"""Backend selection on the CPU: a GPU backend that would quietly run on the CPU is refused."""

from __future__ import annotations

import contextlib

import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.bundle import Bundle
from sdturbo.engine.errors import BackendError


def test_a_cuda_session_that_falls_back_to_the_cpu_is_refused(tiny_bundle, monkeypatch):
    """ONNX Runtime, asked for CUDA where the CUDA provider cannot load, makes a CPU session and says so only
    in a log line. Here the provider is listed but cannot load (the CPU build), as with a missing cuDNN."""
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    backend = OnnxRuntimeBackend("fp32", ("CUDAExecutionProvider",))
    with pytest.raises(BackendError, match="could not use CUDA for text_encoder"):
        backend.load(Bundle(tiny_bundle), "text_encoder")


def test_tensorrt_rtx_is_not_used_on_a_gpu_it_cannot_run_on(tiny_bundle, tmp_path, monkeypatch):
    """Measured on an H100 (SM90): TensorRT-RTX 1.7 builds an engine with CURRENT, then refuses to load it. So on
    such a GPU ``auto`` takes ONNX Runtime CUDA, and building or opening TensorRT-RTX engines fails at once,
    naming the compute capability, instead of after minutes of building."""
    import shutil

    trt = pytest.importorskip("tensorrt_rtx")
    from sdturbo.engine import cuda, runtime
    from sdturbo.engine.backends.trt_lib import unsupported_here
    from sdturbo.engine.engine_store import Profile
    from sdturbo.export.trt_build import build_engines

    assert unsupported_here(trt, "tensorrt-rtx", 89) is None
    assert unsupported_here(trt, "tensorrt", 90) is None
    assert "compute capability 9.0" in unsupported_here(trt, "tensorrt-rtx", 90)

    monkeypatch.setattr(cuda, "gpu_available", lambda: True)
    monkeypatch.setattr(cuda, "current_compute_capability", lambda device=0: 90)
    monkeypatch.setattr(runtime, "_ort_cuda_problem", lambda: None)
    assert runtime.choose_backend("auto") == "onnxruntime-cuda"
    monkeypatch.setattr(cuda, "current_compute_capability", lambda device=0: 89)
    assert runtime.choose_backend("auto") == "tensorrt"

    monkeypatch.setattr(cuda, "current_compute_capability", lambda device=0: 90)
    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    with pytest.raises(BackendError, match=r"does not run on compute capability 9\.0"):
        build_engines(path, "tensorrt-rtx", Profile.parse("1", "64x64"))
    assert not (path / "engines").exists() or not any((path / "engines").rglob("*.plan"))


def test_the_tensorrt_runtime_refuses_such_a_gpu_before_loading(tiny_bundle):
    pytest.importorskip("tensorrt_rtx")
    from tests.engine.emulated_gpu import EmulatedCuda, emulated_pipeline

    with pytest.raises(BackendError, match=r"does not run on compute capability 9\.0"):
        emulated_pipeline(tiny_bundle, EmulatedCuda(compute_capability=90))


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("backend", ["onnxruntime-cuda", "tensorrt"])
def test_a_gpu_backend_without_a_gpu_fails_before_any_export(command, backend, tmp_path, monkeypatch, capsys):
    """It said `cudaSetDevice(0) failed: <cudaError_t.cudaErrorInsufficientDriver: 35>`, after exporting the
    model; now: what was asked for, why there is no GPU (the driver's own words), what runs instead."""
    from sdturbo.engine import cache, cli, cuda

    monkeypatch.setattr(cuda, "gpu_problem", lambda: "cudaErrorNoDevice: no CUDA-capable device is detected")
    exported = []
    monkeypatch.setattr(cache, "ensure_bundle", lambda *a, **k: exported.append(a))
    argv = {"generate": ["generate", "a cat", "--out", str(tmp_path / "a.png")], "serve": ["serve"]}[command]
    if command == "serve":
        pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'sdturbo[serve]')")
        from sdturbo.benchmarks.serve_load import free_ports

        ports = [str(p) for p in free_ports(3)]
        argv += ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--host", "127.0.0.1"]
    assert cli.main([*argv, "--model", "random:tiny", "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"sdturbo: error: --backend {backend} needs an NVIDIA GPU, and none can be used here (cudaErrorNoDevice: no "
        f"CUDA-capable device is detected); --backend onnxruntime runs on the CPU (auto picks it where there is no GPU)"
    )
    assert exported == []


def test_a_machine_without_a_driver_is_told_so(monkeypatch):
    """Where no NVIDIA driver is installed, the CUDA runtime says "CUDA driver version is insufficient": the user
    is told there is no driver; where one loads, the runtime's own words are kept."""
    from sdturbo.engine import cuda
    from sdturbo.engine.errors import BackendError

    class Runtime:
        class cudaDeviceAttr:
            cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor = 75, 76

        @staticmethod
        def cudaGetDeviceCount():
            return ("a failed status", 0)

        @staticmethod
        def cudaDeviceGetAttribute(attribute, device):
            return ("a failed status", 0)

    def check(result, what="cudaDeviceGetAttribute"):
        raise BackendError(f"{what} failed: cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA")

    monkeypatch.setattr(cuda, "bindings", lambda: (None, Runtime, None))
    monkeypatch.setattr(cuda, "check", check)
    monkeypatch.setattr(cuda, "DRIVER_LIBRARY", "libno-such-driver.so.1")
    why = cuda.gpu_problem()  # the loader's own words after the library's name (Linux: "cannot open shared ...")
    assert why.startswith("no NVIDIA driver can be loaded here (") and "libno-such-driver.so.1" in why, why
    with pytest.raises(BackendError) as e:  # (what `sdturbo build --trt tensorrt-rtx` asks without a target)
        cuda.current_compute_capability()
    assert str(e.value).startswith("no usable CUDA GPU: no NVIDIA driver can be loaded here (")
    assert "libno-such-driver.so.1" in str(e.value) and "pass --compute-capability" in str(e.value)
    Runtime.cudaSetDevice = staticmethod(lambda device: ("a failed status",))
    with pytest.raises(BackendError, match=r"^no NVIDIA driver can be loaded here \(.*libno-such-driver"):
        cuda.ensure_context()  # (what the TensorRT probe and a kernel launch ask first)
    monkeypatch.setattr(cuda, "driver_unloadable", lambda: None)
    assert (
        cuda.gpu_problem()
        == "cudaGetDeviceCount failed: cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA"
    )


def test_a_failed_cuda_call_is_said_in_the_librarys_words():
    """Every CUDA status goes through cuda.check: the runtime's errors by name and meaning (not an enum's repr),
    the driver's and NVRTC's by name (the runtime's descriptions number other errors)."""
    from sdturbo.engine.cuda import bindings, check

    try:
        _, rt, nvrtc = bindings()
    except BackendError as e:
        pytest.skip(str(e))
    cases = [
        (rt.cudaError_t.cudaErrorInvalidValue, "cudaMalloc failed: cudaErrorInvalidValue: invalid argument"),
        (nvrtc.nvrtcResult.NVRTC_ERROR_COMPILATION, "cudaMalloc failed: NVRTC_ERROR_COMPILATION"),
    ]
    for status, message in cases:
        with pytest.raises(BackendError) as e:
            check((status, 0), "cudaMalloc")
        assert str(e.value) == message
    assert check((rt.cudaError_t.cudaSuccess, 7), "cudaMalloc") == 7


@pytest.mark.parametrize("cache_optimized", [True, False])
def test_every_session_gets_the_providers_options(tiny_bundle, tmp_path, monkeypatch, cache_optimized):
    """A device pipeline hands the CUDA provider its stream through ``provider_options``: each session is created
    with them, from the bundle's graph or from the cached optimized one (loaded twice: written, then read)."""
    import shutil

    import onnxruntime

    path = shutil.copytree(tiny_bundle, tmp_path / "b")
    created, real = [], onnxruntime.InferenceSession

    def recording(model, options=None, providers=None, **kwargs):
        created.append(providers)
        return real(model, options, providers=["CPUExecutionProvider"], **kwargs)  # (these options are made up)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    options = {"CPUExecutionProvider": {"user_compute_stream": "1234"}}
    for _ in range(2):
        backend = OnnxRuntimeBackend("fp32", provider_options=options, cache_optimized=cache_optimized)
        backend.session(Bundle(path), "text_encoder")
    assert len(created) == 2 and all(p == [("CPUExecutionProvider", options["CPUExecutionProvider"])] for p in created)


@pytest.mark.parametrize("version, usable", [("9.3.0", False), ("10.0.1", True), ("11.2.0", True), ("12.0.0", False)])
def test_tensorrt_10_and_11_are_used_and_no_other(monkeypatch, version, usable):
    import types

    from sdturbo.engine.backends import trt_lib

    fake = types.SimpleNamespace(Builder=object, __version__=version)
    monkeypatch.setattr(trt_lib.importlib, "import_module", lambda name: fake)
    if usable:
        assert trt_lib.import_trt("tensorrt") == (fake, "tensorrt")
    else:
        with pytest.raises(BackendError, match=f"tensorrt {version} is not supported"):
            trt_lib.import_trt("tensorrt")


def test_networks_are_created_strongly_typed():
    """STRONGLY_TYPED is a bit position in TensorRT's creation flags: the flags hold 1 << it (none: 0)."""
    import types

    from sdturbo.engine.backends import trt_lib

    for position in (0, 1, 5):
        trt = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=position))
        assert trt_lib.network_flags(trt) == 2**position
    assert trt_lib.network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())) == 0


@pytest.mark.parametrize("providers, spins", [(("CPUExecutionProvider",), "0"), (("CUDAExecutionProvider",), "")])
def test_cpu_sessions_do_not_spin_after_a_run(tiny_bundle, tmp_path, monkeypatch, providers, spins):
    """On the CPU each session's worker threads would spin after its run and slow the next session (measured:
    random:tiny 256x256 56 -> 35 ms with spinning off); CUDA sessions keep onnxruntime's default (not measured)."""
    import onnxruntime

    options, real = [], onnxruntime.InferenceSession

    def recording(model, opts=None, providers=None, **kwargs):
        try:
            options.append(opts.get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: onnxruntime's default
            options.append("")
        return real(model, opts, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [*providers, "CPUExecutionProvider"])
    backend = OnnxRuntimeBackend("fp32", providers, cache_optimized=False)
    with contextlib.suppress(BackendError):  # (CUDA: the session ran on the CPU here, and was refused once made)
        backend.session(Bundle(tiny_bundle), "text_encoder")
    assert options == [spins]
