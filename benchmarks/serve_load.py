"""Load test for `sdturbo serve`: N concurrent clients on 127.0.0.1, every served image checked against a direct call.

    python -m sdturbo.benchmarks.serve_load --model random:tiny --size 512x512 --clients 1,4,16 --out DIR

Starts the server (or uses one at ``--url``), makes the reference images with the Python API in this process
(same bundle, backend and precision), times direct calls each followed by the same request served (the
overhead: the median difference), then runs each concurrency level, bounded by ``--requests`` and
``--duration-s``. Reports throughput, p50/p99 latency, errors, mismatches, the overhead and the server's peak
RSS; writes results.json and results.md. It reports; the tests assert.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .report import results_folder
from .timers import SETTLE_S

PROMPTS = ("a cinematic shot of a baby racoon", "a red cube on a table", "an astronaut riding a horse", "a lighthouse")
REFUSED = ("[400] ", "[StatusCode.INVALID_ARGUMENT] ")  # how tritonclient words a client's error (HTTP, gRPC)


@dataclass(frozen=True)
class LoadConfig:
    model: str | None = "random:tiny"
    bundle: str | None = None  # an exported bundle instead of --model
    backend: str = "auto"
    precision: str | None = None
    width: int = 512
    height: int = 512
    steps: int = 1
    clients: tuple[int, ...] = (1, 4, 16)
    requests: int = 64  # per level, at most
    duration_s: float = 120.0  # per level, at most (requests in flight then still finish)
    distinct: int = 8  # distinct (prompt, seed) pairs, each checked against its own direct call
    pairs: int = 32  # direct call, then the same request served (one client): the overhead, at most
    warm_like_server: bool = True  # warm the direct pipeline up as `serve` does (memory: a second server's worth)
    bad_every: int = 0  # every Nth request is malformed (width 4 px off): a 400 naming width
    max_batch: int = 4
    max_queue_delay_ms: float = 0.0
    protocol: str = "http"  # or grpc
    url: str | None = None  # an already running server (host:http_port); else one is started here
    startup_timeout_s: float = 900.0
    out: str | None = None


@dataclass
class Level:
    clients: int
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)  # unexpected failures (first 5 kept)
    error_count: int = 0
    rejected_as_expected: int = 0
    mismatches: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now on 127.0.0.1: each socket is held until all are picked (one closed first may be
    handed out again: a test once got the same port for HTTP and metrics)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class Server:
    """`sdturbo serve` in a child process on 127.0.0.1, its log in a file."""

    def __init__(self, cfg: LoadConfig, bundle: str, precision: str, log_path: Path):
        self.http, self.grpc, self.metrics = free_ports(3)
        cmd = [sys.executable, "-m", "sdturbo.engine.cli", "serve", "--bundle", bundle, "--backend", cfg.backend]
        cmd += ["--precision", precision, "--max-batch", str(cfg.max_batch), "--host", "127.0.0.1"]
        cmd += ["--max-queue-delay-ms", str(cfg.max_queue_delay_ms), "--http-port", str(self.http)]
        cmd += ["--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = start + cfg.startup_timeout_s
        while not ready(f"127.0.0.1:{self.http}"):
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not become ready; see {log_path}:\n{log_tail(log_path)}")
            time.sleep(0.25)
        self.startup_s = time.perf_counter() - start

    def stop(self, timeout: float = 300.0) -> dict:
        start = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        log = self.log_path.read_text("utf-8", "replace")
        served = re.findall(r"served (\d+ images in \d+ batches \(sizes \{.*?\}\))", log)
        return {"exit_code": rc, "shutdown_s": time.perf_counter() - start, "batches": served[-1] if served else None}


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:])


class MemorySampler(threading.Thread):
    """Peak RSS of the server process and of its whole tree (tritonserver, the backend stubs), every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.peak_mb, self.peak_tree_mb = psutil.Process(pid), 0.0, 0.0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                main = self.proc.memory_info().rss
                tree = main + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            except Exception:  # a child that just exited
                continue
            self.peak_mb, self.peak_tree_mb = max(self.peak_mb, main / 2**20), max(self.peak_tree_mb, tree / 2**20)

    def stop(self) -> None:
        self._stop.set()


