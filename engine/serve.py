"""Serving, without the server: one served request's tensors become a checked Request, and requests that share
(size, steps, strength) run as one pipeline batch, one batch at a time.

Nothing here knows about Triton or HTTP (serve_triton.py binds it to pytriton). Each request is checked alone,
with the same checks ``sdturbo generate`` runs (``pipe.request``), so a bad one fails alone; the batch of good
ones is then one Request with a seed per image, whose image i is the image that request makes on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, NonFiniteOutput, SdTurboError
from .request import DEFAULT_SIDE, Request, size_refused

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 4


@dataclass(frozen=True)
class Field:
    """One input or output of the served model, as the KServe v2 protocol names it."""

    name: str
    datatype: str  # KServe v2 / Triton: BYTES, INT64, INT32, FP32, UINT8
    shape: tuple[int, ...]  # -1: any length
    optional: bool = True
    allowed: str = ""  # what values are allowed, for error messages


DTYPES = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "UINT8": np.uint8}
INPUTS = (
    Field("prompt", "BYTES", (1,), optional=False, allowed="UTF-8 text"),
    Field("seed", "INT64", (1,), allowed="0 to 2**63 - 1 (default 0)"),
    Field("steps", "INT32", (1,), allowed="1 to 4 (default 1; img2img: the fewest that run a step, 2 at strength 0.5)"),
    Field("width", "INT32", (1,), allowed="a multiple of 8 in the bundle's size range (default 512, or the image's)"),
    Field("height", "INT32", (1,), allowed="a multiple of 8 in the bundle's size range (default 512, or the image's)"),
    Field("strength", "FP32", (1,), allowed="in (0, 1], with an image (default 0.5)"),
    Field("image", "UINT8", (-1, -1, 3), allowed="img2img: RGB pixels [height, width, 3], each side a multiple of 8"),
)
OUTPUT = Field("image", "UINT8", (-1, -1, 3), optional=False)


class ServerClosing(SdTurboError):
    """The server is shutting down and takes no new requests."""


def default_size(bundle) -> int:
    """``DEFAULT_SIDE`` (a request's without width and height) clamped into the bundle's size range."""
    lim = bundle.limits
    return min(max(DEFAULT_SIDE, lim.min_size), lim.max_size)


def _field_error(f: Field, arr: np.ndarray) -> InputError:
    shape = "[" + ", ".join("N" if d < 0 else str(d) for d in f.shape) + "]"
    return InputError(
        f"input {f.name!r} is {_datatype(arr)} {list(arr.shape)}; it must be {f.datatype} {shape} ({f.allowed})"
    )


def _datatype(arr: np.ndarray) -> str:
    if arr.dtype.kind in "OSU":
        return "BYTES"
    names = {np.dtype(v): k for k, v in DTYPES.items() if k != "BYTES"}
    return names.get(arr.dtype, str(arr.dtype))


def _checked(f: Field, value) -> np.ndarray:
    """``value`` as an array of ``f``'s type and shape, else InputError naming the field and what it must be."""
    arr = np.asarray(value)
    shape_ok = arr.ndim == len(f.shape) and all(w < 0 or w == d for w, d in zip(f.shape, arr.shape, strict=True))
    type_ok = arr.dtype.kind in "OSU" if f.datatype == "BYTES" else arr.dtype == DTYPES[f.datatype]
    if not (shape_ok and type_ok):
        raise _field_error(f, arr)
    return arr


def _text(f: Field, arr: np.ndarray) -> str:
    value = arr.reshape(-1)[0]
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes):
        raise _field_error(f, arr)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"input {f.name!r} is not valid UTF-8: {value[:60]!r}; send {f.allowed}") from None


