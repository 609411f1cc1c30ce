"""SDXL LoRAs and embeddings from shared files on demo-tiny-xl: kohya's SDXL naming (original UNet names, lora_te1_ /
lora_te2_, LoCon conv layers), diffusers/peft SDXL files, clip_l/clip_g embeddings; each checked against diffusers'
own loaders, and files for the other family refused with theirs named."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from studio.files.networks import NetworkFileError, NetworkLibrary, lora_card, save_embedding
from studio.generation.denoise import initial_latents
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.generation.samplers import make_scheduler
from studio.models.manager import ModelManager
from studio.models.tiny import build_tiny_xl_pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny-xl")
    return manager, Generator(manager), cfg


def _job(prompt=PROMPT, **kw) -> GenerateJob:
    values = dict(prompt=prompt, negative_prompt="", sampler="Euler", schedule="Automatic", steps=3, cfg_scale=7.0,
                  seed=11, width=64, height=64)
    values.update(kw)
    return GenerateJob(**values)


def _image(gen, job) -> np.ndarray:
    return np.asarray(gen.run(job).images[0].image).astype(int)


# --- kohya's SDXL naming, written from its rules here (not from the studio's mapping) ---

def sgm_path(path: str, layers_per_block: int) -> str | None:
    """The original (SGM) module path kohya names an SDXL UNet layer by: input_blocks counts conv_in, then each
    level's layers and its downsampler; output_blocks counts layers_per_block + 1 per level; resnets rename conv1 to
    in_layers.2."""
    per_level = layers_per_block + 1
    if hit := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        level, kind, j, rest = int(hit[1]), hit[2], int(hit[3]), hit[4]
        head = f"input_blocks.{1 + level * per_level + j}"
    elif hit := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        level, kind, j, rest = int(hit[1]), hit[2], int(hit[3]), hit[4]
        head = f"output_blocks.{level * per_level + j}"
    elif hit := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, j, rest = hit[1], int(hit[2]), hit[3]
        return f"middle_block.{2 * j + 1 if kind == 'attentions' else 2 * j}." + rest.replace("conv1", "in_layers.2")
    else:
        return None
    if kind == "resnets":
        return f"{head}.0." + rest.replace("conv1", "in_layers.2")
    return f"{head}.1.{rest}"


def make_kohya_sdxl_lora(pipe, seed: int, rank: int = 4, alpha: float = 2.0, conv: bool = True) -> dict:
    """UNet attention projections (and, with `conv`, LoCon 3x3 kernels on the resnets' conv1) under kohya's original
    names, and q/k/v/out of both text encoders as lora_te1_ / lora_te2_."""
    pipe = build_tiny_xl_pipeline()  # plain modules, whatever adapters the studio's copy carries
    g = torch.Generator().manual_seed(seed)
    out = {}

    def add(name, down_shape, up_shape):
        out[f"{name}.lora_down.weight"] = torch.randn(*down_shape, generator=g) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn(*up_shape, generator=g) * 0.3
        out[f"{name}.alpha"] = torch.tensor(alpha)

    layers = pipe.unet.config.layers_per_block
    for path, module in pipe.unet.named_modules():
        original = sgm_path(path, layers)
        if original is None:
            continue
        name = "lora_unet_" + original.replace(".", "_")
        if isinstance(module, torch.nn.Linear) and path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            add(name, (rank, module.in_features), (module.out_features, rank))
        elif conv and isinstance(module, torch.nn.Conv2d) and path.endswith("resnets.0.conv1"):
            add(name, (rank, module.in_channels, 3, 3), (module.out_channels, rank, 1, 1))
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                full = path if path.startswith("text_model.") else "text_model." + path
                add(prefix + full.replace(".", "_"), (rank, module.in_features), (module.out_features, rank))
    return {k: v.to(torch.float16) for k, v in out.items()}


def reference(pipe, job: GenerateJob) -> StableDiffusionXLPipeline:
    """diffusers' own SDXL pipeline on a fresh build of demo-tiny-xl (the same weights as the studio's, none of its
    LoRA wrappers; diffusers' LoRA or embedding loading leaves the studio's model alone)."""
    fresh = build_tiny_xl_pipeline()
    ref = StableDiffusionXLPipeline(
        vae=fresh.vae, text_encoder=fresh.text_encoder, text_encoder_2=fresh.text_encoder_2,
        tokenizer=fresh.tokenizer, tokenizer_2=fresh.tokenizer_2, unet=fresh.unet,
        scheduler=make_scheduler(job.sampler, job.schedule, dict(pipe.scheduler.config)),
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def reference_image(ref, pipe, job: GenerateJob) -> np.ndarray:
    latents = initial_latents(pipe, [job.seed], job.width, job.height)
    out = ref(prompt=job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
              guidance_scale=job.cfg_scale, width=job.width, height=job.height, latents=latents)
    return np.asarray(out.images[0]).astype(int)


def test_kohya_sdxl_lora_equals_diffusers_loader_on_unet_conv_and_both_text_encoders(xl):
    manager, gen, cfg = xl
    pipe = manager.current.pipe
    path = cfg.loras_dir / "xlkohya.safetensors"
    save_file(make_kohya_sdxl_lora(pipe, 1), str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    base = _image(gen, _job())
    ours = _image(gen, _job(PROMPT + " <lora:xlkohya:1>"))
    ref = reference(pipe, _job())
    ref.load_lora_weights(str(path))
    theirs = reference_image(ref, pipe, _job())
    assert np.abs(ours - base).max() > 10  # the LoRA does something
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()
    # every layer of the file was applied: none is reported unmatched
    assert not gen.run(_job(PROMPT + " <lora:xlkohya:1>")).notes
    # weight 0 is the base model bit for bit, and so is the model after the LoRA is gone
    assert np.array_equal(_image(gen, _job(PROMPT + " <lora:xlkohya:0>")), base)
    assert np.array_equal(_image(gen, _job()), base)


def test_text_encoder_weight_reaches_both_sdxl_text_encoders(xl):
    manager, gen, cfg = xl
    pipe = manager.current.pipe
    save_file(make_kohya_sdxl_lora(pipe, 2, conv=False), str(cfg.loras_dir / "xlte.safetensors"))
    model = manager.current
    width_l = pipe.text_encoder.config.hidden_size
    lora = gen.networks.find_lora("xlte")
    assert lora.family == "sdxl" and lora_card(lora)["for"] == "SDXL"
    from studio.files.adapters import ActiveLora

    with manager.lock:
        base = gen.prompt_encoder(model, {}, 1).encode(PROMPT).embeds
        model.loras().apply([ActiveLora(lora, te=1.0, unet=0.0)])
        changed = gen.prompt_encoder(model, {}, 1).encode(PROMPT).embeds
        model.loras().apply([])
        restored = gen.prompt_encoder(model, {}, 1).encode(PROMPT).embeds
    assert not torch.allclose(changed[..., :width_l], base[..., :width_l])  # CLIP ViT-L
    assert not torch.allclose(changed[..., width_l:], base[..., width_l:])  # OpenCLIP bigG
    assert torch.equal(restored, base)
    # UNet weight 0, text encoder weight 1 changes the image; the reverse too
    plain = _image(gen, _job())
    assert np.abs(_image(gen, _job(PROMPT + " <lora:xlte:1:0>")) - plain).max() > 0


def test_diffusers_peft_sdxl_lora_file_applies_as_diffusers_does(xl):
    from peft import LoraConfig, get_peft_model_state_dict

    manager, gen, cfg = xl
    pipe = manager.current.pipe
    ref = reference(pipe, _job())
    torch.manual_seed(3)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for encoder in (ref.text_encoder, ref.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    StableDiffusionXLPipeline.save_lora_weights(
        cfg.loras_dir, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(ref.text_encoder_2),
        weight_name="xlpeft.safetensors")
    keys = list(load_file(str(cfg.loras_dir / "xlpeft.safetensors")))
    assert any(k.startswith("text_encoder_2.") for k in keys) and any(k.startswith("unet.") for k in keys)
    assert gen.networks.find_lora("xlpeft").family == "sdxl"
    ours = _image(gen, _job(PROMPT + " <lora:xlpeft:1>"))
    theirs = reference_image(ref, pipe, _job())
    assert np.abs(ours - _image(gen, _job())).max() > 10
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()


def test_loras_for_the_other_family_are_refused_with_the_family_named(xl, tmp_path):
    manager, gen, cfg = xl
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = {f"{layer}.lora_down.weight": torch.zeros(4, 768), f"{layer}.lora_up.weight": torch.zeros(320, 4)}
    save_file(sd15, str(cfg.loras_dir / "sd15style.safetensors"))
    with pytest.raises(NetworkFileError, match="made for SD 1.x models; the loaded model is SDXL"):
        gen.run(_job("a cat <lora:sd15style:1>"))
    # the panel's filter: with the loaded model's family, other families' files are listed as skipped, with theirs
    scan = gen.networks.loras("sdxl")
    assert "sd15style" not in scan.found and "SD 1.x" in scan.skipped["sd15style.safetensors"]
    # and an SDXL LoRA on an SD 1.x model
    from studio.config import StudioConfig

    sd1_cfg = StudioConfig().with_home(tmp_path)
    sd1_cfg.ensure_dirs()
    save_file(make_kohya_sdxl_lora(manager.current.pipe, 4), str(sd1_cfg.loras_dir / "xlstyle.safetensors"))
    sd1 = ModelManager(sd1_cfg)
    sd1.load("demo-tiny")
    with pytest.raises(NetworkFileError, match="made for SDXL models; the loaded model is SD 1.x"):
        Generator(sd1).run(_job("a cat <lora:xlstyle:1>"))
    assert "xlstyle" in NetworkLibrary(sd1_cfg.loras_dir, sd1_cfg.embeddings_dir).loras("sdxl").found


def test_sdxl_embedding_loads_in_diffusers_on_both_encoders_with_the_studio_conditioning(xl):
    manager, gen, cfg = xl
    pipe = manager.current.pipe
    g = torch.Generator().manual_seed(5)
    width_l, width_g = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    clip_l, clip_g = torch.randn(2, width_l, generator=g), torch.randn(2, width_g, generator=g)
    path = save_embedding(cfg.embeddings_dir / "xlstar.safetensors", clip_l, "xlstar", vectors_g=clip_g)
    state = load_file(str(path))
    assert set(state) == {"clip_l", "clip_g"}  # the layout A1111 and ComfyUI read
    prompt = "a photo of xlstar on a blue background"
    ref = reference(pipe, _job())
    ref.load_textual_inversion(state["clip_l"], token="xlstar", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="xlstar", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    embeds, _, pooled, _ = ref.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    nets = gen.networks.embeddings((width_l, width_g))
    assert "xlstar" in nets.found
    from studio.generation.conditioning import TextualInversion

    found = nets.found["xlstar"]
    with manager.lock:
        encoder = gen.prompt_encoder(manager.current, {"xlstar": TextualInversion("xlstar", found.vectors)}, 1,
                                     {"xlstar": TextualInversion("xlstar", found.vectors_g)})
        ours = encoder.encode(prompt)
    assert ours.used_embeddings == ["xlstar"]
    assert torch.allclose(ours.embeds, embeds, atol=1e-5)
    assert torch.allclose(ours.pooled, pooled, atol=1e-5)
    # in a prompt: used, with its A1111 hash in the infotext
    result = gen.run(_job(prompt))
    assert f'TI hashes: "xlstar: {found.hash}"' in result.images[0].infotext, result.images[0].infotext
    assert np.abs(np.asarray(result.images[0].image).astype(int) - _image(gen, _job(prompt.replace("xlstar", "")))
                  ).max() > 0


def test_sd1_embedding_on_sdxl_is_skipped_and_the_prompt_says_so(xl):
    manager, gen, cfg = xl
    save_file({"emb_params": torch.zeros(1, 768)}, str(cfg.embeddings_dir / "oldstyle.safetensors"))
    result = gen.run(_job("a cat, oldstyle"))
    assert any("oldstyle was not used: made for SD 1.x models" in note for note in result.notes), result.notes
