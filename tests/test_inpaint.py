"""Inpainting and outpainting: diffusers' StableDiffusionInpaintPipeline as the oracle (blended latents on a plain
UNet, a 9-channel inpainting UNet loaded from a folder and from a single file), A1111's mask rules and overlay, the
micro model drawing an object where the mask is, and bad input refused before any model work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image

from studio.config import StudioConfig
from studio.files.convert import save_single_file
from studio.generation import masking, samplers
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, to_fields
from studio.generation.job import GenerateJob
from studio.models.checkpoints import ModelLoadError, detect_family
from studio.models.manager import ModelManager, expected_shapes, inpainting_config_dir
from studio.models.tiny import build_tiny_pipeline

SIZE = 64


def noise_image(seed: int, width: int = SIZE, height: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def block_mask(box=(16, 24, 48, 56), size=(SIZE, SIZE)) -> Image.Image:
    """White (redraw) inside `box`, on the 8-px latent grid so every mask rule agrees on its latent cells."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def home(tmp_path_factory) -> StudioConfig:
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    return cfg


def job(**kw) -> GenerateJob:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=5, width=SIZE, height=SIZE, seed=7,
                sampler="DPM++ 2M", schedule="Automatic", init_image=noise_image(1), mask=block_mask(), mask_blur=0,
                denoising_strength=1.0)
    return GenerateJob(**{**base, **kw})


def pixels(result, i: int = 0) -> np.ndarray:
    return np.asarray(result.images[i].image).astype(int)


def inpainting_pipe(seed: int = 0):
    """demo-tiny with a 9-channel UNet (latents, mask, masked picture), as sd-v1-5-inpainting is to SD 1.5."""
    pipe = build_tiny_pipeline("sd1")
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    manager = ModelManager(home(tmp_path_factory))
    manager.load("demo-tiny")
    return Generator(manager)


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    cfg = home(tmp_path_factory)
    inpainting_pipe().save_pretrained(cfg.models_dir / "tiny-inpainting")
    manager = ModelManager(cfg)
    manager.load("tiny-inpainting")
    return Generator(manager)


