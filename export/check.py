"""``sdturbo check``: how far each component's fp16 (or optimized) graph is from its fp32 graph.

Both graphs run on the same inputs with polygraphy's ONNX Runtime runners, and polygraphy's comparator gives
the error statistics of every output (absolute and relative: max, mean, median). The verdict is the
relative L2 error, ``|test - ref| / |ref|``, against ``tolerance`` (1e-2 by default: fp16 rounding across a
UNet is ~1e-3), and any non-finite value where fp32 is finite (an fp16 overflow) fails. With ``layerwise``
every intermediate tensor the two graphs share (by name) is compared too, in the fp32 graph's order, and
the first one whose error jumps is named: non-finite where fp32 is finite, or over the tolerance and more
than ``JUMP`` times the worst error of that node's inputs. Tensors are matched by name and producer (same op,
same inputs); fp32 tensors with finite values beyond fp16's range that fp16 holds as finite (attention masks
of -3.4e38, clamped) are not counted as jumps.

It runs on the CPU; optimized graphs for CUDA (fused ops with CUDA kernels only) need the CUDA provider.
With ``engines`` the test is the bundle's TensorRT (or TensorRT-RTX) engine of each component instead, the one
``TrtPipeline`` would load for that batch and size on this GPU, run once through the runtime's own engine code
(``EngineRunner``) against the fp32 graph on the CPU; that needs the GPU the engines were built for.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine.backends.onnxruntime import cuda_provider_hint, import_onnxruntime
from ..engine.backends.ort_optimized import PROVIDERS, find_optimized
from ..engine.bundle import TINY_VAE, Bundle
from ..engine.errors import BackendError, BundleError, EngineMissing, InputError, first_line
from ..engine.request import Request
from ..engine.spec import axis_values

log = logging.getLogger(__name__)

DEFAULT_SIZE = (64, 64)  # (width, height) of the graphs' sample inputs where none is given
JUMP = 10.0  # a layer's error "jumps" when it is this many times its inputs' worst (and over the tolerance)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    mean_rel: float
    rel_l2: float  # |test - ref| / |ref|; inf when test is not finite where ref is
    nonfinite: int  # elements not finite in test but finite in ref
    beyond_fp16: bool = False  # ref has finite values past fp16's range (masks of -3.4e38): clamped, not wrong

    def ok(self, tolerance: float) -> bool:
        return self.nonfinite == 0 and self.rel_l2 <= tolerance


@dataclass(frozen=True)
class ComponentReport:
    component: str
    test: str  # what was compared with fp32: "fp16" or "optimized-cpu" / "optimized-cuda"
    outputs: tuple[OutputError, ...]
    jump: str | None = None  # layerwise: the first tensor whose error jumps, and how
    tensors: int = 0  # layerwise: tensors compared


def rel_l2(test: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    test, ref = test.astype(np.float64), ref.astype(np.float64)
    bad = int((~np.isfinite(test) & np.isfinite(ref)).sum())
    if bad:
        return float("inf"), bad
    return float(np.linalg.norm(test - ref) / max(np.linalg.norm(ref), 1e-30)), 0


def sample_feeds(bundle: Bundle, precision: str, name: str, batch: int, height: int, width: int, seed: int):
    """Inputs for component ``name`` at this size, in the fp32 graph's dtypes and in ``precision``'s."""
    spec32 = bundle.component("fp32", name).spec
    spec = bundle.component(precision, name).spec
    dims = axis_values(batch, height, width, bundle.vae_scale_factor)
    vocab = int(bundle.manifest.get("text", {}).get("vocab_size", 49408))
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec32.inputs:
        shape = t.concrete(dims)
        if t.dtype == "int32":
            value = rng.integers(0, vocab, shape).astype(np.int32)
        elif t.name == "timestep":
            value = np.full(shape, 999.0, np.float32)
        elif t.name == "time_ids":  # SDXL: original size, crop offset, target size
            value = Request(("",) * shape[0], height, width).time_ids()
        elif t.name == "image":
            value = rng.uniform(-1, 1, shape).astype(np.float32)
        else:
            value = rng.standard_normal(shape, dtype=np.float32)
        feeds[t.name] = value
    cast = {t.name: value.astype(t.dtype) for t, value in zip(spec.inputs, feeds.values(), strict=True)}
    return feeds, cast


def _runner(path: Path, provider: str, name: str, mark_all: bool, tmp: Path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    if mark_all:
        import onnx
        from polygraphy import constants
        from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath

        model = ModifyOutputs(OnnxFromPath(str(path)), outputs=constants.MARK_ALL)()
        path = tmp / f"{name}.onnx"
        from .graph_fixes import needs_external_data
        from .proto_io import save_streamed

        if needs_external_data(model):
            onnx.save(model, str(path), save_as_external_data=True, location=f"{name}.onnx.data")
        else:
            save_streamed(model, path)
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=[provider]), name=name)


def _infer(runner, feeds, one_at_a_time: bool = False):
    """``runner``'s outputs for ``feeds``; ``one_at_a_time``: image by image, joined (the same values, at the
    memory of one image: a VAE at 1024x1024 x 4 took 13 GB on the tiny bundle and was killed, without a word)."""
    from polygraphy.comparator.struct import IterationResult

    parts = _per_image(feeds) if one_at_a_time else [feeds]
    with runner:
        outputs = [{k: np.asarray(v) for k, v in runner.infer(part).items()} for part in parts]
    joined = outputs[0] if len(outputs) == 1 else {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    return IterationResult(joined, runner_name=runner.name)


def _per_image(feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``feeds`` one image at a time, where every input is batch-major (every component's are); else whole."""
    batch = {v.shape[0] if v.ndim else None for v in feeds.values()}
    if len(batch) != 1 or None in batch or batch == {1}:
        return [feeds]
    (n,) = batch
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]


