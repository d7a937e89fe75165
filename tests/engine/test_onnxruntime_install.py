"""onnxruntime as pip installs it: one build per environment, and errors that mend the usual mistakes.

onnxruntime and onnxruntime-gpu install the same module. Measured with both 1.31.1 wheels in one `pip install`:
both records are kept, the module is the CPU build's (no CUDA provider), and `pip uninstall onnxruntime` then
leaves an ``onnxruntime`` folder without its code. So no combination of our extras may name two of them, and the
errors name the commands that mend each state.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from sdturbo.engine import cuda, runtime
from sdturbo.engine.backends import onnxruntime as ort_backend
from sdturbo.engine.backends import trt_lib
from sdturbo.engine.backends.onnxruntime import ORT_DISTRIBUTIONS, OnnxRuntimeBackend, import_onnxruntime
from sdturbo.engine.errors import BackendError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
REINSTALL = "pip install 'onnxruntime-gpu[cuda,cudnn]'"


def _names(extras: list[str], table: dict, seen=None) -> set[str]:
    """The distributions that installing sdturbo with ``extras`` asks for, its own extras followed."""
    seen = set() if seen is None else seen
    names = set()
    for extra in extras:
        if extra in seen:
            continue
        seen.add(extra)
        for req in map(Requirement, table[extra]):
            if req.name == "sdturbo":
                names |= _names(sorted(req.extras), table, seen)
            else:
                names.add(re.sub(r"[-_.]+", "-", req.name).lower())
    return names


@pytest.mark.parametrize("extras", [["cpu"], ["cuda"], ["export"], ["export", "cpu"], ["export", "cuda"], ["dev"]])
def test_no_extras_a_user_is_told_to_take_install_two_onnxruntime_builds(extras):
    """README: [export,cpu] on a CPU, [export,cuda] on a GPU, [dev] for the tests."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11 and newer")
    table = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    builds = _names(extras, table) & set(ORT_DISTRIBUTIONS)
    assert len(builds) <= 1, f"[{','.join(extras)}] installs {sorted(builds)}"
    if extras[-1] in ("cpu", "cuda", "dev"):
        assert builds == {"onnxruntime-gpu" if "cuda" in extras else "onnxruntime"}


def _installed(monkeypatch, tmp_path: Path, *names: str) -> None:
    """Records of ``names`` as installed distributions (dist-info folders first on the path; no module)."""
    for name in names:
        info = tmp_path / f"{name.replace('-', '_')}-1.31.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.31.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_two_builds_installed_together_are_named_with_the_command_that_mends_them(monkeypatch, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    _installed(monkeypatch, tmp_path, "onnxruntime-gpu")  # beside this machine's onnxruntime: both recorded
    assert {"onnxruntime", "onnxruntime-gpu"} <= set(ort_backend.ort_distributions())
    with pytest.raises(BackendError) as e:
        OnnxRuntimeBackend("fp16", ("CUDAExecutionProvider",))
    message = str(e.value)
    assert "onnxruntime and onnxruntime-gpu are both installed" in message, message
    assert f"pip uninstall -y onnxruntime onnxruntime-gpu && {REINSTALL}" in message, message


def test_the_cpu_build_alone_is_replaced_not_joined(monkeypatch):
    """Installing onnxruntime-gpu beside it makes the state above; the command uninstalls it first."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setattr(ort_backend, "ort_distributions", lambda: ["onnxruntime"])
    with pytest.raises(BackendError, match=re.escape(f"pip uninstall -y onnxruntime && {REINSTALL}")):
        OnnxRuntimeBackend("fp16", ("CUDAExecutionProvider",))


def test_the_empty_package_an_uninstall_leaves_is_called_broken(monkeypatch, tmp_path):
    """What `pip uninstall onnxruntime` leaves after both were installed: an ``onnxruntime`` folder of
    subfolders (imported as a namespace package, with no get_available_providers). The path holds it alone: the
    real package elsewhere on the path would be taken over a namespace."""
    (tmp_path / "onnxruntime" / "capi").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(BackendError, match=r"onnxruntime here is broken: its folder .* holds no module") as e:
        import_onnxruntime()
    assert str(tmp_path / "onnxruntime") in str(e.value) and "pip uninstall -y" in str(e.value)


def test_a_missing_onnxruntime_names_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendError, match=re.escape("pip install 'sdturbo[cpu]' (or 'sdturbo[cuda]'")):
        OnnxRuntimeBackend("fp32")


def _gpu_without_tensorrt(monkeypatch):
    monkeypatch.setattr(cuda, "gpu_available", lambda: True)

    def no_trt():
        raise BackendError("no TensorRT here")

    monkeypatch.setattr(trt_lib, "import_trt", no_trt)


def test_auto_on_a_gpu_whose_onnxruntime_lacks_cuda_says_why_it_runs_on_the_cpu(monkeypatch, caplog):
    """A GPU user with the CPU build got the CPU backend (seconds per image) without a word."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    _gpu_without_tensorrt(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sdturbo.engine.runtime"):
        assert runtime.choose_backend("auto") == "onnxruntime"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("a CUDA GPU is here, but onnxruntime"), warned
    assert "has no CUDA provider" in warned[0] and REINSTALL in warned[0], warned


def test_auto_on_a_gpu_without_onnxruntime_picks_the_backend_that_says_how_to_install_it(monkeypatch, caplog):
    """It raised ImportError from inside the backend choice (a GPU, no usable TensorRT, no onnxruntime)."""
    _gpu_without_tensorrt(monkeypatch)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with caplog.at_level(logging.WARNING, logger="sdturbo.engine.runtime"):
        assert runtime.choose_backend("auto") == "onnxruntime"
    assert any("onnxruntime is not installed" in r.getMessage() for r in caplog.records)


def test_optimizing_with_an_onnxruntime_too_old_for_it_is_one_line(monkeypatch, tiny_bundle):
    import onnxruntime
    from sdturbo.export.ort_optimize import optimize_bundle

    monkeypatch.setattr(onnxruntime, "__version__", "1.17.3")
    with pytest.raises(BackendError, match=r"optimizing needs onnxruntime 1\.18 or newer .* this is 1\.17\.3"):
        optimize_bundle(tiny_bundle, provider="cpu")


def test_auto_where_a_driver_loads_but_cuda_cannot_be_used_says_why_it_runs_on_the_cpu(monkeypatch, caplog):
    """A driver older than the CUDA that onnxruntime-gpu and cuda-python bring (or no cuda-python, or no device
    visible) made ``auto`` take the CPU without a word. Where no driver loads at all (a CPU machine) it stays
    quiet."""
    why = "cudaGetDeviceCount failed: cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA"
    monkeypatch.setattr(cuda, "gpu_problem", lambda: why)
    monkeypatch.setattr(cuda, "driver_unloadable", lambda: None)
    with caplog.at_level(logging.WARNING, logger="sdturbo.engine.runtime"):
        assert runtime.choose_backend("auto") == "onnxruntime"
    assert [r.getMessage() for r in caplog.records] == [
        f"an NVIDIA driver is here, but its GPU cannot be used ({why}): running on the CPU"
    ]
    caplog.clear()
    monkeypatch.setattr(cuda, "driver_unloadable", lambda: "libcuda.so.1: cannot open shared object file")
    with caplog.at_level(logging.WARNING, logger="sdturbo.engine.runtime"):
        assert runtime.choose_backend("auto") == "onnxruntime"
    assert caplog.records == []