def reference_pipeline(pipe, scheduler, xl: bool):
    """diffusers' inpainting pipeline (SD or SDXL) over the studio pipe's components."""
    if xl:
        from diffusers import StableDiffusionXLInpaintPipeline

        return StableDiffusionXLInpaintPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
            tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, scheduler=scheduler, requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
    return StableDiffusionInpaintPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def diffusers_inpaint(gen: Generator, j: GenerateJob) -> np.ndarray:
    """The job through StableDiffusionInpaintPipeline on the same components, conditioning and scheduler, from the
    seed's CPU noise; the init goes in as the VAE posterior's mean (as the studio encodes it), and for a 9-channel
    UNet the masked picture too, encoded here with diffusers' own processors."""
    model = gen.manager.current
    pipe = model.pipe
    with gen.manager.lock:
        cond, uncond, nets = gen.encode(j, model)
    processor = pipe.image_processor
    picture = processor.preprocess(j.init_picture())
    mask = reference_pipeline(pipe, pipe.scheduler, model.is_xl).mask_processor.preprocess(j.mask, height=SIZE,
                                                                                         width=SIZE)
    with torch.no_grad():
        sf = pipe.vae.config.scaling_factor
        init_latents = pipe.vae.encode(picture).latent_dist.mode() * sf
        masked_latents = pipe.vae.encode(picture * (mask < 0.5)).latent_dist.mode() * sf
    scheduler = samplers.make_scheduler(j.sampler, j.schedule, dict(pipe.scheduler.config), seed=j.seed)
    ref = reference_pipeline(pipe, scheduler, model.is_xl)
    ref.set_progress_bar_config(disable=True)
    extra = {} if not model.is_xl else dict(pooled_prompt_embeds=nets.pooled,
                                            negative_pooled_prompt_embeds=nets.uncond_pooled)
    noise = torch.randn((4, SIZE // 8, SIZE // 8), generator=torch.Generator("cpu").manual_seed(j.seed))[None]
    out = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=init_latents, mask_image=j.mask,
              masked_image_latents=masked_latents, latents=noise, height=SIZE, width=SIZE, strength=1.0,
              num_inference_steps=j.steps, guidance_scale=j.cfg_scale, output_type="pil", **extra).images[0]
    return np.asarray(out).astype(int)


def inside(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.convert("L")) > 127


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler", "DDIM"])
def test_blended_inpainting_equals_diffusers_and_keeps_the_rest(tiny, sampler):
    j = job(sampler=sampler)
    ours = pixels(tiny.run(j))
    where = inside(j.mask)
    assert np.abs(ours - diffusers_inpaint(tiny, j))[where].max() <= 1
    # outside the mask the original pixels, exactly (A1111's overlay), not their VAE round trip
    assert np.array_equal(ours[~where], np.asarray(j.init_picture()).astype(int)[~where])
    assert np.abs(ours[where] - np.asarray(j.init_picture()).astype(int)[where]).mean() > 5


@pytest.mark.parametrize("source", ["folder", "single file"])
def test_inpainting_checkpoint_equals_diffusers(inpainting_folder, tmp_path_factory, source):
    gen = inpainting_folder
    if source == "single file":
        cfg = home(tmp_path_factory)
        save_single_file(inpainting_pipe(), cfg.models_dir / "tiny-inpainting.safetensors", "sd1")
        manager = ModelManager(cfg)
        manager.load("tiny-inpainting.safetensors")
        gen = Generator(manager)
    assert gen.manager.current.pipe.unet.config.in_channels == 9
    j = job()
    ours = pixels(gen.run(j))
    where = inside(j.mask)
    assert np.abs(ours - diffusers_inpaint(gen, j))[where].max() <= 1
    assert np.array_equal(ours[~where], np.asarray(j.init_picture()).astype(int)[~where])
    # the UNet reads the picture around the mask: another picture outside it changes what is drawn inside
    other = pixels(gen.run(job(init_image=noise_image(2))))
    assert np.abs(other - ours)[where].max() > 3


@pytest.mark.parametrize("channels", [4, 9])
def test_sdxl_inpainting_equals_diffusers(tmp_path_factory, channels):
    """SDXL: blended latents on the base UNet, and an SDXL inpainting UNet (9 channels) from a single file."""
    from studio.models.tiny import build_tiny_xl_pipeline

    cfg = home(tmp_path_factory)
    pipe = build_tiny_xl_pipeline()
    if channels == 9:
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    save_single_file(pipe, cfg.models_dir / "tiny-xl.safetensors", "sdxl")
    manager = ModelManager(cfg)
    manager.load("tiny-xl.safetensors")
    gen = Generator(manager)
    assert gen.manager.current.is_xl and gen.manager.current.pipe.unet.config.in_channels == channels
    j = job(sampler="Euler")
    ours = pixels(gen.run(j))
    where = inside(j.mask)
    assert np.abs(ours - diffusers_inpaint(gen, j))[where].max() <= 1
    assert np.array_equal(ours[~where], np.asarray(j.init_picture()).astype(int)[~where])


def test_text_to_image_on_an_inpainting_model(inpainting_folder):
    """No init: the whole frame masked and grey (A1111's way), so an inpainting checkpoint still makes images."""
    out = inpainting_folder.run(GenerateJob(prompt="a red circle", steps=3, width=SIZE, height=SIZE, seed=1))
    assert out.images[0].image.size == (SIZE, SIZE)
    again = inpainting_folder.run(GenerateJob(prompt="a red circle", steps=3, width=SIZE, height=SIZE, seed=1))
    assert np.array_equal(pixels(out), pixels(again))


def test_inpainting_configs_for_single_files(tmp_path):
    """An sd-v1-5-inpainting or SDXL inpainting file without our metadata: the bundled config with 9 channels in."""
    assets = StudioConfig().assets_dir / "configs"
    for family in ("sd1", "sdxl"):
        out = inpainting_config_dir(assets / family, tmp_path / family, 9)
        assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 9
        assert (out / "model_index.json").read_bytes() == (assets / family / "model_index.json").read_bytes()
    shapes = expected_shapes(tmp_path / "sdxl")
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)
    keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    assert detect_family(keys) == "sd1"
    with pytest.raises(ModelLoadError, match="8 input channels.*instruct-pix2pix"):
        detect_family({**keys, "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)})


def test_micro_draws_the_object_where_the_mask_is(tmp_path_factory):
    """A white picture, one grid cell masked, a prompt that names no place: the object lands in the masked cell,
    and the pixels outside the blurred mask are the picture's own."""
    from micro_kit import micro_generator, one_thread

    from studio.micro import oracle, world

    white = Image.new("RGB", (SIZE, SIZE), world.BACKGROUNDS["white"])
    prompt = "a small blue square"  # (micro's captions always end with the place when they name the background)
    with one_thread():
        gen = micro_generator(home(tmp_path_factory))
        for position in ("bottom right", "top left"):
            row, col = world.cell(position)
            cx, cy = int(world.CELL_CENTRES[col] * SIZE), int(world.CELL_CENTRES[row] * SIZE)
            mask = block_mask((cx - 11, cy - 11, cx + 11, cy + 11))
            seen = []
            for seed in range(4):
                out = np.asarray(gen.run(GenerateJob(prompt=prompt, seed=seed, steps=10, cfg_scale=5.0, width=SIZE,
                                                     height=SIZE, init_image=white, mask=mask, mask_blur=2,
                                                     denoising_strength=1.0)).images[0].image)
                read = oracle.read(out)
                seen.append((read["colour"], read["position"]))
                untouched = np.asarray(masking.blur_mask(mask, 2)) == 0
                assert np.array_equal(out[untouched], np.asarray(white)[untouched])
            assert seen.count(("blue", position)) >= 3, seen


def test_only_masked_draws_the_crop_at_full_size_and_pastes_it_back(tiny):
    big = noise_image(5, 128, 96)
    mask = block_mask((70, 40, 90, 60), (128, 96))
    out = tiny.run(job(init_image=big, mask=mask, inpaint_area="Only masked", inpaint_padding=8, mask_blur=0))
    image = np.asarray(out.images[0].image).astype(int)
    assert out.images[0].image.size == (128, 96)  # the original's size, not the generation's
    plan = job(init_image=big, mask=mask, inpaint_area="Only masked", inpaint_padding=8, mask_blur=0).inpaint_plan()
    x1, y1, x2, y2 = plan.paste_box
    assert (x2 - x1) == (y2 - y1) and x1 <= 62 and x2 >= 98  # padded, grown to the 1:1 generation aspect
    where = inside(mask)
    assert np.array_equal(image[~where], np.asarray(big).astype(int)[~where])
    assert np.abs(image[where] - np.asarray(big).astype(int)[where]).mean() > 5
    fields = to_fields(parse_infotext(out.images[0].infotext))["extra"]
    assert fields["Inpaint area"] == "Only masked" and fields["Masked area padding"] == "8"


def test_mask_rules():
    # a painted layer: its alpha is the mask; an opaque picture: its brightness
    layer = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 8, 16))
    assert np.asarray(masking.binary_mask(layer))[:, :8].min() == 255
    assert np.asarray(masking.binary_mask(layer))[:, 8:].max() == 0
    grey = Image.new("RGB", (16, 16), (200, 200, 200))
    assert np.asarray(masking.binary_mask(grey)).min() == 255
    # blur widens the mask softly and keeps far pixels at 0
    blurred = np.asarray(masking.blur_mask(block_mask((24, 24, 40, 40)), 4))
    assert 0 < blurred[32, 21] < 255 and blurred[32, 2] == 0 and blurred[32, 32] > 200
    # expand_region grows the short side to the generation's aspect, inside the picture
    assert masking.expand_region((10, 10, 30, 20), 64, 64, 100, 100) == (10, 5, 30, 25)
    assert masking.expand_region((0, 0, 10, 40), 64, 64, 100, 100) == (0, 0, 40, 40)
    # fill paints the masked half with the colour of the rest
    half = Image.new("RGB", (32, 32), (200, 30, 30))
    filled = np.asarray(masking.fill_masked(half, block_mask((16, 0, 32, 32), (32, 32))))
    assert np.abs(filled[:, 16:].astype(int) - (200, 30, 30)).max() <= 4


