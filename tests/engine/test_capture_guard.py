"""A CUDA-graph capture that kills the process (an abort inside a library, which no ``except`` catches) is
tried once: the next process skips it, says why, and falls back as it would after a failed capture
(engine/capture_guard.py). Processes are killed here for real (``os.abort``, as a C++ terminate would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sdturbo.engine import capture_guard
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
    assert why is not None and "a process died while capturing the chain (crashed, or was killed" in why
    assert "onnxruntime 1.0" in why and "remove " in why
    assert [p.suffix for p in trials.iterdir()] == [".crashed"]
    (record,) = crash_records()  # what `sdturbo info` lists
    assert record.startswith("  the chain with gpu emulated GPU (SM86), onnxruntime 1.0 (died: pid ")
    assert describe(tiny_bundle).endswith(f"(each killed a process once):\n{record}")
    assert CaptureGuard("the chain", {**FACTS, "onnxruntime": "1.1"}).crashed() is None  # a newer library
    assert CaptureGuard("the sessions' own graphs", FACTS).crashed() is None  # another capture
    (trials / next(trials.iterdir()).name).unlink()  # as the message says: tried again
    assert CaptureGuard("the chain", FACTS).crashed() is None


def stale_marker(folder: Path, key: str, host: str) -> Path:
    """A marker no process holds, as a dead one leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{key}.{host}-123-abc.pending"
    marker.write_text(json.dumps({"pid": 123, "host": host, "started": "then"}))
    return marker


def test_only_this_hosts_markers_are_judged(trials):
    """Locks may be local to a host (some network file systems): another host's marker is never taken for a
    dead process, this host's is."""
    guard = CaptureGuard("the chain", FACTS)
    other = stale_marker(trials, guard.key, "another-host")
    assert guard.crashed() is None and other.exists()
    stale_marker(trials, guard.key, capture_guard._host())
    assert "pid 123" in guard.crashed()
    assert (trials / f"{guard.key}.crashed").exists()


def test_a_marker_replaced_while_checked_is_not_taken_for_a_dead_one(tmp_path, monkeypatch):
    """Between the checker's open and its lock, the marker's process may finish (its file removed, its lock
    freed) and start another capture: the lock then taken is on a file no longer there, not a dead process's."""
    marker = stale_marker(tmp_path, "k", "h")
    assert capture_guard._abandoned(marker)  # (unheld and in place: abandoned)
    real_open = os.open

    def open_then_replace(path, flags, *args):
        fd = real_open(path, flags, *args)
        Path(path).unlink()
        Path(path).write_text("{}")  # (names are unique per attempt; this is the worst case all the same)
        return fd

    monkeypatch.setattr(capture_guard.os, "open", open_then_replace)
    assert not capture_guard._abandoned(marker)


def test_the_guard_never_fails_a_request(trials, monkeypatch):
    """A folder this user may not change, or no folder at all: the crash is still told where it can be read,
    and a capture still runs, unguarded."""
    guard = CaptureGuard("the chain", FACTS)
    marker = stale_marker(trials, guard.key, capture_guard._host())

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(capture_guard.os, "replace", refuse)
    assert str(marker) in guard.crashed()  # not recorded, but said
    monkeypatch.setattr(capture_guard, "trials_folder", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    assert guard.crashed() is None
    ran = []
    with guard.attempt():
        ran.append(True)
    assert ran == [True]


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
        "off: a process died while capturing the sessions' own graphs (ONNX Runtime CUDA)"
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
    assert pipe.graph_status.startswith("sessions: a process died while capturing the chain (ONNX Runtime CUDA)"), (
        pipe.graph_status
    )
    assert [type(g).__name__ for g in pipe.graphs.values()] == ["SessionGraphs"]