class EngineRunner:
    """One component's engine as a polygraphy-style runner (``with``, ``infer(feeds)``, ``name``): a context of
    its own on ``pipe``'s loaded engine (engine/trt_pipeline.py) at ``dims``, the inputs copied to the GPU, one
    enqueue on a stream of its own, the outputs copied back; everything it allocated given back after."""

    def __init__(self, pipe, component: str, dims: dict[str, int], name: str = "test"):
        self.pipe, self.component, self.dims, self.name = pipe, component, dims, name
        self.spec = pipe.bundle.component(pipe.precision, component).spec

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, tensors = self.pipe.cuda, (*self.spec.inputs, *self.spec.outputs)
        host = {t.name: cuda.PinnedArray(t.concrete(self.dims), t.dtype) for t in tensors}
        dev = {name: cuda.DeviceBuffer(a.nbytes) for name, a in host.items()}
        stream = cuda.Stream()
        try:
            addresses = {name: buf.ptr for name, buf in dev.items()}
            context = self.pipe.engines[self.component].context(self.spec, self.dims, addresses)
            for t in self.spec.inputs:
                host[t.name].array[...] = feeds[t.name]
                stream.copy_in(dev[t.name].ptr, host[t.name], host[t.name].nbytes)
            context.enqueue(stream)
            for t in self.spec.outputs:
                stream.copy_out(host[t.name], dev[t.name].ptr, host[t.name].nbytes)
            stream.synchronize()
            return {t.name: host[t.name].array.copy() for t in self.spec.outputs}
        finally:  # each step on its own: after a CUDA fault the first failure is the error to see, not these
            for step in (stream.synchronize, *(h.free for h in (*dev.values(), *host.values(), stream))):
                try:
                    step()
                except BackendError as e:
                    log.debug("giving back %s's check buffers: %s", self.component, first_line(e))


def compare_graphs(ref: Path, test: Path, feeds_ref, feeds_test, provider: str = "cpu", layerwise: bool = False):
    """Run ``ref`` and ``test`` (a graph, or an EngineRunner) on the same inputs (each in its own dtypes);
    polygraphy's statistics of every output (and, with ``layerwise``, every shared tensor), the test's relative
    to the reference's."""
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.comparator.struct import RunResults
    from polygraphy.logger import G_LOGGER

    quiet = G_LOGGER.verbosity(G_LOGGER.INFO if log.isEnabledFor(logging.DEBUG) else G_LOGGER.CRITICAL)
    with quiet, tempfile.TemporaryDirectory(prefix="sdturbo-check-") as tmp:
        runs = RunResults()
        for path, name, feeds in ((test, "test", feeds_test), (ref, "fp32", feeds_ref)):
            mine = isinstance(path, EngineRunner)  # else a graph, run by onnxruntime
            runner = path if mine else _runner(path, PROVIDERS[provider], name, layerwise, Path(tmp))
            runs.append((name, [_infer(runner, feeds, one_at_a_time=not mine and not layerwise)]))
        got, want = runs["test"][0], runs["fp32"][0]
        shared = [k for k in want if k in got and want[k].dtype.kind == "f" and got[k].shape == want[k].shape]
        compare = CompareFunc.simple(
            check_error_stat="max",
            infinities_compare_equal=False,
            find_output_func=lambda n, i, r: [n] if n in shared else [],
        )
        with np.errstate(over="ignore", invalid="ignore"):  # statistics of inf/NaN outputs: reported, not warned
            result = Comparator.compare_accuracy(runs, compare_func=compare, comparisons=[(0, 1)])
    result = result if hasattr(result, "values") else next(iter(result))  # polygraphy >= 0.53: one per function
    (per_iteration,) = result.values()
    stats = per_iteration[0]
    errors = {}
    for k in shared:
        s, (l2, bad) = stats[k], rel_l2(got[k], want[k])
        ref = want[k][np.isfinite(want[k])]
        beyond = bool(ref.size) and float(np.abs(ref).max()) > FP16_MAX
        errors[k] = OutputError(
            k, s.max_absdiff, s.mean_absdiff, s.median_absdiff, s.max_reldiff, s.mean_reldiff, l2, bad, beyond
        )
    return errors, {k: (got[k], want[k]) for k in shared}


