"""IP-Adapter image prompts (studio.generation.ip_adapter): diffusers' StableDiffusionPipeline with load_ip_adapter
as the oracle, on demo-tiny with a tiny IP-Adapter and a tiny CLIP image encoder built here and saved in exactly
the layout diffusers' loader reads (NAME.safetensors with image_proj.* / ip_adapter.* keys, image_encoder/)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from studio.config import StudioConfig
from studio.files.names import UnsafeNameError
from studio.generation import samplers
from studio.generation.denoise import initial_latents
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext
from studio.generation.ip_adapter import (
    IPAdapterError,
    IPAdapterUnit,
    list_ip_adapters,
    parse_ip_flags,
    read_ip_adapter,
)
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager

SIZE = 64
PROJECTION, HIDDEN = 16, 32  # the tiny encoder's image embeds and hidden states


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8))


def tiny_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=37, projection_dim=PROJECTION, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=8)).eval()


def _hidden_size(unet, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return list(reversed(channels))[block] if name.startswith("up_blocks") else channels[block]


def tiny_ip_state(unet, kind: str = "plain", seed: int = 0, width: int | None = None) -> dict:
    """Flat `image_proj.*` / `ip_adapter.*` tensors in h94's original layout for `unet` (key ids 1, 3, 5, ... over
    its cross-attention processors, as diffusers numbers them)."""
    g = torch.Generator().manual_seed(seed)
    cross = width or int(unet.config.cross_attention_dim)

    def rand(*shape, s=0.5):
        return torch.randn(*shape, generator=g) * s

    out = {}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        out[f"ip_adapter.{key}.to_k_ip.weight"] = rand(hidden, cross)
        out[f"ip_adapter.{key}.to_v_ip.weight"] = rand(hidden, cross)
        key += 2
    if kind == "plain":
        out.update({"image_proj.proj.weight": rand(4 * cross, PROJECTION), "image_proj.proj.bias": rand(4 * cross),
                    "image_proj.norm.weight": 1 + rand(cross, s=0.1), "image_proj.norm.bias": rand(cross, s=0.1)})
    else:  # Plus: the resampler (4 layers, one head of 64, 4 queries), from diffusers' module in the original names
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        torch.manual_seed(seed)
        module = IPAdapterPlusImageProjection(embed_dims=HIDDEN, output_dims=cross, hidden_dims=32, heads=1,
                                              num_queries=4)
        state = module.state_dict()
        for k, v in state.items():
            parts = k.split(".")
            if parts[0] != "layers":
                out[f"image_proj.{k}"] = v
                continue
            i, rest = parts[1], ".".join(parts[2:])
            names = {"ln0.weight": "0.norm1.weight", "ln0.bias": "0.norm1.bias", "ln1.weight": "0.norm2.weight",
                     "ln1.bias": "0.norm2.bias", "attn.to_q.weight": "0.to_q.weight",
                     "attn.to_out.0.weight": "0.to_out.weight", "ff.0.weight": "1.0.weight", "ff.0.bias": "1.0.bias",
                     "ff.1.net.0.proj.weight": "1.1.weight", "ff.1.net.2.weight": "1.3.weight"}
            if rest == "attn.to_k.weight":
                out[f"image_proj.layers.{i}.0.to_kv.weight"] = torch.cat([v, state[k.replace("to_k", "to_v")]])
            elif rest in names:
                out[f"image_proj.layers.{i}.{names[rest]}"] = v
    return {k: v.contiguous() for k, v in out.items()}


def home(tmp_path_factory) -> StudioConfig:
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(generator, ipadapter folder): demo-tiny, a plain and a Plus adapter for it, one image encoder."""
    cfg = home(tmp_path_factory)
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    folder = tmp_path_factory.mktemp("ipadapter")
    unet = manager.current.pipe.unet
    save_file(tiny_ip_state(unet, "plain"), str(folder / "tiny.safetensors"))
    save_file(tiny_ip_state(unet, "plus", seed=1), str(folder / "tiny-plus.safetensors"))
    tiny_encoder().save_pretrained(folder / "image_encoder")
    return Generator(manager, ipadapter_dir=folder), folder


def job(**kw) -> GenerateJob:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=5, width=SIZE, height=SIZE, seed=7,
                sampler="DPM++ 2M", schedule="Automatic")
    return GenerateJob(**{**base, **kw})


def unit(name="tiny", images=None, **kw) -> IPAdapterUnit:
    return IPAdapterUnit(name, images if images is not None else [picture(1)], **kw)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(int)


