"""Hires fix: the second pass is image to image of the upscaled first pass (pixel upscalers, a model file in
upscalers/) or of its upscaled latents (A1111's latent upscalers); sizes, steps and infotext as A1111 writes them;
bad settings refused before any model work."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from studio.config import StudioConfig
from studio.generation import hires
from studio.generation.denoise import denoise
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, to_fields
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager

SIZE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    return Generator(manager)


def job(**kw) -> GenerateJob:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=6, width=SIZE, height=SIZE, seed=3,
                sampler="DPM++ 2M", schedule="Automatic", hires_fix=True, hires_steps=4, hires_denoising=0.5)
    return GenerateJob(**{**base, **kw})


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image).astype(int)


def first_pass(gen: Generator, j: GenerateJob) -> Image.Image:
    return gen.run(GenerateJob(**{**j.to_dict(), "hires_fix": False})).images[0].image


def img2img(gen: Generator, j: GenerateJob, init: Image.Image) -> np.ndarray:
    second = j.hires_pass()
    return pixels(gen.run(GenerateJob(prompt=j.prompt, negative_prompt=j.negative_prompt, steps=second.steps or j.steps,
                                      width=second.width, height=second.height, seed=j.seed, sampler=j.sampler,
                                      schedule=j.schedule, init_image=init,
                                      denoising_strength=second.denoising_strength)))


@pytest.mark.parametrize("upscaler, resample", [("Lanczos", Image.Resampling.LANCZOS),
                                                ("Nearest", Image.Resampling.NEAREST),
                                                ("None", Image.Resampling.LANCZOS)])  # A1111: None is a resize
def test_pixel_hires_is_img2img_of_the_upscaled_first_pass(tiny, upscaler, resample):
    j = job(hires_upscaler=upscaler)
    out = tiny.run(j)
    assert out.images[0].image.size == (2 * SIZE, 2 * SIZE)
    upscaled = first_pass(tiny, j).resize((2 * SIZE, 2 * SIZE), resample=resample)
    assert np.array_equal(pixels(out), img2img(tiny, j, upscaled))


def test_model_upscaler_from_the_folder(tiny, tmp_path_factory):
    from spandrel.architectures.ESRGAN import ESRGAN

    from studio.upscale.run import upscale

    save_file(ESRGAN(num_filters=8, num_blocks=1, scale=4).state_dict(),
              str(tiny.manager.cfg.upscalers_dir / "tiny-esrgan.safetensors"))
    j = job(hires_upscaler="tiny-esrgan", hires_scale=1.5)
    out = tiny.run(j)
    assert out.images[0].image.size == (96, 96)
    upscaled = upscale(first_pass(tiny, j), "tiny-esrgan", size=(96, 96), folder=tiny.manager.cfg.upscalers_dir).image
    assert np.array_equal(pixels(out), img2img(tiny, j, upscaled))
    assert "Hires upscaler: tiny-esrgan," in out.images[0].infotext


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest-exact)", "Latent (bicubic antialiased)"])
def test_latent_hires_redraws_the_upscaled_latents(tiny, upscaler):
    j = job(hires_upscaler=upscaler)
    out = tiny.run(j)
    pipe = tiny.manager.current.pipe
    with tiny.manager.lock:
        cond, uncond, nets = tiny.encode(j, tiny.manager.current)
        items = [nets.item(cond, uncond, j.cfg_scale, j.seed)]
        latents = denoise(pipe, items, j.sampler, j.schedule, j.steps, SIZE, SIZE, decode=False).latents
        init = hires.upscale_latents(latents, upscaler, 2 * SIZE, 2 * SIZE, pipe.vae_scale_factor)
        expected = denoise(pipe, items, j.sampler, j.schedule, 4, 2 * SIZE, 2 * SIZE, init_latents=init,
                           strength=0.5).images[0]
    assert np.array_equal(pixels(out), np.asarray(expected).astype(int))
    assert not np.array_equal(pixels(out), pixels(tiny.run(job(hires_upscaler="Lanczos"))))


def test_sizes_steps_and_infotext(tiny):
    text = tiny.run(job(hires_scale=1.5, hires_steps=0, hires_denoising=0.4)).images[0].infotext
    fields = to_fields(parse_infotext(text))
    assert (fields["width"], fields["height"]) == (SIZE, SIZE)  # Size is the first pass's, as A1111 writes it
    extra = fields["extra"]
    assert (extra["Hires upscale"], extra["Hires upscaler"], extra["Denoising strength"]) == ("1.5", "Latent", "0.4")
    assert "Hires steps" not in extra  # 0: the same steps as the first pass, not written
    resized = tiny.run(job(hires_width=128, hires_height=0, hires_sampler="Euler")).images[0]
    assert resized.image.size == (128, 128)
    assert "Hires resize: 128x128," in resized.infotext and "Hires sampler: Euler," in resized.infotext
    assert hires.target_size(512, 768, 1.5) == (768, 1152)
    assert hires.target_size(512, 768, 2, 1000, 0) == (1000, 1496)  # 1500 on the 8-px grid
    assert hires.target_size(100, 100, 1.25) == (120, 120)


def test_hires_prompt_and_progress(tiny):
    seen = []
    plain = tiny.run(job(), on_progress=lambda done, total, info: seen.append((done, total, info)))
    assert seen[-1][:2] == (8, 8) and "hires fix, step 2/2" in seen[-1][2]  # 6 steps, then 4 x 0.5
    prompted = tiny.run(job(hires_prompt="a blue square"))
    assert not np.array_equal(pixels(plain), pixels(prompted))
    assert "Hires prompt: a blue square," in prompted.images[0].infotext


def test_stop_during_the_first_pass_shows_it_unfinished(tiny):
    cancel = threading.Event()

    def stop(done, total, info):
        if done == 2:
            cancel.set()

    out = tiny.run(job(), on_progress=stop, cancel=cancel)
    assert out.interrupted and out.images[0].image.size == (SIZE, SIZE)


@pytest.mark.parametrize("change, message", [
    (dict(init_image=Image.new("RGB", (SIZE, SIZE))), "hires fix is for text to image"),
    (dict(hires_scale=5), "hires scale"),
    (dict(hires_denoising=1.5), "hires denoising strength"),
    (dict(hires_steps=-1), "hires steps"),
    (dict(width=1024, height=1024, hires_scale=2.5), "over 2048"),
    (dict(hires_sampler="Nope"), "sampler"),
    (dict(hires_fix="yes"), "true or false"),
])
def test_bad_hires_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        job(**change).validate()


def test_unknown_upscaler_and_other_loras_are_refused_before_the_first_pass(tiny):
    seen = []
    with pytest.raises(ValueError, match="no-such-upscaler"):
        tiny.run(job(hires_upscaler="no-such-upscaler"), on_progress=lambda *a: seen.append(a))
    with pytest.raises(ValueError, match="same <lora:...> tags"):
        tiny.run(job(hires_prompt="a cat <lora:other:1>"), on_progress=lambda *a: seen.append(a))
    assert seen == []


def test_cli_hires_fix(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    assert main(["generate", "--model", "demo-tiny", "--prompt", "a cat", "--steps", "4", "--width", "64", "--height",
                 "64", "--seed", "3", "--hires-scale", "2", "--hires-upscaler", "Latent (nearest)", "--hires-steps",
                 "2", "--hires-denoise", "0.5"]) == 0
    made = Image.open(capsys.readouterr().out.strip())
    assert made.size == (128, 128)
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)" in made.info["parameters"]


def test_sizes_far_from_native_are_warned_about(tiny):
    assert not tiny.run(job(hires_fix=False)).notes  # demo-tiny's native 64x64
    notes = tiny.run(job(hires_fix=False, width=256, height=64)).notes
    assert any("256x64 is far from demo-tiny's native 64x64" in n and "hires fix" in n for n in notes)
    assert not tiny.run(job(width=64, height=64, hires_scale=2)).notes  # the hires pass is the way to go larger
