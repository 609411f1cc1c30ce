"""Storyboards on demo-tiny-xl with the tiny SDXL ControlNet (studio.models.tiny): a ControlNet frame equal to
diffusers' StableDiffusionXLControlNetPipeline from the same latents, boards with and without references,
ControlNets of the wrong family refused, and the offline SDXL default naming the local ControlNets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image, ImageDraw

from studio.control.controlnet import (
    DEFAULT_SDXL_CONTROLNET,
    controlnet_choices,
    default_controlnet,
    save_controlnet_file,
)
from studio.generation.denoise import initial_latents
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext
from studio.generation.job import GenerateJob
from studio.generation.samplers import make_scheduler
from studio.models.checkpoints import ModelLoadError
from studio.models.manager import ModelManager
from studio.models.tiny import build_tiny_pipeline, build_tiny_xl_controlnet
from studio.storyboard.board import BoardSettings, Shot, StoryboardStore, new_board
from studio.storyboard.runner import StoryboardRunner

W, H = 64, 96  # SDXL sizes are often not square: the size conditioning must take (height, width) in order


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """demo-tiny-xl loaded, the tiny SDXL ControlNet in controlnet/ as a file and as a folder, and an SD 1.x one."""
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    save_controlnet_file(build_tiny_xl_controlnet(), cfg.controlnet_dir / "xl-canny.safetensors")
    build_tiny_xl_controlnet(seed=1).save_pretrained(cfg.controlnet_dir / "xl-folder")
    sd1 = ControlNetModel.from_unet(build_tiny_pipeline("sd1").unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
    save_controlnet_file(sd1, cfg.controlnet_dir / "sd1-canny.safetensors")
    manager = ModelManager(cfg)
    manager.load("demo-tiny-xl")
    store = StoryboardStore(cfg.storyboards_dir)
    return cfg, manager, store, StoryboardRunner(manager, store, cfg.controlnet_dir)


def settings(**kw) -> BoardSettings:
    values = dict(width=W, height=H, steps=4, sampler="Euler", schedule="Automatic", cfg_scale=6.0, candidates=1,
                  controlnet="xl-canny", negative_prompt="blurry")
    values.update(kw)
    return BoardSettings(**values)


def board_with_sketch(store, name: str, shots: list[Shot], with_reference: set[str], **kw):
    """A board whose shots in `with_reference` follow a drawn sketch."""
    board = new_board(name, settings(**kw))
    folder = store.path(name)
    folder.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (80, 112), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle((15, 20, 65, 90), outline="black", width=3)
    draw.line((5, 100, 75, 10), fill=(200, 30, 30), width=2)
    im.save(folder / "sketch.png")
    board.shots = shots
    for shot in shots:
        if shot.shot in with_reference:
            store.add_reference(board, shot, folder / "sketch.png")
    return board


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_controlnet_frame_equals_diffusers_sdxl_controlnet_pipeline(xl):
    cfg, manager, store, runner = xl
    shot = Shot("1", "close shot", "a face", seed=11, control_scale=0.8, control_start=0.0, control_end=0.75)
    board = board_with_sketch(store, "versus diffusers", [shot], {"1"})
    runner.run(board)
    folder = store.path(board.name)
    ours = pixels(folder / shot.frames[0].file)
    pipe = manager.current.pipe
    s = board.settings
    ref = StableDiffusionXLControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, controlnet=runner.controlnets.load(
            "xl-canny", "cpu", torch.float32, pipe.unet.config.cross_attention_dim, xl=True).model,
        scheduler=make_scheduler(s.sampler, s.schedule, dict(pipe.scheduler.config)),
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=board.prompt(shot), negative_prompt=s.negative_prompt, image=Image.open(
        folder / "shots" / "1" / "canny.png"), num_inference_steps=s.steps, guidance_scale=s.cfg_scale, width=W,
        height=H, latents=initial_latents(pipe, [shot.frames[0].seed], W, H), controlnet_conditioning_scale=0.8,
        control_guidance_start=0.0, control_guidance_end=0.75)
    theirs = np.asarray(out.images[0]).astype(int)
    assert ours.shape == (H, W, 3)
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()


def test_board_on_sdxl_with_and_without_the_controlnet(xl):
    cfg, manager, store, runner = xl
    shots = [Shot("1", "close shot", "a face", seed=9), Shot("2", "close shot", "a face", seed=9),
             Shot("3", "close shot", "a face", seed=9, control_scale=0.0), Shot("4", "long shot", "a street", seed=3)]
    board = board_with_sketch(store, "xl board", shots, {"2", "3"}, candidates=2)
    result = runner.run(board)
    assert not result.interrupted and [r.controlnet for r in result.shots] == [False, True, True, False]
    folder = store.path(board.name)
    for shot in board.shots:
        assert [f.seed for f in shot.frames] == [shot.seed, shot.seed + 1]
        for frame in shot.frames:
            assert Image.open(folder / frame.file).size == (W, H) and frame.controlnet == bool(shot.reference)
    info = parse_infotext(read_image_infotext(folder / board.shot("2").frames[0].file))
    assert info["Model"] == "demo-tiny-xl" and info["ControlNet 0"].startswith("Module: canny, Model: xl-canny [")
    plain, steered, zero = (pixels(folder / board.shot(n).frames[0].file) for n in ("1", "2", "3"))
    assert np.abs(plain - steered).max() > 8  # the SDXL ControlNet steers the frame
    assert np.array_equal(plain, zero)  # at scale 0 it adds nothing
    # a frame without a reference is the image Generate makes, bit for bit (the candidates' pass runs SDXL's
    # text-time MLP one row at a time)
    s, shot = board.settings, board.shot("4")
    job = GenerateJob(prompt=board.prompt(shot), negative_prompt=s.negative_prompt, sampler=s.sampler,
                      schedule=s.schedule, steps=s.steps, cfg_scale=s.cfg_scale, seed=shot.frames[1].seed,
                      width=W, height=H)
    made = Generator(manager).run(job).images[0]
    assert np.array_equal(pixels(folder / shot.frames[1].file), np.asarray(made.image).astype(int))
    assert read_image_infotext(folder / shot.frames[1].file) == made.infotext
    # an SDXL ControlNet as a diffusers folder works the same way
    board.settings.controlnet = "xl-folder"
    runner.run(board, ["2"])
    assert board.shot("2").frames[0].controlnet and not np.array_equal(
        pixels(folder / board.shot("2").frames[0].file), steered)


def test_controlnets_of_the_other_family_are_refused(xl):
    cfg, manager, store, runner = xl
    board = board_with_sketch(store, "wrong family", [Shot("1", "close shot", "a face", seed=1)], {"1"},
                              controlnet="sd1-canny")
    with pytest.raises(ModelLoadError, match=r"sd1-canny is a ControlNet for SD 1\.x / 2\.x .*the loaded model is "
                                             r"SDXL .*such as diffusers/controlnet-canny-sdxl-1\.0"):
        runner.run(board)
    assert not board.shot("1").frames and not (store.path(board.name) / "shots").exists()
    # and back: the SDXL ControlNet on demo-tiny (SD 1.x classes)
    sd1 = ModelManager(cfg)
    sd1.load("demo-tiny")
    board.settings.controlnet = "xl-canny"
    with pytest.raises(ModelLoadError, match=r"xl-canny is a ControlNet for SDXL .*the loaded model is SD 1\.x / 2\.x"):
        StoryboardRunner(sd1, store, cfg.controlnet_dir).run(board)
    assert not board.shot("1").frames


def test_the_offline_sdxl_default_fails_fast_naming_the_local_controlnets(xl):
    cfg, manager, store, runner = xl
    assert default_controlnet(manager.current, cfg.assets_dir) == DEFAULT_SDXL_CONTROLNET
    assert controlnet_choices(cfg.controlnet_dir, cfg.assets_dir, manager.current)[-1] == DEFAULT_SDXL_CONTROLNET
    board = board_with_sketch(store, "offline", [Shot("1", "close shot", "a face", seed=1)], {"1"},
                              controlnet=default_controlnet(manager.current, cfg.assets_dir))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"ControlNet diffusers/controlnet-canny-sdxl-1\.0 is not in the Hugging "
                                             r"Face cache .*offline.*Local ControlNets in .*sd1-canny\.safetensors, "
                                             r"xl-canny\.safetensors, xl-folder"):
        runner.run(board)
    assert time.perf_counter() - started < 10