CLIENT_TIMEOUT_S = 3600.0  # a request queued behind full-size CPU batches can take minutes; never give up on one


def client(protocol: str, url: str):
    if protocol == "grpc":
        import tritonclient.grpc as tc

        return tc, tc.InferenceServerClient(url)  # no deadline unless infer() sets one
    import tritonclient.http as tc

    return tc, tc.InferenceServerClient(url, connection_timeout=CLIENT_TIMEOUT_S, network_timeout=CLIENT_TIMEOUT_S)


def infer(tc, conn, prompt: str, seed: int, cfg: LoadConfig, width: int) -> np.ndarray:
    values = [
        ("prompt", "BYTES", np.array([prompt.encode()], dtype=object)),
        ("seed", "INT64", np.array([seed], np.int64)),
        ("steps", "INT32", np.array([cfg.steps], np.int32)),
        ("width", "INT32", np.array([width], np.int32)),
        ("height", "INT32", np.array([cfg.height], np.int32)),
    ]
    inputs = []
    for name, datatype, value in values:
        inputs.append(tc.InferInput(name, list(value.shape), datatype))
        inputs[-1].set_data_from_numpy(value)
    outputs = [tc.InferRequestedOutput("image", **({"binary_data": True} if tc.__name__.endswith("http") else {}))]
    return conn.infer("sdturbo", inputs, outputs=outputs).as_numpy("image")


def run_level(n: int, cfg: LoadConfig, url: str, refs: list[np.ndarray]) -> Level:
    level, lock, counter = Level(n), threading.Lock(), iter(range(cfg.requests))
    deadline = time.perf_counter() + cfg.duration_s

    def worker():
        tc, conn = client(cfg.protocol, url)
        try:
            work(tc, conn)
        finally:
            conn.close()  # in this thread: the HTTP client's gevent hub is per thread

    def work(tc, conn):
        while time.perf_counter() < deadline:
            with lock:
                j = next(counter, None)
            if j is None:
                return
            k, bad = j % cfg.distinct, cfg.bad_every > 0 and j % cfg.bad_every == cfg.bad_every - 1
            start = time.perf_counter()
            try:
                image = infer(tc, conn, PROMPTS[k % len(PROMPTS)], k, cfg, cfg.width + 4 if bad else cfg.width)
                ms, err = 1e3 * (time.perf_counter() - start), None
            except Exception as e:
                image, err = None, str(e)
            with lock:
                level.sent += 1
                if bad:
                    expected = err is not None and err.startswith(REFUSED) and f"width {cfg.width + 4}" in err
                    level.rejected_as_expected += expected
                    if not expected:
                        level.error_count += 1
                        level.errors.append(
                            f"malformed request was not refused as the client's error (HTTP 400, gRPC "
                            f"INVALID_ARGUMENT) naming width: {str(err)[:300]}"
                        )
                elif err is not None:
                    level.error_count += 1
                    level.errors.append(err[-300:])
                elif not np.array_equal(image, refs[k]):
                    level.mismatches += 1
                else:
                    level.ok += 1
                    level.latencies_ms.append(ms)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.wall_s = time.perf_counter() - start
    level.errors = level.errors[:5]
    return level


