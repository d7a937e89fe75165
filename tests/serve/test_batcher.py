"""engine/serve.py without a server: served inputs become checked Requests, bad ones fail alone naming the field,
and the Batcher runs requests of one (size, steps, strength) as one batch, up to the max batch, one batch at a
time, each image byte for byte the image its request makes on its own."""

from __future__ import annotations

import threading
import traceback

import numpy as np
import pytest
from sdturbo.engine.errors import InputError, NonFiniteOutput
from sdturbo.engine.runtime import open_pipeline
from sdturbo.engine.serve import Batcher, ServerClosing, batch_key, default_size, parse


class Recording:
    """The real tiny pipeline, recording each batch it runs; ``gate`` holds the first batch until released."""

    def __init__(self, pipe, fail_batch: int | None = None):
        self.pipe, self.bundle, self.fail_batch = pipe, pipe.bundle, fail_batch
        self.batches: list[tuple[tuple, int]] = []
        self.running = threading.Event()
        self.gate = threading.Event()
        self.active = 0
        self.overlap = False
        self._lock = threading.Lock()

    def request(self, prompts, **kwargs):
        return self.pipe.request(prompts, **kwargs)

    def load(self, img2img=False):
        return self

    def close(self):
        self.closed = getattr(self, "closed", 0) + 1

    def run(self, req):
        with self._lock:
            self.active += 1
            self.overlap |= self.active > 1
        try:
            self.running.set()
            self.gate.wait(30)
            self.batches.append((batch_key(req), req.batch))
            if self.fail_batch == len(self.batches):
                raise RuntimeError("the backend failed")
            images = self.pipe.run(req)
            bad = [i for i, prompt in enumerate(req.prompts) if "overflow" in prompt]  # as if NaN came out
            if bad:
                raise NonFiniteOutput(images, bad)
            return images
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return open_pipeline(tiny_bundle, "onnxruntime", "fp32")


def inputs(text="a red cube", seed=0, steps=1, width=32, height=32, **extra):
    """A served request's tensors; ``extra`` adds or replaces inputs (None: leaves one out)."""

    def tensor(value, dtype):  # a value given as an array is sent as it is
        return value if isinstance(value, np.ndarray) else np.array([value], dtype)

    named = {"seed": (seed, np.int64), "steps": (steps, np.int32), "width": (width, np.int32)}
    named["height"] = (height, np.int32)
    out = {"prompt": np.array([text.encode()], dtype=object)}
    out |= {name: tensor(value, dtype) for name, (value, dtype) in named.items() if value is not None}
    for name, value in extra.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


def picture(h=32, w=32, seed=5):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def direct(pipe, req):
    """The image of ``sdturbo generate`` / the Python API for the same single request."""
    image = None if req.image is None else req.image[0]
    kw = dict(steps=req.steps, height=req.height, width=req.width, seed=req.seed)
    if image is not None:
        kw.update(image=image, strength=req.strength)
    return pipe(req.prompts[0], **kw)[0]


def test_mixed_requests_run_in_batches_of_one_key_each_image_its_own(pipe):
    rec = Recording(pipe)
    batcher = Batcher(rec, max_batch=3)
    blocker = batcher.submit(parse(rec, inputs(width=48)))
    assert rec.running.wait(30)
    mix = [
        inputs("a", seed=1),
        inputs("b", seed=2, width=64),
        inputs("c", seed=3),
        inputs("d", seed=4, steps=2),
        inputs("e", seed=5, steps=2, image=picture(), strength=np.array([0.5], np.float32)),
        inputs("f", seed=6),
        inputs("g", seed=7, steps=2, image=picture(seed=6), strength=np.array([0.5], np.float32)),
        inputs("h", seed=8, steps=2, image=picture(seed=7), strength=np.array([1.0], np.float32)),
        inputs("i", seed=9),
        inputs("j", seed=10),
    ]
    reqs = [parse(rec, m) for m in mix]
    futures = [batcher.submit(r) for r in reqs]
    rec.gate.set()
    images = [f.result(60) for f in futures]
    blocker.result(60)
    batcher.close()
    assert not rec.overlap, "two batches ran on the pipeline at once"
    assert sum(n for _, n in rec.batches) == len(reqs) + 1
    assert all(n <= 3 for _, n in rec.batches)
    for key in {batch_key(r) for r in reqs}:
        want = sum(batch_key(r) == key for r in reqs)
        assert [n for k, n in rec.batches[1:] if k == key] == [min(3, want - i) for i in range(0, want, 3)]
    for req, image in zip(reqs, images, strict=True):
        assert image.shape == (req.height, req.width, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, direct(pipe, req))
    assert batcher.stats.images == len(reqs) + 1 and batcher.stats.batches == len(rec.batches)