def diffusers_image(gen: Generator, folder, j: GenerateJob, weight_name: str, images, scale: float) -> np.ndarray:
    """The job through StableDiffusionPipeline + load_ip_adapter(folder, weight_name, image_encoder/) on a copy of
    the studio's UNet, from the studio's latents and prompt embeddings."""
    model = gen.manager.current
    pipe = model.pipe
    with gen.manager.lock:
        cond, uncond, _ = gen.encode(j, model)
    scheduler = samplers.make_scheduler(j.sampler, j.schedule, dict(pipe.scheduler.config), seed=j.seed)
    ref = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                  unet=copy.deepcopy(pipe.unet), scheduler=scheduler, safety_checker=None,
                                  feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder="image_encoder",
                        local_files_only=True)
    ref.set_ip_adapter_scale(scale)
    latents = initial_latents(pipe, [j.seed], SIZE, SIZE)
    out = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=latents, height=SIZE, width=SIZE,
              num_inference_steps=j.steps, guidance_scale=j.cfg_scale, ip_adapter_image=images,
              output_type="pil").images[0]
    return np.asarray(out).astype(int)


@pytest.mark.parametrize("name, scale", [("tiny", 1.0), ("tiny", 0.6), ("tiny-plus", 1.0)])
def test_equals_diffusers_load_ip_adapter(setup, name, scale):
    gen, folder = setup
    j = job(ip_adapters=[unit(name, scale=scale)])
    ours = pixels(gen.run(j))
    ref = diffusers_image(gen, folder, job(), f"{name}.safetensors", picture(1), scale)
    assert np.abs(ours - ref).max() <= 1
    assert np.abs(ours - pixels(gen.run(job()))).mean() > 2  # and the adapter did change the image


def test_two_pictures_as_diffusers_takes_a_list(setup):
    gen, folder = setup
    ours = pixels(gen.run(job(ip_adapters=[unit(images=[picture(1), picture(2)])])))
    ref = diffusers_image(gen, folder, job(), "tiny.safetensors", [[picture(1), picture(2)]], 1.0)
    assert np.abs(ours - ref).max() <= 1
    one = pixels(gen.run(job(ip_adapters=[unit(images=[picture(1)])])))
    assert np.abs(ours - one).mean() > 1


def test_scale_zero_and_outside_the_window_is_no_adapter_and_the_pipe_is_restored(setup):
    gen, _ = setup
    pipe = gen.manager.current.pipe
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    before = pixels(gen.run(job()))
    with_adapter = pixels(gen.run(job(ip_adapters=[unit(scale=1.0)])))
    assert np.abs(with_adapter - before).mean() > 2
    assert np.array_equal(pixels(gen.run(job(ip_adapters=[unit(scale=0.0)]))), before)
    # 5 steps: a window that starts at 0.99 holds none of them
    assert np.array_equal(pixels(gen.run(job(ip_adapters=[unit(scale=1.0, start=0.99)]))), before)
    late = pixels(gen.run(job(ip_adapters=[unit(scale=1.0, start=0.4)])))
    assert np.abs(late - before).mean() > 0.5 and np.abs(late - with_adapter).mean() > 0.5
    # after the runs the UNet is as it was: its processors, no image projection, the same image
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert pipe.unet.encoder_hid_proj is None and pipe.unet.config.encoder_hid_dim_type is None
    assert pipe.feature_extractor is None and pipe.image_encoder is None
    assert np.array_equal(pixels(gen.run(job())), before)


def test_the_picture_matters(setup):
    gen, _ = setup
    a = pixels(gen.run(job(ip_adapters=[unit(images=[picture(1)])])))
    b = pixels(gen.run(job(ip_adapters=[unit(images=[picture(5)])])))
    assert np.abs(a - b).mean() > 1


def test_infotext_names_the_adapter_and_its_scale(setup):
    gen, _ = setup
    out = gen.run(job(ip_adapters=[unit(scale=0.6, end=0.8)]))
    fields = parse_infotext(out.images[0].infotext)
    assert fields["IP-Adapter"].startswith("tiny [") and len(fields["IP-Adapter"]) == len("tiny [12345678]")
    assert fields["IP-Adapter scale"] == "0.6" and fields["IP-Adapter end"] == "0.8"
    assert "IP-Adapter start" not in fields


