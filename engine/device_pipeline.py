"""Prompt to pixels on the GPU, the whole chain replayed as one CUDA graph: what the TensorRT runtime
(engine/trt_pipeline.py) and the ONNX Runtime CUDA runtime (engine/ort_pipeline.py) share.

Lifecycle (STYLE.md): open the components -> allocate every buffer once (at the largest request allowed)
-> per (batch, size, steps, strength): bind shapes and addresses, warm up, capture, check the replay ->
each request copies ids and noise in, launches the graph, and copies pixels out; the only host wait is
for those pixels -> ``close()`` (or ``with``) gives every buffer, graph, session or engine and the stream back.

Serves both families. SDXL-Turbo adds: a second text encoder whose hidden states are placed beside the
first's (two strided device copies), its pooled output bound straight to the UNet's ``text_embeds``, the
``time_ids`` buffer, per-step noise for the ancestral step, and casts around the fp32 VAE.

Every buffer's dtype and shape comes from the manifest's I/O specs, and every component tensor is bound
to a named buffer (engine/device_buffers.py), so a component whose precision differs from the latents' is
cast, not misread. The CUDA calls go through ``self.cuda`` (engine/cuda.py); tests/engine/emulated_gpu.py puts a
host emulation there so the CPU test suite runs this orchestration against ONNX Runtime.

A subclass opens the components (name -> something whose ``context(spec, dims, addresses)`` gives a
per-shape context with ``enqueue(stream)`` and ``capturable(stream)``), says which shapes it covers, and may
say what replays a request's work instead of one captured graph (``_make_graph``: ONNX Runtime's own per
session, engine/ort_pipeline.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np

from . import cuda as cuda_module
from .bundle import Bundle
from .capture_guard import CaptureGuard
from .device_buffers import HOST_BUFFERS, bindings, buffer_specs, pixel_bytes, spec_of
from .device_cache import DevicePromptRows
from .engine_store import Profile
from .errors import FP32_REMEDY, BackendError, BundleError, NonFiniteOutput, first_line
from .images import to_model_image
from .pipeline import check_vae_request
from .prompt_cache import DEFAULT_SIZE, PromptCache, as_prompt_cache
from .request import Request, build_request
from .schedule import MAX_STEPS, make_schedule
from .spec import axis_values

log = logging.getLogger(__name__)
# Held while a graph is captured and checked, and while a pipeline's sessions and buffers are made or freed: a
# capture in CUDA's global mode (onnxruntime's own) fails if another thread allocates or synchronises meanwhile.
CAPTURE_LOCK = threading.RLock()


class CaptureGate:
    """Device work of every pipeline in the process (a request, stage times) runs ``inside()``; a capture runs
    ``alone()``: it waits for the work under way on other threads to end, and holds new work back until it ends.
    onnxruntime captures its own graphs (the second tier) in CUDA's global mode, where a synchronisation or an
    allocation on any other thread fails, and spoils the capture: a second pipeline's request during it would
    fail, and this pipeline's graphs be turned off. Work waiting for ``CAPTURE_LOCK`` steps ``outside()`` (a
    capture does not wait for a thread that waits for it)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._inside: dict[int, int] = {}  # thread -> depth
        self._alone: int | None = None  # the thread capturing

    @contextmanager
    def inside(self):
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._alone in (None, me))
            self._inside[me] = self._inside.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._inside[me] -= 1
                if not self._inside[me]:
                    del self._inside[me]
                self._cond.notify_all()

    @contextmanager
    def outside(self):
        """Not counted as inside for this block (this thread's depth is kept and taken back after)."""
        me = threading.get_ident()
        with self._cond:
            depth = self._inside.pop(me, 0)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._cond.wait_for(lambda: self._alone in (None, me))
                if depth:
                    self._inside[me] = depth

    @contextmanager
    def capture(self, lock):
        """Take ``lock`` (waiting for it outside), then run the block ``alone()``."""
        with self.outside():
            lock.acquire()
        try:
            with self.alone():
                yield
        finally:
            lock.release()

    @contextmanager
    def alone(self):
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._alone in (None, me))
            outer, self._alone = self._alone, me
            self._cond.wait_for(lambda: not any(t != me for t in self._inside))
        try:
            yield
        finally:
            with self._cond:
                self._alone = outer
                self._cond.notify_all()


