"""The contenders, behind one interface: ``load()``, then ``__call__(prompts, latents, ...)`` -> uint8 [B, H, W, 3].

Every contender gets the same weights, prompts, initial latents, size and steps; each call runs from the
prompt strings to uint8 pixels in host memory. SDXL-Turbo's ancestral steps add noise at every step:
diffusers draws it from a generator seeded with ``step_seed``, and ours is handed the same draws
(``step_noise``) where the images are compared.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import numpy as np

from .timers import StageTimer, TimedStage

VARIANTS = {
    "": "the default: on ONNX Runtime, the bundle's optimized graphs where built",
    "unfused": "ONNX Runtime on the plain graphs (no `sdturbo build --ort-optimize` graphs)",
    "host": "ONNX Runtime CUDA driven stage by stage from the host (the pipeline before the device-resident one)",
    "sessiongraphs": "ONNX Runtime CUDA device-resident, with onnxruntime's own CUDA graph per session (the second "
    "tier), not the whole chain's",
    "nhwc": "ONNX Runtime CUDA device-resident on the plain graphs with the CUDA provider's prefer_nhwc (its own "
    "channels-last convolutions; the fused graphs have NhwcConv already)",
    "tiny": "the tiny VAE (--vae tiny; benchmarks/modes.py): compared with diffusers + AutoencoderTiny",
    "cached": "every timed request a prompt-cache hit (benchmarks/modes.py): compared with diffusers' prompt_embeds",
}


def parse_ours(name: str) -> tuple[str, str, str]:
    """``sdturbo-<backend>[-<variant>]-<precision>`` -> (backend, variant, precision)."""
    rest, precision = name.removeprefix("sdturbo-").rsplit("-", 1)
    for variant in VARIANTS:
        if variant and rest.endswith(f"-{variant}"):
            return rest.removesuffix(f"-{variant}"), variant, precision
    return rest, "", precision


class Ours:
    """This engine through one of its backends (``variant``: one of VARIANTS)."""

    def __init__(self, bundle, backend: str, precision: str, timer: StageTimer, variant: str = ""):
        self.bundle, self.backend, self.precision, self.timer = bundle, backend, precision, timer
        self.variant = variant
        self.name = f"sdturbo-{backend}{f'-{variant}' if variant else ''}-{precision}"
        self.pipe = None

    def load(self, shape: tuple[int, int, int] = (1, 512, 512), max_batch: int = 1) -> None:
        """``shape``: the latency run's; ONNX Runtime CUDA allocates for ``max_batch`` (the throughput sweep's),
        TensorRT builds static engines for ``shape`` only."""
        from sdturbo.engine.runtime import open_pipeline

        if self.variant == "host":
            from sdturbo.engine.backends.onnxruntime import OnnxRuntimeBackend
            from sdturbo.engine.pipeline import Pipeline

            backend = OnnxRuntimeBackend(self.precision, ("CUDAExecutionProvider",))
            self.pipe = Pipeline(self.bundle, backend, prompt_cache=0).load()
        else:
            fused = self.variant not in ("unfused", "nhwc")
            if self.backend == "onnxruntime-cuda":
                shape = (max(shape[0], max_batch), *shape[1:])
            modes = {  # the prompt cache only where it is the thing measured: off everywhere else
                "vae": "tiny" if self.variant == "tiny" else "full",
                "prompt_cache": 64 if self.variant == "cached" else 0,
            }
            graph = "sessions" if self.variant == "sessiongraphs" else True
            if self.variant == "nhwc":
                modes["nhwc"] = True
            self.pipe = open_pipeline(
                self.bundle, self.backend, self.precision, shape=shape, fused=fused, cuda_graph=graph, **modes
            ).load()
        self.graph_status = getattr(self.pipe, "graph_status", None)
        self.graphs_used = getattr(self.pipe, "graphs_used", None) or getattr(
            getattr(self.pipe, "backend", None), "graphs", None
        )
        stages = getattr(self.pipe, "_stages", None)  # host pipelines; TensorRT runs as one graph
        for name in stages or ():  # SDXL's second text encoder counts as text encoding; the tiny VAE as the VAE
            stages[name] = TimedStage(stages[name], name.removesuffix("_2").removeprefix("tiny_"), self.timer)

    def __call__(self, prompts, latents, steps: int, height: int, width: int, step_noise=None) -> np.ndarray:
        kw = {} if step_noise is None else {"step_noise": step_noise}
        return self.pipe(prompts, steps=steps, height=height, width=width, latents=latents, **kw)

    def for_sweep(self, batches, height: int, width: int) -> str | None:
        """Ready the pipeline for the throughput sweep's ``batches``. TensorRT's latency engines are static (the
        latency run's batch only): the sweep gets engines for batch 1 to the largest (tuned for batch 1, as a
        server's), built once and kept in the bundle, in place of the latency pipeline. Returns their profile
        (None: the latency pipeline runs the sweep)."""
        if self.backend != "tensorrt" or not batches:
            return None
        if all(self.pipe.profile.covers(b, height, width) for b in batches):
            return None
        from sdturbo.engine.runtime import open_pipeline

        modes = {"vae": self.pipe.vae, "prompt_cache": self.pipe.prompt_cache}
        shape = (max(batches), height, width)
        self.close()  # the latency pipeline's memory back first: both at once may not fit
        self.pipe = open_pipeline(self.bundle, "tensorrt", self.precision, shape=shape, any_batch=True, **modes).load()
        return self.pipe.profile.tag

    def close(self) -> None:
        """The pipeline's memory back now (a device pipeline's close()), not whenever a collection finds it."""
        if self.pipe is not None:
            self.pipe.close()
        self.pipe = None
        gc.collect()


class Diffusers:
    """diffusers' AutoPipelineForText2Image, eager or with torch.compile on the UNet and VAE decoder; with
    ``variant`` "tiny", given ``vae=AutoencoderTiny`` from ``tiny_vae`` (a folder); with "embeds", given
    ``prompt_embeds`` (SDXL: and ``pooled_prompt_embeds``) computed once per prompt list, on its first call."""

    def __init__(
        self,
        folder,
        device: str,
        dtype: str,
        timer: StageTimer,
        compile_mode: str | None = None,
        step_seed: int | None = None,
        variant: str = "",
        tiny_vae=None,
    ):
        """``compile_mode``: torch.compile's mode for the UNet and VAE decoder (None: eager)."""
        self.folder, self.device, self.dtype, self.timer = folder, device, dtype, timer
        self.compile_mode = compile_mode
        self.step_seed = step_seed  # None: no generator (SD-Turbo's Euler steps add no noise)
        self.variant, self.tiny_vae, self._embeds = variant, tiny_vae, {}
        self.name = f"diffusers-{dtype}" + ("-compile" if compile_mode else "") + (f"-{variant}" if variant else "")
        self.pipe = None

    def load(self) -> None:
        from sdturbo.export.models import model_family
        from sdturbo.export.random_models import quiet_torchvision_notice

        quiet_torchvision_notice()
        import torch
        from diffusers import AutoPipelineForText2Image

        dtype = getattr(torch, {"fp16": "float16", "fp32": "float32"}[self.dtype])
        xl = {"add_watermarker": False} if model_family(Path(self.folder)) == "sdxl-turbo" else {}  # pixels as made
        if self.variant == "tiny":
            from diffusers import AutoencoderTiny

            xl["vae"] = AutoencoderTiny.from_pretrained(self.tiny_vae, torch_dtype=dtype)
        pipe = AutoPipelineForText2Image.from_pretrained(self.folder, torch_dtype=dtype, **xl).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.compile_mode:
            pipe.unet = torch.compile(pipe.unet, mode=self.compile_mode, fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=self.compile_mode, fullgraph=True)
        self._hook(pipe.text_encoder, "text_encoder")
        if getattr(pipe, "text_encoder_2", None) is not None:
            self._hook(pipe.text_encoder_2, "text_encoder")
        self._hook(pipe.unet, "unet")
        decode, step, timer = pipe.vae.decode, pipe.scheduler.step, self.timer

        @functools.wraps(decode)
        def timed_decode(*a, **k):
            timer.start("vae_decoder")
            out = decode(*a, **k)
            timer.stop("vae_decoder")
            return out

        @functools.wraps(step)  # the pipeline reads step's signature to decide whether to pass the generator
        def timed_step(*a, **k):
            timer.start("scheduler")
            out = step(*a, **k)
            timer.stop("scheduler")
            return out

        pipe.vae.decode, pipe.scheduler.step = timed_decode, timed_step
        self.pipe, self._torch_dtype = pipe, dtype

    def _hook(self, module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.timer.start(name))
        module.register_forward_hook(lambda *_: self.timer.stop(name))

    def __call__(self, prompts, latents, steps: int, height: int, width: int, step_noise=None) -> np.ndarray:
        """``step_noise`` is ignored: diffusers draws it, from ``step_seed`` (see ``ancestral_noise``)."""
        import torch

        lat = torch.from_numpy(latents).to(self.device, self._torch_dtype)
        text = self.embeds(prompts) if self.variant == "embeds" else {"prompt": list(prompts)}
        with torch.inference_mode():
            out = self.pipe(
                **text,
                num_inference_steps=steps,
                guidance_scale=0.0,
                height=height,
                width=width,
                latents=lat,
                generator=None if self.step_seed is None else torch.Generator().manual_seed(self.step_seed),
                output_type="np",
            ).images
        return (out * 255).round().astype(np.uint8)

    def embeds(self, prompts) -> dict:
        """The pipeline's own ``encode_prompt`` output for ``prompts``, computed on the first call only."""
        import torch

        key = tuple(prompts)
        if key not in self._embeds:
            kw = dict(prompt=list(prompts), device=self.device, num_images_per_prompt=1)
            kw["do_classifier_free_guidance"] = False
            with torch.inference_mode():
                out = self.pipe.encode_prompt(**kw)
            xl = len(out) == 4  # SDXL: (embeds, negative, pooled, negative pooled)
            self._embeds[key] = {"prompt_embeds": out[0], **({"pooled_prompt_embeds": out[2]} if xl else {})}
        return self._embeds[key]

    def close(self) -> None:
        self.pipe = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def ancestral_noise(seed: int, steps: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The noise diffusers' ancestral scheduler draws at each step from a CPU generator seeded ``seed``
    (when the latents are given, as here): [steps, *shape] float32 holding values of ``dtype``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, {"fp16": "float16", "fp32": "float32"}[dtype])
    return torch.stack([torch.randn(shape, generator=g, dtype=torch_dtype) for _ in range(steps)]).float().numpy()