def test_wrong_family_hostile_pickle_bad_names_and_missing_encoder(setup, tmp_path):
    gen, folder = setup
    unet = gen.manager.current.pipe.unet
    save_file(tiny_ip_state(unet, width=2048), str(folder / "for-xl.safetensors"))
    with pytest.raises(IPAdapterError, match="made for SDXL models"):
        gen.run(job(ip_adapters=[unit("for-xl")]))
    with pytest.raises(UnsafeNameError):
        gen.run(job(ip_adapters=[unit("../outside")]))
    with pytest.raises(IPAdapterError, match="not found"):
        gen.run(job(ip_adapters=[unit("missing")]))

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    state = read_ip_adapter(folder / "tiny.safetensors")
    torch.save({"image_proj": state["image_proj"], "ip_adapter": state["ip_adapter"], "x": Payload()},
               folder / "evil.bin")
    with pytest.raises(IPAdapterError, match="refused evil.bin"):
        gen.run(job(ip_adapters=[unit("evil")]))
    assert not marker.exists()
    (folder / "evil.bin").unlink()
    torch.save(state, folder / "fine.bin")  # a .bin of plain tensors is read
    assert "fine" in list_ip_adapters(folder) and "image_encoder/model" not in list_ip_adapters(folder)

    alone = tmp_path / "alone"
    alone.mkdir()
    save_file(tiny_ip_state(unet), str(alone / "tiny.safetensors"))
    lonely = Generator(gen.manager, ipadapter_dir=alone)
    with pytest.raises(IPAdapterError, match="needs its CLIP image encoder") as e:
        lonely.run(job(ip_adapters=[unit()]))
    assert str(alone / "image_encoder") in str(e.value)
    with pytest.raises(ValueError, match="IP-Adapter 1: scale"):
        job(ip_adapters=[unit(scale=3)]).validate()


def test_cli_flags(setup, tmp_path, monkeypatch, capsys):
    from studio.cli import main

    _, folder = setup
    assert [(u.name, len(u.images), u.scale) for u in parse_ip_flags(["a"], ["x", "y"], [0.6])] == [("a", 2, 0.6)]
    with pytest.raises(ValueError, match="needs a picture"):
        parse_ip_flags(["a"], [], [])
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    import shutil

    shutil.copytree(folder, tmp_path / "home" / "ipadapter")  # the studio's ipadapter/ folder
    picture(1).save(tmp_path / "ref.png")
    assert main(["generate", "--model", "demo-tiny", "--prompt", "a cat", "--steps", "2", "--width", "64",
                 "--height", "64", "--seed", "3", "--ip-adapter", "tiny", "--ip-image", str(tmp_path / "ref.png"),
                 "--ip-scale", "0.6"]) == 0
    made = Image.open(capsys.readouterr().out.strip())
    assert "IP-Adapter scale: 0.6" in made.info["parameters"]


def test_sdxl_equals_diffusers_and_refuses_an_sd1_adapter(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    cfg = home(tmp_path_factory)
    manager = ModelManager(cfg)
    manager.load("demo-tiny-xl")
    pipe = manager.current.pipe
    folder = tmp_path_factory.mktemp("ipadapter-xl")
    save_file(tiny_ip_state(pipe.unet, "plain", seed=3), str(folder / "tiny-xl.safetensors"))
    save_file(tiny_ip_state(pipe.unet, width=32), str(folder / "sd1.safetensors"))  # demo-tiny's width
    tiny_encoder().save_pretrained(folder / "image_encoder")
    gen = Generator(manager, ipadapter_dir=folder)
    j = job(ip_adapters=[unit("tiny-xl")])
    ours = pixels(gen.run(j))
    with gen.manager.lock:
        cond, uncond, nets = gen.encode(j, manager.current)
    scheduler = samplers.make_scheduler(j.sampler, j.schedule, dict(pipe.scheduler.config), seed=j.seed)
    ref = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
                                    unet=copy.deepcopy(pipe.unet), scheduler=scheduler, image_encoder=None,
                                    feature_extractor=None, force_zeros_for_empty_prompt=False,
                                    add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(folder), subfolder="", weight_name="tiny-xl.safetensors",
                        image_encoder_folder="image_encoder", local_files_only=True)
    out = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=nets.pooled,
              negative_pooled_prompt_embeds=nets.uncond_pooled, latents=initial_latents(pipe, [j.seed], SIZE, SIZE),
              height=SIZE, width=SIZE, num_inference_steps=j.steps, guidance_scale=j.cfg_scale,
              ip_adapter_image=picture(1), output_type="pil").images[0]
    assert np.abs(ours - np.asarray(out).astype(int)).max() <= 1
    assert np.abs(ours - pixels(gen.run(job()))).mean() > 2
    with pytest.raises(IPAdapterError, match="text width 32"):
        gen.run(job(ip_adapters=[unit("sd1")]))
