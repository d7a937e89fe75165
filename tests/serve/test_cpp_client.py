"""engine/cpp/sdturbo_client.hpp against a stand-in server speaking the same protocol, for the replies the real
server rarely gives: a chunked body, a kept-alive connection the server closed while idle, a reply cut short, an
error that is not JSON. (tests/serve/test_triton.py runs it against `sdturbo serve` itself.)"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .cpp_client import SOURCE, WARNINGS, compiler, read, request, write


class StandIn:
    """An HTTP server on 127.0.0.1 that answers each request with ``reply(connection, number, header, data)``:
    (bytes to send, close the connection after). Keeps what each request sent."""

    def __init__(self, reply):
        self.reply, self.requests, self.connections = reply, [], 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn, number):
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
                length = int(fields["Content-Length"])
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                split = int(fields["Inference-Header-Content-Length"])
                header, data = json.loads(body[:split]), body[split:]
                self.requests.append((header, data))
                answer, close = self.reply(number, len(self.requests), header, data)
                conn.sendall(answer)
                if close:
                    time.sleep(0 if close is True else close)  # (a float: close that much later, reading nothing)
                    return

    def close(self):
        self.sock.close()


def image_reply(pixels: np.ndarray, chunked=False, cut=0) -> bytes:
    header = {"model_name": "sdturbo", "model_version": "1"}
    header["outputs"] = [
        {
            "name": "image",
            "datatype": "UINT8",
            "shape": list(pixels.shape),
            "parameters": {"binary_data_size": pixels.size},
        }
    ]
    head = json.dumps(header).encode()
    body = head + pixels.tobytes()
    fields = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(head)}\r\n"
    )
    if chunked:  # in three chunks, cut across the header and the pixels
        parts = [body[:10], body[10 : len(body) // 2], body[len(body) // 2 :]]
        return (
            (fields + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
            + b"0\r\n\r\n"
        )
    return (fields + f"Content-Length: {len(body)}\r\n\r\n").encode() + body[: len(body) - cut]


def reply_with_header(outputs: list, data_bytes: int) -> bytes:
    """A 200 reply with this JSON header's ``outputs`` and ``data_bytes`` of zeros after it."""
    head = json.dumps({"model_name": "sdturbo", "outputs": outputs}).encode()
    fields = f"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: {len(head)}\r\n"
    return (fields + f"Content-Length: {len(head) + data_bytes}\r\n\r\n").encode() + head + bytes(data_bytes)


