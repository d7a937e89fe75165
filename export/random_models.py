"""Random-weight SD-Turbo pipelines: the real architecture (model-facts.md) and a tiny one for tests."""

from __future__ import annotations

import logging

from .random_tokenizer import build_vocab

SEED = 0
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    timestep_spacing="trailing",
    steps_offset=1,
    timestep_type="discrete",
    use_karras_sigmas=False,
    interpolation_type="linear",
)

# SDXL-Turbo's scheduler_config.json (model-facts.md): EulerAncestralDiscreteScheduler, same schedule.
SCHEDULER_XL = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    timestep_spacing="trailing",
    steps_offset=1,
)

# The token ids the released SD-Turbo and SDXL-Turbo text encoder configs carry (OpenAI's and OpenCLIP's
# conversions: bos 0, eos 2, pad 1), not the tokenizers' own. With eos_token_id 2, transformers pools CLIP at
# argmax(ids) (the end-of-text token is the highest id), not at the first ids == eos: the path the real
# models take, so the random ones take it too (their tokenizers also put <|endoftext|> last).
RELEASED_CLIP_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}

RANDOM_MODELS = {
    "sd-turbo": dict(
        text_encoder=dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
        ),
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            norm_num_groups=32,
            norm_eps=1e-5,
            flip_sin_to_cos=True,
            freq_shift=0,
            downsample_padding=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=768,
            scaling_factor=0.18215,
            force_upcast=True,
        ),
    ),
    # Tiny but of the same shape: 8x VAE downsampling, cross-attention in the UNet, a 77-token encoder.
    "tiny": dict(
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=32,
        ),
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=8,
            flip_sin_to_cos=True,
            freq_shift=0,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        vae=dict(
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.18215,
            force_upcast=True,
        ),
    ),
}


TORCHVISION_NOTICE = "requires torchvision (not installed)"


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_NOTICE not in record.getMessage()


def quiet_torchvision_notice() -> None:
    """Importing a diffusers pipeline makes transformers 5 warn that CLIP's image processor "requires
    torchvision (not installed)" and advise installing it. We never process images with it, and on a machine
    with the CPU build of torch, ``pip install torchvision`` can pull a CUDA build of torch over it (several GB).
    This drops that one notice, before the import that makes it; every other transformers message still shows."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionNotice) for f in logger.filters):
        logger.addFilter(_DropTorchvisionNotice())


def build_random_pipeline(name: str):
    """A diffusers StableDiffusionPipeline of architecture ``name`` with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = RANDOM_MODELS[name]
    vocab, merges = build_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **RELEASED_CLIP_IDS))
    n_blocks = len(cfg["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        **cfg["vae"],
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
    )
    unet = UNet2DConditionModel(**cfg["unet"])
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# SDXL-Turbo: two CLIP text towers (the second with a projection), a UNet with added "text_time"
# conditioning, and the SDXL VAE (which overflows in fp16). model-facts.md has the real sizes.
RANDOM_SDXL = {
    "sdxl-turbo": dict(
        text_encoder=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        text_encoder_2=dict(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
        ),
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
    ),
    "sdxl-tiny": dict(
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        text_encoder_2=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=32,
        ),
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        ),
        vae=dict(
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
    ),
}


def build_random_sdxl_pipeline(name: str):
    """A diffusers StableDiffusionXLPipeline of architecture ``name`` with seeded random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = RANDOM_SDXL[name]
    vocab, merges = build_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # pads with <|endoftext|>
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **RELEASED_CLIP_IDS))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"], **RELEASED_CLIP_IDS))
    n_blocks = len(cfg["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        **cfg["vae"],
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**cfg["unet"]),
        scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER_XL),
        add_watermarker=False,
    )


def build_random(name: str):
    """Any random model by name: SD-Turbo or SDXL-Turbo architecture."""
    quiet_torchvision_notice()  # before either builder imports diffusers' pipelines
    return build_random_sdxl_pipeline(name) if name in RANDOM_SDXL else build_random_pipeline(name)


ALL_RANDOM = (*RANDOM_MODELS, *RANDOM_SDXL)
