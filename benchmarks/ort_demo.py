"""ONNX Runtime's own Stable Diffusion pipeline as a contender (``onnxruntime-demo-fp16``).

The demo ships inside the onnxruntime wheel (``onnxruntime/transformers/models/stable_diffusion``). Its ORT_CUDA
engine is what the issue measures us against: its own export of the PyTorch models, its optimizer's fused fp16
graphs, I/O binding and one CUDA graph per session and shape (``GpuBindingManager``), a PyTorch scheduler between
the sessions. Here it runs on the same weights (the model folder, laid out where it looks for them), the same
prompts and initial latents as every contender, and hands back uint8 pixels on the host through its own
conversion (the arithmetic of its ``pt_to_pil``, without the PIL objects).

As shipped it does not import on a current stack. Only the import is adjusted, outside its code, and only for
what this contender never runs:
- ``from cuda import cudart``: cuda-python 13 keeps the same functions in ``cuda.bindings.runtime``; that module
  is offered under the old name when the old one is missing.
- TensorRT's engine builders (``engine_builder_tensorrt``, and ``engine_builder_ort_trt`` where it fails) import
  ``tensorrt`` and polygraphy's TensorRT backend at module level: where that import fails, a placeholder module
  stands in, whose builder raises if it is ever constructed.
- transformers 5 runs CLIP's attention through ``F.scaled_dot_product_attention``, which the demo deletes while it
  exports (to export attention as MatMul and Softmax, the pattern its fusion matches): the text encoder's config is
  given ``attn_implementation: eager``, the attention it expects (``framework_models``).
- ``nvtx`` (profiling ranges, used only with ``nvtx_profile=True``): a placeholder where the package is missing,
  seen by the demo's modules only (removed from ``sys.modules`` once they are imported).
Its export calls ``torch.onnx.export`` with the TorchScript exporter's arguments, and its optimizer's fusions
match that exporter's graphs; torch 2.9 and later default to the dynamo exporter, so the build passes
``dynamo=False``, as its authors ran it. Its optimizer is onnxruntime's, which our own ``--ort-optimize`` build
uses too, with the same numpy >= 2.4 fix around it (export/ort_optimize.py ``numpy2_compatible``).

It runs SD-Turbo only (SDXL-Turbo's fp16 VAE there is a separate download, ``madebyollin/sdxl-vae-fp16-fix``),
with its Euler ancestral scheduler, which at 1 step is Euler's step (no noise is added at the last step); at
more steps it draws its own noise, so its image is not diffusers' there (the PSNR column says so).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np

from .timers import StageTimer

log = logging.getLogger(__name__)

NAME = "onnxruntime-demo-fp16"
VERSION = "sd-turbo"  # the demo's name for the model, and the folder it reads the weights from (PipelineInfo)
STAGES = {"clip": "text_encoder", "denoise": "unet", "vae": "vae_decoder"}  # its profile ranges -> our stages
MAX_CUDA_GRAPHS = 8  # per session, one per (batch, size): the latency shape and the throughput sweep's batches
# the components it loads, and where in a diffusers folder their files are
LAYOUT = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "tokenizer": "tokenizer"}


def demo_folder() -> Path:
    import onnxruntime

    return Path(onnxruntime.__file__).parent / "transformers" / "models" / "stable_diffusion"


def _placeholder(name: str, reason: str, **classes: str) -> types.ModuleType:
    """A module standing in for one the demo imports but this contender never uses; its classes raise."""
    mod = types.ModuleType(name)
    mod.__doc__ = f"placeholder (sdturbo benchmarks/ort_demo.py): {reason}"

    def refuse(*_a, **_k):
        raise RuntimeError(f"{name} is a placeholder here: {reason}")

    for cls in classes:
        setattr(mod, cls, type(cls, (), {"__init__": refuse}))
    mod.start_range = mod.end_range = refuse  # nvtx's API, for the nvtx placeholder
    return mod


def import_demo() -> types.SimpleNamespace:
    """The demo's modules this contender uses, imported from the installed onnxruntime (see the module doc for
    what is adjusted). Raises BackendError when this onnxruntime has no demo."""
    from sdturbo.engine.errors import BackendError

    folder = demo_folder()
    if not (folder / "pipeline_stable_diffusion.py").is_file():
        import onnxruntime

        raise BackendError(f"onnxruntime {onnxruntime.__version__} ships no Stable Diffusion demo at {folder}")
    try:
        from cuda import cudart  # noqa: F401  (cuda-python 12)
    except ImportError:
        import cuda
        from cuda.bindings import runtime

        sys.modules["cuda.cudart"] = cuda.cudart = runtime
    with contextlib.suppress(ImportError):
        import nvtx  # noqa: F401
    nvtx_placeholder = "nvtx" not in sys.modules
    if nvtx_placeholder:  # (for the demo's modules only: they keep their reference, the process does not)
        sys.modules["nvtx"] = _placeholder("nvtx", "the nvtx package is not installed")
    sys.path.insert(0, str(folder))  # its modules import one another by bare name
    try:
        for name, cls in (("engine_builder_tensorrt", "TensorrtEngineBuilder"), ("engine_builder_ort_trt", "")):
            try:
                importlib.import_module(name)
            except ImportError as e:
                reason = f"TensorRT's engines are not run by this contender ({type(e).__name__}: {e})"
                classes = {cls or "OrtTensorrtEngineBuilder": reason}
                sys.modules[name] = _placeholder(name, reason, **classes)
        return types.SimpleNamespace(
            pipeline=importlib.import_module("pipeline_stable_diffusion"),
            engine_builder=importlib.import_module("engine_builder"),
            models=importlib.import_module("diffusion_models"),
        )
    finally:
        sys.path.remove(str(folder))
        if nvtx_placeholder:
            del sys.modules["nvtx"]


def framework_models(folder: Path, work: Path, name: str) -> Path:
    """The folder the demo reads PyTorch weights from, ``<it>/<name>/<component>`` (``name`` being its hub id,
    e.g. stabilityai/sd-turbo), made of links to the model folder's files: it loads those weights instead of
    downloading its own. The text encoder's config alone is rewritten, to ask for eager attention: the demo
    deletes ``F.scaled_dot_product_attention`` while it exports, so that attention exports as MatMul and Softmax
    for its fusions, and transformers 5 would otherwise call that function (its default, "sdpa")."""
    root = work / "torch_model"
    for component, sub in LAYOUT.items():
        dst, src = root / name / component, (folder / sub).resolve()
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if component != "text_encoder":
            dst.symlink_to(src, target_is_directory=True)
            continue
        dst.mkdir()
        for f in src.iterdir():
            if f.name != "config.json":
                (dst / f.name).symlink_to(f.resolve())
        config = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "attn_implementation": "eager"}, indent=2))
    return root


def work_folder(folder: Path) -> Path:
    """Where the demo's ONNX and optimized graphs for ``folder`` are kept: under the cache, keyed by the model
    folder's files and the versions that shape its export (onnxruntime, torch, diffusers, transformers)."""
    from importlib.metadata import PackageNotFoundError, version

    from sdturbo.engine.cache import cache_root, folder_stamp

    versions = []
    for pkg in ("onnxruntime-gpu", "onnxruntime", "torch", "diffusers", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{pkg}={version(pkg)}")
    key = hashlib.sha256("\n".join([folder_stamp(folder), *versions]).encode()).hexdigest()[:16]
    return cache_root() / "ort-demo" / f"{VERSION}-{key}"


def prepare_work(folder: Path) -> Path:
    """``work_folder(folder)``, made; one an earlier build left without its ``complete`` mark (stopped part way:
    the demo reuses any file it finds there, whole or not) is removed first."""
    work = work_folder(folder)
    if work.exists() and not (work / "complete").exists():
        log.warning("removing the unfinished ONNX Runtime demo build at %s", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def finish(work: Path, folder: Path) -> None:
    """Mark ``work`` complete (atomically: a marker half written is no marker), naming the model folder it was
    built from; then remove the builds of that same folder made before (other files or library versions: several
    GB each, never read again)."""
    from sdturbo.engine.files import atomic_write

    source = str(folder.resolve())
    atomic_write(work / "complete", json.dumps({"model": source}) + "\n")
    for other in work.parent.glob(f"{VERSION}-*"):
        try:
            built_from = json.loads((other / "complete").read_text()).get("model")
        except (OSError, ValueError, AttributeError):  # unfinished, or of another format: not ours to judge
            continue
        if other != work and built_from == source:
            log.info("removing the ONNX Runtime demo's older build for %s: %s", source, other)
            shutil.rmtree(other, ignore_errors=True)


@contextlib.contextmanager
def legacy_exporter():
    """``torch.onnx.export`` with ``dynamo=False`` while the demo exports (see the module doc)."""
    import inspect

    import torch

    export = torch.onnx.export
    if "dynamo" not in inspect.signature(export).parameters:  # torch before 2.5: one exporter only
        yield
        return

    @functools.wraps(export)
    def torchscript(*a, **k):
        k.setdefault("dynamo", False)
        return export(*a, **k)

    torch.onnx.export = torchscript
    try:
        yield
    finally:
        torch.onnx.export = export


@contextlib.contextmanager
def sdpa_restored(backend):
    """The demo's builder deletes ``F.scaled_dot_product_attention`` while it exports and puts it back only after
    a build that succeeded: put back here whatever happens, so that a failed build does not leave the process
    without it (the contenders after this one: diffusers' and transformers' attention, silently slower or
    failing)."""
    try:
        yield
    finally:
        backend.enable_torch_spda()


class OrtDemo:
    """ONNX Runtime's demo pipeline, ORT_CUDA engine with CUDA graphs, fp16 (the module doc says what and how)."""

    name = NAME

    def __init__(self, folder, timer: StageTimer, seed: int = 0):
        self.folder, self.timer, self.seed = Path(folder), timer, seed
        self.pipe, self.graph_status, self.graphs_used = None, None, None
        self._resources = None

    def load(self, shape: tuple[int, int, int] = (1, 512, 512), max_batch: int = 1) -> None:
        import onnxruntime
        import torch
        from sdturbo.engine.errors import BackendError, InputError
        from sdturbo.export.models import model_family

        if model_family(self.folder) != "sd-turbo":
            raise InputError(f"{NAME} runs SD-Turbo models only; {self.folder} is {model_family(self.folder)}")
        if not torch.cuda.is_available():
            raise BackendError(f"{NAME} needs a CUDA GPU and a CUDA build of torch")
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise BackendError(f"{NAME} needs onnxruntime's CUDA provider: pip install 'sdturbo[cuda]'")
        demo = import_demo()
        EngineType = demo.engine_builder.EngineType
        work = prepare_work(self.folder)
        complete = work / "complete"
        info = demo.models.PipelineInfo(
            VERSION, min_image_size=256, max_image_size=1024, use_fp16_vae=False, do_classifier_free_guidance=False
        )
        models = framework_models(self.folder, work, info.name())
        onnx_dir, engine_dir, output_dir, _, _ = demo.engine_builder.get_engine_paths(
            str(work), info, EngineType.ORT_CUDA, str(models)
        )
        pipe = demo.pipeline.StableDiffusionPipeline(
            info,
            max_batch_size=max(max_batch, shape[0]),
            scheduler="EulerA",
            output_dir=output_dir,
            use_cuda_graph=True,
            framework_model_dir=str(models),
            engine_type=EngineType.ORT_CUDA,
        )
        if not complete.exists():
            log.info("building ONNX Runtime demo's graphs in %s (its export and optimizer: minutes, once)", work)
        build = dict(
            engine_dir=engine_dir,
            framework_model_dir=str(models),
            onnx_dir=onnx_dir,
            tmp_dir=str(work / "tmp"),
            device_id=torch.cuda.current_device(),
            max_cuda_graphs=MAX_CUDA_GRAPHS,
        )
        without = self._build(pipe, build)
        finish(work, self.folder)
        self._time_stages(pipe)
        self.pipe = pipe
        self.graphs_used = {name: "demo-optimized" for name in pipe.backend.engines}
        self.graph_status = "sessions: onnxruntime's CUDA graph per session and shape (the demo's GpuBindingManager)"
        if without:
            self.graph_status += f"; none for {', '.join(without)}: onnxruntime refused it"

    @staticmethod
    def _build(pipe, build: dict) -> list[str]:
        """Its ``build_engines``. Where onnxruntime refuses a session CUDA graphs (a node it places on the CPU), the
        sessions are opened again without them for the text encoder, then for all: what the demo's own SDXL
        configuration does for its second text encoder ("use_cuda_graph=False"). Returns the models left without."""
        from sdturbo.engine.errors import first_line
        from sdturbo.export.ort_optimize import numpy2_compatible

        backend, without = pipe.backend, []
        while True:
            try:
                with legacy_exporter(), numpy2_compatible(), sdpa_restored(backend):
                    backend.build_engines(**build)
                return without
            except Exception as e:
                if "cuda graph" not in str(e).lower():
                    raise
                names = [n for n in backend.models if backend.model_config[n].use_cuda_graph]
                if not names:
                    raise
                off = ["clip"] if "clip" in names and not without else names
                log.warning("onnxruntime refused CUDA graphs in the demo (%s); again without them for %s",
                            first_line(e)[:200], ", ".join(off))  # fmt: skip
                for name in off:
                    backend.model_config[name].use_cuda_graph = False
                without += off

    def _time_stages(self, pipe) -> None:
        """Its profile ranges (CUDA events it records on every run) also start and stop our stage timer."""
        start, stop, timer = pipe.start_profile, pipe.stop_profile, self.timer

        def timed_start(name, color="blue"):
            start(name, color=color)
            if name in STAGES:
                timer.start(STAGES[name])

        def timed_stop(name):
            stop(name)
            if name in STAGES:
                timer.stop(STAGES[name])

        pipe.start_profile, pipe.stop_profile = timed_start, timed_stop

    def __call__(self, prompts, latents, steps: int, height: int, width: int, step_noise=None) -> np.ndarray:
        """``step_noise`` is ignored: its ancestral steps draw their own (none at 1 step)."""
        import torch

        pipe, batch = self.pipe, len(prompts)
        if self._resources != (batch, height, width):  # its bindings (and CUDA graph) for this shape
            pipe.load_resources(height, width, batch)
            self._resources = (batch, height, width)
        noise = torch.from_numpy(np.ascontiguousarray(latents)).to("cuda", torch.float16)
        # the initial latents every contender gets, scaled as its own initialize_latents scales its draw
        pipe.initialize_latents = lambda *_a, **_k: noise * pipe.scheduler.init_noise_sigma
        images, _ = pipe.run(
            list(prompts), [""] * batch, height, width, denoising_steps=steps, guidance=0.0, seed=self.seed,
            output_type="pt",
        )  # fmt: skip
        with torch.inference_mode():  # its pt_to_pil's arithmetic, on the GPU as there; uint8 to the host
            pixels = ((images + 1) * 255 / 2).clamp(0, 255).permute(0, 2, 3, 1).round().to(torch.uint8)
            return pixels.cpu().numpy()

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.teardown()
        self.pipe = None
        gc.collect()
        with contextlib.suppress(ImportError):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