CAPTURE_GATE = CaptureGate()
_PIPELINES = itertools.count()  # one prompt-cache identity per device pipeline
WARMUP_RUNS = 3  # lazy initialisation (TensorRT-RTX's JIT, cuDNN's algorithm search) never lands in a capture


PROBE_PROMPTS = ("a", "a photograph of an astronaut riding a horse on the moon, detailed, soft light, 35mm")


def probe_request(req: Request) -> Request:
    """A request of the same shape, steps and strength as ``req`` with every input changed: each prompt
    swapped for one of another length, other noise, the image mirrored (checks a captured graph)."""
    prompts = tuple(PROBE_PROMPTS[len(p.split()) <= 3] for p in req.prompts)
    seed = tuple(int(s) + 1 for s in req.seed) if isinstance(req.seed, tuple) else int(req.seed) + 1  # numpy's too

    def negated(a):
        return None if a is None else -a

    image = None if req.image is None else np.ascontiguousarray(req.image[:, :, ::-1])
    return replace(
        req,
        prompts=prompts,
        seed=seed,
        latents=negated(req.latents),
        image=image,
        image_noise=negated(req.image_noise),
        step_noise=negated(req.step_noise),
    )


# Nodes a replay must not have: host callbacks (a library freeing or filling its own buffers, run again on each
# replay) and stream-ordered allocations (a graph that allocates without freeing fails its second launch).
UNSAFE_NODES = {"Host": "host callbacks", "MemAlloc": "memory allocations"}


def unsafe_nodes(types: dict[str, int] | None) -> str:
    """What in a captured graph's node counts ``types`` (cuda.node_types) a replay must not run, in words."""
    return ", ".join(f"{types[t]} {what}" for t, what in UNSAFE_NODES.items() if (types or {}).get(t))


NOISE_RUNS = 3  # eager runs more, to measure how much they differ from each other, when a replay differs
NOISE_MARGIN = 4.0  # a replay's squared error may be this many times the eager runs' own largest (6 dB)


def replay_differs(eager: np.ndarray, replayed: np.ndarray, rerun, what: str) -> str | None:
    """Why ``replayed`` (a graph's pixels) is not the eager chain's ``eager``, or None. Equal bytes pass. Else
    the eager chain runs ``NOISE_RUNS`` times more (``rerun``): where it gives the same bytes every time, any
    difference fails. Some kernels are not deterministic (onnxruntime's fused GroupNorm adds its partial sums
    with atomics, in no fixed order): then the eager runs differ from each other too, and a replay passes
    whose squared error from ``eager`` is at most ``NOISE_MARGIN`` times theirs. A replay that skips work or
    reuses stale values is far outside that (NaN poison, another image)."""
    if np.array_equal(eager, replayed):
        return None
    differ = int(np.count_nonzero(eager != replayed))

    def mse(a: np.ndarray) -> float:
        return float(np.mean((a.astype(np.float64) - eager) ** 2))

    noise, error = max(mse(rerun()) for _ in range(NOISE_RUNS)), mse(replayed)
    if noise == 0:
        return f"{differ} of {eager.size} bytes; {NOISE_RUNS} more eager runs gave the same bytes each time"
    if error <= NOISE_MARGIN * noise:
        log.info(
            "%s: the replay differs from the eager run (%d of %d bytes, MSE %.3g) no more than eager runs differ "
            "from each other (MSE up to %.3g: kernels that are not deterministic); accepted",
            what,
            differ,
            eager.size,
            error,
            noise,
        )
        return None
    return f"{differ} of {eager.size} bytes, MSE {error:.3g}; eager runs differ by MSE {noise:.3g} at most"


