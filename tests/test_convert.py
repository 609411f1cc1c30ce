"""studio.convert: diffusers folder and original-layout single file, checked against diffusers' own loader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from studio.files.convert import (
    CONFIG_METADATA_KEY,
    UNET_PREFIX,
    VAE_PREFIX,
    family_of,
    modelspec_architecture,
    pipeline_to_original,
    save_diffusers_folder,
    save_single_file,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
)

COMPONENTS = ("unet", "vae", "text_encoder")
PIPES = {"sd1": "tiny_pipe", "sd2": "tiny_pipe_sd2"}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, tmp_path_factory):
    """A tiny pipeline saved both ways, and reloaded from the single file by diffusers itself."""
    family = request.param
    pipe = request.getfixturevalue(PIPES[family])
    root = tmp_path_factory.mktemp(f"convert-{family}")
    folder = save_diffusers_folder(pipe, root / "diffusers")
    file = save_single_file(pipe, root / "model.safetensors", family)
    # configs only: were a component missing from the file, diffusers would fail instead of quietly
    # falling back to the folder's own weights
    configs = root / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    reloaded = StableDiffusionPipeline.from_single_file(
        str(file), config=str(configs), local_files_only=True, safety_checker=None
    )
    reloaded.set_progress_bar_config(disable=True)
    return dict(family=family, pipe=pipe, folder=folder, file=file, reloaded=reloaded)


def test_diffusers_folder_holds_the_pipeline(exported):
    folder = exported["folder"]
    assert (folder / "model_index.json").is_file()
    for name in COMPONENTS:
        assert list((folder / name).glob("*.safetensors")), name
    assert not list(folder.parent.glob(".*.tmp")), "a temporary file or folder was left behind"


def test_round_trip_through_diffusers_single_file_loader(exported):
    pipe, reloaded = exported["pipe"], exported["reloaded"]
    for name in COMPONENTS:
        original = getattr(pipe, name).state_dict()
        loaded = getattr(reloaded, name).state_dict()
        assert loaded.keys() == original.keys(), name
        for key, tensor in original.items():
            assert not loaded[key].is_meta, f"{name}.{key} was never loaded"
            assert torch.equal(loaded[key], tensor), f"{name}.{key} differs"


def test_same_seed_gives_the_same_image(exported):
    def render(p):
        generator = torch.Generator("cpu").manual_seed(1234)
        kwargs = dict(num_inference_steps=3, height=64, width=64, generator=generator, output_type="np")
        return p("a red apple", **kwargs).images

    before, after = render(exported["pipe"]), render(exported["reloaded"])
    assert before.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(before, after)


def test_single_file_key_layout(exported):
    family = exported["family"]
    checkpoint = load_file(exported["file"])
    assert "model.diffusion_model.input_blocks.0.0.weight" in checkpoint
    assert "model.diffusion_model.time_embed.0.weight" in checkpoint
    assert "model.diffusion_model.out.2.weight" in checkpoint
    assert any(k.startswith("first_stage_model.decoder.up.0.") for k in checkpoint)
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    # the tiny UNet's cross-attention is 32 wide, not 768/1024, so the model type is told by the text encoder
    assert sfu.infer_diffusers_model_type(checkpoint) == "v1"
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in checkpoint
        assert sfu.is_clip_model(checkpoint) and not sfu.is_open_clip_model(checkpoint)
    else:
        assert "cond_stage_model.model.token_embedding.weight" in checkpoint
        assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in checkpoint
        assert sfu.is_open_clip_model(checkpoint) and not sfu.is_clip_model(checkpoint)
        assert not any(k.startswith("cond_stage_model.transformer.") for k in checkpoint)
    assert all(t.is_contiguous() for t in checkpoint.values())


def test_metadata(exported):
    pipe = exported["pipe"]
    with safe_open(exported["file"], framework="pt") as f:
        meta = f.metadata()
    expected = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512"}[exported["family"]]
    assert meta["modelspec.architecture"] == expected
    config = json.loads(meta[CONFIG_METADATA_KEY])
    assert set(config) == {"unet", "vae", "text_encoder", "scheduler"}
    assert config["unet"]["block_out_channels"] == list(pipe.unet.config.block_out_channels)
    assert config["vae"]["latent_channels"] == 4
    assert config["text_encoder"]["hidden_act"] == pipe.text_encoder.config.hidden_act
    assert config["scheduler"]["beta_schedule"] == "scaled_linear"
    assert UNet2DConditionModel.from_config(config["unet"]).config.layers_per_block == 2


def test_modelspec_architecture_follows_prediction_type():
    assert modelspec_architecture("sd1", "epsilon") == "stable-diffusion-v1"
    assert modelspec_architecture("sd2", "epsilon") == "stable-diffusion-v2-512"
    assert modelspec_architecture("sd2", "v_prediction") == "stable-diffusion-v2-768-v"


def test_family_of(tiny_pipe, tiny_pipe_sd2):
    assert family_of(tiny_pipe) == "sd1"
    assert family_of(tiny_pipe_sd2) == "sd2"


def test_half_precision_file_and_user_metadata(tiny_pipe, tmp_path):
    path = save_single_file(
        tiny_pipe, tmp_path / "half.safetensors", "sd1", metadata={"studio.note": "hi"}, dtype=torch.float16
    )
    checkpoint = load_file(path)
    assert {t.dtype for t in checkpoint.values()} == {torch.float16}
    original = pipeline_to_original(tiny_pipe, "sd1")
    assert checkpoint.keys() == original.keys()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(checkpoint[key], original[key].half())
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["studio.note"] == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.safetensors"]


def test_unknown_family_is_refused(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="sd3"):
        text_encoder_to_original(tiny_pipe.text_encoder.state_dict(), "sd3")
    with pytest.raises(ValueError, match="sdxl"):
        pipeline_to_original(tiny_pipe, "sdxl")
    with pytest.raises(ValueError, match="sd3"):
        save_single_file(tiny_pipe, tmp_path / "x.safetensors", "sd3")
    assert not list(tmp_path.iterdir())


def test_family_mismatch_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="sd2"):
        pipeline_to_original(tiny_pipe, "sd2")


def test_unplaceable_weights_are_named_not_dropped(tiny_pipe):
    unet = dict(tiny_pipe.unet.state_dict(), **{"add_embedding.linear_1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="add_embedding.linear_1.weight"):
        unet_to_original(unet, dict(tiny_pipe.unet.config))
    vae = dict(tiny_pipe.vae.state_dict(), **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        vae_to_original(vae, dict(tiny_pipe.vae.config))
    te = dict(tiny_pipe.text_encoder.state_dict(), **{"pooler.weight": torch.zeros(1)})
    for family in ("sd1", "sd2"):
        with pytest.raises(ValueError, match="pooler.weight"):
            text_encoder_to_original(te, family)


def test_bad_metadata_is_refused_before_writing(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="steps"):
        save_single_file(tiny_pipe, tmp_path / "x.safetensors", "sd1", metadata={"steps": 100})
    assert not list(tmp_path.iterdir())


# Real architectures, built on the meta device: no weights, no download, only shapes and names.
SD15_UNET = dict(
    sample_size=64,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21_UNET = dict(
    SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True
)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
)


@pytest.mark.parametrize("unet_config, model_type", [(SD15_UNET, "v1"), (SD21_UNET, "v2")])
def test_real_architecture_key_names(unet_config, model_type):
    with init_empty_weights():
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**SD_VAE)
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    unet_orig = unet_to_original(unet_sd, dict(unet.config))
    vae_orig = vae_to_original(vae_sd, dict(vae.config))
    assert len(unet_orig) == len(unet_sd) == 686  # the key count of the released SD 1.5 / 2.1 UNets
    assert len(vae_orig) == len(vae_sd) == 248
    for key in (
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.11.0.emb_layers.1.weight",
        "middle_block.0.out_layers.3.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.in_layers.0.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.proj_out.weight",
        "output_blocks.11.0.skip_connection.weight",
        "out.2.weight",
    ):
        assert key in unet_orig, key
    assert not any(
        k.startswith(("input_blocks.12.", "output_blocks.12.", "output_blocks.11.2.")) for k in unet_orig
    )
    for key in (
        "decoder.up.3.block.0.conv1.weight",
        "decoder.up.3.upsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.attn_1.q.weight",
        "decoder.mid.block_2.conv2.weight",
        "encoder.norm_out.weight",
        "post_quant_conv.weight",
    ):
        assert key in vae_orig, key
    assert vae_orig["encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    # the LDM decoder counts levels from full resolution: up.0 is the 128-channel level
    assert vae_orig["decoder.up.0.block.0.conv1.weight"].shape[0] == 128
    assert "decoder.up.0.upsample.conv.weight" not in vae_orig

    # diffusers' own converter must place every name back, with the same shape
    checkpoint = {UNET_PREFIX + k: v for k, v in unet_orig.items()} | {
        VAE_PREFIX + k: v for k, v in vae_orig.items()
    }
    assert sfu.infer_diffusers_model_type(checkpoint) == model_type
    back = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet_sd.items()}
    back = sfu.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae_sd.items()}


def test_real_sd2_text_encoder_layout():
    # diffusers' SD 2.x text encoder: OpenCLIP ViT-H's 24 layers less the last (SD 2 uses the penultimate)
    config = CLIPTextConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
    )
    with init_empty_weights():
        te = CLIPTextModel(config)
    orig = text_encoder_to_original(te.state_dict(), "sd2")
    p = "cond_stage_model.model."
    assert orig[p + "transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
    assert orig[p + "transformer.resblocks.22.attn.in_proj_bias"].shape == (3072,)
    assert orig[p + "positional_embedding"].shape == (77, 1024)
    assert orig[p + "text_projection"].shape == (1024, 1024)
    assert p + "transformer.resblocks.23.ln_1.weight" not in orig
    for key in (
        "ln_final.weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.0.ln_2.bias",
    ):
        assert p + key in orig, key
    # 16 tensors per HF layer become 12 (q, k, v fused), plus embeddings, final norm and the projection
    assert len(orig) == 23 * 12 + 2 + 2 + 1


def test_sd1_text_encoder_layout(tiny_pipe):
    orig = text_encoder_to_original(tiny_pipe.text_encoder.state_dict(), "sd1")
    assert len(orig) == len(tiny_pipe.text_encoder.state_dict())
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in orig)
    assert "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc2.weight" in orig


def test_real_sdxl_architecture_key_names():
    """SDXL base from the shipped configs, on the meta device: the SGM names, and diffusers' converter agrees."""
    from pathlib import Path
    from types import SimpleNamespace

    from transformers import CLIPTextModelWithProjection

    configs = Path(__file__).resolve().parent.parent / "assets" / "configs" / "sdxl"

    def config(part):
        return json.loads((configs / part / "config.json").read_text())

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2")))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # the released SDXL base UNet
    pipe = SimpleNamespace(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2)
    checkpoint = pipeline_to_original(pipe, "sdxl")
    unet_keys = [k for k in checkpoint if k.startswith(UNET_PREFIX)]
    assert len(unet_keys) == len(unet.state_dict()) == 1680
    for key in (
        "label_emb.0.0.weight",
        "label_emb.0.2.bias",
        "input_blocks.3.0.op.weight",
        "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
    ):
        assert UNET_PREFIX + key in checkpoint, key
    assert checkpoint[UNET_PREFIX + "label_emb.0.0.weight"].shape == (1280, 2816)
    assert not any(k.startswith((UNET_PREFIX + "output_blocks.8.1", UNET_PREFIX + "output_blocks.8.2"))
                   for k in checkpoint)
    g = "conditioner.embedders.1.model."
    assert checkpoint[g + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert checkpoint[g + "text_projection"].shape == (1280, 1280)
    assert checkpoint[g + "positional_embedding"].shape == (77, 1280)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in checkpoint
    assert sfu.infer_diffusers_model_type(checkpoint) == "xl_base"
    back = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    back = sfu.convert_open_clip_checkpoint(te2, checkpoint, prefix=g)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in te2.state_dict().items()}
