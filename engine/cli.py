"""The ``sdturbo`` command: export, build, generate, info, bench, check, serve. argparse lives here and only here."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

from .errors import InputError, NonFiniteOutput, SdTurboError, export_extra_missing

log = logging.getLogger("sdturbo")
DEFAULT_MODEL = "stabilityai/sd-turbo"


def parse_batches(text: str) -> tuple[int, ...]:
    """``--batches 1,4,8`` -> (1, 4, 8); ``""`` -> () (no throughput sweep); a part that is not a number is named."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if any(not p.isdigit() for p in parts) or (text.strip() and not parts):
        raise InputError(f"--batches {text!r} is not allowed; give batch sizes separated by commas, e.g. 1,4,8")
    return tuple(int(p) for p in parts)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' or 'N' -> (width, height)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise InputError(f"--size {text!r} is not WIDTHxHEIGHT (e.g. 512x512) or N (NxN)")
    for side, v in zip(("width", "height"), parts, strict=True):
        if v <= 0:
            raise InputError(f"--size {text!r}: {side} {v} is not allowed; each side is a positive number of pixels")
    return parts[0], parts[1]


def cmd_export(args) -> None:
    from .bundle import Bundle, is_bundle

    try:
        from ..export.bundle_writer import export_bundle
    except ImportError as e:
        raise export_extra_missing(f"exporting {args.model!r}", e) from e

    precisions = ("fp32", "fp16") if args.precision in (None, "all") else (args.precision,)
    if args.precision is None and args.tiny_vae and not args.force and is_bundle(Path(args.out)):
        precisions = Bundle(args.out).precisions  # a tiny VAE added to a bundle: into the precisions it has only
    export_bundle(
        args.model,
        args.out,
        precisions,
        max_batch=args.max_batch,
        min_size=args.min_size,
        max_size=args.max_size,
        force=args.force,
        tiny_vae=args.tiny_vae,
    )


def _noise_file(flag: str, path: str | None):
    """The array in the .npy file ``path`` given as ``flag`` (None when not given); its values are the
    request's to check."""
    import numpy as np

    if not path:
        return None
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        why = "it is not a .npy array file (write one with numpy.save)" if isinstance(e, ValueError) else e
        raise InputError(f"cannot read {flag} {path}: {why}") from e