def pixels(seed: int, h=24, w=40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def stand_in():
    servers = []

    def start(reply):
        servers.append(StandIn(reply))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_what_it_sends_is_the_protocols_binary_tensors_and_only_the_fields_set(stand_in, cpp_request, tmp_path):
    server = stand_in(lambda c, n, h, d: (image_reply(pixels(0)), False))
    prompt = "é 猫 🐈"
    code, err = request(cpp_request, server.url, prompt, tmp_path / "a.ppm", "--seed", str(2**63 - 1), "--steps", "3")
    assert code == 0, err
    header, data = server.requests[0]
    inputs = header["inputs"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in inputs] == [
        ("prompt", "BYTES", [1]),
        ("seed", "INT64", [1]),
        ("steps", "INT32", [1]),
    ]  # width, height, strength and image unset: the server's defaults
    encoded = prompt.encode()
    assert data == struct.pack("<I", len(encoded)) + encoded + struct.pack("<q", 2**63 - 1) + struct.pack("<i", 3)
    assert [i["parameters"]["binary_data_size"] for i in inputs] == [4 + len(encoded), 8, 4]
    assert header["outputs"] == [{"name": "image", "parameters": {"binary_data": True}}]
    np.testing.assert_array_equal(read(tmp_path / "a.ppm"), pixels(0))


def test_a_chunked_reply_gives_the_same_image(stand_in, cpp_request, tmp_path):
    server = stand_in(lambda c, n, h, d: (image_reply(pixels(1), chunked=True), False))
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm")
    assert code == 0, err
    np.testing.assert_array_equal(read(tmp_path / "a.ppm"), pixels(1))


def test_a_kept_alive_connection_closed_while_idle_is_opened_again(stand_in, cpp_request, tmp_path):
    """The server closes each connection after its first reply, without saying so (as an idle timeout does):
    each next request finds it closed and goes again on a new one, once."""
    server = stand_in(lambda c, n, h, d: (image_reply(pixels(n)), True))
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm", "--count", "3")
    assert code == 0, err
    assert "3 image(s) over 3 connection(s)" in err
    for k in range(3):
        np.testing.assert_array_equal(read(tmp_path / f"a-{k}.ppm"), pixels(k + 1))
    assert [struct.unpack("<q", d[-8:])[0] for _, d in server.requests] == [0, 1, 2]  # seeds 0, 1, 2


def test_a_large_request_on_a_connection_closed_while_idle_goes_again_too(stand_in, cpp_request, tmp_path):
    """A 2048x2048 img2img request (12 MB) on a connection the server closed: the first send() may go through and
    a later one fail (EPIPE), part of it sent; no reply had begun, so it still goes again on a new connection."""
    server = stand_in(lambda c, n, h, d: (image_reply(pixels(n)), True))
    image = write(tmp_path / "in.ppm", np.zeros((2048, 2048, 3), np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    code, err = request(cpp_request, server.url, "x", out / "a.ppm", "--image", str(image), "--count", "3")
    assert code == 0, err
    assert "3 image(s) over 3 connection(s)" in err
    assert [len(d) for _, d in server.requests] == [4 + 1 + 8 + 2048 * 2048 * 3] * 3


def test_a_connection_closed_just_after_the_check_with_the_request_unread_goes_again(stand_in, cpp_request, tmp_path):
    """The server closes each connection 0.3 s after its reply: the client's check before reuse finds it open, the
    next request is sent, and the close resets the connection with that request unread (not taken): it goes again
    on a new connection, once."""
    server = stand_in(lambda c, n, h, d: (image_reply(pixels(n)), 0.3))
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm", "--count", "3")
    assert code == 0, err
    assert "3 image(s) over 3 connection(s)" in err and len(server.requests) == 3


def test_a_request_the_server_took_whole_and_dropped_is_not_sent_again(stand_in, cpp_request, tmp_path):
    """The server reads request 2 whole, then closes without an answer (a crash, or a stopping server cutting off
    a request under way): the client reports it instead of sending it again (the server may have run it)."""
    server = stand_in(lambda c, n, h, d: (b"" if n == 2 else image_reply(pixels(n)), n == 2))
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm", "--count", "3")
    assert code == 1 and "closed the connection without an answer" in err, err
    assert len(server.requests) == 2


class EarlyAnswer(StandIn):
    """A server (a proxy in front of Triton, say) that answers each request after its headers, without reading the
    body, then closes: a large request's send fails (EPIPE or ECONNRESET) with the answer already on its way."""

    def __init__(self, status: str, body: bytes):
        self.answer = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        super().__init__(reply=None)

    def _serve(self, conn, number):
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf and (chunk := conn.recv(4096)):
                buf += chunk
            conn.sendall(self.answer)
            time.sleep(0.1)  # (the answer is out before the close resets the connection)


@pytest.mark.parametrize("size", [16, 2048])
def test_an_answer_before_the_request_was_sent_whole_is_reported(cpp_request, tmp_path, size):
    """The server's own answer is reported (status and its error), not "cannot send", and not sent again.
    2048x2048: the send fails part way (12 MB); 16x16 goes whole before the answer (the usual path)."""
    server = EarlyAnswer("413 Request Entity Too Large", json.dumps({"error": "request over 1 MB"}).encode())
    image = write(tmp_path / "in.ppm", np.zeros((size, size, 3), np.uint8))
    try:
        code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm", "--image", str(image), "--count", "2")
    finally:
        server.sock.close()
    assert code == 1 and "HTTP 413: request over 1 MB" in err, err
    assert server.connections == 1 and not (tmp_path / "a-0.ppm").exists()


def test_a_connection_kept_alive_carries_every_request(stand_in, cpp_request, tmp_path):
    server = stand_in(lambda c, n, h, d: (image_reply(pixels(n)), False))
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm", "--count", "3", "--seed", "5")
    assert code == 0, err
    assert "3 image(s) over 1 connection(s)" in err and server.connections == 1
    assert [struct.unpack("<q", d[-8:])[0] for _, d in server.requests] == [5, 6, 7]


@pytest.mark.parametrize(
    "answer, message",
    [
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 13\r\n\r\nshutting down", "HTTP 503: shutting down"),
        (
            b'HTTP/1.1 400 Bad Request\r\nContent-Length: 36\r\n\r\n{"error":"width \\"7\\" \\u00e9 no"}   ',
            'HTTP 400: width "7" é no',
        ),
        (image_reply(pixels(2), cut=5), "was cut short"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "is not HTTP"),
        (
            b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: 2\r\nContent-Length: 5\r\n\r\n{}abc",
            "has no output 'image'",
        ),
        (  # a size that wraps an unsigned offset around: a read before the body (found in review, under ASan)
            reply_with_header(
                [
                    {"name": "junk", "parameters": {"binary_data_size": 18446744073709549568}},
                    {"name": "image", "shape": [32, 32, 3], "parameters": {"binary_data_size": 3072}},
                ],
                3072,
            ),
            "has binary data beyond its end",
        ),
        (
            reply_with_header([{"name": "image", "shape": [-1, -1, 3], "parameters": {"binary_data_size": 3}}], 3),
            "has an image of 3 bytes that is not [height, width, 3]",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n", "is not chunked as HTTP says"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nabc", "has Content-Length: -5"),
    ],
    ids=[
        *("plain-text-error", "json-error", "cut-short", "not-http", "no-image"),
        *("size-past-the-end", "negative-shape", "bad-chunk-size", "negative-length"),
    ],
)
def test_a_refusal_or_a_broken_reply_is_exit_1_with_the_reason_and_no_image(
    stand_in, cpp_request, tmp_path, answer, message
):
    server = stand_in(lambda c, n, h, d: (answer, True))
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm")
    assert code == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a part


def test_an_image_whose_size_disagrees_with_its_shape_is_refused(stand_in, cpp_request, tmp_path):
    reply = image_reply(pixels(3)).replace(b'"shape": [24, 40, 3]', b'"shape": [24, 41, 3]')
    server = stand_in(lambda c, n, h, d: (reply, True))
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm")
    assert code == 1 and "has an image of 2880 bytes that is not [height, width, 3]" in err, err


def test_no_server_is_named_with_its_address(cpp_request, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # a port nobody listens on once closed
    code, err = request(cpp_request, f"127.0.0.1:{port}", "x", tmp_path / "a.ppm")
    assert code == 1 and f"cannot connect to 127.0.0.1:{port}: Connection refused" in err, err


def test_a_server_that_does_not_answer_is_given_up_after_the_timeout(stand_in, cpp_request, tmp_path):
    answered = threading.Event()
    server = stand_in(lambda c, n, h, d: (answered.wait(30) and b"", True))  # holds the request, answers nothing
    start = time.monotonic()
    code, err = request(cpp_request, server.url, "x", tmp_path / "a.ppm", "--timeout", "1")
    answered.set()
    assert code == 1 and f"no answer from {server.url} within 1 s" in err, err
    assert time.monotonic() - start < 20


@contextlib.contextmanager
def full_listener():
    """The port of a listener whose queue is full: it drops new connections' SYNs, as a host that drops packets
    does."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = [socket.socket() for _ in range(4)]
        for w in waiting:
            w.setblocking(False)
            w.connect_ex(("127.0.0.1", port))
        time.sleep(0.2)
        try:
            yield port
        finally:
            for w in waiting:
                w.close()


def test_a_connection_that_does_not_open_is_given_up_after_the_connect_timeout(cpp_request, tmp_path):
    with full_listener() as port:
        start = time.monotonic()
        code, err = request(cpp_request, f"127.0.0.1:{port}", "x", tmp_path / "a.ppm", "--connect-timeout", "1")
    assert code == 1 and f"cannot connect to 127.0.0.1:{port}: no connection within 1 s" in err, err
    assert time.monotonic() - start < 20


SIGNALLED = r"""
#include <signal.h>
#include <sys/time.h>
#include <cstdio>
#include <cstdlib>
#include "sdturbo_client.hpp"
static void tick(int) {}
int main(int, char** argv) {  // a SIGALRM every 0.2 s, with a handler (no SA_RESTART): poll() and recv() see EINTR
  struct sigaction action {};
  action.sa_handler = tick;
  sigaction(SIGALRM, &action, nullptr);
  itimerval every{{0, 200000}, {0, 200000}};
  setitimer(ITIMER_REAL, &every, nullptr);
  sdturbo::Client client("127.0.0.1", std::atoi(argv[1]), "sdturbo", std::atoi(argv[2]), std::atoi(argv[3]));
  sdturbo::Request request;
  request.prompt = "x";
  try {
    client.generate(request);
  } catch (const sdturbo::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """A program that calls the client with a signal handled every 0.2 s (a profiler's timer does this)."""
    folder = tmp_path_factory.mktemp("signalled")
    source = folder / "signalled.cpp"
    source.write_text(SIGNALLED)
    exe = folder / "signalled"
    cmd = [compiler(), "-std=c++17", "-O1", *WARNINGS, f"-I{SOURCE.parent}", "-o", str(exe), str(source)]
    done = subprocess.run(cmd, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    return exe


def run_signalled(exe: Path, port: int, timeout: int, connect_timeout: int):
    """(exit status, stderr, seconds); fails the test if it has not given up within 15 s."""
    start = time.monotonic()
    try:
        args = [str(exe), str(port), str(timeout), str(connect_timeout)]
        done = subprocess.run(args, capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the client did not give up within 15 s (timeouts {timeout} s and {connect_timeout} s)")
    return done.returncode, done.stderr.decode(), time.monotonic() - start


def test_the_connect_timeout_holds_while_signals_interrupt_the_wait(signalled):
    """Each signal interrupts the wait; the client waits again only for what is left of the timeout. Starting the
    whole timeout again after each one never gave up here."""
    with full_listener() as port:
        code, err, seconds = run_signalled(signalled, port, 30, 1)
    assert code == 1 and f"cannot connect to 127.0.0.1:{port}: no connection within 1 s" in err, err
    assert seconds < 5, seconds


def test_the_reply_timeout_holds_while_signals_interrupt_the_wait(signalled, stand_in):
    answered = threading.Event()
    server = stand_in(lambda c, n, h, d: (answered.wait(30) and b"", True))  # holds the request, answers nothing
    code, err, seconds = run_signalled(signalled, int(server.url.split(":")[1]), 1, 5)
    answered.set()
    assert code == 1 and f"no answer from {server.url} within 1 s" in err, err
    assert seconds < 5, seconds


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "64"], "--size 64 is not WIDTHxHEIGHT"),
        (["--seed", "-1"], "--seed -1 is not an integer from 0 to 9223372036854775807"),
        (["--count", "0"], "--count 0 is not an integer from 1 to 1000"),
        (["--strength", "half"], "--strength half is not a number"),
        (["--url", "localhost"], "--url localhost is not HOST:PORT"),
        (["--image", "/nonexistent.ppm"], "cannot read /nonexistent.ppm"),
        (["two"], "one prompt only"),
        (["--steps"], "--steps needs a value"),
        (["--timeout", "0"], "--timeout 0 is not an integer from 1 to 86400"),
    ],
)
def test_a_bad_command_line_is_exit_2_naming_the_value(cpp_request, tmp_path, args, message):
    code, err = request(cpp_request, "127.0.0.1:1", "x", tmp_path / "a.ppm", *args)
    assert code == 2 and message in err, err


def test_the_readmes_cpp_example_compiles(tmp_path):
    """README's "From C++" example, as a function body, against the header (no server: it is only compiled)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```")[0] for b in readme.split("```cpp\n")[1:]]
    example = next(b for b in blocks if '#include "sdturbo_client.hpp"' in b)
    include, body = example.split("\n", 1)
    source = tmp_path / "app.cpp"
    source.write_text(f"{include}\n\nint main() {{\n{body}\n  return 0;\n}}\n")
    flags = [f for f in WARNINGS if f != "-Werror"]  # the example leaves its image unused
    done = subprocess.run(
        [compiler(), "-std=c++17", "-fsyntax-only", *flags, "-I", str(SOURCE.parent), str(source)], capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def test_a_client_s_bad_settings_are_named_before_any_connection(tmp_path):
    """The library's own checks (sdturbo_request checks its options itself): each an Error naming the value."""
    source = tmp_path / "settings.cpp"
    source.write_text(
        """#include <iostream>
#include "sdturbo_client.hpp"
int main() {
  auto attempt = [](auto make) {
    try { make(); std::cout << "made\\n"; } catch (const sdturbo::Error& e) { std::cout << e.what() << "\\n"; }
  };
  attempt([] { sdturbo::Client c("127.0.0.1", 8000, "no pe"); });
  attempt([] { sdturbo::Client c("127.0.0.1", 8000, "../x"); });
  attempt([] { sdturbo::Client c("127.0.0.1", 0); });
  attempt([] { sdturbo::Client c("127.0.0.1", 8000, "sdturbo", 0); });
  attempt([] { sdturbo::Client c("127.0.0.1", 8000, "sdturbo", 300, 3000000); });
  attempt([] { sdturbo::Client c("127.0.0.1", 8000, ".."); });
  attempt([] { sdturbo::Client c("::1", 8000, "sdturbo_2.v1"); });
  attempt([] {  // sizes without pixels (an empty vector's data()): refused before any connection
    sdturbo::Client c("127.0.0.1", 1);
    sdturbo::Request r;
    r.prompt = "x", r.image_height = 64, r.image_width = 64;
    c.generate(r);
  });
}
"""
    )
    exe = tmp_path / "settings"
    cmd = [compiler(), "-std=c++17", *WARNINGS, "-I", str(SOURCE.parent), "-o", str(exe), str(source)]
    done = subprocess.run(cmd, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert subprocess.run([str(exe)], capture_output=True, text=True).stdout.splitlines() == [
        "model name 'no pe' is not allowed; use letters, digits, '_', '.' and '-' (not '.' or '..')",
        "model name '../x' is not allowed; use letters, digits, '_', '.' and '-' (not '.' or '..')",
        "port 0 is not 1 to 65535",
        "timeouts must be 1 to 1000000 s (got 0 and 10)",
        "timeouts must be 1 to 1000000 s (got 300 and 3000000)",
        "model name '..' is not allowed; use letters, digits, '_', '.' and '-' (not '.' or '..')",
        "made",
        "image_height and image_width are set but image is null (an empty buffer's data()?)",
    ]