def direct_phase(bundle: str, cfg: LoadConfig, precision: str, url: str) -> tuple[list[np.ndarray], dict]:
    """Each distinct request's image from the Python API (batch 1); then up to ``pairs`` direct calls, each
    followed by the same request served (one client), within ``duration_s``. The overhead is the median of the
    pairs' differences: a pair runs back to back, so the machine's load drifts less between its two halves."""
    from ..engine.runtime import open_pipeline
    from ..engine.serve import default_size, warm_up

    # opened as `serve` opens its own: any batch up to the server's (on TensorRT, engines for batch 1 to it)
    shape = (cfg.max_batch, cfg.height, cfg.width)
    with open_pipeline(bundle, cfg.backend, precision, shape=shape, any_batch=True) as pipe:  # closed after this phase
        if cfg.warm_like_server:  # the same state as the server's pipeline (ONNX Runtime's memory after big shapes)
            warm_up(pipe, cfg.max_batch, default_size(pipe.bundle))
        kw = dict(steps=cfg.steps, height=cfg.height, width=cfg.width)
        pipe.load()(PROMPTS[0], seed=0, **kw)  # warm-up
        refs = [pipe(PROMPTS[k % len(PROMPTS)], seed=k, **kw)[0] for k in range(cfg.distinct)]
        tc, conn = client(cfg.protocol, url)
        infer(tc, conn, PROMPTS[0], 0, cfg, cfg.width)  # warm-up
        direct, served, equal = [], [], True
        deadline = time.perf_counter() + cfg.duration_s
        try:
            for j in range(cfg.pairs):
                if time.perf_counter() > deadline:
                    break
                k = j % cfg.distinct
                time.sleep(SETTLE_S)
                start = time.perf_counter()
                image = pipe(PROMPTS[k % len(PROMPTS)], seed=k, **kw)[0]
                direct.append(1e3 * (time.perf_counter() - start))
                time.sleep(SETTLE_S)
                start = time.perf_counter()
                got = infer(tc, conn, PROMPTS[k % len(PROMPTS)], k, cfg, cfg.width)
                served.append(1e3 * (time.perf_counter() - start))
                equal &= np.array_equal(image, refs[k]) and np.array_equal(got, refs[k])
        finally:
            conn.close()
    diffs = [s - d for s, d in zip(served, direct, strict=True)]
    return refs, {
        "pairs": len(diffs),
        "direct_p50_ms": percentile(direct, 50),
        "served_p50_ms": percentile(served, 50),
        "served_minus_direct_p50_ms": percentile(diffs, 50),
        "equal": equal,
        "direct_ms": direct,
        "served_ms": served,
    }


def run(cfg: LoadConfig) -> dict:
    from ..engine.cache import ensure_bundle
    from ..engine.runtime import choose_backend, default_precision

    out = results_folder(cfg.out) if cfg.out else None  # (before the model: named now, not after an export)
    precision = cfg.precision or default_precision(choose_backend(cfg.backend))
    bundle = str(cfg.bundle or ensure_bundle(cfg.model, precision))
    server = sampler = None
    url = cfg.url
    if url is None:
        log_path = (out or Path(".")) / "server.log"
        server = Server(cfg, bundle, precision, log_path)
        url = f"127.0.0.1:{server.grpc if cfg.protocol == 'grpc' else server.http}"
        sampler = MemorySampler(server.proc.pid)
        sampler.start()
    try:
        refs, paired = direct_phase(bundle, cfg, precision, url)
        levels = [run_level(n, cfg, url, refs) for n in cfg.clients]
    finally:
        stopped = server.stop() if server else None
        if sampler:
            sampler.stop()
    return results(cfg, bundle, precision, server, sampler, stopped, paired, levels)


