"""What the hardware allows: FLOPs per stage (counted once, on the meta device) and measured machine rates.

A stage's floor is max(FLOPs / matmul rate, weight bytes / copy bandwidth), with both rates measured
in the same run as the contenders.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def stage_flops(folder: Path, batch: int, height: int, width: int) -> dict[str, dict[str, float]]:
    """{stage: {"flops": ..., "params": ...}} for one call of each stage (the UNet: one step).

    Built on the meta device with explicit (non-fused) attention so FlopCounterMode sees every matmul.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = [("text_encoder", CLIPTextModel)]
    if (folder / "text_encoder_2").is_dir():  # SDXL: both encoders count as text encoding
        encoders.append(("text_encoder_2", CLIPTextModelWithProjection))
    with torch.device("meta"):
        tes = []
        for sub, cls in encoders:
            cfg = CLIPTextConfig.from_pretrained(folder / sub)
            cfg._attn_implementation = "eager"
            tes.append(cls(cfg).eval())
        te = torch.nn.ModuleList(tes)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).eval()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).eval()
        unet.set_attn_processor(AttnProcessor())
        vae.set_attn_processor(AttnProcessor())
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        seq = tes[0].config.max_position_embeddings
        ids = torch.zeros(batch, seq, dtype=torch.int64)
        hidden = torch.zeros(batch, seq, unet.config.cross_attention_dim)
        cond = {}
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size conditioning
            cond = {
                "added_cond_kwargs": {
                    "text_embeds": torch.zeros(batch, tes[-1].config.projection_dim),
                    "time_ids": torch.zeros(batch, 6),
                }
            }
        lat = torch.zeros(batch, vae.config.latent_channels, height // f, width // f)
        img = torch.zeros(batch, 3, height, width)
        calls = {
            "text_encoder": (te, lambda: [m(ids) for m in tes]),
            "unet_step": (unet, lambda: unet(lat, torch.zeros(batch), hidden, **cond)),
            "vae_decoder": (vae, lambda: vae.decode(lat)),
            "vae_encoder": (vae, lambda: vae.encode(img)),
        }
        out = {}
        with torch.no_grad():
            for name, (module, call) in calls.items():
                with FlopCounterMode(display=False) as counter:
                    call()
                params = _params(module, name)
                out[name] = {"flops": float(counter.get_total_flops()), "params": float(params)}
    return out


def _params(module, stage: str) -> int:
    if stage == "vae_decoder":
        return sum(p.numel() for m in (module.decoder, module.post_quant_conv) for p in m.parameters())
    if stage == "vae_encoder":
        return sum(p.numel() for m in (module.encoder, module.quant_conv) for p in m.parameters())
    return sum(p.numel() for p in module.parameters())


def machine_rates(device: str) -> dict[str, float]:
    """Measured dense matmul rate (fp16 on a GPU, fp32 on a CPU) and device copy bandwidth."""
    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3
    t_mm = _best(lambda: a @ b, cuda, 10 if cuda else 3)
    buf = torch.empty(256 * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(buf)
    t_cp = _best(lambda: dst.copy_(buf), cuda, 10 if cuda else 3)
    return {
        "matmul_tflops": flops / t_mm / 1e12,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "copy_gbps": 2 * buf.numel() * 4 / t_cp / 1e9,
    }


def _best(fn, cuda: bool, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def floor_ms(flops: float, weight_bytes: float, rates: dict[str, float]) -> float:
    return 1e3 * max(flops / (rates["matmul_tflops"] * 1e12), weight_bytes / (rates["copy_gbps"] * 1e9))


def tiny_vae_flops(folder: Path, batch: int, height: int, width: int) -> dict[str, float]:
    """FLOPs and parameters of an AutoencoderTiny's decoder (``folder``: its config) for one call at this size,
    counted on the meta device as ``stage_flops`` counts the full VAE's."""
    from diffusers import AutoencoderTiny
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderTiny.from_config(AutoencoderTiny.load_config(folder)).eval()
        f = 2 ** (len(vae.config.decoder_block_out_channels) - 1)
        lat = torch.zeros(batch, vae.config.latent_channels, height // f, width // f)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            vae.decode(lat)
    params = sum(p.numel() for p in vae.decoder.parameters())
    return {"flops": float(counter.get_total_flops()), "params": float(params)}