def same_tensors(ref: Path, test: Path, names) -> list[str]:
    """Of ``names``, those that mean the same in both graphs: made by nodes of the same type from the same
    inputs (the fp16 export has casts the fp32 one has not, so one name can mean different tensors)."""
    import onnx

    def producers(path):
        graph = onnx.load(str(path), load_external_data=False).graph
        return {o: (n.op_type, tuple(n.input)) for n in graph.node for o in n.output}

    a, b = producers(ref), producers(test)
    return [k for k in names if a.get(k) == b.get(k)]


def first_jump(ref: Path, errors: dict[str, OutputError], tolerance: float) -> str | None:
    """The first tensor, in ``ref``'s node order, whose error jumps (see the module's notes), described."""
    import onnx

    graph = onnx.load(str(ref), load_external_data=False).graph
    for node in graph.node:
        worst_in = max((errors[i].rel_l2 for i in node.input if i in errors), default=0.0)
        for out in node.output:
            e = errors.get(out)
            if e is None or (e.beyond_fp16 and not e.nonfinite):
                continue
            if e.nonfinite and np.isfinite(worst_in):
                return f"{out} ({node.op_type} {node.name}): {e.nonfinite} non-finite values where fp32 is finite"
            if e.rel_l2 > tolerance and e.rel_l2 > JUMP * worst_in:
                return f"{out} ({node.op_type} {node.name}): relative error {e.rel_l2:.2e}, its inputs' {worst_in:.2e}"
    return None


