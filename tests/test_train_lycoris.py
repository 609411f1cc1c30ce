"""LyCORIS networks trained by the studio (LoCon, LoHa, LoKr, DoRA) on demo-tiny: peft's adapters written in LyCORIS'
keys (peft_to_lycoris_layers) merge through LoraSlot into exactly the weights peft's own merge makes, from random
factors (every layout: Tucker convs, full and decomposed Kronecker factors, DoRA on convs) and from real training runs,
with the metadata LyCORIS writes; weight 0 is the base model; LoHa and DoRA learn a fixed batch, and not at lr 1e-12;
a stopped and resumed LoHa run equals an uninterrupted one."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from test_lycoris_load import assert_same, module
from test_train_lora import falls, lora_job
from test_train_ti import home_cfg, run_main

from studio.files import lycoris
from studio.files.adapters import ActiveLora, LoraSlot
from studio.files.networks import NetworkLibrary, peft_to_lycoris_layers, save_kohya_network
from studio.models.tiny import build_tiny_pipeline
from studio.train.job import TrainJob
from studio.train.loop import Trainer
from studio.train.lora import ADAPTER, CONV_PATTERN, adapter_scaling

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
CONV = ["conv1", "conv2"]  # the ResNets' 3x3 convolutions (32->32, 32->64, 64->64 on demo-tiny)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def peft_merged(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module path) -> the weight peft's own merge makes of each adapted layer (merged in place)."""
    out = {}
    for component in COMPONENTS:
        for path, layer in getattr(getattr(pipe, component, None), "named_modules", list)():
            if isinstance(layer, BaseTunerLayer) and ADAPTER in layer.scaling:
                layer.merge(adapter_names=[ADAPTER])
                out[component, path] = layer.get_base_layer().weight.detach().clone()
    return out


def snapshot(pipe) -> dict:
    """The model's own weights (a LoCon file loads as peft layers: their base_layer, not their lora_ factors)."""
    return {(c, k.replace(".base_layer", "")): v.detach().clone() for c in COMPONENTS
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items() if ".lora_" not in k}


def through_slot(path, merged: dict, name: str, build=lambda: build_tiny_pipeline("sd1")):
    """The file loaded by name and merged by LoraSlot into a fresh demo-tiny: each layer's largest difference from
    peft's merge, and how far peft's merge moved the base (a check that there is something to compare)."""
    lora = NetworkLibrary(path.parent, path.parent / "embeddings").find_lora(name)
    pipe = build()
    base = snapshot(pipe)
    originals = {key: module(pipe, *key).weight.detach().clone() for key in merged}
    slot = LoraSlot(pipe)
    slot.apply([ActiveLora(lora, te=1.0, unet=1.0)])
    error = max((module(pipe, *key).weight - w).abs().max().item() for key, w in merged.items())
    moved = max((originals[key] - w).abs().max().item() for key, w in merged.items())
    slot.apply([ActiveLora(lora, te=0.0, unet=0.0)])  # <lora:NAME:0>: the base model, bit for bit
    assert_same(snapshot(pipe), base)
    slot.apply([])
    assert_same(snapshot(pipe), base)
    return lora, error, moved


