"""serve_triton.py's checks that need no server: ports, the libpython path handed to Triton's stub, a stop
while Triton starts."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import pickle
import re
import signal
import socket
import sys
import sysconfig
import threading
import time
import types
import typing
from concurrent.futures import ThreadPoolExecutor

import pytest
from sdturbo.engine.errors import InputError
from sdturbo.engine.serve_triton import ServeConfig, check_ports, use_own_libpython

# Those that run our code against pytriton's own (its model config, its proxy files): where it is not installed (Python
# 3.13: [dev] leaves [serve] out there), they skip; the others need none of it.
needs_pytriton = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None,
    reason="nvidia-pytriton is not installed (pip install 'sdturbo[serve]')",
)


def test_ports_must_differ_and_be_ports():
    with pytest.raises(InputError, match=r"--grpc-port 0 is not allowed; use a port from 1 to 65535"):
        ServeConfig(grpc_port=0)
    with pytest.raises(InputError, match=r"must differ; got \[9000, 9000, 8002\]"):
        ServeConfig(http_port=9000, grpc_port=9000)


def test_a_taken_port_is_named_before_anything_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = ServeConfig(host="127.0.0.1", http_port=port, grpc_port=port + 1 if port < 65535 else port - 1)
        with pytest.raises(InputError, match=rf"--http-port {port} is not free on 127.0.0.1"):
            check_ports(cfg)


@pytest.mark.parametrize(
    ("host", "named"),
    [
        ("192.0.2.1", "--host 192.0.2.1 is not an address of this machine"),  # TEST-NET-1: documentation only
        ("no such host.invalid", "--host no such host.invalid is not an address or a name of one"),
    ],
)
def test_a_host_that_is_not_this_machines_is_named_not_the_port(host, named):
    with pytest.raises(InputError, match=re.escape(named)) as e:
        check_ports(ServeConfig(host=host))
    assert "port" not in str(e.value)


LIBPYTHON = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or "")


@pytest.mark.skipif(not os.path.isfile(LIBPYTHON), reason="this Python has no shared libpython in its LIBDIR")
def test_this_pythons_libpython_comes_first_once(monkeypatch):
    libdir = sysconfig.get_config_var("LIBDIR")
    monkeypatch.setenv("LD_LIBRARY_PATH", os.pathsep.join(["/opt/a", libdir, "/opt/b"]))
    use_own_libpython()
    use_own_libpython()
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/opt/a", "/opt/b"]
    monkeypatch.delenv("LD_LIBRARY_PATH")
    use_own_libpython()
    assert os.environ["LD_LIBRARY_PATH"] == libdir


@needs_pytriton
def test_serve_warms_up_on_the_thread_that_serves(tiny_bundle, monkeypatch):
    """What a pipeline keeps per thread (onnxruntime's own CUDA graphs) must be made on the batcher's worker,
    which runs every served batch: `serve` warms up there (Triton itself is not started here)."""
    from sdturbo.benchmarks.serve_load import free_ports
    from sdturbo.engine import serve_triton
    from sdturbo.engine.runtime import open_pipeline

    threads = []
    monkeypatch.setattr(serve_triton, "warm_up", lambda *args: threads.append(threading.current_thread().name))
    monkeypatch.setattr(serve_triton, "_serve", lambda *args: 0)
    ports = free_ports(3)
    cfg = ServeConfig(host="127.0.0.1", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    assert serve_triton.serve(open_pipeline(tiny_bundle, "onnxruntime", "fp32"), cfg) == 0
    assert threads == ["sdturbo-batcher"]


class StartingTriton:
    """pytriton's Triton while it starts, after a terminal's Ctrl-C (sent to the whole process group) killed
    tritonserver: run() polls in Python for a server that will never be ready (pytriton gives up after 120 s)."""

    made: typing.ClassVar[list[StartingTriton]] = []

    def __init__(self, config=None, triton_lifecycle_policy=None):
        self.stopped = self.waited_out = False
        StartingTriton.made.append(self)

    def bind(self, **kwargs):
        pass

    def run(self):
        os.kill(os.getpid(), signal.SIGTERM)  # the stop signal, at this process too
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
        self.waited_out = True
        raise TimeoutError("Waiting for server to be ready timed out.")

    def stop(self):
        self.stopped = True


def stand_in_pytriton(monkeypatch, triton_class) -> None:
    """serve_triton with ``triton_class`` as pytriton's Triton, and no ports, warm-up or model tensors."""
    from sdturbo.engine import serve_triton

    triton = types.SimpleNamespace(
        Triton=triton_class, TritonConfig=lambda **kw: kw, TritonLifecyclePolicy=lambda **kw: kw
    )
    model_config = types.SimpleNamespace(ModelConfig=lambda **kw: kw)
    monkeypatch.setattr(serve_triton, "import_pytriton", lambda: (triton, model_config))
    monkeypatch.setattr(serve_triton, "tensors", lambda model_config: ([], []))
    for name in ("check_ports", "warm_up", "use_own_libpython", "_allow_drain"):
        monkeypatch.setattr(serve_triton, name, lambda *args: None)


@needs_pytriton
def test_a_stop_while_triton_starts_stops_it_now(tiny_bundle, monkeypatch, caplog):
    """Ctrl-C during start-up: the start is broken off and what had started is stopped, instead of waiting
    out pytriton's readiness timeout and starting Triton again for each attempt left."""
    from sdturbo.engine import serve_triton
    from sdturbo.engine.runtime import open_pipeline

    stand_in_pytriton(monkeypatch, StartingTriton)
    StartingTriton.made.clear()
    outer = signal.signal(signal.SIGTERM, lambda *_: None)  # were serve's own handler missing: no harm done here
    try:
        with caplog.at_level("INFO", logger="sdturbo.engine.serve_triton"):
            assert serve_triton.serve(open_pipeline(tiny_bundle, "onnxruntime", "fp32"), ServeConfig()) == 0
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert [(t.waited_out, t.stopped) for t in StartingTriton.made] == [(False, True)]  # one start, stopped
    assert "stopped while Triton was starting" in caplog.messages


class FlakyTriton:
    """pytriton's Triton whose model fails to load (pytriton's one-second handshake missed) the first ``fails``
    times it is started; once loaded, the server stops on its own at once."""

    fails: typing.ClassVar[int] = 0
    made: typing.ClassVar[list[FlakyTriton]] = []

    def __init__(self, config=None, triton_lifecycle_policy=None):
        self.stopped, self.config = False, config
        FlakyTriton.made.append(self)

    def bind(self, **kwargs):
        pass

    def run(self):
        if len(FlakyTriton.made) <= FlakyTriton.fails:
            raise RuntimeError("Model sdturbo failed to load")

    def is_alive(self):
        return False

    def stop(self):
        self.stopped = True


@needs_pytriton
@pytest.mark.parametrize(("fails", "started"), [(2, True), (3, False)])
def test_a_model_that_fails_to_load_is_started_again_up_to_three_times(tiny_bundle, monkeypatch, fails, started):
    """Each failed start is stopped and tried again, three starts in all; a third failure is an error (never
    exit 0 as if stopped by a signal)."""
    from sdturbo.engine import serve_triton
    from sdturbo.engine.errors import BackendError
    from sdturbo.engine.runtime import open_pipeline

    stand_in_pytriton(monkeypatch, FlakyTriton)
    FlakyTriton.made.clear()
    monkeypatch.setattr(FlakyTriton, "fails", fails)
    pipe = open_pipeline(tiny_bundle, "onnxruntime", "fp32")
    if started:
        assert serve_triton.serve(pipe, ServeConfig()) == 1  # it ran, then stopped on its own
    else:
        with pytest.raises(BackendError, match="Triton did not load the model in 3 attempts"):
            serve_triton.serve(pipe, ServeConfig())
    assert len(FlakyTriton.made) == 3 and all(t.stopped for t in FlakyTriton.made)


@needs_pytriton
def test_triton_may_take_the_drain_and_then_the_unloading_to_stop(tiny_bundle, monkeypatch):
    """tritonserver's one exit timeout covers the requests in flight, then the unloading of its model instances,
    one after another (1.4 s each, measured). Given the drain alone, an idle server at --max-batch 16 (32
    instances) ran out of it while unloading and was stopped in haste ("Exit timeout expired"), after 62 s.
    pytriton, which kills tritonserver when it takes longer than its own limit, is given the same budget."""
    from sdturbo.engine import serve_triton
    from sdturbo.engine.runtime import open_pipeline

    stand_in_pytriton(monkeypatch, FlakyTriton)
    allowed = []
    monkeypatch.setattr(serve_triton, "_allow_drain", allowed.append)
    FlakyTriton.made.clear()
    monkeypatch.setattr(FlakyTriton, "fails", 0)
    cfg = ServeConfig(max_batch=4)  # (the tiny bundle's largest)
    assert serve_triton.serve(open_pipeline(tiny_bundle, "onnxruntime", "fp32"), cfg) == 1
    unloading = serve_triton.UNLOAD_MEASURED_S * 2 * cfg.max_batch
    assert FlakyTriton.made[0].config["exit_timeout_secs"] >= cfg.drain_timeout_s + unloading
    assert allowed == [FlakyTriton.made[0].config["exit_timeout_secs"]]


def test_load_test_results_count_served_images_and_any_mismatch_is_incorrect():
    """The load test's summary: images/s counts the images served right (not requests sent, errors or
    mismatches) over the level's wall time; one mismatch makes the run incorrect; the overhead is the median of
    served minus direct per pair (positive when serving costs time)."""
    import numpy as np
    from sdturbo.benchmarks.serve_load import Level, LoadConfig, results

    direct, served = [100.0, 120.0, 110.0], [130.0, 125.0, 160.0]
    paired = {"served_minus_direct_p50_ms": float(np.median(np.subtract(served, direct))), "equal": True}
    clean = Level(1, sent=8, ok=8, latencies_ms=[10.0, 30.0, 20.0], wall_s=2.0)
    res = results(LoadConfig(), "b", "fp32", None, None, None, paired, [clean])
    assert res["correct"] and res["levels"][0]["images_per_s"] == pytest.approx(clean.ok / clean.wall_s)
    assert res["levels"][0]["p50_ms"] == pytest.approx(np.median(clean.latencies_ms))
    assert res["overhead_ms_p50_1_client"] == paired["served_minus_direct_p50_ms"] > 0
    wrong = Level(4, sent=8, ok=5, error_count=1, mismatches=2, latencies_ms=[10.0] * 5, wall_s=2.5)
    res = results(LoadConfig(), "b", "fp32", None, None, None, paired, [clean, wrong])
    assert not res["correct"]
    assert res["levels"][1]["images_per_s"] == pytest.approx(wrong.ok / wrong.wall_s)
    only_mismatch = Level(4, sent=8, ok=7, mismatches=1, latencies_ms=[10.0] * 7, wall_s=1.0)
    assert not results(LoadConfig(), "b", "fp32", None, None, None, paired, [clean, only_mismatch])["correct"]


def test_the_overhead_is_served_minus_direct_per_pair(monkeypatch):
    """direct_phase(): each pair's direct call, then the same request served; the overhead is the median of the
    pairs' differences (served minus direct), timed here on a fake clock."""
    import time as time_module

    import numpy as np
    from sdturbo.benchmarks import serve_load
    from sdturbo.engine import runtime

    now = [0.0]
    direct_s, served_s = iter([0.0, 0.0, 0.100, 0.120, 0.110]), iter([0.0, 0.130, 0.125, 0.160])  # warm-ups first
    image = np.zeros((8, 8, 3), np.uint8)

    class Pipe:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def load(self):
            return self

        def __call__(self, prompt, seed, **kw):
            now[0] += next(direct_s, 0.0)
            return [image]

    def infer(tc, conn, prompt, seed, cfg, width):
        now[0] += next(served_s)
        return image

    monkeypatch.setattr(time_module, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time_module, "sleep", lambda s: None)
    monkeypatch.setattr(runtime, "open_pipeline", lambda *a, **kw: Pipe())
    monkeypatch.setattr(serve_load, "client", lambda protocol, url: (None, types.SimpleNamespace(close=lambda: None)))
    monkeypatch.setattr(serve_load, "infer", infer)
    cfg = serve_load.LoadConfig(pairs=3, distinct=1, warm_like_server=False, duration_s=1e6)
    _, paired = serve_load.direct_phase("bundle", cfg, "fp32", "url")
    assert paired["direct_ms"] == pytest.approx([100.0, 120.0, 110.0])
    assert paired["served_ms"] == pytest.approx([130.0, 125.0, 160.0])
    diffs = np.subtract(paired["served_ms"], paired["direct_ms"])
    assert paired["served_minus_direct_p50_ms"] == pytest.approx(np.median(diffs)) and paired["equal"]


def pytriton_proxy(name: str) -> str:
    """The installed pytriton's proxy file ``name``, as it copies it into a model repository."""
    import pytriton

    return (pathlib.Path(pytriton.__file__).parent / "proxy" / name).read_text()


@needs_pytriton
def test_each_failure_is_answered_with_its_status_code_and_message_alone():
    """What a failed request is answered (HTTP 400, 503 or 500; gRPC INVALID_ARGUMENT, UNAVAILABLE, INTERNAL),
    and how pytriton's proxy, given the text of the callable's error, answers it: each request with the code and
    the message (whatever it holds), or any other error as pytriton does (raised: INTERNAL), an Answer that is
    only the context of a later error and a line that does not parse too."""
    import traceback

    import pytriton
    from sdturbo.engine.errors import NonFiniteOutput
    from sdturbo.engine.serve import ServerClosing
    from sdturbo.engine.serve_triton import ANSWER_HELPER, answer, patched

    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = "400", "503", "500"

        def __init__(self, message, code):
            self.message, self.code = message, code

    pb_utils = types.SimpleNamespace(
        TritonError=TritonError,
        TritonModelException=RuntimeError,
        InferenceResponse=lambda error: (error.code, error.message),
    )
    proxy = {"pb_utils": pb_utils}
    exec(ANSWER_HELPER, proxy)

    def answered(e: Exception, n=2):
        try:
            raise answer(e) from None
        except Exception as raised:
            return proxy["_sdturbo_answer"]("".join(traceback.format_exception(raised)), n)

    bad = "width 36 is not allowed; use a positive multiple of 8 (not 'x: y\nz')"
    assert answered(InputError(bad)) == [("400", bad)] * 2
    closing = "the server is shutting down; send the request to another instance"
    assert answered(ServerClosing(closing), 1) == [("503", closing)]
    nan = NonFiniteOutput([None], [0])
    assert answered(nan, 1) == [("500", str(nan))] and "NaN" in str(nan)
    assert answered(KeyError("seed"), 1) == [("500", "KeyError: 'seed'")]
    sly = 'x"\nsdturbo.engine.serve_triton.Answer: INVALID_ARG "spoofed"'  # (a prompt echoed in a message)
    assert answered(RuntimeError(sly), 1) == [("500", f"RuntimeError: {sly}")]
    assert pickle.loads(pickle.dumps(answer(InputError(bad)))).message == bad

    def raised_as_pytriton(text):
        other = proxy["_sdturbo_answer"](text, 1)
        return isinstance(other, RuntimeError) and str(other) == text

    assert raised_as_pytriton("Traceback (most recent call last):\nValueError: no")
    try:
        try:
            raise answer(InputError(bad)) from None
        except Exception as e:
            raise ValueError("pytriton failed while handling it") from e
    except ValueError as later:
        assert raised_as_pytriton("".join(traceback.format_exception(later)))
    line = "".join(traceback.format_exception(answer(InputError(bad))))
    assert raised_as_pytriton(line.replace("INVALID_ARG", "NO_SUCH_CODE"))
    assert raised_as_pytriton(line.replace('"', "'"))

    source = pytriton_proxy("model.py")
    changed = patched("model.py", source)
    assert changed is not None, f"pytriton {pytriton.__version__}'s model.py is not the one sdturbo patches"
    compile(changed, "model.py", "exec")
    assert "_sdturbo_answer(responses_payload" in changed and changed.endswith(ANSWER_HELPER)
    assert patched("model.py", changed) is None and patched("model.py", "") is None


@needs_pytriton
def test_our_model_s_proxy_files_are_changed_and_pytriton_logs_no_answer(tmp_path, monkeypatch, caplog):
    """While pytriton writes our model into its repository, its proxy files are changed there (no other model's;
    a file that is not the one we know, or is missing, is left as it is, with a warning), and pytriton's
    traceback of an Answer is not logged (other errors are). After, pytriton writes models as before."""
    import logging
    import traceback

    from pytriton.models.model import Model
    from sdturbo.engine import serve_triton

    def write_proxy(self, repository):  # stands in for pytriton's: its proxy files, copied into the repository
        folder = pathlib.Path(repository) / self.model_name / "1"
        folder.mkdir(parents=True)
        for name in serve_triton.PROXY_PATCHES:
            if name in self.files:
                (folder / name).write_text(self.files[name])

    monkeypatch.setattr(Model, "generate_model", write_proxy)
    known = {name: "".join(old for old, _ in patches) for name, patches in serve_triton.PROXY_PATCHES.items()}

    def model(name: str, files: dict) -> types.SimpleNamespace:
        return types.SimpleNamespace(model_name=name, model_version=1, files=files)

    with caplog.at_level("WARNING", logger="sdturbo.engine.serve_triton"), serve_triton.patched_proxy():
        Model.generate_model(model(serve_triton.MODEL, known), tmp_path / "ours")
        Model.generate_model(model("theirs", known), tmp_path / "theirs")
        Model.generate_model(model(serve_triton.MODEL, {"model.py": "other"}), tmp_path / "other")
    assert Model.generate_model is write_proxy
    for name, text in known.items():
        assert (tmp_path / "ours" / "sdturbo" / "1" / name).read_text() == serve_triton.patched(name, text)
        assert (tmp_path / "theirs" / "theirs" / "1" / name).read_text() == text
    assert (tmp_path / "other" / "sdturbo" / "1" / "model.py").read_text() == "other"
    warned = [m for m in caplog.messages if "is not the one sdturbo knows" in m]
    assert [name for m in warned for name in serve_triton.PROXY_PATCHES if f" {name} " in m] == [
        "model.py",  # changed
        *(name for name in serve_triton.PROXY_PATCHES if name != "model.py"),  # missing
    ]

    def logged(e: Exception) -> bool:
        """Whether pytriton's line for the callable's error ``e`` is logged (as pytriton 0.7 logs it)."""
        caplog.clear()
        with caplog.at_level("WARNING", logger="pytriton.proxy.inference"):
            try:
                raise e
            except Exception:
                text = traceback.format_exc()
            logging.getLogger("pytriton.proxy.inference").warning("Exception while performing inference: %s", text)
        return bool(caplog.records)

    serve_triton.quiet_answers()  # (as `sdturbo serve` does before it starts Triton)
    assert not logged(serve_triton.answer(InputError("width 36 is not allowed")))
    assert logged(ValueError("pytriton's own failure"))


def _handshake_client(source: str):
    """``get_config_from_handshake_server`` of pytriton's proxy module communication.py as ``source`` has it."""
    module = types.ModuleType("communication")
    exec(compile(source, "communication.py", "exec"), module.__dict__)
    return module.get_config_from_handshake_server


@needs_pytriton
@pytest.mark.parametrize("late", ["appears late", "listens late"])
def test_model_instances_wait_for_the_first_one_s_handshake(tmp_path, late):
    """pytriton's model instances ask the first one for their settings through its handshake socket. pytriton's
    own client gives up after 1 s, or at once when the socket exists but is not listening yet: on a busy
    machine the model then fails to load (and Triton is started again, after 120 s). Ours waits (up to 60 s)."""
    import pytriton
    from pytriton.proxy.communication import HandshakeServer
    from sdturbo.engine.serve_triton import patched

    source = pytriton_proxy("communication.py")
    ours = patched("communication.py", source)
    assert ours is not None, f"pytriton {pytriton.__version__}'s communication.py is not the one sdturbo patches"

    def serve_late(path: pathlib.Path, delay: float):
        if late == "listens late":  # bound (the file exists), not listening, for ``delay``
            bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bound.bind(path.as_posix())
            time.sleep(delay)
            bound.close()
            path.unlink()
        else:
            time.sleep(delay)
        server = HandshakeServer(path, {"authkey": "k"})
        server.start()
        return server

    results = {}
    for who, text in (("pytriton", source), ("ours", ours)):
        path = tmp_path / f"{who}-config.sock"
        with ThreadPoolExecutor(1) as ex:
            server = ex.submit(serve_late, path, 1.5)
            try:
                results[who] = _handshake_client(text)(path)
            except (TimeoutError, ConnectionRefusedError) as e:
                results[who] = type(e).__name__
            finally:
                try:
                    server.result().close()
                except RuntimeError as e:  # pytriton's close() races its own loop's end (its race, not ours):
                    assert "Event loop is closed" in str(e)  # the loop closed after the first task's cancel
    assert results["ours"] == {"authkey": "k"}
    assert results["pytriton"] == ("TimeoutError" if late == "appears late" else "ConnectionRefusedError")


@needs_pytriton
def test_a_zero_size_tensor_is_copied_into_shared_memory_as_nothing(monkeypatch):
    """pytriton's proxy copies each input into shared memory through ``memoryview.cast``, which raises on a zero
    in the shape: a request with a 0x0 image failed in the proxy (HTTP 500, tracebacks) before our checks could
    refuse it (400). Our model's data.py copies it as the nothing it holds, and pytriton reads it back."""
    import numpy as np
    import pytriton
    from sdturbo.engine.serve_triton import patched

    def proxy_data(source: str) -> types.ModuleType:
        module = types.ModuleType("pytriton.proxy.sdturbo_data")
        module.__package__ = "pytriton.proxy"
        monkeypatch.setitem(sys.modules, module.__name__, module)  # (its dataclasses look their module up)
        exec(compile(source, "data.py", "exec"), module.__dict__)
        return module

    source = pytriton_proxy("data.py")
    changed = patched("data.py", source)
    assert changed is not None, f"pytriton {pytriton.__version__}'s data.py is not the one sdturbo patches"
    for shape in ((0, 0, 3), (0, 32, 3), (32, 0, 3), (2, 2, 3)):
        tensor = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
        data = proxy_data(changed)
        frames = data.serialize_numpy_with_struct_header(tensor)
        shm = types.SimpleNamespace(buf=bytearray(4096))
        data.TensorStore._copy_frames(None, frames, shm, 16)
        shm.buf = memoryview(shm.buf)
        back = data.deserialize_numpy_with_struct_header(data.TensorStore._handle_frames(None, shm, 16))
        assert back.shape == shape and back.dtype == np.uint8 and np.array_equal(back, tensor)
        if not tensor.size:
            with pytest.raises(TypeError, match="zeros in shape"):  # what pytriton's own copy does
                proxy_data(source).TensorStore._copy_frames(None, frames, shm, 16)