def parse(pipe, inputs: Mapping[str, np.ndarray]) -> Request:
    """One served request's inputs -> a checked batch-1 Request, with the checks ``sdturbo generate`` runs.
    InputError (or the pipeline's own SdTurboError) names the first bad field and what is allowed."""
    known = {f.name: f for f in INPUTS}
    unknown = sorted(set(inputs) - set(known))
    if unknown:
        raise InputError(f"input {unknown[0]!r} is not known; the inputs are {', '.join(known)}")
    arrays = {name: _checked(known[name], value) for name, value in inputs.items()}
    if "prompt" not in arrays:
        raise InputError(f"input 'prompt' is missing; it is required ({known['prompt'].allowed})")
    prompt = _text(known["prompt"], arrays["prompt"])
    scalar = {name: arr.reshape(-1)[0].item() for name, arr in arrays.items() if name not in ("prompt", "image")}
    image = arrays.get("image")
    side = default_size(pipe.bundle)
    if image is None:
        if "strength" in scalar:
            raise InputError("input 'strength' is for img2img; send an 'image' too")
        height, width = scalar.get("height", side), scalar.get("width", side)
    else:
        if not image.size:
            raise InputError(f"input 'image' is {image.shape[1]}x{image.shape[0]}; send {known['image'].allowed}")
        height, width = scalar.get("height", image.shape[0]), scalar.get("width", image.shape[1])
        if (height, width) != image.shape[:2]:
            raise InputError(
                f"input 'image' is {image.shape[1]}x{image.shape[0]} but width x height is {width}x{height}; "
                f"send the image at the size you want, or leave width and height out"
            )
    try:
        return pipe.request(
            prompt,
            seed=scalar.get("seed", 0),
            steps=scalar.get("steps"),
            height=height,
            width=width,
            image=image,
            strength=scalar.get("strength"),
        )
    except InputError as e:
        if image is None:
            raise
        sides = tuple(side for side in ("height", "width") if side not in scalar)  # the ones the image gave
        raise size_refused(e, "input 'image'", width, height, "send it resized", sides) from None


def batch_key(req: Request) -> tuple:
    """Requests with the same key run as one batch: same size, steps and (img2img) strength."""
    return (req.height, req.width, req.steps, None if req.image is None else req.strength)


def merge(pipe, reqs: list[Request]) -> Request:
    """Batch-1 requests of one key -> one checked Request whose image i is request i's image (one seed each)."""
    first = reqs[0]
    image = None if first.image is None else np.concatenate([r.image for r in reqs])  # [B, H, W, 3]
    return pipe.request(
        [r.prompts[0] for r in reqs],
        seed=tuple(r.seed for r in reqs),
        steps=first.steps,
        height=first.height,
        width=first.width,
        image=image,
        strength=None if image is None else first.strength,
    )


@dataclass
class _Pending:
    request: Request
    future: Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    """Work for the worker thread itself (``Batcher.on_worker``), run before the next batch."""

    fn: Callable
    future: Future


@dataclass
class BatcherStats:
    batches: int = 0
    images: int = 0
    failed_batches: int = 0
    nonfinite: int = 0  # requests refused alone: their image came out NaN or infinite (NonFiniteOutput)
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches ran at that size


def check_settings(bundle, max_batch: int, max_delay_s: float) -> None:
    """InputError naming the option when the batch or the delay is out of range."""
    limit = bundle.limits.max_batch
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= limit:
        raise InputError(f"--max-batch {max_batch!r} is not allowed; use 1 to {limit} (the bundle's max_batch)")
    if not 0 <= max_delay_s <= 10:
        raise InputError(f"--max-queue-delay-ms {max_delay_s * 1000:g} is not allowed; use 0 to 10000")


