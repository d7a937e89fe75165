"""Build TensorRT engines (``tensorrt`` or ``tensorrt_rtx``) from a bundle's fp16 ONNX.

Strongly typed: precision comes from the ONNX, so the fp16 graphs build fp16 engines (with fp32 kept
where the graph keeps it). Engines, build records and the timing cache live in the bundle
(engine/engine_store.py); an engine whose key still matches is kept, a stale one is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

from ..engine.backends.trt_lib import Logger, compute_capability_enum, import_trt, network_flags, unsupported_here
from ..engine.bundle import Bundle, atomic_write
from ..engine.engine_store import Profile, engine_dir, engine_key, find_engine
from ..engine.errors import BackendError, BundleError, EngineCorrupt, EngineMissing, InputError
from ..engine.files import check_free_space, human_size, locked, naming_failures, remove_leftovers
from ..engine.integrity import read_checked, stamp, write_checked

log = logging.getLogger(__name__)
MAX_WORKSPACE_GB = 1024  # --workspace-gb's largest (GiB): beyond any GPU's memory, and within TensorRT's size_t
# The free space a build asks for beside an engine's weights: its kernels. random:tiny's engines hold up to 10 MB of
# them (2-11 MB plans for 0.15-2 MB of weights; TensorRT-RTX 1.7, SM86 and SM89, batch 1-4 at 64-512 pixels); a
# full-size engine's are not measured.
KERNELS_BYTES = 32 * 10**6
DEFAULT_OPT_LEVEL = 3  # --opt-level's default (TensorRT's own)
SETTINGS = {"optimization_level": "--opt-level", "workspace_gb": "--workspace-gb"}  # build record key: option


def device_name(trt, flavour: str, compute_capability: int | None) -> tuple[str, int | None]:
    """("sm86", 86): the device key and the compute capability to build for (None: TensorRT, which builds for
    the GPU it runs on). TensorRT-RTX always gets one target, the one asked for, else this GPU's (left alone it
    builds a portable engine for 8.6, 8.9 and 12.0, whatever GPU is here); a GPU it cannot run on (SM90) is an
    error naming the ones it can."""
    if compute_capability is not None:
        if flavour != "tensorrt-rtx":
            raise InputError("--compute-capability needs --trt tensorrt-rtx (TensorRT builds for the GPU it runs on)")
        compute_capability_enum(trt, compute_capability)
        return f"sm{compute_capability}", compute_capability
    from ..engine.cuda import current_compute_capability

    cc = current_compute_capability()
    if flavour != "tensorrt-rtx":
        return f"sm{cc}", None
    why = unsupported_here(trt, flavour, cc)
    if why:
        raise BackendError(why)
    return f"sm{cc}", cc


def build_engines(
    bundle_path,
    flavour: str | None = None,
    profile: Profile | None = None,
    compute_capability: int | None = None,
    opt_level: int | None = None,
    workspace_gb: float | None = None,
    components=None,
    force: bool = False,
) -> list[Path]:
    """Build (or keep, if still valid) one engine per component; returns the plan paths. ``opt_level`` and
    ``workspace_gb`` given (not None) also rebuild an engine built with another value; left out, an engine built
    with any is kept, and what is built gets the defaults (level 3, TensorRT's workspace)."""
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise InputError(f"--opt-level {opt_level} is not allowed; use 0-5")
    if workspace_gb is not None and not (math.isfinite(workspace_gb) and 0 < workspace_gb <= MAX_WORKSPACE_GB):
        raise InputError(
            f"--workspace-gb {workspace_gb} is not allowed; give a number of GiB above 0, at most {MAX_WORKSPACE_GB}"
        )
    bundle = Bundle(bundle_path)
    profile = profile or Profile()
    trt, flavour = import_trt(flavour)
    profile.check(bundle)
    components = bundle.select_components(components)
    device, target = device_name(trt, flavour, compute_capability)
    folder = engine_dir(bundle, flavour, trt.__version__, device, profile)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(components)
    with locked(folder, "is building engines in"):  # concurrent builds of one profile: one builds, one reuses
        remove_leftovers(folder, ".*.plan.*")  # atomic_write's temporary files, left by a killed build
        plans, version = [], trt.__version__
        asked = {"optimization_level": opt_level, "workspace_gb": workspace_gb}  # None: not given
        level = DEFAULT_OPT_LEVEL if opt_level is None else opt_level
        for i, name in enumerate(components, 1):
            plan = None if force else _valid_engine(bundle, name, flavour, version, device, profile, asked, i, n)
            if plan is None:
                weights = bundle.component("fp16", name).bytes
                check_free_space(
                    folder,
                    weights + KERNELS_BYTES,
                    f"building the {name} engine",
                    f"an engine holds its fp16 weights, {human_size(weights)}, and its kernels, "
                    f"{human_size(KERNELS_BYTES)} allowed",
                    "Free some space, then run the same command again (the engines built so far are kept)",
                )
                log.info(
                    "[%d/%d] building %s for %s (%s %s, profile %s)",
                    *(i, n, name, device, flavour, trt.__version__, profile.tag),
                )
                key = engine_key(bundle, name, flavour, trt.__version__, device, profile)
                with _ctrl_c_cancels() as cancel:
                    plan = _build_one(trt, bundle, name, key, profile, target, level, workspace_gb, folder, cancel)
            plans.append(plan)
    return plans


def _valid_engine(bundle, name, flavour, version, device, profile, asked, i, n) -> Path | None:
    """The engine already built for ``name`` if it may be kept; None (and why, logged) when it must be built."""
    try:
        plan = find_engine(bundle, name, flavour, version, device, profile)
    except EngineCorrupt as e:
        log.warning("[%d/%d] %s: %s; rebuilding it", i, n, name, e)
        return None
    except EngineMissing:
        return None
    except BundleError as e:  # stale, corrupt record, or a plan of the wrong size
        log.info("[%d/%d] %s: rebuilding: %s", i, n, name, e)
        return None
    changed = _changed_setting(plan, asked)
    if changed:
        log.info("[%d/%d] %s: rebuilding: %s", i, n, name, changed)
        return None
    log.info("[%d/%d] %s: engine up to date (%s)", i, n, name, plan)
    return plan


def _changed_setting(plan: Path, asked: dict) -> str | None:
    """Which builder setting given (not None) in ``asked`` differs from the one ``plan`` was built with, old and
    new; None when none does. A setting left out never counts: an engine built with any value is kept."""
    built_with = json.loads(plan.with_suffix(".json").read_text()).get("builder", {})
    for field, flag in SETTINGS.items():
        old, new = built_with.get(field), asked[field]
        if new is not None and old != new:
            return f"{flag} {new} given, the engine was built with {'the default' if old is None else old}"
    return None


def _build_one(
    trt,
    bundle: Bundle,
    name: str,
    key: dict,
    profile: Profile,
    target: int | None,
    opt_level: int,
    workspace_gb: float | None,
    folder: Path,
    cancel: threading.Event,
) -> Path:
    """Build ``name``'s engine into ``folder``; a build cancelled by ``cancel`` raises KeyboardInterrupt."""
    comp = bundle.component("fp16", name)
    logger = Logger.get(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(comp.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT cannot parse {comp.onnx}: {errors}")
    config = builder.create_builder_config()
    for flag in key["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if target is not None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(compute_capability_enum(trt, target), 0)
    config.builder_optimization_level = opt_level
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    opt = builder.create_optimization_profile()
    scale = bundle.vae_scale_factor
    for t in comp.spec.inputs:
        opt.set_shape(t.name, *(t.concrete(profile.dims(w, scale)) for w in range(3)))
    config.add_optimization_profile(opt)
    # TensorRT times tactics while building: its timing cache makes rebuilds fast. TensorRT-RTX does not
    # (it specialises kernels on the device, cached by the runtime cache: see engine/trt_pipeline.py),
    # and reading a timing cache without a GPU only fails noisily there.
    cache_path = folder.parent / "timing.cache" if key["library"] == "tensorrt" else None
    if cache_path is not None:
        cache = config.create_timing_cache(read_checked(cache_path, "the timing cache") or b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    monitor = _progress_monitor(trt, name, cancel)
    if monitor is not None:
        config.progress_monitor = monitor

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if cancel.is_set():  # Ctrl-C: nothing written
        raise KeyboardInterrupt
    if serialized is None:
        raise BackendError(f"TensorRT failed to build {name} (see the [TRT] messages above)")
    data = bytes(memoryview(serialized))
    sha256 = hashlib.sha256(data).hexdigest()
    record = {
        "key": key,
        "plan_bytes": len(data),
        "plan_sha256": sha256,
        "build_seconds": round(seconds, 2),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "builder": {
            "optimization_level": opt_level,
            "workspace_gb": workspace_gb,
            "strongly_typed": True,
            "target_compute_capability": target,
            "profile": asdict(profile),
        },
        # What TensorRT's network holds, read back from the parsed graph (not copied from the manifest).
        "io": [_tensor_info(trt, network.get_input(i)) for i in range(network.num_inputs)]
        + [_tensor_info(trt, network.get_output(i)) for i in range(network.num_outputs)],
        "profile_shapes": {t.name: [list(s) for s in opt.get_shape(t.name)] for t in comp.spec.inputs},
    }
    plan = folder / f"{name}.plan"
    with naming_failures(folder):  # a full disk mid-write names where it was writing
        atomic_write(plan, data)
        try:
            atomic_write(folder / f"{name}.json", json.dumps(record, indent=2).encode())
        except BaseException:
            plan.unlink()  # no plan without its record
            raise
        if cache_path is not None:
            write_checked(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    stamp([plan], sha256)
    log.info("    %s: %.1f s, %.1f MB", name, seconds, len(data) / 1e6)
    return plan


def _tensor_info(trt, tensor) -> dict:
    dtype = {trt.float32: "float32", trt.float16: "float16", trt.int32: "int32", trt.int64: "int64"}
    return {
        "name": tensor.name,
        "dtype": dtype.get(tensor.dtype, str(tensor.dtype)),
        "shape": list(tensor.shape),
        "is_input": bool(tensor.is_network_input),
    }


@contextlib.contextmanager
def _ctrl_c_cancels():
    """While TensorRT parses and builds, Ctrl-C sets the event yielded (the progress monitor then cancels the build),
    and KeyboardInterrupt is raised after it. Left to Python, KeyboardInterrupt is raised inside the next TensorRT
    callback (our logger's or monitor's), where TensorRT catches it ("Exception caught in log()") and builds on.
    Outside the main thread, or under a SIGINT handler of someone else's, Ctrl-C is left alone."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)
    if cancel.is_set():
        raise KeyboardInterrupt


def _progress_monitor(trt, name: str, cancel: threading.Event):
    """Logs TensorRT's build phases as they start (three levels deep; the deeper ones, repeated per layer or
    format, at debug) and cancels the build once ``cancel`` is set. Both flavours have IProgressMonitor."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._start: dict[str, tuple[int, float]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = 0 if parent_phase not in self._start else self._start[parent_phase][0] + 1
            self._start[phase_name] = depth, time.perf_counter()
            steps = f" ({num_steps} steps)" if depth == 0 else ""
            log.log(
                logging.INFO if depth <= 3 else logging.DEBUG, "    %s: %s%s%s", name, "  " * depth, phase_name, steps
            )

        def step_complete(self, phase_name, step):
            return not cancel.is_set()  # False cancels the build

        def phase_finish(self, phase_name):
            if phase_name in self._start:
                depth, start = self._start.pop(phase_name)
                log.debug("    %s: %s%s done in %.1f s", name, "  " * depth, phase_name, time.perf_counter() - start)

    return Monitor()
