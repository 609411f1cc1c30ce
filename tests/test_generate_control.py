"""ControlNets in Generate (GenerateJob.controls): units read from controlnet/, their maps made by the preprocessors,
the image equal to the denoise loop's with the same Controls, several at once, weight 0 adding nothing, A1111's
`ControlNet N` fields, hires fix keeping the control, the command line's --control, bad units refused early."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw

from studio.config import StudioConfig
from studio.control import preprocessors
from studio.control.controlnet import save_controlnet_file
from studio.generation.controls import ControlUnit, parse_control_flag
from studio.generation.denoise import Control, denoise
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager

SIZE = 64


def tiny_controlnet(unet, seed: int) -> ControlNetModel:
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
    for p in net.parameters():  # from_unet zeroes the output convs: give them weights so they steer
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return net


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    for seed, name in ((0, "edges"), (1, "shapes")):
        save_controlnet_file(tiny_controlnet(manager.current.pipe.unet, seed), cfg.controlnet_dir / f"{name}.safetensors")
    picture = Image.new("RGB", (96, 80), "white")
    draw = ImageDraw.Draw(picture)
    draw.rectangle((20, 15, 70, 60), outline="black", width=3)
    draw.ellipse((40, 30, 90, 75), fill=(200, 40, 40))
    path = tmp_path_factory.mktemp("refs") / "ref.png"
    picture.save(path)
    g = Generator(manager)
    g.reference = path
    return g


def job(gen, controls, **kw) -> GenerateJob:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=4, width=SIZE, height=SIZE, seed=5,
                sampler="Euler", schedule="Automatic", cfg_scale=6.0, controls=controls)
    return GenerateJob(**{**base, **kw})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(int)


def test_two_units_equal_the_loop_with_the_same_controls(gen):
    units = [ControlUnit("edges", gen.reference, "canny", 0.9, params={"low": 50, "high": 150}),
             ControlUnit("shapes", gen.reference, "invert", 0.5, 0.0, 0.75, resize_mode="Just Resize")]
    out = gen.run(job(gen, units))
    ours = pixels(out)
    # the same thing by hand: maps from the preprocessors, ControlNets from the files, the denoise loop
    from studio.generation.job import load_init_image, resize_image

    model = gen.manager.current
    pipe = model.pipe
    j = job(gen, [])
    picture = load_init_image(gen.reference)
    maps = [preprocessors.get("canny").run(resize_image(picture, "Crop and resize", SIZE, SIZE), low=50, high=150),
            preprocessors.get("invert").run(resize_image(picture, "Just resize", SIZE, SIZE))]
    tensors = [torch.from_numpy(np.asarray(m, dtype=np.float32) / 255).permute(2, 0, 1)[None] for m in maps]
    nets = [gen.controlnets.load(name, "cpu", torch.float32, 32).model for name in ("edges", "shapes")]
    with gen.manager.lock:
        cond, uncond, prompts = gen.encode(j, model)
        expected = denoise(pipe, [prompts.item(cond, uncond, j.cfg_scale, j.seed)], j.sampler, j.schedule, j.steps,
                           SIZE, SIZE, control=[Control(nets[0], tensors[0], 0.9), Control(nets[1], tensors[1], 0.5,
                                                                                           0.0, 0.75)]).images[0]
    assert np.array_equal(ours, np.asarray(expected).astype(int))
    assert np.abs(ours - pixels(gen.run(job(gen, units[:1])))).max() > 3
    fields = parse_infotext(out.images[0].infotext)
    assert fields["ControlNet 0"].startswith("Module: canny, Model: edges [")
    assert "Weight: 0.9, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 50, Threshold B: 150" \
        in fields["ControlNet 0"]
    assert "Module: invert" in fields["ControlNet 1"] and "Guidance End: 0.75" in fields["ControlNet 1"]


def test_weight_zero_is_no_control_and_hires_keeps_it(gen):
    plain = pixels(gen.run(job(gen, [])))
    zero = gen.run(job(gen, [ControlUnit("edges", gen.reference, "canny", 0.0)]))
    assert np.array_equal(pixels(zero), plain)
    unit = ControlUnit("edges", gen.reference, "canny", 1.0)
    steered = gen.run(job(gen, [unit], hires_fix=True, hires_steps=2, hires_denoising=0.6))
    unsteered = gen.run(job(gen, [], hires_fix=True, hires_steps=2, hires_denoising=0.6))
    assert steered.images[0].image.size == (2 * SIZE, 2 * SIZE)
    assert np.abs(pixels(steered) - pixels(unsteered)).max() > 3


@pytest.mark.parametrize("unit, message", [
    (dict(model="edges", image="nope.png"), "does not exist"),
    (dict(model="edges", image=None, module="canny"), "image must be"),
    (dict(model="edges", module="cany"), "cany"),
    (dict(model="edges", weight=3), "weight"),
    (dict(model="edges", start=0.6, end=0.5), "guidance start must be before its end"),
    (dict(model="edges", mode="Prompt"), "control mode must be one of"),
    (dict(model="edges", resize_mode="crop"), "resize mode must be one of"),
    (dict(model="edges", colour="red"), "unknown control keys: colour"),
])
def test_bad_units_are_refused_before_model_work(gen, unit, message):
    values = {"image": gen.reference, **unit}
    with pytest.raises(ValueError, match=message):
        job(gen, [values]).validate()


def test_missing_controlnet_and_preprocessor_weights_fail_fast(gen):
    with pytest.raises(Exception, match="no-such-net"):
        gen.run(job(gen, [ControlUnit("no-such-net", gen.reference, "canny")]))
    t = time.perf_counter()
    with pytest.raises(Exception, match="body_pose_model.pth"):
        gen.run(job(gen, [ControlUnit("edges", gen.reference, "openpose")]))
    assert time.perf_counter() - t < 5


def test_control_flag_and_cli(gen, tmp_path, monkeypatch, capsys):
    unit = parse_control_flag("canny:edges:C:/pictures/a.png:0.8:0.1:0.9")
    assert (unit.module, unit.model, str(unit.image), unit.weight, unit.start, unit.end) == \
        ("canny", "edges", "C:/pictures/a.png", 0.8, 0.1, 0.9)
    assert parse_control_flag("none:edges:map.png:0.5").weight == 0.5
    with pytest.raises(ValueError, match="TYPE:MODEL:IMAGE"):
        parse_control_flag("canny:edges")
    from studio.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("STUDIO_HOME", str(home))
    (home / "controlnet").mkdir(parents=True)
    for name in ("edges.safetensors", "shapes.safetensors"):
        (home / "controlnet" / name).write_bytes((gen.manager.cfg.controlnet_dir / name).read_bytes())
    assert main(["generate", "--model", "demo-tiny", "--prompt", "a cat", "--steps", "3", "--width", "64", "--height",
                 "64", "--seed", "1", "--control", f"canny:edges:{gen.reference}:0.7", "--control",
                 f"lineart_standard:shapes:{gen.reference}", "--control-mode", "My prompt is more important"]) == 0
    made = Image.open(capsys.readouterr().out.strip())
    text = made.info["parameters"]
    assert "ControlNet 0: \"Module: canny, Model: edges [" in text and "Weight: 0.7" in text
    assert "ControlNet 1: \"Module: lineart_standard" in text and "Control Mode: My prompt is more important" in text


def test_the_explorer_refuses_controls_rather_than_dropping_them(gen):
    from studio.explorer.grid import AxisSpec, GridJob

    grid = GridJob(job(gen, [ControlUnit("edges", gen.reference, "canny")]), x=AxisSpec.parse("Steps: 2, 3"))
    with pytest.raises(ValueError, match="does not run ControlNets yet"):
        grid.validate()