def check_bundle(
    path,
    components: tuple[str, ...] | None = None,
    precision: str = "fp16",
    optimized: str | None = None,
    layerwise: bool = False,
    size: tuple[int, int] | None = None,
    batch: int = 1,
    tolerance: float = 1e-2,
    seed: int = 0,
    engines: str | None = None,
    trt_pipeline=None,
) -> list[ComponentReport]:
    """Compare each component's ``precision`` graph (or, with ``optimized`` = a provider, its optimized graph
    for that provider; with ``engines`` = "auto" or a TensorRT flavour, its engine on this GPU) with its fp32
    graph. ``size`` is (width, height): where None, ``DEFAULT_SIZE`` for graphs and the built profile's optimal
    size for engines. ``trt_pipeline``: the TrtPipeline class that loads the engines (tests
    give an emulated one)."""
    onnxruntime = import_onnxruntime()
    try:
        import polygraphy  # noqa: F401
    except ImportError as e:
        raise BackendError(
            f"sdturbo check needs polygraphy ({e.name} is missing): pip install 'sdturbo[export]'"
        ) from e
    if precision != "fp16":
        raise InputError(f"--precision {precision!r} is not allowed; the fp32 graphs are the reference, so: fp16")
    provider = optimized or "cpu"
    if provider not in PROVIDERS:
        raise InputError(f"--provider {provider!r} is not allowed; use one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in onnxruntime.get_available_providers():
        raise BackendError(
            f"onnxruntime here has no {PROVIDERS[provider]} (it has {onnxruntime.get_available_providers()}); "
            f"{cuda_provider_hint()}"
        )
    if not tolerance > 0:
        raise InputError(f"--tolerance {tolerance} is not allowed; give a positive relative error, e.g. 0.01")
    if engines is not None and (optimized or layerwise):
        raise InputError("--engines compares the engines' outputs only: not with --optimized or --layerwise")
    bundle = Bundle(path)
    if engines is None:
        size = size or DEFAULT_SIZE
    if size is not None:
        width, height = size
        bundle.check_request(batch, height, width)
        f = bundle.vae_scale_factor
        if height % f or width % f:
            raise InputError(f"--size {width}x{height} is not allowed; each side must be a multiple of {f}")
    names = bundle.select_components(components)
    if engines is None:
        return [
            _check_graph(bundle, name, precision, optimized, layerwise, batch, height, width, tolerance, seed)
            for name in names
        ]
    reports: dict[str, ComponentReport] = {}
    for vae in ("full", "tiny"):  # the tiny VAE's engines are loaded by a pipeline asked for it
        group = [name for name in names if (name in TINY_VAE) == (vae == "tiny")]
        if group:
            reports.update(_check_engines(bundle, group, engines, vae, size, batch, seed, trt_pipeline))
    return [reports[name] for name in names]


def _check_engines(bundle, names, engines: str, vae: str, size, batch: int, seed: int, trt_pipeline=None) -> dict:
    """``names``' engines (as TrtPipeline loads them for this batch and size, with this VAE) against fp32. With
    no ``size``: the one profile built, at its optimal size."""
    flavour = None if engines == "auto" else engines
    if trt_pipeline is None:
        from ..engine.cuda import gpu_problem
        from ..engine.trt_pipeline import TrtPipeline as trt_pipeline

        problem = gpu_problem()
        if problem:
            raise BackendError(f"--engines runs the TensorRT engines, on the GPU they were built for: {problem}")
    shape = None if size is None else (batch, size[1], size[0])
    try:
        pipe = trt_pipeline(bundle, flavour, shape=shape, cuda_graph=False, vae=vae, prompt_cache=0)
    except EngineMissing as e:
        raise EngineMissing(f"{e} (or give check's --batch and --size within a built profile)") from e
    try:
        missing = [name for name in names if name not in pipe.engines]
        if missing:
            raise EngineMissing(
                f"bundle {bundle.root} has no {pipe.flavour} engine of {', '.join(missing)} for profile "
                f"{pipe.profile.tag} on {pipe.device}; build it with `sdturbo build {bundle.root}`"
            )
        p, f = pipe.profile, bundle.vae_scale_factor
        if not p.batch[0] <= batch <= p.batch[2]:
            raise InputError(f"--batch {batch} is outside the engines' profile {p.tag}; give a batch within it")
        height, width = (size[1], size[0]) if size else (p.height[1], p.width[1])
        out = {}
        for name in names:
            feeds32, feeds = sample_feeds(bundle, pipe.precision, name, batch, height, width, seed)
            runner = EngineRunner(pipe, name, axis_values(batch, height, width, f))
            errors, _ = compare_graphs(bundle.component("fp32", name).onnx, runner, feeds32, feeds)
            outputs = tuple(errors[t.name] for t in bundle.component("fp32", name).spec.outputs)
            out[name] = ComponentReport(name, f"{pipe.flavour} engine", outputs)
        return out
    finally:
        pipe.close()


def _check_graph(bundle, name, precision, optimized, layerwise, batch, height, width, tolerance, seed):
    """One component's graph (``precision``'s, or the optimized one for provider ``optimized``) against fp32."""
    import onnxruntime

    provider = optimized or "cpu"
    ref = bundle.component("fp32", name).onnx
    test = bundle.component(precision, name).onnx
    if optimized:
        test = find_optimized(bundle, name, onnxruntime.__version__, optimized, precision)
        if test is None:
            raise BundleError(
                f"bundle {bundle.root} has no valid optimized {name} for {optimized} and onnxruntime "
                f"{onnxruntime.__version__}: build it with `sdturbo build {bundle.root} --ort-optimize "
                f"--ort-provider {optimized}`"
            )
    feeds32, feeds = sample_feeds(bundle, precision, name, batch, height, width, seed)
    errors, _ = compare_graphs(ref, test, feeds32, feeds, provider)
    outputs = tuple(errors[t.name] for t in bundle.component("fp32", name).spec.outputs)
    jump, tensors = None, 0
    if layerwise:  # a second run: every tensor an output stops onnxruntime fusing across them, which moves the
        every, _ = compare_graphs(ref, test, feeds32, feeds, provider, layerwise=True)  # outputs' errors a little
        every = {k: every[k] for k in same_tensors(ref, test, every)}
        jump, tensors = first_jump(ref, every, tolerance), len(every)
    label = f"optimized-{optimized}" if optimized else precision
    return ComponentReport(name, label, outputs, jump, tensors)


def format_reports(reports: list[ComponentReport], tolerance: float) -> str:
    """A markdown table of the per-output statistics, a verdict per output, and the layerwise findings."""
    lines = [
        "| component | graph | output | max abs | mean abs | median abs | max rel | mean rel | rel L2 | non-finite | |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        for e in r.outputs:
            verdict = "ok" if e.ok(tolerance) else "FAIL"
            lines.append(
                f"| {r.component} | {r.test} | {e.name} | {e.max_abs:.3e} | {e.mean_abs:.3e} | {e.median_abs:.3e} | "
                f"{e.max_rel:.3e} | {e.mean_rel:.3e} | {e.rel_l2:.3e} | {e.nonfinite} | {verdict} |"
            )
    for r in reports:
        if r.tensors:
            lines.append(f"{r.component}: {r.tensors} tensors compared; first jump: {r.jump or 'none'}")
    return "\n".join(lines)
