"""Each component as a torch module with the fixed signature its ComponentSpec declares."""

from __future__ import annotations

import torch


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.model = text_encoder

    def forward(self, input_ids):  # [B, 77] int32 -> [B, 77, D]
        return self.model(input_ids.to(torch.int64), return_dict=True).last_hidden_state


class PenultimateTextEncoder(torch.nn.Module):
    """SDXL: the second-to-last hidden states, and for the second encoder its pooled projection too."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.model = text_encoder
        self.pooled = pooled

    def forward(self, input_ids):  # [B, 77] int32 -> [B, 77, D] (, [B, P])
        out = self.model(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        return (out.hidden_states[-2], out.text_embeds) if self.pooled else out.hidden_states[-2]


class UNetXL(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.model = unet

    def forward(self, sample, timestep, hidden_states, text_embeds, time_ids):  # -> [B, 4, h, w]
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, hidden_states, added_cond_kwargs=cond, return_dict=False)[0]


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.model = unet

    def forward(self, sample, timestep, hidden_states):  # [B, 4, h, w], [B] fp32, [B, 77, D] -> [B, 4, h, w]
        return self.model(sample, timestep, hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latents):  # [B, 4, h, w] -> [B, 3, 8h, 8w] in [-1, 1]
        return self.vae.decode(latents / self.scale, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image, noise):  # [B, 3, H, W] in [-1, 1], [B, 4, H/8, W/8] -> scaled latents
        dist = self.vae.encode(image).latent_dist
        return (dist.mean + dist.std * noise) * self.scale


class TinyVaeDecoder(torch.nn.Module):
    """AutoencoderTiny's decoder as diffusers' pipelines call it: latents / scaling_factor in, its output out."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latents):  # [B, 4, h, w] -> [B, 3, 8h, 8w] in about [-1, 1]
        return self.vae.decode(latents / self.scale, return_dict=False)[0]


class TinyVaeEncoder(torch.nn.Module):
    """AutoencoderTiny's encoder as diffusers' img2img pipelines use it: ``.latents`` times scaling_factor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, image):  # [B, 3, H, W] in [-1, 1] -> [B, 4, H/8, W/8] scaled latents
        return self.vae.encode(image, return_dict=False)[0] * self.scale


def build_wrapper(name: str, model) -> torch.nn.Module:
    """The wrapper for component ``name`` of a LoadedModel."""
    if model.family == "sdxl-turbo":
        xl = {
            "text_encoder": lambda: PenultimateTextEncoder(model.text_encoder, pooled=False),
            "text_encoder_2": lambda: PenultimateTextEncoder(model.text_encoder_2, pooled=True),
            "unet": lambda: UNetXL(model.unet),
        }
        if name in xl:
            return xl[name]()
    return {
        "text_encoder": lambda: TextEncoder(model.text_encoder),
        "unet": lambda: UNet(model.unet),
        "vae_decoder": lambda: VaeDecoder(model.vae),
        "vae_encoder": lambda: VaeEncoder(model.vae),
    }[name]()
