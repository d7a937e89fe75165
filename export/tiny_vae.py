"""The tiny autoencoder (TAESD: diffusers' ``AutoencoderTiny``), exported into a bundle beside the full VAE.

A source (``sdturbo export MODEL --tiny-vae SOURCE``) is:

- a Hugging Face repo id: ``madebyollin/taesd`` for SD-Turbo, ``madebyollin/taesdxl`` for SDXL-Turbo
  (the two share an architecture; each is trained on its model's latents, which this code cannot tell apart);
- a local ``AutoencoderTiny`` folder (``config.json`` and ``diffusion_pytorch_model.safetensors``);
- ``random:taesd`` / ``random:taesdxl``: TAESD's architecture with seeded random weights, or ``random:taesd-tiny``,
  a small one for tests; built once into the cache like the random models.

What diffusers' SD and SDXL pipelines do with it, and the graphs therefore do: the decoder gets the latents
divided by its ``scaling_factor`` (1.0) and returns [0, 1] pixels times 2 minus 1 (unclamped); the encoder's
output is its ``latents`` (no distribution, so no noise is drawn) times ``scaling_factor``; it runs in the
pipeline's dtype (its ``force_upcast`` is False, for SDXL too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ..engine.cache import folder_stamp
from ..engine.errors import InputError, first_line
from ..engine.spec import tiny_vae_specs
from .models import check_safetensors, random_folder
from .onnx_export import export_record
from .wrappers import TinyVaeDecoder, TinyVaeEncoder

log = logging.getLogger(__name__)

SEED = 0
WEIGHTS = "diffusion_pytorch_model.safetensors"
RANDOM_TINY_VAES = {
    "taesd": {},  # AutoencoderTiny's defaults are TAESD's architecture (madebyollin/taesd, /taesdxl)
    "taesdxl": {},
    "taesd-tiny": dict(  # 8x like TAESD, one block per stage, 16 channels
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ),
}


@dataclass
class TinyVaeModel:
    """An AutoencoderTiny loaded on the CPU in fp32, and where it came from."""

    source: str
    folder: Path
    vae: object

    def manifest_entry(self) -> dict:
        cfg = self.vae.config
        return {
            "source": self.source,
            "class": "AutoencoderTiny",
            "config_hash": config_hash(self.folder),
            "source_stamp": folder_stamp(self.folder),
            "scaling_factor": float(cfg.scaling_factor),
            "latent_channels": int(cfg.latent_channels),
            "scale_factor": scale_factor(cfg),
        }


def scale_factor(cfg) -> int:
    """Pixels per latent: the decoder upsamples after every block but the last, the encoder halves likewise."""
    up = int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)
    down = 2 ** (len(cfg.encoder_block_out_channels) - 1)
    if up != down:
        raise InputError(f"this AutoencoderTiny decodes {up}x but encodes {down}x; both must be the same")
    return up


def config_hash(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def same_source(a: str, b: str) -> bool:
    """Two names of one model or tiny VAE: equal, or the same existing folder."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def check_tiny_source(source: str) -> None:
    """What ``source`` can be told to be wrong by its name alone (nothing read, built or downloaded): an
    unknown random:<name>, a file, neither a folder nor an owner/name hub id."""
    if source.startswith("random:"):
        if source.removeprefix("random:") not in RANDOM_TINY_VAES:
            allowed = ", ".join("random:" + n for n in RANDOM_TINY_VAES)
            raise InputError(f"unknown random tiny VAE {source!r}; allowed: {allowed}")
        return
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"--tiny-vae {source!r} is a file; give an AutoencoderTiny folder, hub id or random:taesd")
    if not path.exists() and (source.count("/") != 1 or source.startswith((".", "/"))):
        raise InputError(f"--tiny-vae {source!r} is neither an existing folder nor a hub id like 'madebyollin/taesd'")


def resolve_tiny_vae_folder(source: str) -> Path:
    """The local AutoencoderTiny folder for ``source``, building or downloading it if needed."""
    check_tiny_source(source)
    if source.startswith("random:"):
        return random_folder(source.removeprefix("random:"), build=build_random_tiny_vae, marker="config.json")
    path = Path(source).expanduser()
    if path.is_dir():
        check_tiny_vae_folder(path)
        return path
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=["config.json", WEIGHTS]))
    except Exception as e:  # network, auth, or unknown repo: say which and why
        raise InputError(
            f"could not download the tiny VAE {source!r} from the Hugging Face Hub ({first_line(e)}); "
            f"offline, give `sdturbo export ... --tiny-vae` a local AutoencoderTiny folder or random:taesd / "
            f"random:taesdxl"
        ) from e
    check_tiny_vae_folder(folder)  # a repo without diffusers' AutoencoderTiny files: one line naming them
    return folder