def suffixes(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {lycoris.split_key(k)[1] for k in f.keys()}


# --- the converter, on random factors of every layout ---------------------------------------------------

HADA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
CONVERTER_CASES = {
    "loha": (LoHaConfig(r=4, alpha=2, target_modules=ATTN + CONV), HADA, "loha"),
    "loha-tucker": (LoHaConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=CONV),
                    HADA | {"hada_t1", "hada_t2"}, "loha"),
    # rank 8 on 32/64-wide layers: both Kronecker factors full, peft's scale 3/8 goes into lokr_w1
    "lokr-full": (LoKrConfig(r=8, alpha=3, target_modules=ATTN + CONV), {"lokr_w1", "lokr_w2", "alpha"}, "lokr"),
    "lokr-decomposed": (LoKrConfig(r=1, alpha=3, decompose_both=True, decompose_factor=4, target_modules=ATTN + CONV),
                        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"}, "lokr"),
    "lokr-tucker": (LoKrConfig(r=1, alpha=2, use_effective_conv2d=True, target_modules=CONV),
                    {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b", "alpha"}, "lokr"),
    "dora": (LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=ATTN + CONV),
             {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}, "locon+dora"),
    "locon": (LoraConfig(r=4, lora_alpha=2, target_modules=ATTN + CONV, rank_pattern={CONV_PATTERN: 2},
                         alpha_pattern={CONV_PATTERN: 5}), {"lora_down.weight", "lora_up.weight", "alpha"}, "locon"),
}


@pytest.mark.parametrize("case", list(CONVERTER_CASES))
def test_converted_random_adapters_merge_as_peft_merges_them(case, tmp_path):
    config, keys, algorithm = CONVERTER_CASES[case]
    pipe = build_tiny_pipeline("sd1")
    g = torch.Generator().manual_seed(len(case))
    pipe.unet.add_adapter(config, adapter_name=ADAPTER)
    if case == "loha":  # and the text encoder, as lora_te_
        pipe.text_encoder.add_adapter(LoHaConfig(r=2, alpha=1, target_modules=["q_proj", "out_proj"]),
                                      adapter_name=ADAPTER)
    layers = {}
    with torch.no_grad():
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if not hasattr(model, "peft_config"):
                continue
            for p in model.parameters():
                if p.requires_grad:  # every factor away from its initial zeros; DoRA's magnitude too
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
            layers[component] = peft_to_lycoris_layers(get_peft_model_state_dict(model, adapter_name=ADAPTER),
                                                       adapter_scaling(model))
    path = save_kohya_network(tmp_path / "loras" / f"{case}.safetensors", layers["unet"], layers.get("text_encoder"),
                              dtype=torch.float32)
    assert suffixes(path) == keys
    merged = peft_merged(pipe)
    lora, error, moved = through_slot(path, merged, case)
    assert lora.algorithm == algorithm  # (the family: demo-tiny's widths tell none, the metadata of a run does)
    assert moved > 0.01 and error < 1e-5, (moved, error)
    if case == "loha":
        assert any(c == "text_encoder" for c, _ in merged)
    if case == "dora":  # LyCORIS' per-output layout: [out, 1] for a Linear, [out, 1, 1, 1] for a conv
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith("dora_scale")}
        assert shapes["lora_unet_down_blocks_1_resnets_0_conv1.dora_scale"] == (64, 1, 1, 1)
        assert shapes["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.dora_scale"] == (64, 1)


# --- training runs: the written file is what peft trained ----------------------------------------------

RUNS = {
    "loha": (dict(network="loha", conv_rank=2, conv_alpha=1, train_text_encoder=True), HADA,
             {"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}, "loha"),
    "lokr-full": (dict(network="lokr"), {"lokr_w1", "lokr_w2", "alpha"}, {"algo": "lokr", "factor": "-1"}, "lokr"),
    "lokr-decomposed": (dict(network="lokr", rank=2, lokr_factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
                        {"algo": "lokr", "factor": "4"}, "lokr"),
    "dora": (dict(network="dora", conv_rank=2), {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
             {"algo": "lora", "conv_dim": "2", "conv_alpha": "2", "dora_wd": "True", "wd_on_output": "True"},
             "locon+dora"),
    "locon": (dict(network="locon"), {"lora_down.weight", "lora_up.weight", "alpha"},
              {"algo": "locon", "conv_dim": "4", "conv_alpha": "4"}, "locon"),
}


@pytest.mark.parametrize("case", list(RUNS))
def test_trained_network_file_has_lycoris_keys_and_merges_as_peft_does(case, tmp_path):
    changes, keys, args, algorithm = RUNS[case]
    cfg = home_cfg(tmp_path)
    trainer = Trainer(cfg)
    result = trainer.start(lora_job(name=case, max_steps=2, save_every=100, **changes))
    assert result.state == "finished", result.message
    assert suffixes(result.output) == keys
    with safe_open(str(result.output), framework="pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == args
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4" if case != "lokr-decomposed" else "2", "8.0")
    assert meta["studio.network"] == changes["network"]
    if "conv_dim" in args:  # the 3x3 convolutions, down kernels k x k for LoCon and DoRA
        assert any("resnets_0_conv1" in k for k in names) and any("downsamplers_0_conv" in k for k in names)
    if changes.get("train_text_encoder"):
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_") for k in names)
    # peft's own merge of what it trained (its factors rounded as the float16 file holds them) = the file's
    for model in trainer.method.modules.values():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.half().float()
    merged = peft_merged(trainer.pipe)
    lora, error, moved = through_slot(result.output, merged, case)
    assert lora.algorithm == algorithm and lora.family == "sd1"
    assert moved > 1e-4 and error < 1e-5, (moved, error)


def test_sdxl_loha_on_the_unet_and_both_text_encoders_merges_as_peft_does(tmp_path):
    """kohya's SDXL naming (original UNet names, lora_te1_ / lora_te2_) for a LyCORIS network too."""
    from studio.models.tiny import build_tiny_xl_pipeline

    trainer = Trainer(home_cfg(tmp_path))
    result = trainer.start(lora_job(model="demo-tiny-xl", name="xl-loha", network="loha", train_text_encoder=True,
                                    max_steps=1, batch_size=1, save_every=100))
    assert result.state == "finished", result.message
    with safe_open(str(result.output), framework="pt") as f:
        names, meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(".hada_w1_a") for k in names)
    assert any(k.startswith("lora_te1_") for k in names) and any(k.startswith("lora_te2_") for k in names)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and json.loads(meta["ss_network_args"])["algo"] == "loha"
    for model in trainer.method.modules.values():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.half().float()
    merged = peft_merged(trainer.pipe)
    assert {c for c, _ in merged} == {"unet", "text_encoder", "text_encoder_2"}
    lora, error, moved = through_slot(result.output, merged, "xl-loha", build_tiny_xl_pipeline)
    assert lora.family == "sdxl" and lora.algorithm == "loha"
    assert moved > 1e-4 and error < 1e-5, (moved, error)


def test_network_settings_are_validated_and_reach_the_peft_config():
    from studio.train.lora import network_config

    with pytest.raises(ValueError, match="network must be one of lora, locon, loha, lokr, dora"):
        lora_job(network="oft").validate()
    with pytest.raises(ValueError, match="for the LoRA method"):
        TrainJob(name="x", data="d", network="loha").validate()  # Textual Inversion trains no network
    with pytest.raises(ValueError, match="that is LoCon"):
        lora_job(conv_rank=4).validate()  # plain LoRA with a conv rank
    with pytest.raises(ValueError, match="conv alpha needs a conv rank"):
        lora_job(network="loha", conv_alpha=2).validate()
    with pytest.raises(ValueError, match="LoKr factor"):
        lora_job(network="loha", lokr_factor=4).validate()
    with pytest.raises(ValueError, match="LoKr factor must be -1"):
        lora_job(network="lokr", lokr_factor=0).validate()
    with pytest.raises(ValueError, match="diffusers' LoRA layout has no LoHa"):
        lora_job(network="loha", save_diffusers=True).validate()
    dora = lora_job(network="dora", conv_rank=2.0, conv_alpha=1, class_prompt="a room", class_images=2)
    dora.validate()  # DreamBooth-LoRA takes a network too
    assert dora.conv_rank == 2 and isinstance(dora.conv_rank, int) and dora.conv_dims == (2, 1.0)
    assert lora_job(network="locon").conv_dims == (4, 4.0) and lora_job(network="loha").conv_dims is None
    config = network_config(lora_job(network="lokr", rank=2, alpha=1, lokr_factor=4, conv_rank=3, dropout=0.1),
                            ATTN, convs=True)
    assert isinstance(config, LoKrConfig) and (config.r, config.alpha, config.decompose_factor) == (2, 1.0, 4)
    assert config.rank_dropout == 0.1 and config.rank_pattern == {CONV_PATTERN: 3}
    assert config.alpha_pattern == {CONV_PATTERN: 3.0} and {"conv1", "downsamplers.0.conv"} <= set(config.target_modules)
    assert network_config(lora_job(network="dora"), ATTN).use_dora
    text = network_config(lora_job(network="loha", conv_rank=3), ["q_proj"])  # no convolutions in a text encoder
    assert isinstance(text, LoHaConfig) and not text.rank_pattern and set(text.target_modules) == {"q_proj"}


# --- learning ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["loha", "dora"])
def test_loss_on_a_fixed_batch_falls_and_not_at_a_vanishing_rate(network, tmp_path):
    result = Trainer(home_cfg(tmp_path)).start(lora_job(network=network, max_steps=20, overfit_batches=1,
                                                        save_every=100))
    assert result.state == "finished", result.message
    assert falls(result.losses, 0.8), result.losses
    still = Trainer(home_cfg(tmp_path, "still")).start(lora_job(network=network, max_steps=4, overfit_batches=1,
                                                                save_every=100, learning_rate="1e-12"))
    assert abs(still.losses[-1] - still.losses[0]) < 1e-3 * still.losses[0], still.losses


def test_loha_stop_and_resume_with_rank_dropout_equals_an_uninterrupted_run(tmp_path):
    settings = dict(network="loha", max_steps=4, save_every=2, dropout=0.3, conv_rank=2)
    whole = Trainer(home_cfg(tmp_path, "a")).start(lora_job(**settings))
    cfg = home_cfg(tmp_path, "b")
    cancel = threading.Event()
    stopped = Trainer(cfg, cancel=cancel, on_event=lambda k, i: cancel.set() if k == "loss" and i["step"] == 2
                      else None).start(lora_job(**settings))
    assert stopped.state == "stopped" and stopped.step == 2
    resumed = Trainer(cfg).resume(stopped.run_dir)
    assert resumed.step == 4
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-5)
    with safe_open(str(whole.output), framework="pt") as a, safe_open(str(resumed.output), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.allclose(a.get_tensor(key).float(), b.get_tensor(key).float(), atol=1e-3), key


def test_cli_trains_a_lokr_with_its_flags(tmp_path, monkeypatch, capsys):
    cfg = home_cfg(tmp_path)
    out = run_main(["train", "lora", "--data", "stripes", "--name", "kron", "--steps", "1", "--resolution", "64",
                    "--batch-size", "1", "--preview-every", "0", "--network", "lokr", "--rank", "2", "--conv-rank",
                    "2", "--conv-alpha", "1", "--lokr-factor", "4"], tmp_path / "home", monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    path = cfg.loras_dir / "kron.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1", "factor": "4"}
    assert "lokr_w2_b" in suffixes(path)
    bad = run_main(["train", "lora", "--data", "stripes", "--name", "bad", "--steps", "1", "--conv-rank", "2"],
                   tmp_path / "home", monkeypatch, capsys)
    assert bad.returncode == 2 and "that is LoCon" in bad.stderr
