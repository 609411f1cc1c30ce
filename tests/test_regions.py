"""Regional prompts: the layout syntax, masks that partition the frame, each region's noise prediction used in its
own part (checked on the latents after one step), the same prompt in every region equal to no regions, hires fix and
SDXL, the infotext, and bad layouts refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import StudioConfig
from studio.generation import regions
from studio.generation.denoise import denoise
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager

SIZE = 64


def home(tmp_path_factory) -> StudioConfig:
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    manager = ModelManager(home(tmp_path_factory))
    manager.load("demo-tiny")
    return Generator(manager)


def job(**kw) -> GenerateJob:
    base = dict(prompt="a garden", negative_prompt="blurry", steps=4, width=SIZE, height=SIZE, seed=3,
                sampler="Euler", schedule="Automatic", cfg_scale=6.0)
    return GenerateJob(**{**base, **kw})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(int)


def test_layouts_and_masks():
    assert regions.parse_layout("cols 1,1") == ("cols", [0.5, 0.5])
    assert regions.parse_layout("Rows 2, 1, 1") == ("rows", [0.5, 0.25, 0.25])
    masks = regions.latent_masks("cols 1,2", 96, 64, 8)
    assert [m.shape for m in masks] == [(1, 1, 8, 12)] * 2
    assert torch.equal(sum(masks), torch.ones(1, 1, 8, 12))  # every cell in exactly one region
    assert masks[0][0, 0, 0].tolist() == [1] * 4 + [0] * 8
    rows = regions.latent_masks("rows 1,1,2", 64, 64, 8)
    assert [int(m.sum()) // 8 for m in rows] == [2, 2, 4]
    assert regions.region_text("a garden, oil painting", "a red fox") == "a garden, oil painting, a red fox"
    assert regions.region_text("", "a red fox") == "a red fox"
    for bad, message in (("cols", "like 'cols 1,1'"), ("diagonal 1,1", "like 'cols 1,1'"), ("cols 1", "2 to 4"),
                         ("cols 1,0", "positive"), ("cols 1,x", "numbers"), ("cols 1,1,1,1,1", "2 to 4")):
        with pytest.raises(ValueError, match=message):
            regions.parse_layout(bad)
    with pytest.raises(ValueError, match="narrower than one latent cell"):
        regions.latent_masks("cols 1,20", 64, 64, 8)


def test_latent_mode_each_region_takes_its_own_prediction(tiny):
    """Latent mode, one Euler step: the latents in the left region are those the left prompt alone gives, the right ones those
    of the right prompt alone (the step is linear in the prediction; the predictions are made on the same input)."""
    model = tiny.manager.current
    pipe = model.pipe
    split = job(prompt="", regions="cols 1,1", region_prompts=["a red fox", "a blue bird"], steps=1)

    def latents(j):
        with tiny.manager.lock:
            cond, uncond, nets = tiny.encode(j, model)
            return denoise(pipe, [nets.item(cond, uncond, j.cfg_scale, j.seed)], j.sampler, j.schedule, 1, SIZE,
                           SIZE, decode=False, region_mode="Latent").latents

    both = latents(split)
    fox, bird = latents(job(prompt="a red fox", steps=1)), latents(job(prompt="a blue bird", steps=1))
    half = SIZE // 16
    assert torch.allclose(both[..., :half], fox[..., :half], atol=1e-5)
    assert torch.allclose(both[..., half:], bird[..., half:], atol=1e-5)
    assert not torch.allclose(fox[..., :half], bird[..., :half], atol=1e-3)


def test_one_prompt_in_every_region_is_no_regions(tiny):
    plain = pixels(tiny.run(job(prompt="a red fox")))
    same = tiny.run(job(prompt="", regions="rows 1,1", region_prompts=["a red fox", "a red fox"]))
    assert np.abs(pixels(same) - plain).max() <= 1
    text = same.images[0].infotext
    assert 'Regions: "rows 1,1", Region mode: Attention, Region 1 prompt: a red fox, Region 2 prompt: a red fox,' in text


def test_regions_with_hires_fix_and_batches(tiny):
    j = job(prompt="a garden", regions="cols 1,1", region_prompts=["a red fox", "a blue bird"], hires_fix=True,
            hires_steps=2, hires_denoising=0.5, batch_size=2)
    out = tiny.run(j)
    assert [im.image.size for im in out.images] == [(2 * SIZE, 2 * SIZE)] * 2
    assert not np.array_equal(pixels(out), pixels(tiny.run(job(prompt="a garden", hires_fix=True, hires_steps=2,
                                                               hires_denoising=0.5))))


def test_sdxl_regions(tmp_path_factory):
    manager = ModelManager(home(tmp_path_factory))
    manager.load("demo-tiny-xl")
    gen = Generator(manager)
    plain = pixels(gen.run(job(prompt="a red fox")))
    same = pixels(gen.run(job(prompt="", regions="cols 1,1", region_prompts=["a red fox", "a red fox"])))
    assert np.abs(same - plain).max() <= 1
    split = pixels(gen.run(job(prompt="", regions="cols 1,1", region_prompts=["a red fox", "a blue bird"])))
    assert np.abs(split - plain).max() > 3


@pytest.mark.parametrize("change, message", [
    (dict(regions="cols 1,1", region_prompts=["a"]), "give one prompt for each"),
    (dict(regions="", region_prompts=["a", "b"]), "need a regions layout"),
    (dict(regions="cols 1,1", region_prompts=["a <lora:x:1>", "b"]), "act on the whole picture"),
    (dict(regions="cols one", region_prompts=["a", "b"]), "numbers"),
])
def test_bad_regions_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        job(**change).validate()


def test_regions_and_prompt_editing_are_refused(tiny):
    with pytest.raises(ValueError, match="prompt editing"):
        tiny.run(job(prompt="a [cat:dog:0.5]", regions="cols 1,1", region_prompts=["a", "b"]))


def test_cli_regions(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    assert main(["generate", "--model", "demo-tiny", "--prompt", "a garden", "--steps", "2", "--width", "64",
                 "--height", "64", "--seed", "1", "--regions", "cols 1,1", "--region-prompt", "a red fox",
                 "--region-prompt", "a blue bird"]) == 0
    text = Image.open(capsys.readouterr().out.strip()).info["parameters"]
    assert 'Regions: "cols 1,1", Region mode: Attention, Region 1 prompt: a red fox, Region 2 prompt: a blue bird' in text
    assert main(["generate", "--model", "demo-tiny", "--prompt", "x", "--regions", "cols 1,1",
                 "--region-prompt", "a"]) == 2
    assert "give one prompt for each" in capsys.readouterr().err


def test_attention_mode_masks_each_regions_cross_attention():
    """The processor: each region's prompt attended to by the whole frame, kept where its mask is; the UNet's own
    processors are back after the pass."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
    masks = regions.latent_masks("cols 1,1", 32, 32, 8)  # 4x4 latents
    proc = regions.RegionalCrossAttention(AttnProcessor2_0(), torch.cat(masks), tokens=3)
    x = torch.randn(2, 16, 8)
    a, b = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    out = proc(attn, x, torch.cat([a, b], dim=1))
    alone_a, alone_b = AttnProcessor2_0()(attn, x, a), AttnProcessor2_0()(attn, x, b)
    left = masks[0].flatten()[None, :, None].bool()
    assert torch.allclose(out, torch.where(left, alone_a, alone_b), atol=1e-6)
    # at a coarser layer (2x2 positions) the mask is scaled down with it
    small = torch.randn(2, 4, 8)
    out = proc(attn, small, torch.cat([a, b], dim=1))
    assert torch.allclose(out[:, [0, 2]], AttnProcessor2_0()(attn, small, a)[:, [0, 2]], atol=1e-6)
    assert torch.allclose(out[:, [1, 3]], AttnProcessor2_0()(attn, small, b)[:, [1, 3]], atol=1e-6)


def test_attention_mode_runs_and_restores_the_unet(tiny):
    unet = tiny.manager.current.pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    split = tiny.run(job(prompt="", regions="cols 1,1", region_prompts=["a red fox", "a blue bird"]))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    latent = tiny.run(job(prompt="", regions="cols 1,1", region_prompts=["a red fox", "a blue bird"],
                          region_mode="Latent"))
    assert np.abs(pixels(split) - pixels(latent)).max() > 3
    assert "Region mode: Latent" in latent.images[0].infotext
