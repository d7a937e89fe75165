"""A CUDA-graph capture that kills the process (an abort inside a library, which no ``except`` catches) is
tried once: the next process skips it, says why, and falls back as it would after a failed capture
(engine/capture_guard.py). Processes are killed here for real (``os.abort``, as a C++ terminate would)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
from sdturbo.engine.cache import cache_root
from sdturbo.engine.capture_guard import FOLDER, CaptureGuard, crash_records
from sdturbo.engine.info import describe
from sdturbo.engine.pipeline import Pipeline

from tests.engine.emulated_gpu import EmulatedCuda, emulated_ort_pipeline

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cube on a table", "an astronaut riding a horse"]
FACTS = {"gpu": "emulated GPU (SM86)", "onnxruntime": "1.0"}
pytestmark = pytest.mark.skipif(os.name != "posix", reason="the guard needs POSIX file locks")


@pytest.fixture
def trials(tmp_path, monkeypatch):
    """A cache of this test's own, for this process and the processes it starts."""
    monkeypatch.setenv("SDTURBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDTURBO_CAPTURE_TRIALS", raising=False)
    return tmp_path / "cache" / FOLDER


def run_child(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = "import os\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)


def test_a_capture_that_returns_or_raises_leaves_nothing_behind(trials):
    guard = CaptureGuard("the chain", FACTS)
    with guard.attempt():
        assert [p.name.endswith(".pending") for p in trials.iterdir()] == [True]
        assert CaptureGuard("the chain", FACTS).crashed() is None  # its process is alive: not a crash
    with pytest.raises(RuntimeError), guard.attempt():
        raise RuntimeError("capture failed")
    assert list(trials.iterdir()) == []
    assert guard.crashed() is None


def test_the_records_may_live_elsewhere(tmp_path, trials, monkeypatch):
    monkeypatch.setenv("SDTURBO_CAPTURE_TRIALS", str(tmp_path / "results" / "trials"))
    with CaptureGuard("the chain", FACTS).attempt():
        assert [p.suffix for p in (tmp_path / "results" / "trials").iterdir()] == [".pending"]
    assert not trials.exists()


def test_a_process_killed_inside_a_capture_marks_it_for_these_versions_only(tiny_bundle, trials):
    child = run_child(
        f"""
        from sdturbo.engine.capture_guard import CaptureGuard
        with CaptureGuard("the chain", {FACTS!r}).attempt():
            os.abort()
        """
    )
    assert child.returncode < 0, child.stderr  # killed by a signal
    why = CaptureGuard("the chain", FACTS).crashed()
    assert why is not None and "capturing the chain killed an earlier process" in why
    assert "onnxruntime 1.0" in why and "remove " in why
    assert [p.suffix for p in trials.iterdir()] == [".crashed"]
    (record,) = crash_records()  # what `sdturbo info` lists
    assert record.startswith("  the chain with gpu emulated GPU (SM86), onnxruntime 1.0 (killed pid ")
    assert describe(tiny_bundle).endswith(f"(each killed a process once):\n{record}")
    assert CaptureGuard("the chain", {**FACTS, "onnxruntime": "1.1"}).crashed() is None  # a newer library
    assert CaptureGuard("the sessions' own graphs", FACTS).crashed() is None  # another capture
    (trials / next(trials.iterdir()).name).unlink()  # as the message says: tried again
    assert CaptureGuard("the chain", FACTS).crashed() is None


CHILD = """
from tests.engine.emulated_gpu import EmulatedCuda, emulated_ort_pipeline
cuda = EmulatedCuda()
pipe = emulated_ort_pipeline({bundle!r}, cuda, shape=(2, 64, 64), cuda_graph={mode!r})
{kill}
pipe({prompts!r}, height=64, width=64, seed=1)
print("survived")
"""


def test_a_pipeline_whose_capture_killed_a_process_falls_back_in_the_next(tiny_bundle, trials):
    """The first process dies capturing the whole chain; the second goes straight to onnxruntime's own
    graphs per session, and dies capturing those; the third runs without graphs. Each says why, and each
    image equals the host pipeline's."""
    kills = {
        "chain": "cuda.Graph = lambda stream, fn: os.abort()",
        "sessions": "pipe.engines['unet'].session.fail_capture = lambda *key: os.abort()",
    }
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=1)
    for tier, kill in kills.items():
        child = run_child(CHILD.format(bundle=str(tiny_bundle), mode=True, kill=kill, prompts=PROMPTS))
        assert child.returncode < 0 and "survived" not in child.stdout, (tier, child.stderr[-2000:])
    pipe = emulated_ort_pipeline(tiny_bundle, EmulatedCuda(), shape=(2, 64, 64), cuda_graph=True)
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=1), want)
    assert pipe.graph_status.startswith(
        "off: capturing the sessions' own graphs (ONNX Runtime CUDA) killed an earlier process"
    ), pipe.graph_status
    assert sorted(p.suffix for p in trials.iterdir()) == [".crashed", ".crashed"]
    assert str(cache_root()) in pipe.graph_status  # where the record is, to remove it


def test_after_a_crash_in_the_chain_the_sessions_graphs_run(tiny_bundle, trials):
    child = run_child(
        CHILD.format(bundle=str(tiny_bundle), mode=True, kill="cuda.Graph = lambda s, f: os.abort()", prompts=PROMPTS)
    )
    assert child.returncode < 0, child.stderr[-2000:]
    pipe = emulated_ort_pipeline(tiny_bundle, EmulatedCuda(), shape=(2, 64, 64), cuda_graph=True)
    want = Pipeline(tiny_bundle, OnnxRuntimeBackend("fp16"))(PROMPTS, height=64, width=64, seed=1)
    np.testing.assert_array_equal(pipe(PROMPTS, height=64, width=64, seed=1), want)
    assert pipe.graph_status.startswith("sessions: capturing the chain (ONNX Runtime CUDA) killed an earlier"), (
        pipe.graph_status
    )
    assert [type(g).__name__ for g in pipe.graphs.values()] == ["SessionGraphs"]