class Batcher:
    """Groups submitted requests by ``batch_key`` into batches of up to ``max_batch`` and runs them on ``pipe``,
    one at a time, on one worker thread (a pipeline never runs two batches at once).

    The oldest waiting request's key runs next. It waits up to ``max_delay_s`` for more requests of its key
    when fewer than ``max_batch`` are waiting; requests that arrive while a batch runs are batched anyway, so a
    delay of 0 adds no latency to a lone request and still batches under load."""

    def __init__(self, pipe, max_batch: int = DEFAULT_MAX_BATCH, max_delay_s: float = 0.0):
        check_settings(pipe.bundle, max_batch, max_delay_s)
        self.pipe, self.max_batch, self.max_delay_s = pipe, max_batch, max_delay_s
        self.stats = BatcherStats()
        self._pending: list[_Pending] = []
        self._jobs: list[_Job] = []
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="sdturbo-batcher", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> Future:
        """Queue a checked batch-1 Request; the future gives its image [H, W, 3] uint8 or the batch's error."""
        if req.batch != 1:
            raise InputError(f"a served request holds one prompt; got {req.batch}")
        item = _Pending(req, Future())
        self._queue(self._pending, item)
        return item.future

    def on_worker(self, fn, timeout: float | None = None):
        """Run ``fn()`` on the worker thread, before any request queued after it, and give its result (or raise
        its error). The server's warm-up runs here: what a pipeline keeps per thread (onnxruntime keeps its own
        CUDA graphs per thread) is then made on the thread that serves."""
        job = _Job(fn, Future())
        self._queue(self._jobs, job)
        return job.future.result(timeout)

    def _queue(self, queue: list, item) -> None:
        """Append ``item`` to ``queue`` and wake the worker; refused once the batcher is closing."""
        with self._cv:
            if self._closing:
                raise ServerClosing("the server is shutting down; send the request to another instance")
            queue.append(item)
            self._cv.notify()

    def infer(self, inputs: Mapping[str, np.ndarray], timeout: float | None = None) -> np.ndarray:
        """One served request, start to end: parse, queue, wait for its batch."""
        return self.submit(parse(self.pipe, inputs)).result(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Take no new requests, run every queued one (without waiting for the delay), stop the worker. True
        once it has stopped; False where ``timeout`` ran out first (a batch still running)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_batch(self) -> list[_Pending] | _Job | None:
        with self._cv:
            while True:
                if self._jobs:
                    return self._jobs.pop(0)
                if not self._pending:
                    if self._closing:
                        return None
                    self._cv.wait()
                    continue
                key = batch_key(self._pending[0].request)
                same = [p for p in self._pending if batch_key(p.request) == key]
                wait = self._pending[0].arrived + self.max_delay_s - time.monotonic()
                if len(same) >= self.max_batch or self._closing or wait <= 0:
                    break
                self._cv.wait(wait)
            batch = same[: self.max_batch]
            taken = {id(p) for p in batch}
            self._pending = [p for p in self._pending if id(p) not in taken]
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if isinstance(batch, _Job):
                try:
                    batch.future.set_result(batch.fn())
                except BaseException as e:  # the caller gets it
                    batch.future.set_exception(e)
            else:
                self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        bad: dict[int, NonFiniteOutput] = {}
        try:
            images = self.pipe.run(merge(self.pipe, [p.request for p in batch]))  # [B, H, W, 3] uint8
        except NonFiniteOutput as e:  # those requests fail, each with its own message; the others have images
            images, bad = e.images, {i: e.alone(i) for i in e.bad}
            self.stats.nonfinite += len(bad)
            log.error("%d of a batch of %d failed: %s", len(bad), len(batch), e)
        except Exception as e:  # the pipeline failed this batch: its requests get the error, the server goes on
            self.stats.failed_batches += 1
            log.error("a batch of %d failed: %s", len(batch), e, exc_info=not isinstance(e, SdTurboError))
            for p in batch:
                p.future.set_exception(e)
            return
        s = self.stats
        s.batches, s.images = s.batches + 1, s.images + len(batch) - len(bad)
        s.sizes[len(batch)] = s.sizes.get(len(batch), 0) + 1
        log.debug(
            "batch of %d %s in %.1f ms", len(batch), batch_key(batch[0].request), 1e3 * (time.perf_counter() - start)
        )
        for i, (p, image) in enumerate(zip(batch, images, strict=True)):
            if i in bad:
                p.future.set_exception(bad[i])
            else:
                p.future.set_result(image)


def warm_up(pipe, max_batch: int, side: int) -> None:
    """At the default size, txt2img at batch 1 and at the largest batch, then img2img at batch 1 (its encoder
    loads and runs once), so that the first requests pay no first-run costs. A device pipeline keeps a CUDA
    graph per batch size, for new prompts and for prompts its cache holds, each captured and checked on first
    use (several chain runs): it is warmed up at every batch size up to the largest, both ways, so that no
    served request pays for one at the default size and steps. A pipeline that cannot serve txt2img at these
    shapes, or whose warm-up images come out NaN or infinite, fails here, before the server is ready; one
    without img2img (a device pipeline built without the VAE encoder) serves txt2img only."""
    pipe.load(img2img=True)
    graphs = getattr(pipe, "graphs", None) is not None
    for n in range(1, max_batch + 1) if graphs else sorted({1, max_batch}):
        prompts = [f"warm up {n}.{i}" for i in range(n)]  # new to the prompt cache: the whole chain runs
        request = merge(pipe, [pipe.request(p, seed=i, height=side, width=side) for i, p in enumerate(prompts)])
        for _ in range(2 if graphs else 1):  # the second time, a prompt-cache hit (where the cache is on)
            _warm_run(pipe, request)
    try:
        image = np.zeros((side, side, 3), np.uint8)
        _warm_run(pipe, pipe.request("warm up", height=side, width=side, image=image, steps=2))
    except NonFiniteOutput:
        raise
    except SdTurboError as e:
        log.warning("img2img requests will fail: %s", e)


def _warm_run(pipe, request: Request) -> None:
    """One warm-up run. An image that comes out NaN or infinite stops the server before it is ready (a model
    that overflows on the warm-up's prompts is not one to serve), with a line saying it was the warm-up's."""
    try:
        pipe.run(request)
    except NonFiniteOutput:
        what = "img2img" if request.image is not None else "txt2img"
        log.error("the warm-up's %s at %dx%d failed; the server does not start", what, request.width, request.height)
        raise
