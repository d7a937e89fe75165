"""``sdturbo bench``: this engine against the diffusers reference, in one run, on the same work.

See benchmarks/README.md for how to run and read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..engine.errors import InputError, SdTurboError
from . import modes
from .contenders import Diffusers, Ours, ancestral_noise, parse_ours
from .ort_demo import NAME as ORT_DEMO
from .ort_demo import OrtDemo
from .report import results_folder
from .timers import StageTimer, percentile

log = logging.getLogger(__name__)
SCHEMA = 1
TIMED = ("text_encoder", "unet", "vae_decoder", "scheduler")  # stages timed inside a run


@dataclass(frozen=True)
class BenchConfig:
    model: str = "random:sd-turbo"
    width: int = 512
    height: int = 512
    steps: int = 1
    batch: int = 1
    runs: int = 10
    warmup: int = 2
    batches: tuple[int, ...] = (1,)  # throughput sweep
    contenders: tuple[str, ...] = ()  # empty: every one available here
    prompt: str = "a cinematic shot of a baby racoon wearing an intricate italian priest robe"
    seed: int = 0
    cold: bool = True
    compile_mode: str = "max-autotune"  # torch.compile's mode for the diffusers-*-compile contender
    out: str = ""  # empty: a new folder under benchmarks/results (new_results_folder), never an earlier run's
    modes: tuple[str, ...] = ()  # opt-in modes, each against diffusers doing the same: tiny-vae, prompt-cache
    paired_runs: int = 5  # the modes' targets measured in pairs too (benchmarks/modes.py); 0: not

    def __post_init__(self):
        """Every value checked once, here: a bad one is named with what is allowed, before anything loads."""
        from sdturbo.engine.schedule import MAX_STEPS

        def positive(option: str, value, low: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{option} {value!r} is not allowed; give a whole number >= {low}")

        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"--steps {self.steps} is not allowed; use 1 to {MAX_STEPS}")
        for side, value in (("width", self.width), ("height", self.height)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
                raise InputError(f"--size: {side} {value!r} is not allowed; use a positive multiple of 8")
        for option, value, low in (("--batch", self.batch, 1), ("--runs", self.runs, 1), ("--warmup", self.warmup, 0)):
            positive(option, value, low)
        for b in self.batches:  # (none: no throughput sweep)
            positive("--batches", b)
        if self.compile_mode not in COMPILE_MODES:
            raise InputError(f"--compile-mode {self.compile_mode!r} is not allowed; use one of {COMPILE_MODES}")
        for name in self.contenders:
            check_contender(name)
        modes.check(self.modes)
        cached = "prompt-cache" in self.modes or any(modes.mode_of(n) == "prompt-cache" for n in self.contenders)
        if cached and self.warmup < modes.CACHED_WARMUP:
            raise InputError(
                f"--warmup {self.warmup} is not allowed with prompt-cache contenders; give --warmup "
                f"{modes.CACHED_WARMUP} or more (the first warm-up run fills the prompt cache, the second runs a hit "
                f"once, capturing its CUDA graph on a GPU, so that every timed run is a warmed-up cache hit)"
            )


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


# what each of our backends can run: its variants (benchmarks/contenders.py VARIANTS) and precisions
OUR_CONTENDERS = {
    "tensorrt": (("", "tiny", "cached"), ("fp16",)),
    "onnxruntime-cuda": (("", "sessiongraphs", "nhwc", "unfused", "host", "tiny", "cached"), ("fp16", "fp32")),
    "onnxruntime": (("", "unfused", "tiny", "cached"), ("fp32", "fp16")),
}


def check_contender(name: str) -> None:
    """``diffusers-<fp16|fp32>[-<variant>]`` or ``sdturbo-<backend>[-<variant>]-<precision>`` with a variant and
    precision that backend runs, else an InputError."""
    extra = ("", "-compile", *(f"-{theirs}" for _, theirs in modes.MODES.values()))
    ok = name == ORT_DEMO or name in {f"diffusers-{p}{c}" for p in ("fp16", "fp32") for c in extra}
    if name.startswith("sdturbo-") and name.count("-") >= 2:
        backend, variant, precision = parse_ours(name)
        variants, precisions = OUR_CONTENDERS.get(backend, ((), ()))
        ok = variant in variants and precision in precisions
    if not ok:
        ours = "; ".join(
            f"sdturbo-{b}[-<{'|'.join(v for v in vs if v)}>]-<{'|'.join(ps)}>" for b, (vs, ps) in OUR_CONTENDERS.items()
        )
        raise InputError(
            f"--contenders {name!r} is not allowed; use diffusers-<fp16|fp32>[-compile|-tiny|-embeds], {ORT_DEMO} "
            f"(ONNX Runtime's own pipeline) or {ours}"
        )


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available(dev: str) -> list[str]:
    """Contender ids that can run here; the first diffusers one is the reference."""
    import onnxruntime

    names = ["diffusers-fp16" if dev == "cuda" else "diffusers-fp32"]
    if dev == "cuda":
        names.append("diffusers-fp16-compile")
        from sdturbo.engine.runtime import choose_backend

        if choose_backend("auto") == "tensorrt":
            names.append("sdturbo-tensorrt-fp16")
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            names += ["sdturbo-onnxruntime-cuda-fp16", "sdturbo-onnxruntime-cuda-sessiongraphs-fp16"]
            names += ["sdturbo-onnxruntime-cuda-nhwc-fp16"]
            names += ["sdturbo-onnxruntime-cuda-unfused-fp16", "sdturbo-onnxruntime-cuda-host-fp16"]
    else:
        names.append("sdturbo-onnxruntime-fp32")
    return names


def make(
    name: str,
    folder,
    bundle,
    dev: str,
    timer: StageTimer,
    step_seed: int | None = None,
    compile_mode: str = BenchConfig.compile_mode,
    tiny_vae=None,
):
    if name.startswith("diffusers-"):
        mode = compile_mode if name.endswith("-compile") else None
        variant = next((v for _, v in modes.MODES.values() if name.endswith(f"-{v}")), "")
        dtype = name.split("-")[1]
        return Diffusers(folder, dev, dtype, timer, mode, step_seed, variant=variant, tiny_vae=tiny_vae)
    if name == ORT_DEMO:
        return OrtDemo(folder, timer)
    backend, variant, precision = parse_ours(name)
    return Ours(bundle, backend, precision, timer, variant)


def run(cfg: BenchConfig) -> dict:
    """The benchmark's results (``report.write`` saves them into ``cfg.out``'s folder, named in them). A run
    without ``--out`` that fails before writing anything leaves no empty folder behind."""
    made = not cfg.out
    cfg = replace(cfg, out=str(results_folder(cfg.out)))
    try:
        return _run(cfg)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):  # (only where it is still empty)
                Path(cfg.out).rmdir()
        raise


def _run(cfg: BenchConfig) -> dict:
    from sdturbo.engine.cache import ensure_bundle
    from sdturbo.engine.images import psnr, save_images
    from sdturbo.export.bundle_writer import tool_versions
    from sdturbo.export.models import model_family, resolve_model_folder

    from .floors import floor_ms, machine_rates, stage_flops, tiny_vae_flops

    dev = device()
    names = list(cfg.contenders) or available(dev)
    names += modes.contenders(cfg.modes, names)
    # each mode's contenders together, diffusers first (otherwise in the order given): a mode's reference is the
    # first of its contenders to run, so diffusers' wherever it runs
    groups = list(dict.fromkeys(modes.mode_of(n) for n in names))
    names.sort(key=lambda n: (groups.index(modes.mode_of(n)), not n.startswith("diffusers-")))
    tiny = any(modes.mode_of(n) == "tiny-vae" for n in names)
    out = Path(cfg.out)
    log.info("results go to %s", out)
    folder = resolve_model_folder(cfg.model)
    family = model_family(folder)
    ancestral = family == "sdxl-turbo"  # EulerAncestral: noise added at every step after the first
    precisions = {n.rsplit("-", 1)[1] for n in names if n.startswith("sdturbo")}
    bundle = {p: ensure_bundle(cfg.model, p, tiny_vae=tiny) for p in precisions}
    tiny_folder = None
    if tiny:  # diffusers + AutoencoderTiny loads the tiny VAE the bundle was exported from
        path = next(iter(bundle.values()), None) or ensure_bundle(cfg.model, "fp32", tiny_vae=True)
        tiny_folder = modes.tiny_vae_folder(path)
    plain = ("unfused", "nhwc", "host")  # the variants that run the plain graphs
    fused = [n for n in names if n.startswith("sdturbo-onnxruntime-cuda-") and parse_ours(n)[1] not in plain]
    if fused:  # ONNX Runtime's optimized graphs for CUDA, built before any run
        ort_optimized(cfg.model)
    prompts = [cfg.prompt] * cfg.batch
    shape = (cfg.batch, 4, cfg.height // 8, cfg.width // 8)
    latents = np.random.default_rng(cfg.seed).standard_normal(shape, dtype=np.float32)
    step_seed = cfg.seed if ancestral else None
    ref_dtype = names[0].split("-")[1] if names[0].startswith("diffusers-") else "fp32"
    step_noise = ancestral_noise(step_seed, cfg.steps, shape, ref_dtype) if ancestral else None

    log.info("measuring this machine's matmul rate and copy bandwidth")
    rates = machine_rates(dev)
    flops = stage_flops(folder, cfg.batch, cfg.height, cfg.width)
    if tiny:
        flops["tiny_vae_decoder"] = tiny_vae_flops(Path(tiny_folder), cfg.batch, cfg.height, cfg.width)
    bytes_per_param = 2 if dev == "cuda" else 4
    floors = {s: floor_ms(v["flops"], v["params"] * bytes_per_param, rates) for s, v in flops.items()}
    floors["end_to_end"] = floors["text_encoder"] + cfg.steps * floors["unet_step"] + floors["vae_decoder"]

    results, references = [], {}  # mode -> its reference: the first of its contenders (diffusers' where it ran)
    failed = []
    for name in names:
        log.info("contender %s", name)
        timer = StageTimer(cuda=dev == "cuda" and not name.startswith("sdturbo-"))  # torch's stream: its events
        precision = name.rsplit("-", 1)[1]
        contender = None
        try:
            contender = make(name, folder, bundle.get(precision), dev, timer, step_seed, cfg.compile_mode, tiny_folder)
            res = measure(contender, cfg, prompts, latents, timer, dev, step_noise)
        except Exception as e:  # one contender that cannot run here is reported, the others still run
            if isinstance(e, SdTurboError):  # ours: its one line says it all (no GPU here, say)
                log.error("contender %s failed: %s", name, e)
            else:
                log.exception("contender %s failed", name)
            failed.append({"name": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            if contender is not None:  # its memory back before the next one loads
                try:
                    contender.close()
                except Exception as err:
                    log.warning("closing contender %s: %s", name, err)
            continue
        res["floor_ms"] = mode_floors = modes.floors_for(name, floors, cfg.steps)
        res["over_floor"] = {
            k: res["stages_ms"][k] / mode_floors[s]
            for k, s in (
                ("text_encoder", "text_encoder"),
                ("unet_per_step", "unet_step"),
                ("vae_decoder", "vae_decoder"),
            )
            if res["stages_ms"].get(k) and mode_floors[s]  # a cache hit's text encoder: no floor (0)
        }
        res["over_floor"]["end_to_end"] = res["e2e_ms"]["median"] / mode_floors["end_to_end"]
        image = res.pop("image")
        res["image"] = save_images(image[:1], out / f"{name}.png")[0].name
        reference = references.setdefault(modes.mode_of(name), (name, image))
        value = psnr(image, reference[1])
        res["psnr_vs_reference_db"] = None if value == float("inf") else value  # null: identical (JSON has no inf)
        contender.close()  # before the cold start: its memory is not the new process's to share
        if cfg.cold and modes.mode_of(name) == modes.FULL:
            res["cold_start"] = cold_start(name, folder, bundle.get(precision), dev, cfg)
        results.append(res)
    if not references:
        raise RuntimeError(f"no contender ran: {failed}")
    modes.compare(results, {m: ref[0] for m, ref in references.items()})
    demo = next((r for r in results if r["name"] == ORT_DEMO), None)
    for r in results if demo else ():  # the third target: ONNX Runtime's own pipeline, same run
        if r["name"].startswith("sdturbo-onnxruntime-cuda"):
            r["vs_onnxruntime_demo"] = demo["e2e_ms"]["median"] / r["e2e_ms"]["median"]
    paired = {}
    if cfg.modes and cfg.paired_runs:
        log.info("the modes' targets, measured in pairs")
        precision_of = {n: n.rsplit("-", 1)[1] for n in names}

        def build(name, timer):
            b = bundle.get(precision_of[name])
            return make(name, folder, b, dev, timer, step_seed, cfg.compile_mode, tiny_folder)

        def call(c, suffix):
            asked = prompts if suffix is None else [f"{p} {suffix}" for p in prompts]
            return c(asked, latents, cfg.steps, cfg.height, cfg.width, step_noise)

        size = (cfg.batch, cfg.height, cfg.width)
        paired = modes.paired(cfg.modes, names, build, size, call, cfg.paired_runs, _sync(dev))
    return {
        "schema": SCHEMA,
        "config": asdict(cfg),
        "family": family,
        "reference": references.get(modes.FULL, next(iter(references.values())))[0],
        "modes": modes.summary(results),
        "paired": paired,
        "machine": machine(dev),
        "versions": tool_versions(BENCH_TOOLS),
        "rates": rates,
        "flops": flops,
        "contenders": results,
        "failed": failed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def device_stage_times(contender, prompts, latents, cfg: BenchConfig, step_noise=None) -> dict | None:
    """A device pipeline's stages (DevicePipeline.stage_times, CUDA events between the stages of an eager run,
    no graph): the median of ``cfg.runs`` runs, "other" as measured there (uint8), plus "eager_total"; None for
    the host pipelines and diffusers, whose stages are timed inside the measured runs. A prompt-cache contender's
    runs leave the text encoders out, as its timed runs (hits) do."""
    pipe = getattr(contender, "pipe", None)
    if not hasattr(pipe, "stage_times"):
        return None
    kw = {} if step_noise is None else {"step_noise": step_noise}
    req = pipe.request(prompts, steps=cfg.steps, height=cfg.height, width=cfg.width, latents=latents, **kw)
    encode = modes.mode_of(contender.name) != "prompt-cache"  # (its last timed run, a hit, left their outputs)
    runs = [pipe.stage_times(req, encode=encode) for _ in range(max(cfg.runs, 1))]
    totals = [sum(r.values()) for r in runs]
    run = runs[median_run(totals)]  # one run's stages, which add up to its eager_total
    out = {k: float(run.get(k, 0.0)) for k in (*TIMED, "other")}
    out["eager_total"] = float(sum(run.values()))
    return out


def ort_optimized(model: str) -> None:
    """ONNX Runtime's optimized fp16 graphs for CUDA in ``model``'s bundle (they need its fp32 graphs too), once.
    A failure is logged: the contender then runs the plain graphs, and its "graphs" entry says so."""
    from sdturbo.engine.cache import ensure_bundle
    from sdturbo.export.ort_optimize import optimize_bundle

    try:
        ensure_bundle(model, "fp32")
        optimize_bundle(ensure_bundle(model, "fp16"), provider="cuda")
    except Exception:
        log.exception("could not build ONNX Runtime's optimized graphs for CUDA; the plain graphs run instead")


def measure(contender, cfg: BenchConfig, prompts, latents, timer: StageTimer, dev: str, step_noise=None) -> dict:
    sync = _sync(dev)
    mem = Memory(dev)
    t = time.perf_counter()
    if isinstance(contender, Diffusers):
        contender.load()
    else:
        contender.load((cfg.batch, cfg.height, cfg.width), max_batch=max((cfg.batch, *cfg.batches)))
    load_s = time.perf_counter() - t
    warm, e2e, stages = [], [], []
    for i in range(cfg.warmup + cfg.runs):
        timer.reset()
        sync()
        t = time.perf_counter()
        image = contender(prompts, latents, cfg.steps, cfg.height, cfg.width, step_noise)  # uint8 on the host
        ms = 1e3 * (time.perf_counter() - t)
        (warm if i < cfg.warmup else e2e).append(ms)
        if i >= cfg.warmup:
            resolved = timer.resolve()
            run = {k: resolved.get(k, 0.0) for k in TIMED}
            run["other"] = ms - sum(run.values())  # tokenizer, noise, uint8, copies: the rest of this run
            stages.append(run)
    peak_mb, start_mb = mem.peak_mb(), mem.start_mb  # load and latency runs: before the sweep's larger batches
    st = dict(stages[median_run(e2e)])  # the stages of one run, which add up to its time
    device_stages = device_stage_times(contender, prompts, latents, cfg, step_noise)
    if device_stages:  # a device pipeline runs as one graph: its stages are timed in eager runs apart
        st = device_stages
    st["unet_per_step"] = st["unet"] / cfg.steps
    return {
        "name": contender.name,
        "cuda_graph": getattr(contender, "graph_status", None),  # device pipelines: "on", or "off: why"
        "graphs": getattr(contender, "graphs_used", None),  # ONNX Runtime: component -> "optimized" or "plain"
        "load_s": load_s,
        "warmup_ms": warm,
        "stages_ms": st,
        "e2e_ms": {
            "median": float(np.median(e2e)),
            "p90": percentile(e2e, 90),
            "p99": percentile(e2e, 99),
            "min": min(e2e),
            "runs": e2e,
        },
        "throughput": throughput(contender, cfg, sync),
        "throughput_profile": getattr(contender, "sweep_profile", None),  # TensorRT: the sweep's engines
        "peak_memory_mb": peak_mb,
        "memory_at_start_mb": start_mb,
        "image": image,
    }


def median_run(times: list[float]) -> int:
    """The index of the median run (of the two middle ones, the faster), so that the stages reported are one
    run's and add up to its time."""
    order = sorted(range(len(times)), key=times.__getitem__)
    return order[(len(times) - 1) // 2]


def throughput(contender, cfg: BenchConfig, sync) -> list[dict]:
    """Images per second at each of ``cfg.batches`` (the median of 3 runs after a warm-up each; prompt-cache
    contenders: after two, a miss and a hit, as the latency runs). A TensorRT contender runs them on engines for
    every batch up to the largest (``Ours.for_sweep``; its profile is reported)."""
    out = []
    if hasattr(contender, "for_sweep"):
        try:
            contender.sweep_profile = contender.for_sweep(cfg.batches, cfg.height, cfg.width)
        except Exception as e:  # engines that cannot be built here: every batch says why
            return [{"batch": b, "images_per_s": None, "error": f"{type(e).__name__}: {e}"[:300]} for b in cfg.batches]
    for b in cfg.batches:
        lat = np.random.default_rng(b).standard_normal((b, 4, cfg.height // 8, cfg.width // 8), dtype=np.float32)
        try:
            for _ in range(modes.CACHED_WARMUP if modes.mode_of(contender.name) == "prompt-cache" else 1):
                contender([cfg.prompt] * b, lat, cfg.steps, cfg.height, cfg.width)  # warm-up for this shape
            times = []
            for _ in range(3):
                sync()
                t = time.perf_counter()
                contender([cfg.prompt] * b, lat, cfg.steps, cfg.height, cfg.width)
                times.append(time.perf_counter() - t)
            out.append({"batch": b, "images_per_s": b / float(np.median(times))})
        except Exception as e:  # out of memory, or a batch the bundle does not allow: record it, go on
            out.append({"batch": b, "images_per_s": None, "error": f"{type(e).__name__}: {e}"[:300]})
    return out


def cold_start(name: str, folder, bundle, dev: str, cfg: BenchConfig) -> dict:
    """Process start to first image, measured around a fresh interpreter."""
    size = f"{cfg.width}x{cfg.height}"
    if name == ORT_DEMO:
        return {"skipped": "its first load exports and optimizes its own graphs: load_s says how long"}
    if name.startswith("diffusers"):
        if name.endswith("-compile"):
            return {"skipped": "compile time is in warmup_ms"}
        args = ["diffusers", str(folder), dev, name.split("-")[1], size, str(cfg.steps), str(cfg.batch)]
    else:
        backend, variant, precision = parse_ours(name)
        if variant:
            return {"skipped": "measured for the default variant only"}
        args = ["ours", str(bundle), backend, precision, size, str(cfg.steps), str(cfg.batch)]
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "sdturbo.benchmarks.cold", *args], capture_output=True, text=True, env=dict(os.environ)
    )
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return {"process_s": wall, **json.loads(r.stdout.strip().splitlines()[-1])}


class Memory:
    """Peak memory while a contender loads and runs: the process's host RSS high-water on a CPU; on a GPU, torch's
    peak or the device memory taken since the start by other allocators (ONNX Runtime's arena, TensorRT), the
    larger. ``start_mb``: what the process held when it started (on a CPU: the imports, torch's included, and what
    earlier contenders left; on a GPU: device memory in use by anything), which the peak includes on a CPU."""

    def __init__(self, dev: str):
        self.dev = dev
        if dev == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.free0, total = torch.cuda.mem_get_info()
            self.start_mb = (total - self.free0) / 2**20
        else:
            from sdturbo.export.rss import PeakRss

            self.rss = PeakRss()
            self.start_mb = float(self.rss.peak_mb()) if self.rss.resets else None  # just reset: the RSS now

    def peak_mb(self) -> float:
        if self.dev == "cuda":
            import torch

            used = (self.free0 - torch.cuda.mem_get_info()[0]) / 2**20  # what non-torch allocators hold
            return max(torch.cuda.max_memory_allocated() / 2**20, used)
        return float(self.rss.peak_mb())


def _sync(dev: str):
    if dev == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def machine(dev: str) -> dict:
    info = {
        "device": dev,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    with contextlib.suppress(ValueError, OSError):
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if dev == "cuda":
        import torch

        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            compute_capability="sm{}{}".format(*torch.cuda.get_device_capability()),
        )
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = r.stdout.strip() if r.returncode == 0 else None
    return info


BENCH_TOOLS = (
    "sdturbo",
    "torch",
    "diffusers",
    "transformers",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "tensorrt-rtx-cu13",
    "numpy",
)
