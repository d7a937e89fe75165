"""The device buffers of a GPU pipeline (engine/device_pipeline.py): which buffer each component tensor is bound
to, and every buffer's shape and dtype at the largest request allowed. Data from the manifest's I/O specs; nothing
here touches the GPU."""

from __future__ import annotations

import numpy as np

from .errors import BundleError
from .schedule import MAX_STEPS
from .spec import TensorSpec

# the buffers with a pinned host twin: what is copied in (ids, noise, timesteps, image) or out (pixels)
HOST_BUFFERS = ("ids", "ids_2", "noise", "image_noise", "step_noise", "timesteps", "time_ids", "image_in", "pixels")


def bindings(
    family: str, latent_dtype: str, specs: dict, decoder: str = "vae_decoder", encoder: str = "vae_encoder"
) -> dict[str, dict[str, str]]:
    """Each component tensor -> the device buffer it reads or writes (every address fixed once per context).

    A VAE whose latents are not in the latents' dtype (SDXL's fp32 VAE) gets buffers of its own,
    filled and drained by cast kernels. ``decoder``/``encoder``: the VAE's components (the full VAE's, or the
    tiny VAE's, whose encoder takes no posterior noise)."""
    xl = family == "sdxl-turbo"
    out = {
        "text_encoder": {"input_ids": "ids", "hidden_states": "hidden_1" if xl else "hidden"},
        "unet": {"sample": "x_in", "timestep": "timestep", "hidden_states": "hidden", "noise_pred": "eps"},
        decoder: {"image": "image_out"},
        encoder: {"image": "image_in"},
    }
    if xl:
        out["text_encoder_2"] = {"input_ids": "ids_2", "hidden_states": "hidden_2", "text_embeds": "pooled"}
        out["unet"].update(text_embeds="pooled", time_ids="time_ids")
    dec_in = spec_of(specs[decoder], "latents").dtype
    out[decoder]["latents"] = "x" if dec_in == latent_dtype else "x_vae"
    if encoder in specs:
        enc_out = spec_of(specs[encoder], "latents").dtype
        out[encoder]["latents"] = "encoded" if enc_out == latent_dtype else "encoded_vae"
        if any(t.name == "noise" for t in specs[encoder].inputs):
            out[encoder]["noise"] = "image_noise"
    return out


def spec_of(component_spec, name: str) -> TensorSpec:
    for t in (*component_spec.inputs, *component_spec.outputs):
        if t.name == name:
            return t
    raise BundleError(f"the manifest's {component_spec.name} has no tensor {name!r}")


def pixel_bytes(batch: int, height: int, width: int) -> int:
    """Bytes of a request's [B, H, W, 3] uint8 pixels at the start of the "pixels" buffer; B bytes follow them,
    byte b set to 1 where image b is NaN or infinite (kernels' to_uint8)."""
    return batch * height * width * 3


def buffer_specs(bundle, profile, dtype, ancestral: bool, binds: dict, specs: dict) -> tuple[int, dict]:
    """(elements in the largest latents, buffer name -> (shape, dtype)) at ``profile``'s maximum: the latents'
    and the schedule's buffers, and each component-bound one (``binds``: component -> tensor -> buffer) sized
    from its spec."""
    p, c, dt = profile, bundle.latent_channels, dtype
    bmax = p.batch[2]
    dmax = p.dims(2, bundle.vae_scale_factor)
    lat = (bmax, c, dmax["latent_height"], dmax["latent_width"])
    sizes = {
        "noise": (lat, dt),
        "x": (lat, dt),
        "encoded": (lat, dt),
        "timesteps": ((MAX_STEPS, bmax), np.float32),
        "timestep": ((bmax,), np.float32),  # this step's row of timesteps, copied in on the device
        "pixels": ((pixel_bytes(bmax, p.height[2], p.width[2]) + bmax,), np.uint8),
    }
    if ancestral:
        sizes["step_noise"] = ((MAX_STEPS, *lat), dt)
    for comp, tensors in binds.items():
        for tensor, buf in tensors.items():
            t = spec_of(specs[comp], tensor)
            sizes.setdefault(buf, (t.concrete(dmax), np.dtype(t.dtype)))
    return int(np.prod(lat)), sizes