def _give_back_all(held: tuple) -> None:
    """What a device pipeline holds, given back in order (its close(), or its collection): the stream's work
    finished, the contexts, the components (sessions; engines and their memory), every buffer, the stream.
    A step that fails is logged and the others go on: what it held is lost either way."""
    name, stream, contexts, components, dev, host, cached_rows = held

    def step(what: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # (a stream in error still gives back its buffers)
            log.warning("closing %s: %s: %s", name, what, first_line(e))

    step("waiting for its stream", stream.synchronize)
    contexts.clear()
    for component_name, component in components.items():
        step(f"closing {component_name}", component.close)
    components.clear()
    for buffers in (dev, host):
        for buffer_name, buffer in buffers.items():
            step(f"freeing {buffer_name}", buffer.free)
        buffers.clear()
    if cached_rows is not None:
        step("freeing the prompt cache's rows", cached_rows.free)
    step("destroying its stream", stream.free)


class DevicePipeline:
    """Same requests and results as ``Pipeline``; the chain runs on the GPU from buffers allocated once."""

    cuda = cuda_module  # device memory, streams, graphs
    name = "device"
    precision = "fp16"
    encoder_hint = "{export_hint} (adds it)"
    fp32_remedy = FP32_REMEDY  # how to run fp32 graphs instead, for NonFiniteOutput's message
    capture_errors: tuple[type[BaseException], ...] = ()  # a capture failing with these turns the graph off

    def _setup(self, profile: Profile, cuda_graph: bool, components: dict) -> None:
        """Buffers and kernels for ``components`` (name -> opened component), once; after ``_prepare``."""
        b = self.bundle
        self.profile = profile
        self.cuda_graph = cuda_graph
        self.graph_off_reason = None if cuda_graph else "turned off by the caller"
        self.engines = components
        self.specs = {name: b.component(self.precision, name).spec for name in self.engines}
        self.dtype = np.dtype(spec_of(self.specs["unet"], "sample").dtype)
        self.binds = bindings(b.family, self.dtype.name, self.specs, self.decoder, self.encoder)
        self.ancestral = b.scheduler.ancestral
        cc = self.cuda.current_compute_capability()
        float_types = {self.dtype.name, spec_of(self.specs[self.decoder], "image").dtype}
        self.kernels = {dt: self._kernels(dt, cc) for dt in sorted(float_types)}
        self._allocate()
        shas = tuple(b.components[self.precision][n].sha256 for n in self.engines if n.startswith("text_encoder"))
        # Whose outputs the prompt cache holds: this pipeline's own, as its rows live in its own device pool
        self.encoder_id = (self.name, next(_PIPELINES), self.precision, profile.tag, *shas)
        cache = self.prompt_cache
        self.cached_rows = DevicePromptRows(cache, self.cuda, self.buffer_specs) if cache.enabled else None
        self.graphs: dict[tuple, object] = {}
        self.contexts: dict[tuple, dict] = {}  # (batch, height, width) -> one context per component
        # close() and the collection of a pipeline dropped without it give back in one order (_give_back_all);
        # what it is handed outlives the pipeline until then, so none of it may refer to the pipeline
        held = (self.name, self.stream, self.contexts, self.engines, self.dev, self.host, self.cached_rows)
        self._release = cuda_module.on_collect(self, _give_back_all, held)

    def _prepare(
        self, bundle: Bundle | str | Path, vae: str = "full", prompt_cache: int | PromptCache = DEFAULT_SIZE
    ) -> None:
        """The bundle, its tokenizers, the VAE to run ("full" or "tiny"), the prompt cache (a size, 0: off, or
        one to share), a current CUDA context (before anything touches the GPU) and the stream."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.vae = vae
        self.decoder, self.encoder = self.bundle.vae_components(vae)
        self.prompt_cache = as_prompt_cache(prompt_cache)
        self.tokenizers = self.bundle.prompt_tokenizers()
        self.seq = self.tokenizers[0].max_length
        self.cuda.ensure_context()
        self.stream = self.cuda.Stream()
        self.closed = False
        self._running = threading.RLock()  # a run, or close(): close waits for the run under way

    @property
    def component_names(self) -> tuple[str, ...]:
        """What this pipeline opens: the text encoders, the UNet and the chosen VAE's decoder and encoder."""
        encoders = tuple(n for n in self.bundle.component_names if n.startswith("text_encoder"))
        return (*encoders, "unet", self.decoder, self.encoder)

    def _kernels(self, dtype: str, cc: int):
        from sdturbo.kernels import load_kernels

        return load_kernels(dtype, cc)

    def _outside(self, req: Request) -> str:
        """Why ``req`` is outside what this pipeline was opened for (the subclass says what to do)."""
        return f"batch {req.batch} at {req.width}x{req.height} is outside this pipeline's shapes {self.profile.tag}"

    # -- buffers ----------------------------------------------------------------------------------

    def _allocate(self) -> None:
        """Every buffer once, at the profile's maximum (device_buffers.buffer_specs), and the pinned host twins
        of those copied in and out."""
        binds = {c: tensors for c, tensors in self.binds.items() if c in self.engines}
        self.latent_max, sizes = buffer_specs(self.bundle, self.profile, self.dtype, self.ancestral, binds, self.specs)
        self.buffer_specs = sizes
        self.dev = {k: self.cuda.DeviceBuffer(int(np.prod(s)) * np.dtype(d).itemsize) for k, (s, d) in sizes.items()}
        self.host = {k: self.cuda.PinnedArray(*sizes[k]) for k in HOST_BUFFERS if k in sizes}

    def _put(self, name: str, values: np.ndarray) -> None:
        """Copy ``values`` into the front of device buffer ``name``, through its pinned twin."""
        host = self.host[name]
        host.array.reshape(-1)[: values.size] = values.astype(host.dtype, copy=False).ravel()
        self.stream.copy_in(self.dev[name].ptr, host, values.size * host.dtype.itemsize)

    # -- requests ---------------------------------------------------------------------------------

    def request(self, prompts: str | Sequence[str], **kwargs) -> Request:
        req = build_request(self.bundle, prompts, **kwargs)
        if not self.profile.covers(req.batch, req.height, req.width):
            raise BundleError(self._outside(req))
        if req.image is not None and self.encoder not in self.engines:
            raise BundleError(
                f"img2img needs the {self.encoder}, which this {self.name} pipeline lacks: "
                + self.encoder_hint.format(export_hint=self.bundle.export_hint)
            )
        check_vae_request(self.vae, req)
        return req

    def __call__(self, prompts, **kwargs) -> np.ndarray:
        self._check_open()
        return self.run(self.request(prompts, **kwargs))

    def load(self, img2img: bool = False) -> DevicePipeline:
        return self  # components load in __init__

    def __enter__(self) -> DevicePipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Give back what this pipeline holds on the GPU, in order: the captured graphs (CUDA keeps one being
        replayed until it ends), then, the stream's work finished, the components' contexts, the components
        (sessions; engines and their memory), every buffer, the stream. Once (a second call does nothing); a
        request after it raises. A pipeline dropped without it gives back the same way when collected (the
        graphs whenever they are: a graph needs nothing else)."""
        with self._running, CAPTURE_LOCK:  # after the run under way; frees are no capture's business either
            if self.closed:
                return
            self.closed = True
            self.graphs.clear()
            self._release()

    def _check_open(self) -> None:
        if self.closed:
            raise BackendError(f"this {self.name} pipeline is closed; open another one")

    def run(self, req: Request) -> np.ndarray:
        """A prompt-cache hit (every prompt's rows cached at this batch size) copies the rows in from the
        cache's device pool and replays a second graph per shape, captured without the text encoders; a miss
        runs the whole chain and then copies its rows into the pool."""
        with self._running, CAPTURE_GATE.inside():
            self._check_open()
            return self._run(req)

    def _run(self, req: Request) -> np.ndarray:
        s = self.stream
        B, H, W = req.batch, req.height, req.width
        img2img = req.image is not None
        sched = make_schedule(self.bundle.scheduler, req.steps, req.strength if img2img else 1.0)
        ids = [tok(list(req.prompts)) for tok in self.tokenizers]  # [B, 77] int32 each
        keys = PromptCache.keys(self.encoder_id, ids)
        hit = self.prompt_cache.lookup(keys)
        slots = None if hit is None else [e.slot for e in hit]
        self._inputs(req, sched, ids)
        if slots is not None:
            self.cached_rows.load(s, self.dev, slots)
        key = (B, H, W, sched.steps, req.strength if img2img else None, slots is not None)
        ctx = self._contexts(B, H, W)
        enqueue = lambda: self._enqueue(ctx, sched, B, H, W, img2img, encode=slots is None)  # noqa: E731
        while True:  # a graph that fails its capture or its check turns its tier off: the next one runs (or none)
            scoped = key + self._graph_scope()
            if not self.cuda_graph:
                enqueue()
                break
            if scoped in self.graphs:
                self.graphs[scoped].launch()
                break
            # one capture at a time in this process, no pipeline being opened meanwhile, nothing freed during it,
            # no other pipeline's work under way
            with CAPTURE_GATE.capture(CAPTURE_LOCK), self.cuda.capturing():
                captured = self._capture(scoped, req, sched, ctx, enqueue, slots)
            if captured:
                break  # its check's last replay was this request's
            self._inputs(req, sched, ids)  # the check fed the probe's inputs
            if slots is not None:
                self.cached_rows.load(s, self.dev, slots)
        if slots is None and self.cached_rows is not None:
            self.cached_rows.store(s, self.dev, keys)
        n = pixel_bytes(B, H, W)
        out = self._pixels(n + B)  # the one host wait: for the pixels and their non-finite flags
        self._first_run_done()
        images, flags = out[:n].reshape(B, H, W, 3), out[n:]
        if flags.any():
            remedy = self.fp32_remedy if self.dtype == np.float16 else None
            raise NonFiniteOutput(images, np.flatnonzero(flags).tolist(), remedy)
        return images

    def _inputs(self, req: Request, sched, ids: list[np.ndarray] | None = None) -> None:
        """Copy ``req``'s ids (``ids``: its tokens, where already made), noise, timesteps (and image) into their
        device buffers, on the stream."""
        b, s = self.bundle, self.stream
        B = req.batch
        img2img = req.image is not None
        noise, image_noise, step_noise = req.noises(b, sched)
        ids = ids or [tok(list(req.prompts)) for tok in self.tokenizers]
        self._put("ids", ids[0])
        if "ids_2" in self.host:
            self._put("ids_2", ids[1])
            self._put("time_ids", req.time_ids())
        self._put("noise", noise)
        timesteps = self.host["timesteps"].array
        timesteps[: sched.steps, :B] = sched.timesteps[:, None]
        s.copy_in(self.dev["timesteps"].ptr, self.host["timesteps"], self.host["timesteps"].nbytes)
        if sched.ancestral:
            steps = self.host["step_noise"].array.reshape(MAX_STEPS, -1)
            for i, step in enumerate(step_noise):
                steps[i, : step.size] = step.ravel()
            s.copy_in(self.dev["step_noise"].ptr, self.host["step_noise"], sched.steps * steps[0].nbytes)
        if img2img:
            if "image_noise" in self.host:  # the full VAE's posterior; the tiny VAE's encoder takes none
                self._put("image_noise", image_noise)
            self._put("image_in", to_model_image(req.image, self.dtype))  # then to the encoder's dtype, as diffusers

    def _capture(self, key: tuple, req: Request, sched, ctx: dict, enqueue, slots: list[int] | None = None) -> bool:
        """Warm up, capture ``enqueue`` as a graph, and check it before use: replayed on a probe request (other
        prompts of another length, other noise, the image mirrored) and on ``req``, from buffers poisoned in
        between, it must give the pixels the eager chain gives for each, byte for byte, or, where the eager runs
        vary themselves, no further from them than they are from each other (replay_differs). So a graph that
        skips work, or replays a value computed on the host at capture time (what a library's host-side step
        under capture would leave), is never used. False: the graph is off, with the reason.

        With ``slots`` (a prompt-cache hit: a graph without the text encoders) the text encoders' outputs are
        inputs too, never poisoned: the request's copied in from the cache, the probe's made by the text
        encoders run eagerly."""
        s, nbytes = self.stream, pixel_bytes(req.batch, req.height, req.width) + req.batch  # pixels and flags
        keep = self.cached_rows.inputs if slots is not None else ()
        what = self._graph_label()
        guard = CaptureGuard(f"{what} ({self.name})", self._capture_facts())
        crashed = guard.crashed()
        if crashed:
            self._graph_off(crashed)
            return False

        def feed(r: Request) -> None:
            self._inputs(r, sched)
            if slots is not None and r is req:
                self.cached_rows.load(s, self.dev, slots)
            elif slots is not None:
                self._encode_text(ctx, r.batch)

        for _ in range(WARMUP_RUNS):
            enqueue()
        s.synchronize()
        refused = [name for name, c in ctx.items() if not c.capturable(s)]
        if refused:
            self._graph_off(f"{self.name} says the {', '.join(refused)} context(s) cannot be stream-captured")
            return False
        probe = probe_request(req)
        eager = {"request": self._pixels(nbytes)}
        feed(probe)
        enqueue()
        eager["probe"] = self._pixels(nbytes)
        finite = not eager["request"][-req.batch :].any() and not eager["probe"][-req.batch :].any()
        if finite and np.array_equal(eager["probe"], eager["request"]):
            # Every input changed (prompts, noise, image) and not one pixel did: the chain does not read what is
            # put in its buffers (a library that copied an input once, when it was bound, say). Every request
            # would come out as this one, graph or not: refused, never served.
            changed = "other prompts, other noise" + (" and the image mirrored" if req.image is not None else "")
            raise BackendError(
                f"{self.name}: a request with {changed} gave the same pixels as this one: the chain does not read "
                "its inputs (an input copied once, when it was bound?), so every image would be this one; not used"
            )
        with guard.attempt():  # a capture or replay that kills the process is not tried again (capture_guard.py)
            errors = (BackendError, *self.capture_errors)  # a graph that cannot be made or replayed is not used
            try:
                graph = self._make_graph(enqueue)
            except errors as e:
                s.synchronize()
                self._graph_off(f"capturing {what} failed: {first_line(e)}")
                return False
            replayed_on_host = unsafe_nodes(getattr(graph, "node_types", None))
            if replayed_on_host:
                self._graph_off(f"the captured graph of {what} has {replayed_on_host}, which every replay would redo")
                return False
            for which, inputs in (("probe", probe), ("request", req)):
                feed(inputs)
                self._poison(int(eager[which][0]) ^ 0xFF, keep)
                try:
                    graph.launch()
                    replayed = self._pixels(nbytes)
                except errors as e:  # (the eager chain that runs instead synchronises the stream again)
                    self._graph_off(f"replaying {what} failed on the {which}: {first_line(e)}")
                    return False

                def rerun(r: Request = inputs) -> np.ndarray:
                    feed(r)
                    enqueue()
                    return self._pixels(nbytes)

                why = replay_differs(eager[which], replayed, rerun, f"{what} on the {which}")
                if why:
                    self._graph_off(f"the captured graph's pixels differ from the eager run's on the {which} ({why})")
                    return False
        self.graphs[key] = graph
        return True

    def _capture_facts(self) -> dict[str, str]:
        """What a capture's outcome may depend on: this code's version, the GPU and driver, the model and the
        pipeline's settings; a subclass adds its library's version and settings (a process that died capturing
        is not tried again while these stay the same)."""
        from importlib import metadata

        try:
            version = metadata.version("sdturbo")
        except metadata.PackageNotFoundError:
            version = "?"
        b = self.bundle
        return {
            "sdturbo": version,
            "gpu": self.cuda.device_summary(),
            "model": f"{b.model_id} ({b.config_hash[:12]}, {self.precision}, vae {self.vae})",
        }

    def _graph_scope(self) -> tuple:
        """What a graph's key adds to the request's shape: nothing here (a CUDA graph replays on any thread)."""
        return ()

    def _make_graph(self, enqueue):
        """What replays ``enqueue``'s work: here one CUDA graph of it, captured now."""
        return self.cuda.Graph(self.stream, enqueue)

    def _graph_label(self) -> str:
        return "the chain"

    def _poison(self, pixel_byte: int, keep: tuple[str, ...] = ()) -> None:
        """Fill every buffer the chain computes (not its inputs, nor ``keep``) with 0xFF bytes, NaN in fp16 and
        fp32, and the pixels with ``pixel_byte``: a replay that skips work, or reads what an eager run left
        behind, cannot then come out equal to the eager pixels. (The prompt cache's pools are not among them.)"""
        inputs = (set(self.host) - {"pixels"}) | set(keep)
        for name, buf in self.dev.items():
            if name not in inputs:
                self.stream.fill(buf.ptr, pixel_byte if name == "pixels" else 0xFF, buf.nbytes)

    def stage_times(self, req: Request, encode: bool = True) -> dict[str, float]:
        """Milliseconds per stage of one eager run of ``req`` (no graph), from CUDA events recorded between
        the stages: text_encoder (both of SDXL's), vae_encoder (img2img), unet (every step), scheduler (the
        kernels around each step), vae_decoder (with its casts), other (uint8). For the benchmark: the graph's
        own end-to-end time is measured apart; these tell where it goes. ``encode`` False: without the text
        encoders, as a prompt-cache hit runs (their outputs are the last run's, left in place)."""
        with self._running, CAPTURE_GATE.inside():
            self._check_open()
            return self._stage_times(req, encode)

    def _stage_times(self, req: Request, encode: bool = True) -> dict[str, float]:
        img2img = req.image is not None
        sched = make_schedule(self.bundle.scheduler, req.steps, req.strength if img2img else 1.0)
        self._inputs(req, sched)
        ctx = self._contexts(req.batch, req.height, req.width)
        marks = [("start", self.cuda.Event())]
        marks[0][1].record(self.stream)

        def mark(stage: str) -> None:
            marks.append((stage, self.cuda.Event()))
            marks[-1][1].record(self.stream)

        self._enqueue(ctx, sched, req.batch, req.height, req.width, img2img, mark, encode=encode)
        self.stream.synchronize()
        out: dict[str, float] = {}
        for (_, begin), (stage, end) in pairwise(marks):
            out[stage] = out.get(stage, 0.0) + end.ms_since(begin)
        return out

    def _pixels(self, nbytes: int) -> np.ndarray:
        pixels = self.host["pixels"]
        self.stream.copy_out(pixels, self.dev["pixels"].ptr, nbytes)
        self.stream.synchronize()
        return pixels.array.reshape(-1)[:nbytes].copy()

    def _first_run_done(self) -> None:
        """After the first request (TensorRT-RTX keeps the kernels it compiled)."""

    def _graph_off(self, reason: str) -> None:
        log.warning(
            "CUDA graph OFF for %s: %s; running every request enqueue by enqueue (slower)", self.bundle.root, reason
        )
        self.cuda_graph, self.graph_off_reason = False, reason

    @property
    def graph_status(self) -> str:
        """Either "on" or "off: why" (the benchmark's JSON reports it)."""
        return "on" if self.cuda_graph else f"off: {self.graph_off_reason}"

    def _contexts(self, B: int, H: int, W: int) -> dict:
        """This shape's contexts, one per component: shapes (from the specs) and addresses set once, never
        changed after (a graph captured with them stays valid)."""
        key = (B, H, W)
        if key not in self.contexts:
            dims = axis_values(B, H, W, self.bundle.vae_scale_factor)
            self.contexts[key] = {
                name: engine.context(
                    self.specs[name], dims, {t: self.dev[buf].ptr for t, buf in self.binds[name].items()}
                )
                for name, engine in self.engines.items()
            }
        return self.contexts[key]

    def _enqueue(self, e: dict, sched, B: int, H: int, W: int, img2img: bool, mark=None, encode: bool = True) -> None:
        """Everything one request does on the stream, in order, with this shape's contexts ``e``; captured once.
        ``mark(stage)``, where given, is called as each stage's work has been enqueued (stage_times).
        ``encode`` False: no text encoders (a prompt-cache hit: their outputs are in place already)."""
        s, d = self.stream, self.dev
        mark = mark or (lambda stage: None)
        k = self.kernels[self.dtype.name]
        f = self.bundle.vae_scale_factor
        n = B * self.bundle.latent_channels * (H // f) * (W // f)
        if encode:
            self._encode_text(e, B)
        mark("text_encoder")
        if img2img:
            e[self.encoder].enqueue(s)
            if self.binds[self.encoder]["latents"] != "encoded":
                k.from_float32(d["encoded_vae"].ptr, d["encoded"].ptr, n, s.ptr)
            mark("vae_encoder")
            k.add_noise(d["encoded"].ptr, d["noise"].ptr, d["x"].ptr, float(sched.sigmas[0]), n, s.ptr)
        else:
            k.init_latents(d["noise"].ptr, d["x"].ptr, sched.init_noise_sigma, n, s.ptr)
        bmax = self.profile.batch[2]
        for i in range(sched.steps):
            sigma = sched.sigmas[i]
            k.scale_input(d["x"].ptr, d["x_in"].ptr, float(np.sqrt(sigma**2 + np.float32(1))), n, s.ptr)
            s.copy_d2d(d["timestep"].ptr, d["timesteps"].ptr + i * bmax * 4, B * 4)
            mark("scheduler")
            e["unet"].enqueue(s)
            mark("unet")
            if sched.ancestral:
                up, down = sched.sigma_up_down(i)
                noise_ptr = d["step_noise"].ptr + i * self.latent_max * self.dtype.itemsize
                k.ancestral_step(d["x"].ptr, d["eps"].ptr, noise_ptr, float(sigma), float(down), float(up), n, s.ptr)
            else:
                k.euler_step(d["x"].ptr, d["eps"].ptr, float(sigma), float(sched.sigmas[i + 1]), n, s.ptr)
            mark("scheduler")
        if self.binds[self.decoder]["latents"] != "x":
            k.to_float32(d["x"].ptr, d["x_vae"].ptr, n, s.ptr)
        e[self.decoder].enqueue(s)
        mark("vae_decoder")
        image_dtype = self.buffer_specs["image_out"][1]
        flags = d["pixels"].ptr + pixel_bytes(B, H, W)  # one byte per image, set where it is not finite
        s.fill(flags, 0, B)
        self.kernels[np.dtype(image_dtype).name].to_uint8(d["image_out"].ptr, d["pixels"].ptr, flags, B, H, W, s.ptr)
        mark("other")

    def _encode_text(self, e: dict, B: int) -> None:
        """The text encoders, into the UNet's ``hidden`` (SDXL: both, side by side, and ``pooled``)."""
        e["text_encoder"].enqueue(self.stream)
        if "text_encoder_2" in e:
            e["text_encoder_2"].enqueue(self.stream)
            self._concat_hidden(B)

    def _concat_hidden(self, B: int) -> None:
        """hidden[..., :D1] = hidden_1, hidden[..., D1:] = hidden_2: two row-strided device copies."""
        item = self.dtype.itemsize
        d1 = self.buffer_specs["hidden_1"][0][-1] * item
        d2 = self.buffer_specs["hidden_2"][0][-1] * item
        rows, hidden = B * self.seq, self.dev["hidden"].ptr
        self.stream.copy_2d(hidden, d1 + d2, self.dev["hidden_1"].ptr, d1, d1, rows)
        self.stream.copy_2d(hidden + d1, d1 + d2, self.dev["hidden_2"].ptr, d2, d2, rows)
