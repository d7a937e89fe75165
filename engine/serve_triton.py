"""`sdturbo serve`: a Batcher (serve.py) behind NVIDIA Triton Inference Server, through nvidia-pytriton.

Triton owns HTTP and gRPC (KServe v2), health, metrics and the checks of each input's type and shape. Its own
dynamic batcher is off: it fails a whole batch when one request in it is bad, and it batches by shape, not by
the values of width, height, steps and strength. So Triton hands each request to its own model instance, and the
Batcher groups the requests of all instances. Twice the largest batch in instances lets one batch fill while
another runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import sysconfig
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import BackendError, InputError, SdTurboError
from .serve import DTYPES, INPUTS, OUTPUT, Batcher, ServerClosing, default_size, parse, warm_up

log = logging.getLogger(__name__)
MODEL = "sdturbo"
START_ATTEMPTS = 3


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 4
    max_queue_delay_ms: float = 0.0
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    drain_timeout_s: int = 60  # SIGTERM: how long in-flight requests may take to finish

    def __post_init__(self):
        for name in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, name)
            if not 1 <= v <= 65535:
                raise InputError(f"--{name.replace('_', '-')} {v} is not allowed; use a port from 1 to 65535")
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise InputError(f"--http-port, --grpc-port and --metrics-port must differ; got {ports}")


# per model instance: tritonserver unloads them one after another, once the requests in flight are done
UNLOAD_MEASURED_S = 1.4  # (2 s with pytriton's own proxy; on the project's 2-core CPU machine)
UNLOAD_S = 2  # what the stop allows for


def instances(cfg: ServeConfig) -> int:
    """Triton's model instances: each holds one request until its image is back; twice the largest batch lets
    one batch fill while another runs."""
    return 2 * cfg.max_batch


def stop_budget_s(cfg: ServeConfig) -> int:
    """How long tritonserver may take to stop (its ``exit_timeout_secs``, one budget for both): the requests in
    flight (``drain_timeout_s``), then the unloading of every model instance. With the drain alone, an idle
    server at --max-batch 16 ran out of it while unloading (32 instances) and was stopped in haste."""
    return cfg.drain_timeout_s + UNLOAD_S * instances(cfg)


def use_own_libpython() -> None:
    """Make Triton's Python backend stub load this interpreter's libpython, not the system's: a pyenv or venv
    Python otherwise gets the system's libpython under its own standard library, and the model fails to load
    (``'_thread.RLock' object has no attribute '_recursion_count'``). The server inherits our environment."""
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not library or not (Path(libdir) / library).is_file():
        log.warning("no shared libpython beside this Python (%s/%s); Triton's stub uses the system's", libdir, library)
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if paths[:1] != [libdir]:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in paths if p != libdir]])


def import_pytriton():
    try:
        import pytriton.model_config as model_config
        import pytriton.triton as triton
    except ImportError as e:
        raise BackendError(
            f"sdturbo serve needs nvidia-pytriton ({e.name} is missing): pip install 'sdturbo[serve]'"
        ) from e
    return triton, model_config


def tensors(model_config):
    """The model's inputs and output as pytriton Tensors, from serve.INPUTS / OUTPUT."""
    dtype = {name: (bytes if name == "BYTES" else t) for name, t in DTYPES.items()}
    inputs = [
        model_config.Tensor(name=f.name, dtype=dtype[f.datatype], shape=f.shape, optional=f.optional) for f in INPUTS
    ]
    return inputs, [model_config.Tensor(name=OUTPUT.name, dtype=dtype[OUTPUT.datatype], shape=OUTPUT.shape)]


