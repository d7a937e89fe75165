"""serve_triton.py's checks that need no server: ports, the libpython path handed to Triton's stub, a stop
while Triton starts."""

from __future__ import annotations

import os
import re
import signal
import socket
import sysconfig
import threading
import time
import types
import typing

import pytest
from sdturbo.engine.errors import InputError
from sdturbo.engine.serve_triton import ServeConfig, check_ports, use_own_libpython


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


def test_serve_warms_up_on_the_thread_that_serves(tiny_bundle, monkeypatch):
    """What a pipeline keeps per thread (onnxruntime's own CUDA graphs) must be made on the batcher's worker,
    which runs every served batch: `serve` warms up there (Triton itself is not started here)."""
    from sdturbo.benchmarks.serve_load import free_port
    from sdturbo.engine import serve_triton
    from sdturbo.engine.runtime import open_pipeline

    threads = []
    monkeypatch.setattr(serve_triton, "warm_up", lambda *args: threads.append(threading.current_thread().name))
    monkeypatch.setattr(serve_triton, "_serve", lambda *args: 0)
    ports = [free_port() for _ in range(3)]
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


def test_a_stop_while_triton_starts_stops_it_now(tiny_bundle, monkeypatch, caplog):
    """Ctrl-C during start-up: the start is broken off and what had started is stopped, instead of waiting
    out pytriton's readiness timeout and starting Triton again for each attempt left."""
    from sdturbo.engine import serve_triton
    from sdturbo.engine.runtime import open_pipeline

    triton = types.SimpleNamespace(
        Triton=StartingTriton, TritonConfig=lambda **kw: kw, TritonLifecyclePolicy=lambda **kw: kw
    )
    model_config = types.SimpleNamespace(ModelConfig=lambda **kw: kw)
    monkeypatch.setattr(serve_triton, "import_pytriton", lambda: (triton, model_config))
    monkeypatch.setattr(serve_triton, "tensors", lambda model_config: ([], []))
    for name in ("check_ports", "warm_up", "use_own_libpython", "_allow_drain"):
        monkeypatch.setattr(serve_triton, name, lambda *args: None)
    StartingTriton.made.clear()
    outer = signal.signal(signal.SIGTERM, lambda *_: None)  # were serve's own handler missing: no harm done here
    try:
        with caplog.at_level("INFO", logger="sdturbo.engine.serve_triton"):
            assert serve_triton.serve(open_pipeline(tiny_bundle, "onnxruntime", "fp32"), ServeConfig()) == 0
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert [(t.waited_out, t.stopped) for t in StartingTriton.made] == [(False, True)]  # one start, stopped
    assert "stopped while Triton was starting" in caplog.messages
