"""`sdturbo serve` for real: tritonserver through nvidia-pytriton on 127.0.0.1, the tiny random bundle, HTTP and
gRPC. Served images equal `sdturbo generate` and the Python API byte for byte; bad requests fail alone, as the
client's error (HTTP 400, gRPC INVALID_ARGUMENT) naming the field; the load test's every image is right; SIGTERM
lets in-flight requests finish, then exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'sdturbo[serve]')")
http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'sdturbo[serve]')")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'sdturbo[serve]')")

from PIL import Image  # noqa: E402
from sdturbo.benchmarks.serve_load import LoadConfig, free_ports, log_tail, ready  # noqa: E402
from sdturbo.benchmarks.serve_load import run as load_test  # noqa: E402
from sdturbo.engine.runtime import open_pipeline  # noqa: E402

from . import cpp_client  # noqa: E402

MAX_BATCH = 2


@dataclass
class Server:
    proc: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    log: Path
    model_ready_when_ready: bool  # /v2/models/sdturbo/ready already true when /v2/health/ready first was


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    ports = free_ports(3)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "sdturbo.engine.cli", "serve", "--bundle", str(tiny_bundle), "--backend"]
    cmd += ["onnxruntime", "--precision", "fp32", "--max-batch", str(MAX_BATCH), "--host", "127.0.0.1"]
    cmd += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + 600  # a start-up retry waits out pytriton's 120 s timeout
    while not ready(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"sdturbo serve did not become ready:\n{log_tail(log, 40)}")
        time.sleep(0.1)
    model_ready = _get(f"http://{url}/v2/models/sdturbo/ready")[0] == 200
    yield Server(proc, url, f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}", log, model_ready)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return open_pipeline(tiny_bundle, "onnxruntime", "fp32")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def ask(tc, url: str, **values) -> np.ndarray:
    """One request with the given inputs (numpy arrays, sent with their own dtype and shape)."""
    names = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}
    names |= {np.dtype(np.uint8): "UINT8", np.dtype(object): "BYTES"}
    inputs = []
    for name, value in values.items():
        inputs.append(tc.InferInput(name, list(value.shape), names[value.dtype]))
        inputs[-1].set_data_from_numpy(value)
    with tc.InferenceServerClient(url) as conn:
        return conn.infer("sdturbo", inputs).as_numpy("image")


def text(s) -> np.ndarray:
    return np.array([s.encode() if isinstance(s, str) else s], dtype=object)


def i32(v) -> np.ndarray:
    return np.array([v], np.int32)


def picture(h, w, seed=3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_ready_means_the_model_is_loaded_and_metrics_are_served(server):
    assert server.model_ready_when_ready, "the server said ready before the model was"
    status, body = _get(f"http://{server.metrics}/metrics")
    assert status == 200 and 'nv_inference_request_success{model="sdturbo"' in body


@pytest.mark.parametrize("tc", [http, grpc], ids=["http", "grpc"])
def test_served_image_is_the_direct_call(server, pipe, tc):
    url = server.http if tc is http else server.grpc
    got = ask(
        tc, url, prompt=text("a red cube"), seed=np.array([11], np.int64), steps=i32(2), width=i32(48), height=i32(40)
    )
    np.testing.assert_array_equal(got, pipe("a red cube", seed=11, steps=2, width=48, height=40)[0])
    image = picture(32, 40)
    got = ask(tc, url, prompt=text("a lighthouse"), steps=i32(4), image=image, strength=np.array([0.75], np.float32))
    np.testing.assert_array_equal(
        got, pipe("a lighthouse", steps=4, image=image, strength=0.75, height=32, width=40)[0]
    )


def test_served_image_is_sdturbo_generate(server, tiny_bundle, tmp_path):
    out = tmp_path / "cat.png"
    cmd = [sys.executable, "-m", "sdturbo.engine.cli", "generate", "a cat", "--bundle", str(tiny_bundle), "--seed"]
    cmd += ["5", "--steps", "3", "--size", "56x32", "--backend", "onnxruntime", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    got = ask(
        http,
        server.http,
        prompt=text("a cat"),
        seed=np.array([5], np.int64),
        steps=i32(3),
        width=i32(56),
        height=i32(32),
    )
    np.testing.assert_array_equal(got, np.asarray(Image.open(out)))


GOOD = [
    dict(prompt=text(f"p{i}"), seed=np.array([i], np.int64), width=i32(32 + 8 * (i % 3)), height=i32(32))
    for i in range(8)
]
BAD = [
    (dict(prompt=text("x"), width=i32(36)), "width 36 is not allowed; use a positive multiple of 8"),
    (dict(prompt=text("x"), height=i32(1024)), "height 1024 is outside this bundle's range 32-256"),
    (dict(prompt=text("x"), steps=i32(9)), "steps=9 is not allowed; use an integer from 1 to 4"),
    (dict(prompt=text("x"), strength=np.array([0.5], np.float32)), "input 'strength' is for img2img"),
    (dict(prompt=text(b"\xff\xfe")), "input 'prompt' is not valid UTF-8"),
    (dict(seed=np.array([1], np.int64)), "'prompt'"),  # Triton: missing required input(s) ['prompt']
    (dict(prompt=np.array([1], np.int32)), "'prompt'"),  # Triton: data-type is 'INT32', expects 'BYTES'
    (dict(prompt=np.array([b"a", b"b"], dtype=object)), "'prompt'"),  # Triton: expected shape [1], got [2]
    (dict(prompt=text("x"), steps=np.array([1], np.int64)), "'steps'"),  # Triton: INT64, expects INT32
    (dict(prompt=text("x"), image=np.zeros((32, 32, 4), np.uint8)), "'image'"),  # Triton: shape [-1,-1,3]
    (
        dict(prompt=text("x"), image=np.zeros((0, 0, 3), np.uint8)),
        "input 'image' is 0x0; send img2img: RGB",
    ),  # zero-size: pytriton's copy raised
    (dict(prompt=text("x"), image=np.zeros((0, 32, 3), np.uint8)), "input 'image' is 32x0; send img2img"),
]


def test_bad_requests_fail_alone_while_the_others_succeed(server, pipe):
    work = [(g, None) for g in GOOD] + BAD
    order = np.random.default_rng(0).permutation(len(work))

    def send(j):
        values, _ = work[j]
        try:
            return ask(http, server.http, **values)
        except Exception as e:
            return e

    with ThreadPoolExecutor(len(work)) as ex:
        results = dict(zip(order, ex.map(send, order), strict=True))
    for j, (values, message) in enumerate(work):
        if message is None:
            w = int(values["width"][0])
            want = pipe(values["prompt"][0].decode(), seed=int(values["seed"][0]), width=w, height=32)[0]
            np.testing.assert_array_equal(results[j], want)
        else:  # Triton's checks and ours alike: HTTP 400, the message without a traceback
            assert isinstance(results[j], http.InferenceServerException), f"{values} was served"
            assert results[j].status() == "400" and message in results[j].message(), results[j]
            assert "Traceback" not in results[j].message() and "Answer" not in results[j].message()
    np.testing.assert_array_equal(ask(http, server.http, **GOOD[0]), pipe("p0", seed=0, width=32, height=32)[0])


@pytest.mark.parametrize("tc, code", [(http, "400"), (grpc, "StatusCode.INVALID_ARGUMENT")], ids=["http", "grpc"])
def test_a_bad_request_is_answered_with_a_client_error_and_its_message_alone(server, tc, code):
    """Not pytriton's answer to any error of the callable (INTERNAL: HTTP 500 with two processes' tracebacks),
    which tells a client to retry what can never succeed."""
    with pytest.raises(tc.InferenceServerException) as e:
        ask(tc, server.http if tc is http else server.grpc, prompt=text("x"), width=i32(36))
    assert (e.value.status(), e.value.message()) == (code, "width 36 is not allowed; use a positive multiple of 8")


def test_load_test_checks_every_image(server, tiny_bundle):
    cfg = LoadConfig(
        bundle=str(tiny_bundle),
        backend="onnxruntime",
        precision="fp32",
        width=32,
        height=32,
        steps=2,
        clients=(1, 3),
        requests=8,
        distinct=3,
        bad_every=4,
        pairs=3,
        max_batch=MAX_BATCH,
        url=server.http,
    )
    res = load_test(cfg)
    assert res["correct"], res["levels"]
    assert res["paired"]["pairs"] == 3 and res["paired"]["equal"]
    for level in res["levels"]:
        assert (level["sent"], level["ok"], level["rejected_as_expected"]) == (8, 6, 2)
        assert level["p50_ms"] > 0 and level["images_per_s"] > 0


def test_the_cpp_client_gets_the_direct_calls_images(server, pipe, cpp_request, tmp_path):
    """engine/cpp/sdturbo_request (sdturbo_client.hpp) against the server: txt2img, img2img from a PPM, a UTF-8
    prompt over one kept-alive connection, each image the direct call's byte for byte; a refusal is the server's
    message."""
    url = server.http
    code, err = cpp_client.request(cpp_request, url, "a red cube", tmp_path / "a.ppm", "--seed", "11", "--steps", "2",
                                   "--size", "48x40")  # fmt: skip
    assert code == 0, err
    want = pipe("a red cube", seed=11, steps=2, width=48, height=40)[0]
    np.testing.assert_array_equal(cpp_client.read(tmp_path / "a.ppm"), want)
    image = cpp_client.write(tmp_path / "in.ppm", picture(32, 40))
    code, err = cpp_client.request(cpp_request, url, "a lighthouse", tmp_path / "b.ppm", "--image", str(image),
                                   "--strength", "0.75", "--steps", "4")  # fmt: skip
    assert code == 0, err
    want = pipe("a lighthouse", steps=4, image=picture(32, 40), strength=0.75)[0]
    np.testing.assert_array_equal(cpp_client.read(tmp_path / "b.ppm"), want)
    code, err = cpp_client.request(cpp_request, url, "é 猫 🐈", tmp_path / "c.ppm", "--count", "3", "--seed", "4",
                                   "--size", "32x32")  # fmt: skip
    assert code == 0 and "3 image(s) over 1 connection(s)" in err, err
    for k in range(3):
        want = pipe("é 猫 🐈", seed=4 + k, width=32, height=32)[0]
        np.testing.assert_array_equal(cpp_client.read(tmp_path / f"c-{k}.ppm"), want)
    code, err = cpp_client.request(cpp_request, url, "x", tmp_path / "d.ppm", "--steps", "9")
    assert code == 1 and "HTTP 400: steps=9 is not allowed; use an integer from 1 to 4" in err, err
    assert not (tmp_path / "d.ppm").exists()


def test_sigterm_finishes_in_flight_requests_then_exits_0(server, pipe):
    """Last: it stops the module's server. SIGTERM goes out once all 8 requests are sent and the first response
    is back; the others (queued or running: at least 3 more batches of 2) must all arrive, right, and the server
    then exit with 0."""
    first, all_sent, done_after, sent_at = threading.Event(), threading.Barrier(9), [], []

    def send(i):
        all_sent.wait(60)
        image = ask(http, server.http, prompt=text(f"q{i}"), seed=np.array([i], np.int64), steps=i32(4),
                    width=i32(256), height=i32(256))  # fmt: skip
        if sent_at:
            done_after.append(i)
        first.set()
        return image

    with ThreadPoolExecutor(8) as ex:
        futures = [ex.submit(send, i) for i in range(8)]
        all_sent.wait(60)
        assert first.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        sent_at.append(time.monotonic())
        images = [f.result(180) for f in futures]
    assert done_after, "every request was done before SIGTERM: nothing was in flight"
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, pipe(f"q{i}", seed=i, steps=4, width=256, height=256)[0])
    assert server.proc.wait(180) == 0, log_tail(server.log)
