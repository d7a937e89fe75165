"""serve_triton.py's checks that need no server: ports, the libpython path handed to Triton's stub."""

from __future__ import annotations

import os
import socket
import sysconfig
import threading

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
