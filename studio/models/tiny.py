"""`demo-tiny` and `demo-tiny-xl`: tiny Stable Diffusion models with random weights, built in code, deterministic.

Same classes and key layout as SD 1.x (or SD 2.x with family="sd2", SDXL with family="sdxl"), so every
loader, converter and sampler runs on them exactly as on a real checkpoint. Their images are noise.
`build_tiny_xl_controlnet` is a ControlNet of demo-tiny-xl's shape, for tests of SDXL storyboards.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.models.tokenizer import clip_tokenizer

TINY_NAME = "demo-tiny"
TINY_XL_NAME = "demo-tiny-xl"
TINY_NAMES = {TINY_NAME: "sd1", TINY_XL_NAME: "sdxl"}  # built-in name -> family
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
# SDXL base's scheduler (EulerDiscreteScheduler): the same noise schedule, "leading" timesteps
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    prediction_type="epsilon",
    use_karras_sigmas=False,
)
# demo-tiny-xl's widths: the two text encoders must differ in width (diffusers' loader tells them apart by it)
XL_TE1_WIDTH, XL_TE2_WIDTH, XL_PROJECTION, XL_TIME_DIM = 32, 64, 32, 8


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


def tiny_unet_xl() -> UNet2DConditionModel:
    """SDXL's UNet shape at tiny widths: size-and-pooled-text embedding, linear projections, deeper last level."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=XL_TE1_WIDTH + XL_TE2_WIDTH,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_DIM,
        # six size/crop numbers embedded, plus the pooled text of text_encoder_2
        projection_class_embeddings_input_dim=6 * XL_TIME_DIM + XL_PROJECTION,
        use_linear_projection=True,
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


def tiny_text_encoder_2() -> CLIPTextModelWithProjection:
    """SDXL's second text encoder (OpenCLIP ViT-bigG: gelu, pads with "!", a text projection) at tiny width."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=XL_TE2_WIDTH,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=XL_PROJECTION,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    return CLIPTextModelWithProjection(config)


def build_tiny_xl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """demo-tiny-xl: the same weights for the same seed, whatever the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        unet = tiny_unet_xl()
        torch.default_generator.manual_seed(seed + 1)
        vae = tiny_vae()
        vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE scale
        torch.default_generator.manual_seed(seed + 2)
        text_encoder = tiny_text_encoder("sd1")
        torch.default_generator.manual_seed(seed + 3)
        text_encoder_2 = tiny_text_encoder_2()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer("sd1"),
        tokenizer_2=clip_tokenizer("sd2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_xl_controlnet(seed: int = 0) -> ControlNetModel:
    """An SDXL ControlNet for demo-tiny-xl (ControlNetModel.from_unet of its UNet), the same for the same seed; its
    zero convolutions get small random weights, so that it changes the image (a fresh one adds exactly zero)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # demo-tiny-xl's UNet
        unet = tiny_unet_xl()
        torch.default_generator.manual_seed(seed + 10)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
        with torch.no_grad():
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                         controlnet.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0, 0.3)
    return controlnet


def build_tiny_pipeline(family: str = "sd1", seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The same weights for the same (family, seed), whatever the global RNG state."""
    if family == "sdxl":
        return build_tiny_xl_pipeline(seed)
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