def cmd_generate(args) -> None:
    from .bundle import Bundle
    from .cache import ensure_bundle
    from .images import check_out_path, load_image, save_images
    from .prompt_cache import DEFAULT_SIZE as DEFAULT_PROMPT_CACHE
    from .request import DEFAULT_SIDE, check_settings, size_refused
    from .runtime import check_gpu_backend, choose_backend, default_precision, open_pipeline

    if args.bundle and args.model is not None:
        raise InputError("give --model or --bundle, not both")
    prompts = args.prompt
    if args.batch is not None:
        if args.batch < 1:
            raise InputError(f"--batch {args.batch} is not allowed; give 1 or more (up to the bundle's max_batch)")
        if len(prompts) not in (1, args.batch):
            raise InputError(f"--batch {args.batch} does not match the {len(prompts)} prompts given")
        prompts = prompts * (args.batch // len(prompts))
    check_out_path(args.out, len(prompts))
    width, height = parse_size(args.size) if args.size else (None, None)
    image = None
    if args.image:
        image = load_image(args.image, (width, height) if width is not None else None)
        height, width = image.shape[:2]
        if args.size is None and (height % 8 or width % 8):  # every family's VAE scales by 8
            fit = f"{max(8, width // 8 * 8)}x{max(8, height // 8 * 8)}"
            raise InputError(
                f"--image {args.image} is {width}x{height}; img2img needs sides that are multiples of 8: "
                f"give --size to resize it (e.g. --size {fit})"
            )
    elif args.strength is not None:
        raise InputError("--strength is for img2img; give --image too")
    if width is None:
        width, height = DEFAULT_SIDE, DEFAULT_SIDE
    if args.image_noise and not args.image:
        raise InputError("--image-noise samples the VAE posterior of img2img; give --image too")
    latents, image_noise = (
        _noise_file(flag, path) for flag, path in (("--latents", args.latents), ("--image-noise", args.image_noise))
    )
    settings = dict(steps=args.steps, height=height, width=width, seed=args.seed, strength=args.strength)
    check_settings(prompts, **settings, img2img=image is not None)  # before minutes of export or loading
    backend = choose_backend(args.backend)
    check_gpu_backend(backend)
    precision = args.precision or default_precision(backend)
    bundle = Bundle(args.bundle) if args.bundle else None
    if bundle is not None:
        check_bundle_precision(bundle, precision, backend)
    start = time.perf_counter()
    if bundle is None:
        model = DEFAULT_MODEL if args.model is None else args.model
        bundle = ensure_bundle(model, precision, tiny_vae=args.vae == "tiny")
    with open_pipeline(
        bundle,
        backend,
        precision,
        shape=(len(prompts), height, width),
        cuda_graph=not args.no_cuda_graph,
        vae=args.vae,
        prompt_cache=0 if args.no_prompt_cache else DEFAULT_PROMPT_CACHE,
    ) as pipe:
        try:
            request = pipe.request(prompts, **settings, latents=latents, image=image, image_noise=image_noise)
        except InputError as e:
            if image is None or args.size:
                raise
            raise size_refused(e, f"--image {args.image}", width, height, "give --size WxH to resize it") from None
        pipe.load(img2img=image is not None)
        log.info(
            "ready in %.2f s; generating %d image(s) at %dx%d, %d step(s)",
            *(time.perf_counter() - start, request.batch, width, height, request.steps),
        )
        start = time.perf_counter()
        try:
            images, failed = pipe.run(request), None
        except NonFiniteOutput as e:  # the good images are saved; the bad ones not (a file there stays)
            images, failed = e.images, e
        graph = getattr(pipe, "graph_status", None)  # GPU pipelines: "on", "sessions: why", "off: why"
    log.info(
        "generated %d image(s)%s in %.3f s%s",
        len(images),
        "" if failed is None else f", {len(failed.bad)} of them refused",
        time.perf_counter() - start,
        f"; CUDA graph {graph}" * bool(graph),
    )
    for path in save_images(images, args.out, skip=failed.bad if failed else ()):
        print(path)
    if failed is not None:
        raise failed


TRT_BUILD_OPTIONS = ("trt", "batch", "size", "compute_capability", "opt_level", "workspace_gb")  # TensorRT's only


def check_bundle_precision(bundle, precision: str, backend: str) -> None:
    """A --bundle without the precision this run would use (fp32 on the CPU by default): an InputError naming
    both ways out, exporting it or running the precision the bundle has, where the backend runs that one."""
    from .runtime import GPU_BACKENDS

    path, has = bundle.root, bundle.precisions
    if precision in has:
        return
    runs = ("fp16",) if backend == "tensorrt" else ("fp32", "fp16")
    other = [p for p in has if p in runs]
    raise InputError(
        f"bundle {path} has no {precision} ONNX (it has: {', '.join(has)}); export it with --precision {precision}"
        + (f", or run it with --precision {other[0]}" if other else "")
        + (" (fp16 is slow on a CPU)" if other == ["fp16"] and backend not in GPU_BACKENDS else "")
    )


def component_list(text: str | None) -> tuple[str, ...] | None:
    """--components a,b -> ("a", "b"); not given -> None (every component); given empty -> () (refused)."""
    return None if text is None else tuple(c.strip() for c in text.split(",") if c.strip())


def cmd_build(args) -> None:
    components = component_list(args.components)
    if args.ort_optimize:
        try:
            from ..export.ort_optimize import optimize_bundle
        except ImportError as e:
            raise export_extra_missing("optimizing with onnxruntime's transformer optimizer", e) from e

        given = [f"--{o.replace('_', '-')}" for o in TRT_BUILD_OPTIONS if getattr(args, o) is not None]
        if given:
            raise InputError(f"{', '.join(given)} is for TensorRT engines; --ort-optimize takes --ort-provider")
        optimize_bundle(args.bundle, components, provider=args.ort_provider or "cuda", force=args.force)
        return
    if args.ort_provider is not None:
        raise InputError("--ort-provider is for --ort-optimize; give --ort-optimize too (or leave it out)")
    from ..export.trt_build import build_engines
    from .engine_store import Profile

    kwargs = {"components": components} if components else {}
    build_engines(
        args.bundle,
        flavour=args.trt,
        profile=Profile.parse(args.batch or "1", args.size or "512x512"),
        compute_capability=args.compute_capability,
        opt_level=args.opt_level,
        workspace_gb=args.workspace_gb,
        force=args.force,
        **kwargs,
    )


def cmd_bench(args) -> None:
    import importlib.util

    try:
        from ..benchmarks import report
        from ..benchmarks.bench import BenchConfig, run

        if importlib.util.find_spec("matplotlib") is None:  # imported to draw the plot, after the whole run
            raise ImportError(name="matplotlib")
    except ImportError as e:
        raise InputError(
            f"the benchmark needs the export and bench extras ({e.name} is missing): "
            f"pip install 'sdturbo[export,bench,cpu]' ([export,bench,cuda] on an NVIDIA GPU)"
        ) from e
    width, height = parse_size(args.size)
    cfg = BenchConfig(
        model=args.model,
        width=width,
        height=height,
        steps=args.steps,
        batch=args.batch,
        runs=args.runs,
        warmup=args.warmup,
        batches=parse_batches(args.batches),
        contenders=tuple(args.contenders.split(",")) if args.contenders else (),
        cold=not args.no_cold,
        compile_mode=args.compile_mode,
        out=args.out or "",
        modes=tuple(args.modes.split(",")) if args.modes else (),
    )
    results = run(cfg)
    for path in report.write(results, Path(results["config"]["out"])):
        log.info("wrote %s", path)
    print(report.markdown(results))


def cmd_check(args) -> int:
    from ..export.check import check_bundle, format_reports

    reports = check_bundle(
        args.bundle,
        component_list(args.components),
        precision=args.precision,
        optimized=args.optimized,
        layerwise=args.layerwise,
        size=parse_size(args.size) if args.size else None,
        batch=args.batch,
        tolerance=args.tolerance,
        engines=args.engines,
    )
    print(format_reports(reports, args.tolerance))
    return 0 if all(e.ok(args.tolerance) for r in reports for e in r.outputs) else 1


def cmd_info(args) -> int:
    from .info import describe

    broken: list[str] = []
    print(describe(args.bundle, verify=args.verify, broken=broken))
    return 1 if broken else 0  # a damaged bundle file fails a script's health check too (a damaged cache heals)


def cmd_serve(args) -> int:
    from .bundle import Bundle
    from .cache import ensure_bundle
    from .runtime import check_gpu_backend, choose_backend, default_precision, open_pipeline
    from .serve import check_settings, default_size
    from .serve_triton import ServeConfig, check_ports, import_pytriton, serve

    cfg = ServeConfig(
        max_batch=args.max_batch,
        max_queue_delay_ms=args.max_queue_delay_ms,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    import_pytriton()  # missing, or a port taken: one line now, not after the model has loaded
    check_ports(cfg)
    backend = choose_backend(args.backend)
    check_gpu_backend(backend)
    precision = args.precision or default_precision(backend)
    bundle = Bundle(args.bundle or ensure_bundle(args.model, precision))
    if args.bundle:
        check_bundle_precision(bundle, precision, backend)
    check_settings(bundle, cfg.max_batch, cfg.max_queue_delay_ms / 1000)
    side = default_size(bundle)
    pipe = open_pipeline(bundle, backend, precision, shape=(cfg.max_batch, side, side), any_batch=True)
    return serve(pipe, cfg, verbose=args.verbose)


def _version() -> str:
    """This package's installed version (its metadata: pyproject's), or "unknown" where it is run uninstalled."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdturbo")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from ..export.random_models import ALL_RANDOM  # names only: no torch
    from .runtime import BACKENDS

    p = argparse.ArgumentParser(prog="sdturbo", description="Fast SD-Turbo: export, build, generate.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)  # -v after the command too (not set there: the top's stays)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], **kwargs)

    e = add_parser("export", help="export a model to an ONNX bundle")
    e.add_argument(
        "model",
        help="hub id (stabilityai/sd-turbo, stabilityai/sdxl-turbo), local diffusers folder, or a random-weight "
        f"model: {', '.join('random:' + name for name in ALL_RANDOM)}",
    )
    e.add_argument("--out", required=True, help="bundle folder to create (or complete)")
    e.add_argument(
        "--precision",
        choices=("fp32", "fp16", "all"),
        help="(default all; with --tiny-vae on an existing bundle: the precisions it has)",
    )
    e.add_argument("--max-batch", type=int, help="largest batch the bundle allows (default 16)")
    e.add_argument("--min-size", type=int, help="smallest image side in pixels (default 64)")
    e.add_argument("--max-size", type=int, help="largest image side in pixels (default 1024)")
    e.add_argument("--force", action="store_true", help="replace an existing bundle")
    e.add_argument(
        "--tiny-vae",
        metavar="SOURCE",
        help="also export a tiny autoencoder (TAESD) beside the full VAE, or add it to an existing bundle: a hub id "
        "(madebyollin/taesd, madebyollin/taesdxl), a local AutoencoderTiny folder, random:taesd / random:taesdxl / "
        "random:taesd-tiny, "
        "or auto (the model's own)",
    )
    e.set_defaults(func=cmd_export)

    g = add_parser("generate", help="make images from a prompt")
    g.add_argument("prompt", nargs="+", help="one prompt per image (or one, repeated by --batch)")
    g.add_argument("--model", help=f"model to export and cache on first use (default {DEFAULT_MODEL})")
    g.add_argument("--bundle", help="an exported bundle folder")
    g.add_argument(
        "--steps",
        type=int,
        help="Euler steps, 1-4 (default 1; img2img: the fewest that run a step, 2 at the default strength 0.5)",
    )
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    g.add_argument("--size", help="WIDTHxHEIGHT or N (NxN), multiples of 8 (default 512x512, or the --image size)")
    g.add_argument("--batch", type=int, help="images per call (repeats a single prompt)")
    g.add_argument("--image", help="img2img: the input image")
    g.add_argument("--strength", type=float, help="img2img strength in (0, 1] (default 0.5)")
    g.add_argument("--latents", help="float32 .npy [B,4,H/8,W/8]: txt2img start noise / img2img added noise")
    g.add_argument(
        "--image-noise",
        help="img2img: float32 .npy [B,4,H/8,W/8] sampling the VAE posterior (full VAE; with --latents, "
        "reproduces a diffusers img2img image)",
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto (default): TensorRT on a GPU with TensorRT, else ONNX Runtime (CUDA, then CPU)",
    )
    g.add_argument("--no-cuda-graph", action="store_true", help="GPU pipelines: enqueue stage by stage, no CUDA graph")
    g.add_argument(
        "--vae",
        choices=("full", "tiny"),
        default="full",
        help="full (default: diffusers' image) or tiny: the bundle's tiny autoencoder (TAESD), much faster, "
        "blurrier; --model adds the model's own TAESD to its cached bundle",
    )
    g.add_argument(
        "--no-prompt-cache", action="store_true", help="run the text encoder for every prompt (same images either way)"
    )
    g.add_argument("--precision", choices=("fp32", "fp16"), help="ONNX precision (default: fp32 on a CPU, else fp16)")
    g.add_argument("--out", default="out.png", help="output PNG; several images get -0, -1, ... (default out.png)")
    g.set_defaults(func=cmd_generate)

    b = add_parser("build", help="build TensorRT engines from a bundle's fp16 ONNX")
    b.add_argument("bundle")
    b.add_argument("--trt", choices=("tensorrt", "tensorrt-rtx"), help="library (default: whichever is installed)")
    b.add_argument("--batch", help="batch size N (static) or MIN-MAX (default 1)")
    b.add_argument("--size", help="WIDTHxHEIGHT (static), or MIN-MAX for both sides (default 512x512)")
    b.add_argument(
        "--compute-capability", type=int, help="TensorRT-RTX: build ahead of time for e.g. 86 (no GPU needed)"
    )
    b.add_argument(
        "--opt-level",
        type=int,
        help="builder optimisation level 0-5 (default 3; given, an engine built at another level is rebuilt)",
    )
    b.add_argument(
        "--workspace-gb",
        type=float,
        help="builder workspace limit in GiB (default: TensorRT's; given, an engine built with another is rebuilt)",
    )
    b.add_argument("--components", help="comma-separated subset (default: every component of the bundle)")
    b.add_argument("--force", action="store_true", help="rebuild even when engines are up to date")
    b.add_argument(
        "--ort-optimize",
        action="store_true",
        help="instead of TensorRT engines: ONNX Runtime transformer-optimized fp16 graphs (fused attention, "
        "GroupNorm, ...), used by the onnxruntime backends when present; needs the fp32 ONNX",
    )
    b.add_argument(
        "--ort-provider",
        choices=("cuda", "cpu"),
        help="with --ort-optimize: cuda (default; every fusion, some CUDA-only) or cpu (fusions with CPU kernels)",
    )
    b.set_defaults(func=cmd_build)

    c = add_parser("check", help="compare each component's fp16 (or optimized) graph with its fp32 graph")
    c.add_argument("bundle")
    c.add_argument("--components", help="comma-separated subset (default: all)")
    c.add_argument("--precision", default="fp16", help="graph to compare with fp32 (default fp16)")
    c.add_argument("--optimized", choices=("cpu", "cuda"), help="compare the optimized graph for this provider instead")
    c.add_argument("--layerwise", action="store_true", help="compare every shared tensor; name the first jump")
    c.add_argument(
        "--engines",
        nargs="?",
        const="auto",
        choices=("auto", "tensorrt", "tensorrt-rtx"),
        help="compare the bundle's TensorRT engines for --batch and --size on this GPU instead (default library: auto)",
    )
    c.add_argument(
        "--size", help="WIDTHxHEIGHT of the sample inputs (default 64x64; with --engines, their profile's optimum)"
    )
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--tolerance", type=float, default=1e-2, help="largest relative L2 error (default 0.01)")
    c.set_defaults(func=cmd_check)

    n = add_parser("bench", help="compare latency with the diffusers reference on the same weights")
    n.add_argument("--model", default="random:sd-turbo", help="model for every contender (default random:sd-turbo)")
    n.add_argument("--size", default="512x512", help="WIDTHxHEIGHT (default 512x512)")
    n.add_argument("--steps", type=int, default=1)
    n.add_argument("--batch", type=int, default=1, help="batch of the latency runs (default 1)")
    n.add_argument("--runs", type=int, default=10, help="timed runs per contender (default 10)")
    n.add_argument(
        "--warmup", type=int, default=2, help="untimed runs first (default 2; prompt-cache contenders need 2 or more)"
    )
    n.add_argument("--batches", default="1", help="throughput sweep, e.g. 1,4,8,16 (default 1; '': none)")
    n.add_argument("--contenders", help="comma-separated subset (default: all available here)")
    n.add_argument("--no-cold", action="store_true", help="skip the process-start-to-first-image runs")
    n.add_argument(
        "--compile-mode",
        default="max-autotune",
        help="torch.compile mode for diffusers-fp16-compile (default max-autotune; 'default' compiles faster)",
    )
    n.add_argument(
        "--out",
        help="folder for results.json, .md, plot, images (default: a new benchmarks/results/run-<UTC time>)",
    )
    n.add_argument(
        "--modes",
        help="also tiny-vae and/or prompt-cache (comma-separated): ours and diffusers doing the same, reported apart",
    )
    n.set_defaults(func=cmd_bench)

    i = add_parser("info", help="show what a bundle holds")
    i.add_argument("bundle")
    i.add_argument(
        "--verify", action="store_true", help="hash every file again (default: only files changed since last checked)"
    )
    i.set_defaults(func=cmd_info)

    v = add_parser("serve", help="serve a model on Triton Inference Server (HTTP, gRPC: KServe v2)")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="an exported bundle folder")
    src.add_argument("--model", help="model to export and cache on first use (hub id, folder, random:...)")
    v.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="as for generate (default auto)",
    )
    v.add_argument("--precision", choices=("fp32", "fp16"), help="ONNX precision (default: fp32 on a CPU, else fp16)")
    v.add_argument("--max-batch", type=int, default=4, help="most requests run as one batch (default 4)")
    v.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=0.0,
        help="how long a request waits for others of its size, steps and strength when the pipeline is idle "
        "(default 0: at once; requests that arrive while a batch runs are batched anyway)",
    )
    v.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0; 127.0.0.1: this host)")
    v.add_argument("--http-port", type=int, default=8000)
    v.add_argument("--grpc-port", type=int, default=8001)
    v.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (default 8002)")
    v.set_defaults(func=cmd_serve)
    return p


def _attach_dash_values(argv: list[str]) -> list[str]:
    """``--size -8x64`` as ``--size=-8x64``: argparse takes a value starting with a dash for an option and says
    only "expected one argument"; attached, it reaches ``parse_size``, which names what is wrong with it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--size" and re.match(r"-\d", arg):
            out[-1] = f"--size={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_attach_dash_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        rc = args.func(args)
    except SdTurboError as e:
        print(f"sdturbo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system failure no check foresaw (disk full, ...): one line; -v for the traceback
        if args.verbose:
            raise
        print(f"sdturbo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdturbo: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