@pytest.mark.parametrize("content", ["fill", "latent noise", "latent nothing"])
def test_masked_content_changes_what_is_drawn_and_is_recorded(tiny, content):
    base = pixels(tiny.run(job(denoising_strength=0.6)))
    out = tiny.run(job(denoising_strength=0.6, masked_content=content))
    assert np.abs(pixels(out) - base)[inside(block_mask())].max() > 3
    assert f"Masked content: {content}," in out.images[0].infotext


def test_inpaint_not_masked_redraws_the_outside(tiny):
    out = tiny.run(job(mask_mode="Inpaint not masked"))
    image, where = pixels(out), inside(block_mask())
    assert np.array_equal(image[where], np.asarray(noise_image(1)).astype(int)[where])
    assert "Mask mode: Inpaint not masked," in out.images[0].infotext


def test_outpainting_extends_the_picture(tiny):
    out = tiny.run(job(mask=None, outpaint="left=32,bottom=16", mask_blur=4))
    image = np.asarray(out.images[0].image).astype(int)
    assert out.images[0].image.size == (SIZE + 32, SIZE + 16)
    # the picture is kept away from the seam (8 px of overlap plus the blur's reach), the new bands are drawn
    init = np.asarray(noise_image(1)).astype(int)
    assert np.array_equal(image[:SIZE - 24, 32 + 24:], init[:SIZE - 24, 24:])
    assert np.abs(image[:SIZE - 24, 32 + 8] - init[:SIZE - 24, 8]).max() > 3  # the seam is redrawn
    assert image[:, :24].std() > 0 and image[SIZE + 4:, 40:].std() > 0
    fields = to_fields(parse_infotext(out.images[0].infotext))
    assert (fields["width"], fields["height"]) == (SIZE + 32, SIZE + 16)
    assert fields["extra"]["Outpaint"] == "left 32, bottom 16"
    assert masking.pads_for_aspect(512, 512, 16 / 9) == {"left": 200, "right": 200}
    assert masking.pads_for_aspect(512, 512, 1.0) == {}