def test_over_the_max_batch_splits_in_arrival_order(pipe):
    rec = Recording(pipe)
    batcher = Batcher(rec, max_batch=3)
    batcher.submit(parse(rec, inputs(width=48)))
    assert rec.running.wait(30)
    reqs = [parse(rec, inputs(f"p{i}", seed=10 * i + 1)) for i in range(7)]
    futures = [batcher.submit(r) for r in reqs]
    rec.gate.set()
    for req, f in zip(reqs, futures, strict=True):
        np.testing.assert_array_equal(f.result(60), direct(pipe, req))
    batcher.close()
    assert [n for _, n in rec.batches] == [1, 3, 3, 1]


def test_a_full_batch_does_not_wait_for_the_delay(pipe):
    """With a long delay a lone request would wait; max_batch requests of one key run at once."""
    rec = Recording(pipe)
    rec.gate.set()
    batcher = Batcher(rec, max_batch=2, max_delay_s=10.0)
    futures = [batcher.submit(parse(rec, inputs(seed=s))) for s in (1, 2)]
    for f in futures:
        f.result(9)
    batcher.close()
    assert [n for _, n in rec.batches] == [2]


BAD = [
    (dict(prompt=None), r"input 'prompt' is missing"),
    (dict(prompt=np.array([b"\xff\xfe"], dtype=object)), r"input 'prompt' is not valid UTF-8"),
    (dict(prompt=np.array([1], np.int32)), r"input 'prompt' is INT32 \[1\]; it must be BYTES \[1\]"),
    (dict(width=np.array([36], np.int32)), r"width 36 is not allowed; use a positive multiple of 8"),
    (dict(height=np.array([512], np.int32)), r"height 512 is outside this bundle's range 32-256"),
    (dict(steps=np.array([0], np.int32)), r"steps=0 is not allowed; use an integer from 1 to 4"),
    (dict(steps=np.array([5], np.int32)), r"steps=5 is not allowed"),
    (dict(steps=np.array([1], np.int64)), r"input 'steps' is INT64 \[1\]; it must be INT32 \[1\]"),
    (dict(steps=np.array([1, 2], np.int32)), r"input 'steps' is INT32 \[2\]; it must be INT32 \[1\]"),
    (dict(seed=np.array([-1], np.int64)), r"seed -1 is not allowed"),
    (dict(strength=np.array([0.5], np.float32)), r"input 'strength' is for img2img; send an 'image' too"),
    (dict(image=picture().astype(np.float32)), r"input 'image' is FP32 \[32, 32, 3\]; it must be UINT8 \[N, N, 3\]"),
    (dict(image=np.zeros((32, 32, 4), np.uint8)), r"input 'image' is UINT8 \[32, 32, 4\]; it must be UINT8"),
    (dict(image=picture(64, 32), steps=np.array([2], np.int32)), r"input 'image' is 32x64 but width x height is 32x32"),
    (dict(steps=np.array([1], np.int32), image=picture()), r"1 \* 0.5 = 0.5 runs no step"),
    (  # the size from the image: the message says so (it named a height the request never sent)
        dict(image=picture(264, 32), steps=2, width=None, height=None),
        r"input 'image' is 32x264, and that size is not allowed: height 264 is outside this bundle's range 32-256; "
        r"send it resized",
    ),
    (  # the width given, the height the image's
        dict(image=picture(264, 32), steps=2, height=None),
        r"input 'image' is 32x264, and that size is not allowed: height 264 is outside",
    ),
    (dict(colour=np.array([1], np.int32)), r"input 'colour' is not known; the inputs are prompt, seed"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_a_bad_request_fails_alone_naming_the_field(pipe, change, message):
    rec = Recording(pipe)
    batcher = Batcher(rec, max_batch=3)
    batcher.submit(parse(rec, inputs(width=48)))
    assert rec.running.wait(30)
    good = [parse(rec, inputs(f"p{i}", seed=10 * i + 1)) for i in range(2)]
    futures = [batcher.submit(good[0])]
    with pytest.raises(InputError, match=message):
        batcher.submit(parse(rec, inputs(**change)))
    futures.append(batcher.submit(good[1]))
    rec.gate.set()
    for req, f in zip(good, futures, strict=True):
        np.testing.assert_array_equal(f.result(60), direct(pipe, req))
    batcher.close()
    assert [n for _, n in rec.batches] == [1, 2]


def test_defaults_are_the_cli_defaults_and_the_image_sets_the_size(pipe):
    req = parse(pipe, {"prompt": np.array([b"x"], dtype=object)})
    side = default_size(pipe.bundle)
    assert (req.seed, req.steps, req.height, req.width, req.image) == (0, 1, side, side, None)
    assert side == 256  # 512 clamped into the test bundle's 32-256
    img = parse(pipe, {"prompt": np.array(["x"]), "image": picture(40, 48), "steps": np.array([2], np.int32)})
    assert (img.height, img.width, img.strength) == (40, 48, 0.5)
    img = parse(pipe, {"prompt": np.array(["x"]), "image": picture(40, 48)})  # no steps: 2 run one at strength 0.5
    assert (img.steps, img.strength) == (2, 0.5)
    strong = {"strength": np.array([1.0], np.float32)}
    assert parse(pipe, {"prompt": np.array(["x"]), "image": picture(40, 48), **strong}).steps == 1


def test_a_failed_batch_fails_its_requests_and_the_next_batch_runs(pipe):
    rec = Recording(pipe, fail_batch=2)
    batcher = Batcher(rec, max_batch=2)
    batcher.submit(parse(rec, inputs(width=48)))
    assert rec.running.wait(30)
    doomed = [batcher.submit(parse(rec, inputs(seed=s))) for s in (1, 2)]
    later = parse(rec, inputs(seed=3, width=40))
    fine = batcher.submit(later)
    rec.gate.set()
    for f in doomed:
        with pytest.raises(RuntimeError, match="the backend failed"):
            f.result(60)
    np.testing.assert_array_equal(fine.result(60), direct(pipe, later))
    batcher.close()
    assert batcher.stats.failed_batches == 1


def test_an_image_that_is_not_finite_fails_its_request_alone(pipe):
    """The pipeline refuses images 0 and 2 of a batch of 3 (NaN or inf came out): those two requests fail, each
    told of its own image alone, and the third gets its image, as it would alone."""
    rec = Recording(pipe)
    batcher = Batcher(rec, max_batch=3)
    batcher.submit(parse(rec, inputs(width=48)))  # holds the pipeline while the three queue up
    assert rec.running.wait(30)
    reqs = [parse(rec, inputs(text, seed=s)) for s, text in enumerate(["an overflow", "a cat", "an overflow too"])]
    futures = [batcher.submit(r) for r in reqs]
    rec.gate.set()
    for f in futures[0], futures[2]:
        with pytest.raises(NonFiniteOutput, match=r"^the image came out of the VAE decoder with NaN") as e:
            f.result(60)
        assert e.value.bad == [0] and e.value.images.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(futures[1].result(60), direct(pipe, reqs[1]))
    batcher.close()
    assert rec.batches[1] == (batch_key(reqs[0]), 3)  # one batch
    assert (batcher.stats.images, batcher.stats.nonfinite, batcher.stats.failed_batches) == (2, 2, 0)


def test_close_runs_what_is_queued_then_refuses(pipe):
    rec = Recording(pipe)
    batcher = Batcher(rec, max_batch=4, max_delay_s=10.0)
    futures = [batcher.submit(parse(rec, inputs(seed=s))) for s in (1, 2, 3)]
    rec.gate.set()
    batcher.close(timeout=8)  # the queued three run now, not after the 10 s delay
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(ServerClosing, match="shutting down"):
        batcher.submit(parse(rec, inputs()))


@pytest.mark.parametrize("drained", [True, False])
def test_serve_closes_its_pipeline_once_drained_and_not_under_a_running_batch(pipe, monkeypatch, caplog, drained):
    """`sdturbo serve` stopping: every queued request run, the pipeline is closed (a device pipeline's memory
    and stream back, in order); a batch still running past the drain's limit is not waited for (close would)."""
    from sdturbo.engine import serve_triton

    rec = Recording(pipe)
    rec.gate.set()
    served = []

    def _serve(triton, model_config, batcher, cfg, stop, verbose):  # Triton stands in: one request, then a stop
        if not drained:
            rec.gate.clear()  # the request's batch runs past the drain's limit
        served.append(batcher.submit(parse(rec, inputs(seed=4))))
        assert rec.running.wait(30)
        return 0

    monkeypatch.setattr(serve_triton, "import_pytriton", lambda: (None, None))
    monkeypatch.setattr(serve_triton, "check_ports", lambda cfg: None)
    monkeypatch.setattr(serve_triton, "warm_up", lambda *args: None)
    monkeypatch.setattr(serve_triton, "_serve", _serve)
    cfg = serve_triton.ServeConfig(drain_timeout_s=1 if not drained else 60)
    with caplog.at_level("WARNING", logger="sdturbo.engine.serve_triton"):
        assert serve_triton.serve(rec, cfg) == 0
    assert getattr(rec, "closed", 0) == (1 if drained else 0)
    warned = [r.getMessage() for r in caplog.records if r.name == "sdturbo.engine.serve_triton"]
    assert warned == ([] if drained else ["a batch was still running 1 s after the stop; exiting without waiting"])
    rec.gate.set()
    np.testing.assert_array_equal(served[0].result(60), direct(pipe, parse(pipe, inputs(seed=4))))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, r"--max-batch 0 .*1 to 4"),
        ({"max_batch": 5}, r"--max-batch 5"),
        ({"max_delay_s": -1}, r"--max-queue-delay-ms -1000"),
    ],
)
def test_bad_settings_name_the_option(pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        Batcher(pipe, **kwargs)


def test_on_worker_runs_on_the_serving_thread_and_gives_back_result_or_error(pipe):
    batcher = Batcher(pipe)
    try:
        assert batcher.on_worker(lambda: threading.current_thread().name, timeout=30) == "sdturbo-batcher"
        with pytest.raises(ZeroDivisionError):
            batcher.on_worker(lambda: 1 / 0, timeout=30)
        image = batcher.infer(inputs(seed=4), timeout=60)  # the worker goes on serving
        np.testing.assert_array_equal(image, direct(pipe, parse(pipe, inputs(seed=4))))
    finally:
        batcher.close(timeout=30)


def test_the_servers_warm_up_leaves_the_serving_thread_nothing_to_capture(tiny_bundle):
    """onnxruntime keeps its own CUDA graphs per thread: warmed up through the batcher (as `sdturbo serve`
    does), the worker thread has its graphs, so the first served request captures nothing (the ONNX Runtime
    CUDA pipeline on the emulated GPU, with onnxruntime's own graph per session)."""
    from sdturbo.engine.serve import warm_up

    from tests.engine.emulated_gpu import emulated_ort_pipeline

    gpu = emulated_ort_pipeline(tiny_bundle, shape=(3, 64, 64), cuda_graph="sessions")
    batcher = Batcher(gpu, max_batch=3)
    try:
        batcher.on_worker(lambda: warm_up(gpu, 3, 64), timeout=300)
        captured = set(gpu.graphs)
        image = batcher.submit(gpu.request("a red cube", height=64, width=64, seed=3)).result(60)
        assert set(gpu.graphs) == captured and gpu.graph_status.startswith("sessions: ")
        want = open_pipeline(tiny_bundle, "onnxruntime", "fp16")("a red cube", height=64, width=64, seed=3)[0]
        np.testing.assert_array_equal(image, want)
        # every batch size up to the largest, new prompts and prompts seen before (a graph each): none captured
        for prompts in (["a", "b"], ["a", "b"], ["c", "d", "e"], ["c", "d", "e"], ["f"]):
            futures = [batcher.submit(gpu.request(p, height=64, width=64, seed=1)) for p in prompts]
            [f.result(60) for f in futures]
        assert set(gpu.graphs) == captured
    finally:
        batcher.close(timeout=30)


class Overflowing(Recording):
    """The tiny pipeline whose images all come out NaN or infinite (as an fp16 overflow leaves them)."""

    def run(self, req):
        raise NonFiniteOutput(self.pipe.run(req), list(range(req.batch)))


def test_a_served_request_whose_image_is_not_finite_gets_that_error(pipe):
    """pytriton's callable answers with our errors' messages, without our stack: a NonFiniteOutput too (the
    server's error, 500; re-made from its message alone it was a TypeError), naming the request's own image;
    a bad request as the client's (400)."""
    from types import SimpleNamespace

    from sdturbo.engine.serve_triton import Answer, infer_function

    batcher = Batcher(Overflowing(pipe), max_batch=1)
    try:
        with pytest.raises(Answer) as e:
            infer_function(batcher)([SimpleNamespace(data=inputs())])
        assert e.value.code == "INTERNAL"
        assert e.value.message.startswith("the image came out of the VAE decoder with NaN")
        frames = [f.name for f in traceback.extract_tb(e.value.__traceback__)]
        assert frames[1:] == ["infer"] and e.value.__cause__ is None  # from the callable, not the worker's stack
        assert e.value.__suppress_context__
        with pytest.raises(Answer) as e:
            infer_function(batcher)([SimpleNamespace(data=inputs(width=33))])
        assert e.value.code == "INVALID_ARG" and e.value.message.startswith("width 33 is not allowed")
    finally:
        batcher.close()


def test_a_warm_up_image_that_is_not_finite_stops_the_server(pipe, caplog):
    """The server is not made ready with a model whose warm-up images come out NaN or infinite: the error, and
    a line saying it was the warm-up's (not "img2img requests will fail", which was the message for img2img)."""
    from sdturbo.engine.serve import warm_up

    with caplog.at_level("WARNING"), pytest.raises(NonFiniteOutput, match="came out of the VAE decoder"):
        warm_up(Overflowing(pipe), 1, 32)
    assert "the warm-up's txt2img at 32x32 failed; the server does not start" in caplog.text

    class Img2imgOverflows(Recording):
        def run(self, req):
            return Overflowing.run(self, req) if req.image is not None else self.pipe.run(req)

    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(NonFiniteOutput):
        warm_up(Img2imgOverflows(pipe), 1, 32)
    assert "the warm-up's img2img at 32x32 failed" in caplog.text and "requests will fail" not in caplog.text
