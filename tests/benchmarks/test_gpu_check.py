"""gpu_check's steps survive a crash inside a library: the benchmark runs in a process of its own and once
more after being killed by a signal (a capture that killed it is skipped then: engine/capture_guard.py); the
GPU tests' log says when they were killed. The processes are stood in for here; what they run is not."""

from __future__ import annotations

import subprocess

from sdturbo.benchmarks import gpu_check


def fake_runs(monkeypatch, codes: list[int], timeouts: list | None = None) -> list[list[str]]:
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if timeouts is not None:
            timeouts.append(kwargs.get("timeout"))
        if "stdout" in kwargs:
            kwargs["stdout"].write("tests/x.py::test_capture \n")
        return subprocess.CompletedProcess(cmd, codes[len(calls) - 1])

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    return calls


def test_a_benchmark_killed_by_a_signal_runs_once_more(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, [-6, 0])
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,tests,ort-demo", "--steps", "1"]) == 0
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0][1:4] == ["-m", "sdturbo.engine.cli", "bench"]
    assert not list(tmp_path.glob("*.error.txt"))


def test_a_benchmark_killed_twice_or_failing_is_recorded_as_failed(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, [-6, -6, 1])
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,tests,ort-demo", "--steps", "1,4"]) == 1
    assert len(calls) == 3  # killed twice: not a third time; an error exit: not again
    for steps, exit_code in ((1, -6), (4, 1)):
        error = (tmp_path / f"bench-{steps}step.error.txt").read_text()
        assert f"failed (exit {exit_code})" in error


def test_gpu_tests_killed_by_a_signal_say_so_and_run_once_more(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, [-6, 0])
    gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,bench,ort-demo"])
    log = (tmp_path / "gpu-tests.log").read_text()
    assert len(calls) == 2
    assert "== the gpu tests were killed by signal 6: in the last test above\n== running them once more\n" in log
    assert log.count("tests/x.py::test_capture") == 2  # both runs' output, in one log


def test_the_tests_timeout_is_for_both_runs_together(tmp_path, monkeypatch):
    timeouts, clock = [], iter([0.0, 0.0, 70.0])  # the deadline set, the first run, the second 70 s later
    fake_runs(monkeypatch, [-6, 0], timeouts)
    monkeypatch.setattr(gpu_check.time, "monotonic", lambda: next(clock))
    gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,bench,ort-demo", "--tests-timeout", "100"])
    assert timeouts == [100.0, 30.0]


def test_gpu_tests_killed_twice_are_not_run_a_third_time(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, [-6, -6, 0])
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,bench,ort-demo"]) == 1
    assert len(calls) == 2
    assert (tmp_path / "gpu-tests.log").read_text().endswith("killed by signal 6: in the last test above\n")


def test_every_step_keeps_its_capture_records_with_the_results(tmp_path, monkeypatch):
    envs = []
    fake_runs(monkeypatch, [0, 0])
    fake = gpu_check.subprocess.run
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, **kw: envs.append(kw["env"]) or fake(cmd, **kw))
    gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,ort-demo", "--steps", "1"])
    folder = (tmp_path / "capture-trials").resolve()
    assert [env["SDTURBO_CAPTURE_TRIALS"] for env in envs] == [str(folder / "tests"), str(folder / "bench")]


def test_onnxruntime_s_own_pipeline_is_measured_in_a_run_of_its_own_beside_ours_and_diffusers(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, [0, -6, 0])  # the main benchmark, then the demo's: killed once, run again
    assert gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,tests", "--steps", "1"]) == 0
    main, demo, again = calls
    assert "onnxruntime-demo-fp16" not in " ".join(main) and demo == again
    assert demo[demo.index("--contenders") + 1] == "diffusers-fp16,sdturbo-onnxruntime-cuda-fp16,onnxruntime-demo-fp16"
    assert demo[demo.index("--steps") + 1] == "1" and demo[demo.index("--out") + 1] == str(tmp_path / "bench-ort-demo")
    assert not list(tmp_path.glob("*.error.txt"))


def test_each_benchmark_runs_with_the_settings_it_was_given(tmp_path, monkeypatch):
    """Every step count's benchmark gets its --steps, the contenders, model and compile mode asked for; the
    1-step one runs the throughput sweep (--batches), the others skip the sweep's cold start; the ort-demo run
    gets its own --demo-batches."""
    calls = fake_runs(monkeypatch, [0, 0, 0])
    argv = ["--out", str(tmp_path), "--skip", "device,probe,tests", "--steps", "1,4", "--model", "random:tiny"]
    argv += ["--contenders", "diffusers-fp16,sdturbo-tensorrt-fp16", "--compile-mode", "default"]
    argv += ["--batches", "2,3", "--demo-batches", "5"]
    assert gpu_check.main(argv) == 0
    one, four, demo = calls

    def value(cmd, option):
        return cmd[cmd.index(option) + 1] if option in cmd else None

    for cmd, steps in ((one, "1"), (four, "4")):
        assert value(cmd, "--steps") == steps and value(cmd, "--model") == "random:tiny"
        assert value(cmd, "--contenders") == "diffusers-fp16,sdturbo-tensorrt-fp16"
        assert value(cmd, "--compile-mode") == "default"
        assert value(cmd, "--out") == str(tmp_path / f"bench-{steps}step")
    assert value(one, "--batches") == "2,3" and "--no-cold" not in one
    assert "--no-cold" in four
    assert value(demo, "--batches") == "5" and value(demo, "--model") == "random:tiny"


def test_a_skipped_step_does_not_run_and_the_others_do(tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, [0, 0])
    gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,tests,ort-demo", "--steps", "1,4"])
    assert [c[c.index("--steps") + 1] for c in calls] == ["1", "4"]  # the benchmarks only: no ort-demo run
    calls = fake_runs(monkeypatch, [0])
    gpu_check.main(["--out", str(tmp_path), "--skip", "device,probe,tests,bench"])
    assert len(calls) == 1 and "onnxruntime-demo-fp16" in " ".join(calls[0])  # the ort-demo run only


def test_the_exit_status_is_1_when_a_step_failed_and_0_when_none_did(tmp_path, monkeypatch, caplog):
    """Each step runs whatever failed before it, and the exit status says whether one failed: a run in which
    the GPU tests failed (exit 1) and the benchmark ran is 1, with the failed steps named; one all passed, 0."""
    fake_runs(monkeypatch, [1, 0])
    assert gpu_check.main(["--out", str(tmp_path / "a"), "--skip", "device,probe,ort-demo", "--steps", "1"]) == 1
    assert "the gpu tests failed (exit 1)" in (tmp_path / "a" / "tests.error.txt").read_text()
    assert not (tmp_path / "a" / "bench-1step.error.txt").exists()
    assert "1 step(s) failed: tests" in caplog.text
    fake_runs(monkeypatch, [0, 0])
    assert gpu_check.main(["--out", str(tmp_path / "b"), "--skip", "device,probe,ort-demo", "--steps", "1"]) == 0
    assert not list((tmp_path / "b").glob("*.error.txt"))