def results(cfg, bundle, precision, server, sampler, stopped, paired: dict, levels) -> dict:
    rows = []
    for lv in levels:
        lat = lv.latencies_ms
        row = {k: v for k, v in asdict(lv).items() if k != "latencies_ms"}
        row |= {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}
        row["mean_ms"] = float(np.mean(lat)) if lat else None
        row["images_per_s"] = lv.ok / lv.wall_s if lv.wall_s > 0 else None
        rows.append(row)
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("onnxruntime", "tritonclient", "nvidia-pytriton"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "schema": 1,
        "config": asdict(cfg),
        "bundle": bundle,
        "precision": precision,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": _cores(),
            "platform": platform.platform(),
        },
        "versions": versions,
        "startup_s": server.startup_s if server else None,
        "paired": paired,
        "levels": rows,
        "overhead_ms_p50_1_client": paired["served_minus_direct_p50_ms"],
        "server": {
            "peak_rss_mb": sampler.peak_mb if sampler else None,
            "peak_rss_tree_mb": sampler.peak_tree_mb if sampler else None,
            **(stopped or {}),
        },
        "correct": paired["equal"] and all(r["mismatches"] == 0 and r["error_count"] == 0 for r in rows),
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [
        f"`sdturbo serve`, {res['bundle']} ({res['precision']}, backend {c['backend']}), {c['width']}x{c['height']}, "
        f"{c['steps']} step(s), max batch {c['max_batch']}, {c['protocol']}; server start (load, warm-up, "
        f"Triton) {_num(res['startup_s'], ' s')}",
        "",
        "| clients | requests | ok | errors | mismatches | images/s | p50 | p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["levels"]:
        lines.append(
            f"| {r['clients']} | {r['sent']} | {r['ok']} | {r['error_count']} | {r['mismatches']} | "
            f"{_num(r['images_per_s'], '', 2)} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} |"
        )
    s = res["server"]
    lines += [
        "",
        f"Served minus direct at 1 client, median of {res['paired']['pairs']} back-to-back pairs: "
        f"{_ms(res['overhead_ms_p50_1_client'])} (p50 direct {_ms(res['paired']['direct_p50_ms'])}, served "
        f"{_ms(res['paired']['served_p50_ms'])}). Server peak RSS: "
        f"{_num(s.get('peak_rss_mb'), ' MB', 0)} (whole tree with tritonserver and stubs: "
        f"{_num(s.get('peak_rss_tree_mb'), ' MB', 0)}). Batches (count, sizes): {s.get('batches')}. "
        f"Exit code after SIGTERM: {s.get('exit_code')}. Every image equal to the direct call: {res['correct']}.",
    ]
    return "\n".join(lines)


def _ms(v) -> str:
    return _num(v, " ms", 1)


def _num(v, unit: str, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdturbo.benchmarks.serve_load", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="random:tiny", help="model to export and cache (default random:tiny)")
    src.add_argument("--bundle", help="an exported bundle")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", choices=("fp32", "fp16"))
    p.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (default 512x512)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    p.add_argument("--requests", type=int, default=64, help="requests per level, at most (default 64)")
    p.add_argument("--duration-s", type=float, default=120.0, help="seconds per level, at most (default 120)")
    p.add_argument("--distinct", type=int, default=8, help="distinct prompt/seed pairs (default 8)")
    p.add_argument("--pairs", type=int, default=32, help="direct-then-served pairs for the overhead (default 32)")
    p.add_argument(
        "--direct-warmup",
        choices=("server", "one"),
        default="server",
        help="server (default): warm the direct pipeline up as the server does (batch 1 and --max-batch at the "
        "default size), so both run from the same state; one: a single call at the test size (less memory)",
    )
    p.add_argument("--bad-every", type=int, default=0, help="every Nth request malformed; it must fail (default 0)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--url", help="use a running server at HOST:PORT (its HTTP or gRPC port) instead of starting one")
    p.add_argument("--out", help="folder for results.json, results.md and server.log")
    args = p.parse_args(argv)
    from ..engine.cli import parse_size

    width, height = parse_size(args.size)
    cfg = LoadConfig(
        model=None if args.bundle else args.model,
        bundle=args.bundle,
        backend=args.backend,
        precision=args.precision,
        width=width,
        height=height,
        steps=args.steps,
        clients=tuple(int(c) for c in args.clients.split(",")),
        requests=args.requests,
        duration_s=args.duration_s,
        distinct=args.distinct,
        pairs=args.pairs,
        warm_like_server=args.direct_warmup == "server",
        bad_every=args.bad_every,
        max_batch=args.max_batch,
        max_queue_delay_ms=args.max_queue_delay_ms,
        protocol=args.protocol,
        url=args.url,
        out=args.out,
    )
    res = run(cfg)
    table = markdown(res)
    if cfg.out:
        Path(cfg.out, "results.json").write_text(json.dumps(res, indent=2) + "\n")
        Path(cfg.out, "results.md").write_text(table + "\n")
    print(table)
    return 0 if res["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
