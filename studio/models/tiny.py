"""`demo-tiny`: a tiny Stable Diffusion with random weights, built in code and deterministic.

Same classes and key layout as SD 1.x (or SD 2.x with family="sd2"), so every loader, converter
and sampler runs on it exactly as on a real checkpoint. Its images are noise.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from studio.models.tokenizer import clip_tokenizer

TINY_NAME = "demo-tiny"
# the noise schedule of SD 1.5's scheduler config (scaled_linear 0.00085 .. 0.012)
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


def tiny_unet(family: str = "sd1") -> UNet2DConditionModel:
    sd2 = family == "sd2"
    return UNet2DConditionModel(
        sample_size=8,  # native size 8 latents * 8 = 64 px
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,  # as in SD, so the original key layout maps one to one
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )


def tiny_vae() -> AutoencoderKL:
    # four blocks: the same 8x down-scaling as SD's VAE, so sizes behave like a real model
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_text_encoder(family: str = "sd1") -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu" if family == "sd2" else "quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if family == "sd2" else 49407,
    )
    return CLIPTextModel(config)


def build_tiny_pipeline(family: str = "sd1", seed: int = 0) -> StableDiffusionPipeline:
    """The same weights for the same (family, seed), whatever the global RNG state."""
    # only the CPU generator (the models are built on the CPU): torch.manual_seed would also reseed CUDA
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        unet = tiny_unet(family)
        torch.default_generator.manual_seed(seed + 1)
        vae = tiny_vae()
        torch.default_generator.manual_seed(seed + 2)
        text_encoder = tiny_text_encoder(family)
    scheduler = PNDMScheduler(**SD_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(family),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
