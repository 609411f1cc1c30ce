"""Several ControlNets in one pass: the studio's loop equals diffusers' StableDiffusionControlNetPipeline with a
list of ControlNets (MultiControlNetModel) from the same latents; weight 0 adds nothing; A1111's control modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

from studio.config import StudioConfig
from studio.generation.denoise import CONTROL_MODES, Control, denoise, initial_latents
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.generation.samplers import make_scheduler
from studio.models.manager import ModelManager

SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    gen = Generator(manager)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(manager.current.pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
        for p in net.parameters():  # from_unet zeroes the output convs: give them weights so they steer
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.05)
        nets.append(net.eval())
    return gen, nets


def maps() -> list[Image.Image]:
    a = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(a).rectangle((10, 10, 40, 50), outline="white", width=2)
    b = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(b).ellipse((20, 5, 60, 45), fill=(180, 180, 180))
    return [a, b]


def tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def run(gen, controls, seed=3, steps=5):
    job = GenerateJob(prompt="a red circle", negative_prompt="blurry", steps=steps, width=SIZE, height=SIZE,
                      seed=seed, sampler="Euler", schedule="Automatic", cfg_scale=6.0)
    model = gen.manager.current
    with gen.manager.lock:
        cond, uncond, nets = gen.encode(job, model)
        out = denoise(model.pipe, [nets.item(cond, uncond, job.cfg_scale, seed)], job.sampler, job.schedule, steps,
                      SIZE, SIZE, control=controls)
    return np.asarray(out.images[0]).astype(int), (cond, uncond, job)


def test_two_controlnets_equal_diffusers_multi_controlnet(setup):
    gen, nets = setup
    a, b = maps()
    controls = [Control(nets[0], tensor(a), 0.8, 0.0, 1.0), Control(nets[1], tensor(b), 0.6, 0.2, 0.8)]
    ours, (cond, uncond, job) = run(gen, controls)
    pipe = gen.manager.current.pipe
    ref = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=nets,
        scheduler=make_scheduler(job.sampler, job.schedule, dict(pipe.scheduler.config)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=[a, b], num_inference_steps=job.steps,
              guidance_scale=job.cfg_scale, width=SIZE, height=SIZE,
              latents=initial_latents(pipe, [job.seed], SIZE, SIZE), controlnet_conditioning_scale=[0.8, 0.6],
              control_guidance_start=[0.0, 0.2], control_guidance_end=[1.0, 0.8])
    theirs = np.asarray(out.images[0]).astype(int)
    assert np.abs(ours - theirs).max() <= 1
    one, _ = run(gen, controls[:1])
    assert np.abs(ours - one).max() > 3  # the second ControlNet counts


def test_weight_zero_adds_nothing_and_modes_differ(setup):
    gen, nets = setup
    a, b = maps()
    plain, _ = run(gen, None)
    zero, _ = run(gen, [Control(nets[0], tensor(a), 0.0), Control(nets[1], tensor(b), 0.0)])
    assert np.array_equal(plain, zero)
    results = {mode: run(gen, [Control(nets[0], tensor(a), 1.0, mode=mode)])[0] for mode in CONTROL_MODES}
    balanced, prompt_first, control_first = (results[m] for m in CONTROL_MODES)
    # "my prompt is more important" weakens the control: its image lies nearer the uncontrolled one
    assert np.abs(prompt_first - plain).mean() < np.abs(balanced - plain).mean()
    assert np.abs(control_first - balanced).max() > 3 and np.abs(control_first - prompt_first).max() > 3
    with pytest.raises(ValueError, match="control mode must be one of"):
        run(gen, [Control(nets[0], tensor(a), 1.0, mode="Prompt")])