def check_tiny_vae_folder(folder: Path) -> None:
    missing = [f for f in ("config.json", WEIGHTS) if not (folder / f).is_file()]
    if missing:
        raise InputError(f"tiny VAE folder {folder} lacks {', '.join(missing)} (an AutoencoderTiny folder has both)")
    try:
        cls = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise InputError(f"{folder / 'config.json'} is not a readable config ({e})") from e
    if cls != "AutoencoderTiny":
        raise InputError(f"{folder} holds a {cls}, not an AutoencoderTiny (TAESD)")
    check_safetensors(folder / WEIGHTS)


def load_tiny_vae(source: str) -> TinyVaeModel:
    import torch
    from diffusers import AutoencoderTiny

    folder = resolve_tiny_vae_folder(source)
    if not source.startswith("random:") and Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().resolve())
    log.info("loading the tiny VAE %s from %s", source, folder)
    vae = AutoencoderTiny.from_pretrained(  # (low_cpu_mem_usage: see models.load_model)
        folder, use_safetensors=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
    ).eval()
    return TinyVaeModel(source, folder, vae)


def check_fits(tiny: TinyVaeModel, latent_channels: int, scale: int) -> None:
    """The tiny VAE must read and write the model's latents: the same channels and the same pixels per latent."""
    cfg = tiny.vae.config
    got = (int(cfg.latent_channels), scale_factor(cfg))
    if got != (latent_channels, scale):
        raise InputError(
            f"the tiny VAE {tiny.source} has {got[0]} latent channels at {got[1]}x; this model's latents have "
            f"{latent_channels} at {scale}x"
        )
    if float(getattr(cfg, "shift_factor", 0.0) or 0.0) != 0.0:
        raise InputError(
            f"the tiny VAE {tiny.source} has shift_factor {cfg.shift_factor}; SD-Turbo and SDXL-Turbo pipelines "
            f"apply none (it belongs to another model family)"
        )


def write_tiny_onnx(tiny: TinyVaeModel, root: Path, precisions: list[str], latent_channels: int, scale: int) -> dict:
    """Export the tiny decoder and encoder for each precision (fp32 before fp16: fp16 converts the module in
    place) into ``root/onnx/<precision>/``; their manifest entries by precision."""
    check_fits(tiny, latent_channels, scale)
    specs = tiny_vae_specs(latent_channels)
    lh, lw = 9, 17  # odd latent sides, as the other components are traced (onnx_export.trace_dims)
    dims = {"batch": 2, "latent_height": lh, "latent_width": lw, "height": lh * scale, "width": lw * scale}
    wrappers = {"tiny_vae_decoder": TinyVaeDecoder, "tiny_vae_encoder": TinyVaeEncoder}
    components: dict = {}
    for precision in precisions:
        if precision == "fp16":
            tiny.vae.half()
        folder = root / "onnx" / precision
        folder.mkdir(parents=True, exist_ok=True)
        for name, spec in specs.items():
            log.info("exporting %s (%s) from %s", name, precision, tiny.source)
            wrapper = wrappers[name](tiny.vae)
            entry = export_record(None, spec.resolve(precision), folder, precision, dims=dims, wrapper=wrapper)
            components.setdefault(precision, {})[name] = entry
    return components


def build_random_tiny_vae(name: str):
    """An AutoencoderTiny of architecture ``name`` with seeded random weights that make images, not a flat one.

    PyTorch's default initialisation shrinks the signal through TAESD's many ReLU convolutions, so every image
    decodes to about -1 (all black once clamped). Instead: He-normal weights and zero biases throughout, then
    the last convolution of each half rescaled once, on seeded inputs, so the decoder's output spreads over
    [-1, 1] (mean 0, std 0.5 for latents spread across its tanh range) and the encoder's latents have unit
    variance."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(SEED)
    vae = AutoencoderTiny(**RANDOM_TINY_VAES[name]).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
                if m.bias is not None:
                    m.bias.zero_()
        latents = 3 * torch.randn(4, vae.config.latent_channels, 16, 16, generator=g)
        _calibrate(vae.decoder.layers, torch.tanh(latents / 3) * 3, mean=0.5, std=0.25)  # [0, 1] before x2 - 1
        _calibrate(vae.encoder.layers, torch.rand(4, 3, 128, 128, generator=g), mean=0.0, std=1.0)
    return vae


def _calibrate(layers, x, mean: float, std: float) -> None:
    """Scale and shift the last convolution of ``layers`` so that its output on ``x`` has this mean and std."""
    import torch

    last = layers[-1]
    assert isinstance(last, torch.nn.Conv2d), type(last)
    out = layers(x)
    s = std / float(out.std())
    last.weight.mul_(s)
    last.bias.mul_(s).add_(mean - float(out.mean()) * s)


AUTO = "auto"  # the model's own TAESD: madebyollin/taesd or /taesdxl; random:taesd / random:taesdxl for random models


def default_source(model: str, family: str | None = None) -> str:
    """The tiny VAE ``auto`` names for ``model`` (``family`` read from its folder when not given)."""
    if family is None:
        from .models import model_family, resolve_model_folder

        family = model_family(resolve_model_folder(model))
    name = "taesdxl" if family == "sdxl-turbo" else "taesd"
    return f"random:{name}" if model.startswith("random:") else f"madebyollin/{name}"
