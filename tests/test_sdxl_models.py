"""SDXL loading: demo-tiny-xl, the SGM single-file layout both ways, diffusers folders, offline configs, refusals."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.files.convert import CONFIG_METADATA_KEY, family_of, save_diffusers_folder, save_single_file
from studio.models.checkpoints import (
    XL_REFINER_MESSAGE,
    ModelLoadError,
    detect_family,
    family_info,
    prediction_hint,
    require_family,
    zero_snr_hint,
)
from studio.models.manager import HUB_PATTERNS, ModelManager, expected_shapes
from studio.models.tiny import SDXL_SCHEDULER, TINY_XL_NAME, build_tiny_pipeline
from studio.models.tokenizer import family_tokenizers

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "configs" / "sdxl"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def xl_pipe():
    return build_tiny_pipeline("sdxl")


@pytest.fixture(scope="module")
def xl_file(xl_pipe, tmp_path_factory):
    return save_single_file(xl_pipe, tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors", "sdxl")


def same_weights(a, b) -> None:
    for name in PARTS:
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert x.keys() == y.keys(), name
        for key in x:
            assert not y[key].is_meta and torch.equal(x[key], y[key]), f"{name}.{key}"


def render(pipe) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)
    return pipe("a red apple", num_inference_steps=2, height=64, width=64, generator=generator,
                output_type="np").images


def test_demo_tiny_xl_is_built_in_deterministic_and_sdxl(studio_cfg):
    manager = ModelManager(studio_cfg)
    assert TINY_XL_NAME in manager.choices() and manager.default_choice() != TINY_XL_NAME
    model = manager.load(TINY_XL_NAME)
    assert (model.name, model.source, model.family, model.prediction_type) == (TINY_XL_NAME, "demo", "sdxl", "epsilon")
    assert model.is_demo and model.is_xl and model.native_size == 64
    assert model.family_info == family_info("sdxl") and model.family_info.label == "SDXL"
    assert isinstance(model.pipe, StableDiffusionXLPipeline) and family_of(model.pipe) == "sdxl"
    unet = model.pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert unet.cross_attention_dim == (model.pipe.text_encoder.config.hidden_size
                                        + model.pipe.text_encoder_2.config.hidden_size)
    assert unet.projection_class_embeddings_input_dim == (6 * unet.addition_time_embed_dim
                                                          + model.pipe.text_encoder_2.config.projection_dim)
    assert model.pipe.text_encoder_2.config.hidden_act == "gelu"
    assert type(model.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert model.pipe.tokenizer.pad_token_id == 49407 and model.pipe.tokenizer_2.pad_token_id == 0
    same_weights(model.pipe, build_tiny_pipeline("sdxl"))
    assert model.hash_ == ModelManager(studio_cfg).open(TINY_XL_NAME).hash_
    assert render(model.pipe).shape == (1, 64, 64, 3)  # diffusers' own SDXL pipeline runs on it
    # the memory options do not break on an SDXL pipeline
    assert manager.set_memory_options(True, True, True).startswith("memory options applied")
    assert model.pipe.vae.use_tiling and render(model.pipe).shape == (1, 64, 64, 3)
    manager.set_memory_options(False, False, False)


def test_single_file_layout_and_metadata(xl_pipe, xl_file):
    checkpoint = load_file(xl_file)
    # (diffusers tells xl_base by resblocks.9, which 3 tiny layers lack; test_convert checks the real architecture)
    assert sfu.is_clip_sdxl_model(checkpoint) and sfu.is_open_clip_sdxl_model(checkpoint)
    assert not any(k.startswith(("cond_stage_model.", "v_pred", "ztsnr")) for k in checkpoint)
    assert "model.diffusion_model.label_emb.0.0.weight" in checkpoint
    assert any(k.startswith("first_stage_model.decoder.up.0.") for k in checkpoint)
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in checkpoint
    g = "conditioner.embedders.1.model."
    te2 = xl_pipe.text_encoder_2.state_dict()
    width = xl_pipe.text_encoder_2.config.hidden_size
    assert checkpoint[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * width, width)
    assert torch.equal(checkpoint[g + "transformer.resblocks.0.attn.in_proj_bias"][width:2 * width],
                       te2["text_model.encoder.layers.0.self_attn.k_proj.bias"])
    assert torch.equal(checkpoint[g + "text_projection"], te2["text_projection.weight"].T)  # OpenCLIP: x @ P
    for key in ("positional_embedding", "token_embedding.weight", "ln_final.weight", "ln_final.bias"):
        assert g + key in checkpoint, key
    assert not any(k.startswith("conditioner.embedders.1.model.transformer.text_model") for k in checkpoint)
    with safe_open(str(xl_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert set(json.loads(meta[CONFIG_METADATA_KEY])) == {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler"}


def test_single_file_loads_offline_bit_for_bit_and_converts_to_the_same_file(studio_cfg, no_network, xl_pipe,
                                                                                xl_file, tmp_path):
    shutil.copy(xl_file, studio_cfg.models_dir / "xl.safetensors")
    manager = ModelManager(studio_cfg)
    model = manager.load("xl.safetensors")
    assert (model.source, model.family, model.prediction_type, model.native_size) == ("single-file", "sdxl",
                                                                                      "epsilon", 64)
    assert isinstance(model.pipe, StableDiffusionXLPipeline) and model.is_xl
    same_weights(xl_pipe, model.pipe)
    assert type(model.pipe.scheduler) is type(xl_pipe.scheduler)
    settings = [{k: v for k, v in p.scheduler.config.items() if not k.startswith("_")} for p in (model.pipe, xl_pipe)]
    assert settings[0] == settings[1]
    again = save_single_file(model.without_loras(), tmp_path / "again.safetensors", "sdxl")
    a, b = load_file(xl_file), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_file_loads_in_diffusers_own_single_file_loader(xl_pipe, xl_file, tmp_path, no_network):
    folder = save_diffusers_folder(xl_pipe, tmp_path / "folder")
    configs = tmp_path / "configs"  # configs only: a missing weight could not quietly come from the folder
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    reloaded = StableDiffusionXLPipeline.from_single_file(str(xl_file), config=str(configs), local_files_only=True,
                                                          **family_tokenizers("sdxl"), add_watermarker=False)
    reloaded.set_progress_bar_config(disable=True)
    same_weights(xl_pipe, reloaded)
    assert np.abs(render(xl_pipe) - render(reloaded)).max() <= 1 / 255


def test_diffusers_folder_loads(studio_cfg, xl_pipe, no_network):
    save_diffusers_folder(xl_pipe, studio_cfg.models_dir / "xl-folder")
    model = ModelManager(studio_cfg).load("xl-folder")
    assert (model.source, model.family, model.native_size) == ("diffusers", "sdxl", 64)
    same_weights(xl_pipe, model.pipe)


def test_cli_converts_demo_tiny_xl(studio_cfg, monkeypatch, capsys, tmp_path):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(studio_cfg.models_dir.parent))
    out = tmp_path / "cli-xl.safetensors"
    assert main(["convert", "--model", TINY_XL_NAME, "--to", "single-file", "--out", str(out)]) == 0
    assert ModelManager(studio_cfg).load(str(out)).family == "sdxl"
    assert main(["models"]) == 0
    assert "demo-tiny-xl\tbuilt-in" in capsys.readouterr().out


def test_hub_id_offline_names_the_local_alternatives(studio_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert {"text_encoder_2/model.safetensors", "tokenizer_2/*"} <= set(HUB_PATTERNS)
    with pytest.raises(ModelLoadError, match="offline.*demo-tiny-xl"):
        ModelManager(studio_cfg).load("stabilityai/stable-diffusion-xl-base-1.0")


# --- what is refused ---------------------------------------------------------------------------------------------


def test_refiner_file_and_folder_are_refused(studio_cfg):
    refiner = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 2560),
               "conditioner.embedders.0.model.positional_embedding": torch.zeros(77, 8),
               "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}
    save_file(refiner, str(studio_cfg.models_dir / "refiner.safetensors"))
    with pytest.raises(ModelLoadError, match=XL_REFINER_MESSAGE):
        ModelManager(studio_cfg).load("refiner.safetensors")
    folder = studio_cfg.models_dir / "refiner-folder"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(ModelLoadError, match=XL_REFINER_MESSAGE):
        ModelManager(studio_cfg).load("refiner-folder")


@pytest.mark.parametrize("keys, message", [
    ({"model.diffusion_model.label_emb.0.0.weight": (1536, 2560), "conditioner.embedders.0.transformer.a": (1,),
      "conditioner.embedders.1.model.a": (1,)}, "refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3), "conditioner.embedders.0.transformer.a": (1,),
      "conditioner.embedders.1.model.a": (1,)}, "8 input channels"),  # instruct-pix2pix; 9 (inpainting) loads
    ({"model.diffusion_model.a": (1,), "conditioner.embedders.1.model.a": (1,)}, "lacks the CLIP ViT-L"),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 8)}, "LoRA.*loras/"),
    ({"encoder.conv_in.weight": (1,), "decoder.conv_out.weight": (1,)}, "VAE"),
])
def test_detect_family_refusals(keys, message):
    with pytest.raises(ModelLoadError, match=message):
        detect_family(keys, "x.safetensors")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_of_sdxl_keys_is_refused_never_run(studio_cfg, tmp_path):
    marker = tmp_path / "pwned"
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
             "conditioner.embedders.0.transformer.text_model.x": torch.zeros(1),
             "conditioner.embedders.1.model.token_embedding.weight": _Payload(str(marker))}
    with open(studio_cfg.models_dir / "evil-xl.ckpt", "wb") as f:
        pickle.dump({"state_dict": state}, f)
    torch.save({"state_dict": state}, studio_cfg.models_dir / "evil-xl-zip.ckpt")
    for name in ("evil-xl.ckpt", "evil-xl-zip.ckpt"):
        with pytest.raises(ModelLoadError, match="refused"):
            ModelManager(studio_cfg).load(name)
    assert not marker.exists()


def test_lying_sdxl_files_are_refused_with_the_weight_named(studio_cfg, xl_file):
    tensors = load_file(xl_file)
    with safe_open(str(xl_file), framework="pt") as f:
        meta = f.metadata()
    manager = ModelManager(studio_cfg)

    def refused(name, tensors, metadata, message):
        save_file(tensors, str(studio_cfg.models_dir / name), metadata=metadata)
        with pytest.raises(ModelLoadError, match=message):
            manager.load(name)

    # without our configs it is taken for SDXL base, whose shapes it does not have
    no_config = {k: v for k, v in meta.items() if k != CONFIG_METADATA_KEY}
    refused("plain.safetensors", tensors, no_config,
            r"input_blocks.0.0.weight has shape \(32, 4, 3, 3\), but SDXL base has \(320, 4, 3, 3\)")
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    refused("shape.safetensors", dict(tensors, **{key: torch.zeros(10, 64)}), meta, rf"{key} has shape \(10, 64\)")
    gone = "model.diffusion_model.out.2.weight"
    refused("short.safetensors", {k: v for k, v in tensors.items() if k != gone}, meta, f"lacks 1 weight.*{gone}")
    refused("meta.safetensors", tensors, dict(meta, **{CONFIG_METADATA_KEY: json.dumps({"unet": {}})}), "KeyError")


def test_the_shipped_configs_describe_sdxl_base():
    shapes = expected_shapes(ASSETS)
    assert len(shapes) == 2513  # UNet 1680, VAE 248, CLIP ViT-L 196, OpenCLIP bigG 389
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert detect_family(shapes) == "sdxl"
    vae = json.loads((ASSETS / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["force_upcast"], vae["sample_size"]) == (0.13025, True, 1024)
    assert json.loads((ASSETS / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    scheduler = json.loads((ASSETS / "scheduler" / "scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in SDXL_SCHEDULER} == SDXL_SCHEDULER  # demo-tiny-xl samples like SDXL base


# --- v-prediction and zero terminal SNR ---------------------------------------------------------------------------


@pytest.mark.parametrize("sidecar, zero_snr", [
    ('model:\n  params:\n    parameterization: "v"\n', False),
    ("model:\n  params:\n    parameterization: v\n    zero_terminal_snr: true\n", True),
    ("denoiser_config:\n  params:\n    scaling_config:\n      target: sgm.modules.diffusionmodules.denoiser_scaling"
     ".VScaling\n", False),
])
def test_v_prediction_sidecar_is_honoured(studio_cfg, xl_file, sidecar, zero_snr):
    path = shutil.copy(xl_file, studio_cfg.models_dir / "v.safetensors")
    Path(path).with_suffix(".yaml").write_text(sidecar)
    model = ModelManager(studio_cfg).load("v.safetensors")
    config = model.pipe.scheduler.config
    assert model.prediction_type == config.prediction_type == "v_prediction"
    assert bool(config.get("rescale_betas_zero_snr")) == zero_snr
    assert config.timestep_spacing == ("trailing" if zero_snr else "leading")


def test_v_prediction_ztsnr_pipeline_round_trips_with_comfyui_markers(studio_cfg):
    pipe = build_tiny_pipeline("sdxl")
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                                rescale_betas_zero_snr=True, timestep_spacing="trailing")
    path = save_single_file(pipe, studio_cfg.models_dir / "vz.safetensors", "sdxl")
    checkpoint = load_file(path)
    assert checkpoint["v_pred"].numel() == 0 and checkpoint["ztsnr"].numel() == 0
    model = ModelManager(studio_cfg).load("vz.safetensors")
    assert model.prediction_type == "v_prediction"
    assert model.pipe.scheduler.config.rescale_betas_zero_snr
    # the markers alone say so too, as ComfyUI reads them
    keys = {"v_pred": (0,), "ztsnr": (0,)}
    assert prediction_hint(path.with_name("none.safetensors"), {}, keys) == "v_prediction"
    assert zero_snr_hint(path.with_name("none.safetensors"), {}, keys)


@pytest.mark.parametrize("meta, pred, zero_snr", [
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.prediction_type": "v"}, "v_prediction",
     False),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.prediction_type": "epsilon"}, "epsilon",
     False),
    ({"modelspec.prediction_type": "v_prediction", "ss_zero_terminal_snr": "True"}, "v_prediction", True),
    ({}, None, False),
])
def test_modelspec_hints(tmp_path, meta, pred, zero_snr):
    path = tmp_path / "m.safetensors"
    assert prediction_hint(path, meta) == pred
    assert zero_snr_hint(path, meta) == zero_snr


# --- the family API ----------------------------------------------------------------------------------------------


def test_require_family_refuses_what_code_cannot_handle_yet(studio_cfg):
    model = ModelManager(studio_cfg).open(TINY_XL_NAME)
    with pytest.raises(ValueError, match="generating with SDXL models is not supported yet.*SD 1.x or SD 2.x"):
        require_family(model, ("sd1", "sd2"), "generating")
    require_family(model, ("sd1", "sd2", "sdxl"), "generating")
    require_family("sd1", ("sd1", "sd2"), "training")
    assert family_info("sd1").text_encoders == ("text_encoder",) and not family_info("sd2").is_xl
    assert family_info("sdxl").tokenizers == ("tokenizer", "tokenizer_2")
    with pytest.raises(ValueError, match="unknown model family"):
        family_info("sd3")