@pytest.mark.parametrize("change, message", [
    (dict(init_image=None), "needs an init image"),
    (dict(outpaint="left=64"), "not both"),
    (dict(mask=Image.new("L", (SIZE, SIZE), 0)), "mask is empty"),
    (dict(mask=Image.new("L", (SIZE, SIZE), 255), mask_mode="Inpaint not masked"), "covers the whole picture"),
    (dict(mask_blur=-1), "mask blur"),
    (dict(masked_content="noise"), "masked content must be one of"),
    (dict(inpaint_area="masked"), "inpaint area must be one of"),
    (dict(mask=None, outpaint="left=60"), "multiple of 8"),
    (dict(mask=None, outpaint="up=64"), "side must be one of"),
    (dict(mask=None, outpaint="left=1024,right=1024"), "over 2048"),
])
def test_bad_inpaint_input_is_refused_before_model_work(change, message):
    j = job(**change)
    with pytest.raises(ValueError, match=message):
        j.validate()
        j.inpaint_plan()


def test_masks_of_another_size_and_huge_masks(tiny, tmp_path):
    from dataset_files import png_header_only

    # a mask drawn at another size covers the same part of the picture
    small = pixels(tiny.run(job(mask=block_mask((8, 12, 24, 28), (32, 32)))))
    assert np.array_equal(small, pixels(tiny.run(job())))
    bomb = tmp_path / "mask.png"
    png_header_only(bomb, 20000, 20000)
    with pytest.raises(ValueError, match="mask mask.png: oversized"):
        job(mask=bomb).inpaint_plan()


def test_cli_inpaints_and_outpaints(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    noise_image(1).save(tmp_path / "init.png")
    block_mask().save(tmp_path / "mask.png")
    base = ["generate", "--model", "demo-tiny", "--prompt", "a cat", "--steps", "3", "--width", "64", "--height", "64",
            "--seed", "3", "--init-image", str(tmp_path / "init.png"), "--denoise", "1"]
    assert main([*base, "--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--masked-content", "fill",
                 "--inpaint-area", "masked", "--padding", "8"]) == 0
    made = Image.open(capsys.readouterr().out.strip())
    assert "Masked content: fill, Inpaint area: Only masked, Masked area padding: 8" in made.info["parameters"]
    outside = ~inside(block_mask())
    assert np.array_equal(np.asarray(made)[outside], np.asarray(noise_image(1))[outside])
    assert main([*base, "--outpaint", "right=32"]) == 0
    assert Image.open(capsys.readouterr().out.strip()).size == (96, 64)
    assert main([*base, "--mask", str(tmp_path / "missing.png")]) == 2
    assert "mask 'missing.png' does not exist" in capsys.readouterr().err
