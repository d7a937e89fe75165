"""The declared contract of each exported component, as data (shared by export, runtime and builders).

Shapes use symbolic axes: ``batch``, ``height``/``width`` (pixels) and ``latent_height``/``latent_width``
(pixels / VAE scale factor). ``float`` stands for the bundle precision's float type.
"""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("batch", "height", "width", "latent_height", "latent_width")
FLOAT = "float"
DTYPES = {"fp32": "float32", "fp16": "float16"}


def axis_values(batch: int, height: int, width: int, scale: int) -> dict[str, int]:
    """Each symbolic axis's value for a batch at height x width pixels (latents are ``scale`` times smaller)."""
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // scale,
        "latent_width": width // scale,
    }


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # float32 | float16 | int32 | "float" (the precision's float type)
    shape: tuple[int | str, ...]

    def resolve(self, precision: str) -> TensorSpec:
        return TensorSpec(self.name, DTYPES[precision] if self.dtype == FLOAT else self.dtype, self.shape)

    def concrete(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def resolve(self, precision: str) -> ComponentSpec:
        return ComponentSpec(
            self.name,
            tuple(t.resolve(precision) for t in self.inputs),
            tuple(t.resolve(precision) for t in self.outputs),
        )


def component_specs(seq_len: int, hidden: int, latent_channels: int) -> dict[str, ComponentSpec]:
    """The four components of an SD-Turbo bundle, for a model's text length and widths."""
    latent = TensorSpec("latents", FLOAT, ("batch", latent_channels, "latent_height", "latent_width"))
    image = TensorSpec("image", FLOAT, ("batch", 3, "height", "width"))
    hidden_states = TensorSpec("hidden_states", FLOAT, ("batch", seq_len, hidden))
    specs = [
        ComponentSpec("text_encoder", (TensorSpec("input_ids", "int32", ("batch", seq_len)),), (hidden_states,)),
        ComponentSpec(
            "unet",
            (TensorSpec("sample", FLOAT, latent.shape), TensorSpec("timestep", "float32", ("batch",)), hidden_states),
            (TensorSpec("noise_pred", FLOAT, latent.shape),),
        ),
        # Takes denoised latents; the 1/scaling_factor is applied inside the graph. Output in [-1, 1].
        ComponentSpec("vae_decoder", (latent,), (image,)),
        # Samples the posterior with caller noise and applies scaling_factor inside the graph.
        ComponentSpec("vae_encoder", (image, TensorSpec("noise", FLOAT, latent.shape)), (latent,)),
    ]
    return {s.name: s for s in specs}


def component_specs_xl(seq_len: int, hidden: int, hidden_2: int, pooled: int, latent_channels: int) -> dict:
    """SDXL-Turbo's five components. The VAE is float32 in every bundle: the SDXL VAE overflows in fp16
    (diffusers upcasts it too), so an fp16 bundle casts to fp32 at the VAE's inputs."""
    latent = ("batch", latent_channels, "latent_height", "latent_width")
    ids = TensorSpec("input_ids", "int32", ("batch", seq_len))
    text_embeds = TensorSpec("text_embeds", FLOAT, ("batch", pooled))
    specs = [
        ComponentSpec("text_encoder", (ids,), (TensorSpec("hidden_states", FLOAT, ("batch", seq_len, hidden)),)),
        ComponentSpec(
            "text_encoder_2", (ids,), (TensorSpec("hidden_states", FLOAT, ("batch", seq_len, hidden_2)), text_embeds)
        ),
        ComponentSpec(
            "unet",
            (
                TensorSpec("sample", FLOAT, latent),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("hidden_states", FLOAT, ("batch", seq_len, hidden + hidden_2)),
                text_embeds,
                TensorSpec("time_ids", FLOAT, ("batch", 6)),
            ),
            (TensorSpec("noise_pred", FLOAT, latent),),
        ),
        ComponentSpec(
            "vae_decoder",
            (TensorSpec("latents", "float32", latent),),
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
        ),
        ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")), TensorSpec("noise", "float32", latent)),
            (TensorSpec("latents", "float32", latent),),
        ),
    ]
    return {s.name: s for s in specs}


def tiny_vae_specs(latent_channels: int) -> dict[str, ComponentSpec]:
    """The tiny autoencoder's two components (TAESD: diffusers' AutoencoderTiny), beside the full VAE, in the
    precision's float type for both families (diffusers runs AutoencoderTiny in the pipeline dtype: its
    ``force_upcast`` is False, SDXL's included).

    The decoder takes denoised latents and applies 1/scaling_factor inside (1.0 for TAESD), as diffusers'
    pipelines do; it returns an image in about [-1, 1] (TAESD's [0, 1] output times 2 minus 1, unclamped). The
    encoder takes an image in [-1, 1] and returns its latents times scaling_factor: deterministic, with no
    posterior to sample (diffusers reads ``.latents`` and draws no noise for it)."""
    latent = TensorSpec("latents", FLOAT, ("batch", latent_channels, "latent_height", "latent_width"))
    image = TensorSpec("image", FLOAT, ("batch", 3, "height", "width"))
    specs = [
        ComponentSpec("tiny_vae_decoder", (latent,), (image,)),
        ComponentSpec("tiny_vae_encoder", (image,), (latent,)),
    ]
    return {s.name: s for s in specs}