class Answer(Exception):
    """How a request that failed is answered: a status code of Triton's (a name in its Python backend's
    ``TritonError``, which Triton turns into HTTP's and gRPC's) and the message alone. Raised by the callable;
    the proxy that ``patched_proxy`` puts in the model repository reads both from the last line of the
    traceback it is given, which Python writes as ``ANSWER_PREFIX``, the code and the message as JSON (one
    line, whatever the message holds)."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.code} {json.dumps(self.message)}"


ANSWER_PREFIX = f"{Answer.__module__}.{Answer.__qualname__}: "


class _AnswersLogged(logging.Filter):
    """pytriton logs every error of the callable with its traceback, a bad request's too: an Answer is left out
    (the callable has logged it in a line, or the batcher the failure behind it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().rstrip().rsplit("\n", 1)[-1].startswith(ANSWER_PREFIX)


def quiet_answers() -> None:
    """pytriton logs no Answer from now on (once per process)."""
    inference_log = logging.getLogger("pytriton.proxy.inference")
    if not any(isinstance(f, _AnswersLogged) for f in inference_log.filters):
        inference_log.addFilter(_AnswersLogged())


CODES = ((InputError, "INVALID_ARG"), (ServerClosing, "UNAVAILABLE"))  # HTTP 400 and 503; anything else 500


def answer(e: Exception) -> Answer:
    """``e`` as its request's answer: a bad request (400) names the value, a server going down (503) says to
    retry elsewhere, and any other error is the server's (500), its message without a traceback."""
    code = next((code for kind, code in CODES if isinstance(e, kind)), "INTERNAL")
    return Answer(code, str(e) if isinstance(e, SdTurboError) else f"{type(e).__name__}: {e}")


def infer_function(batcher: Batcher):
    """pytriton's callable: Triton's batcher is off, so ``requests`` holds one request. A bad one is answered
    with its own error (``answer``); a good one waits for its batch."""

    def infer(requests):
        try:
            futures = [batcher.submit(parse(batcher.pipe, r.data)) for r in requests]
        except Exception as e:
            if isinstance(e, SdTurboError):
                log.info("request refused: %s", e)
            else:  # a bug of ours: its traceback goes to the server's log
                log.error("a request could not be read: %s", e, exc_info=e)
            raise answer(e) from None
        try:
            return [{OUTPUT.name: f.result()} for f in futures]
        except Exception as e:  # (the batcher has logged a batch that failed)
            raise answer(e) from None

    return infer


# pytriton 0.7's proxy: the files Triton's Python backend runs for a pytriton model, copied into the model
# repository. Our model's copy is changed in four places (``PROXY_PATCHES``), each found by its exact text (where
# a text is not found, another pytriton, that file is used as it is, with a warning):
# - model.py answers any error of the callable by raising it from ``execute``: Triton then says INTERNAL (HTTP 500,
#   gRPC INTERNAL) to a request that was bad, with the tracebacks of both processes. Where the error is an
#   ``Answer``, each request is answered with its code and message instead; any other error as pytriton does.
# - data.py copies each input into shared memory through ``memoryview.cast``, which raises on a tensor with a zero
#   in its shape: a request with a 0x0 image failed inside the proxy (HTTP 500, two tracebacks) before our
#   callable could refuse it. Such a tensor is copied as the nothing it holds, and refused by our checks (400).
# - communication.py: every model instance but the first asks the first one's handshake socket for its settings,
#   within one second, and gives up at once when the socket exists but does not listen yet. The instances start
#   in parallel, so on a busy machine one fails, the model fails to load, and pytriton waits out its 120 s
#   start-up timeout before saying so (``_start`` then starts it all again). They wait up to 60 s instead, and
#   try again while the socket is not listening yet.
# - communication.py: each instance's requests server looks every second whether it is to stop; tritonserver
#   unloads the instances one after another, so a stop took 2 s per instance. It looks every 0.25 s: 1.4 s each
#   (every 0.1 s: 1.3 s, but an idle server at --max-batch 16 then used 7% of a core, against 1.5% and 3%).
_MODEL_RAISES = """\
                    triton_responses_or_error = pb_utils.TritonModelException(  # pytype: disable=module-attr
                        responses_payload.decode("utf-8")
                    )
"""
_MODEL_ANSWERS = """\
                    triton_responses_or_error = _sdturbo_answer(responses_payload.decode("utf-8"), len(triton_requests))
"""
_MODEL_END = """\
        LOGGER.debug(f"[{self._model_instance_name}] Finalized.")  # noqa: G004
        self._model_instance_name = None
"""
ANSWER_HELPER = """

def _sdturbo_answer(text, n):
    \"\"\"(added by sdturbo) The callable's error, formatted by Python's traceback: where it is an sdturbo Answer
    (its last line), each of the ``n`` requests answered with its status code and message; else raised as
    pytriton does.\"\"\"
    import json

    try:
        line = text.rstrip().rsplit("\\n", 1)[-1]
        if line.startswith(ANSWER_PREFIX):
            code, _, message = line[len(ANSWER_PREFIX) :].partition(" ")
            error = pb_utils.TritonError(json.loads(message), getattr(pb_utils.TritonError, code))
            return [pb_utils.InferenceResponse(error=error) for _ in range(n)]  # pytype: disable=module-attr
    except Exception:  # (never leave the requests unanswered)
        pass
    return pb_utils.TritonModelException(text)  # pytype: disable=module-attr
""".replace("ANSWER_PREFIX", repr(ANSWER_PREFIX))
_HANDSHAKE_WAITS = "def get_config_from_handshake_server(socket_path: pathlib.Path, timeout_s: float = 1.0) -> dict:\n"
_HANDSHAKE_CONNECTS = """\
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.0, should_stop_before_s - time.time()))
        sock.connect(socket_path.as_posix())
"""
_HANDSHAKE_RETRIES = """\
        while True:  # (sdturbo) the socket may exist before it listens, or be made again: retry until the deadline
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.0, should_stop_before_s - time.time()))
            try:
                sock.connect(socket_path.as_posix())
                break
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
                sock = None
                if time.time() >= should_stop_before_s:
                    raise
                time.sleep(0.01)
"""
_SHUTDOWN_POLL = """\
            flag_check_interval_s = 1.0
            # have to receive messages until all requests are processed, even while shutting down
"""
_COPY_FRAME = """\
            shm.buf[offset + total_size : offset + total_size + frame.nbytes] = frame.cast("B")
"""
_COPY_FRAME_IF_ANY = """\
            if frame.nbytes:  # (sdturbo) a zero-size tensor has nothing to copy, and memoryview cannot cast it
                shm.buf[offset + total_size : offset + total_size + frame.nbytes] = frame.cast("B")
"""
PROXY_PATCHES = {
    "model.py": ((_MODEL_RAISES, _MODEL_ANSWERS), (_MODEL_END, _MODEL_END + ANSWER_HELPER)),
    "data.py": ((_COPY_FRAME, _COPY_FRAME_IF_ANY),),
    "communication.py": (
        (_HANDSHAKE_WAITS, _HANDSHAKE_WAITS.replace("timeout_s: float = 1.0", "timeout_s: float = 60.0")),
        (_HANDSHAKE_CONNECTS, _HANDSHAKE_RETRIES),
        (_SHUTDOWN_POLL, _SHUTDOWN_POLL.replace("interval_s = 1.0", "interval_s = 0.25  # (sdturbo; was 1.0)")),
    ),
}
_UNPATCHED = {  # what a file used as it is loses
    "model.py": "a bad request is answered HTTP 500",
    "data.py": "a request with a zero-size image is answered HTTP 500",
    "communication.py": "on a busy machine the model may fail to load, and Triton be started again; a stop takes 2 s "
    "per model instance",
}


def patched(name: str, source: str) -> str | None:
    """pytriton's proxy file ``name`` (``source``) with sdturbo's changes, or None where it is not the text they
    were written for (another pytriton)."""
    for old, new in PROXY_PATCHES[name]:
        if source.count(old) != 1:
            return None
        source = source.replace(old, new)
    return source


@contextmanager
def patched_proxy():
    """While pytriton writes our model into the repository, the proxy's files are ``patched``."""
    from pytriton.models.model import Model

    generate = Model.generate_model

    def generate_model(self, model_repository):
        generate(self, model_repository)
        if self.model_name != MODEL:
            return
        for name in PROXY_PATCHES:
            path = Path(model_repository) / self.model_name / str(self.model_version) / name
            try:
                source = patched(name, path.read_text())
            except OSError:  # (no such file in another pytriton)
                source = None
            if source is None:
                log.warning(
                    "pytriton's %s is not the one sdturbo knows; it is used as it is (%s)", name, _UNPATCHED[name]
                )
            else:
                path.write_text(source)

    Model.generate_model = generate_model
    try:
        yield
    finally:
        Model.generate_model = generate


class _Interrupted(BaseException):
    """SIGTERM or SIGINT while Triton starts. A terminal's Ctrl-C reaches tritonserver too (one process group),
    and pytriton would then wait minutes for it to turn ready: the wait is broken off instead."""


class StopSignal(threading.Event):
    """The handler of SIGTERM and SIGINT: set. While ``armed`` (Triton starting) it also raises _Interrupted in
    the main thread, once; otherwise the serving loop sees it within a second."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def __call__(self, *_) -> None:
        self.set()
        if self.armed:
            self.armed = False
            raise _Interrupted


def check_ports(cfg: ServeConfig) -> None:
    """Each port free on the host, or an InputError now (tritonserver would fail to bind it much later)."""
    for option, port in (
        ("--http-port", cfg.http_port),
        ("--grpc-port", cfg.grpc_port),
        ("--metrics-port", cfg.metrics_port),
    ):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((cfg.host, port))
            except socket.gaierror as e:
                raise InputError(f"--host {cfg.host} is not an address or a name of one ({e.strerror})") from e
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    raise InputError(
                        f"--host {cfg.host} is not an address of this machine ({e.strerror}); "
                        "give one of its own, or 0.0.0.0 for all"
                    ) from e
                raise InputError(
                    f"{option} {port} is not free on {cfg.host} ({e.strerror}); choose another port"
                ) from e


def serve(pipe, cfg: ServeConfig, verbose: bool = False) -> int:
    """Warm up, start Triton, serve until SIGTERM or SIGINT; then let in-flight requests finish and return 0
    (1 when the server stopped on its own). ``pipe`` is closed once the last batch is done (not if the drain
    timed out with one still running): open another to use it after."""
    triton, model_config = import_pytriton()
    check_ports(cfg)
    stop = StopSignal()
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    batcher = Batcher(pipe, cfg.max_batch, cfg.max_queue_delay_ms / 1000)
    try:
        side = default_size(pipe.bundle)
        log.info("warming up (batch 1 and %d at %dx%d)", cfg.max_batch, side, side)
        batcher.on_worker(lambda: warm_up(pipe, cfg.max_batch, side))  # on the thread that serves
        return 0 if stop.is_set() else _serve(triton, model_config, batcher, cfg, stop, verbose)
    finally:
        if batcher.close(timeout=cfg.drain_timeout_s):
            pipe.close()  # the GPU memory, sessions and stream back, in order (nothing runs on them any more)
        else:  # closing would wait for the batch under way, which the drain's limit has just given up on
            log.warning("a batch was still running %d s after the stop; exiting without waiting", cfg.drain_timeout_s)
        for s, h in handlers.items():
            signal.signal(s, h)
        st = batcher.stats
        log.info(
            "served %d images in %d batches (sizes %s); %d batches failed; %d images refused (NaN or infinite)",
            st.images,
            st.batches,
            st.sizes,
            st.failed_batches,
            st.nonfinite,
        )


def _serve(triton, model_config, batcher: Batcher, cfg: ServeConfig, stop: StopSignal, verbose: bool) -> int:
    use_own_libpython()
    if not verbose:
        logging.getLogger("pytriton").setLevel(logging.WARNING)
    quiet_answers()
    _allow_drain(stop_budget_s(cfg))
    server = _start(triton, model_config, batcher, cfg, verbose, stop)
    if server is None:
        log.info("stopped while Triton was starting")
        return 0
    bundle = batcher.pipe.bundle
    log.info(
        "serving %s (%s) as model %r on %s: HTTP port %d, gRPC port %d, metrics port %d; max batch %d",
        *(bundle.root, bundle.family, MODEL, cfg.host, cfg.http_port, cfg.grpc_port, cfg.metrics_port, cfg.max_batch),
    )
    rc = 0
    try:
        while not stop.wait(1.0):
            if not server.is_alive():
                log.error("the Triton server stopped on its own")
                rc = 1
                break
        log.info(
            "stopping: in-flight requests finish first (up to %d s), then Triton unloads %d model instances "
            "(about %.0f s)",
            *(cfg.drain_timeout_s, instances(cfg), UNLOAD_MEASURED_S * instances(cfg)),
        )
    finally:
        server.stop()  # tritonserver takes no new requests, waits for those in flight, then exits
    return rc


def _start(triton, model_config, batcher: Batcher, cfg: ServeConfig, verbose: bool, stop: StopSignal):
    """A running Triton with the model loaded, or None when ``stop`` came first (whatever had started is
    stopped). The model goes into the repository before tritonserver starts, so /v2/health/ready turns true
    only once it is loaded (pytriton's default loads it into a running, already ready server). Should the model
    fail to load (pytriton's handshake between its instances, which ``patched_proxy`` makes wait, is how it
    failed on a busy machine), we start again."""
    config = triton.TritonConfig(
        http_address=cfg.host,
        grpc_address=cfg.host,
        metrics_address=cfg.host,
        http_port=cfg.http_port,
        grpc_port=cfg.grpc_port,
        metrics_port=cfg.metrics_port,
        exit_timeout_secs=stop_budget_s(cfg),
        log_verbose=1 if verbose else None,
    )
    inputs, outputs = tensors(model_config)
    # (a local model store: pytriton writes the model's files with generate_model, where patched_proxy changes
    # them; loaded over the network instead, they would go out unchanged)
    policy = triton.TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    server = None
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            stop.armed = True  # from here a stop signal breaks off the start (before: it is seen just below)
            if stop.is_set():
                break
            server = triton.Triton(config=config, triton_lifecycle_policy=policy)
            try:
                with patched_proxy():
                    server.bind(
                        model_name=MODEL,
                        infer_func=[infer_function(batcher)] * instances(cfg),
                        inputs=inputs,
                        outputs=outputs,
                        config=model_config.ModelConfig(batching=False),
                        strict=True,
                    )
                server.run()
                stop.armed = False
                return server
            except Exception as e:  # pytriton's own error types; tritonserver's log above says why
                stop.armed = False
                server.stop()
                server = None
                if stop.is_set():  # the stop signal reached tritonserver too: that is why it failed
                    break
                if attempt == START_ATTEMPTS:
                    raise BackendError(f"Triton did not load the model in {START_ATTEMPTS} attempts: {e}") from e
                log.warning(
                    "Triton did not load the model (%s); starting it again (%d of %d)", e, attempt + 1, START_ATTEMPTS
                )
    except _Interrupted:
        stop.armed = False
        if server is not None:
            server.stop()
    return None


def _allow_drain(seconds: int) -> None:
    """pytriton kills tritonserver when it has not exited 30 s after SIGINT, even while Triton still waits for
    in-flight requests (``exit_timeout_secs``): give it the drain time and a margin."""
    from pytriton.server import triton_server

    if hasattr(triton_server, "SERVER_OUTPUT_TIMEOUT_SECS"):
        triton_server.SERVER_OUTPUT_TIMEOUT_SECS = max(triton_server.SERVER_OUTPUT_TIMEOUT_SECS, seconds + 15)
