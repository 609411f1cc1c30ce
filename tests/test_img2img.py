"""Image to image and the VAE menu: diffusers' img2img pipelines as the oracle, A1111's strength and resize rules,
the micro model keeping an init's layout, and VAEs from vae/ swapped by the ModelManager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image
from safetensors.torch import save_file

from studio.config import StudioConfig
from studio.files.convert import save_single_file, vae_to_original
from studio.generation import samplers
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext, to_fields
from studio.generation.job import GenerateJob, resize_image
from studio.generation.paste import denoising_strength, vae_choice
from studio.models.checkpoints import ModelLoadError
from studio.models.manager import ModelManager
from studio.models.tiny import build_tiny_pipeline

SIZE = 64


def noise_image(seed: int, width: int = SIZE, height: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def home(tmp_path_factory) -> StudioConfig:
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    manager = ModelManager(home(tmp_path_factory))
    manager.load("demo-tiny")
    return Generator(manager)


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    manager = ModelManager(home(tmp_path_factory))
    manager.load("demo-tiny-xl")
    return Generator(manager)


def job(**kw) -> GenerateJob:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=5, width=SIZE, height=SIZE, seed=7,
                sampler="DPM++ 2M", schedule="Automatic")
    return GenerateJob(**{**base, **kw})


def pixels(result, i: int = 0) -> np.ndarray:
    return np.asarray(result.images[i].image).astype(int)


def round_trip(pipe, image: Image.Image) -> np.ndarray:
    """The image through the VAE and back (diffusers' own calls): what strength 0 must return."""
    with torch.no_grad():
        latents = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode()
        decoded = pipe.vae.decode(latents, return_dict=False)[0]
    return np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0]).astype(int)


def diffusers_img2img(gen: Generator, j: GenerateJob) -> np.ndarray:
    """The same job through diffusers' img2img pipeline on the same components, with the studio's conditioning and
    scheduler. The init goes in as latents (the VAE posterior's mean, see studio.generation.denoise.encode_init), so
    the pipeline's noise is the seed's CPU noise, as the studio's."""
    model = gen.manager.current
    pipe = model.pipe
    with gen.manager.lock:
        cond, uncond, nets = gen.encode(j, model)
    with torch.no_grad():
        latents = pipe.vae.encode(pipe.image_processor.preprocess(j.init_picture())).latent_dist.mode()
    latents = latents * pipe.vae.config.scaling_factor
    scheduler = samplers.make_scheduler(j.sampler, j.schedule, dict(pipe.scheduler.config), seed=j.seed)
    if model.is_xl:
        ref = StableDiffusionXLImg2ImgPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
            tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, scheduler=scheduler, requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=False, add_watermarker=False)
        extra = dict(pooled_prompt_embeds=nets.pooled, negative_pooled_prompt_embeds=nets.uncond_pooled)
    else:
        ref = StableDiffusionImg2ImgPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        extra = {}
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt_embeds=cond, negative_prompt_embeds=uncond, image=latents, strength=j.denoising_strength,
              num_inference_steps=j.steps, guidance_scale=j.cfg_scale,
              generator=[torch.Generator("cpu").manual_seed(j.seed)], output_type="pil", **extra).images[0]
    return np.asarray(out).astype(int)


# Euler a, DPM2 a, DPM++ SDE, DPM++ 2M SDE are left out: their per-step noise comes from a generator of the item's
# own seed in the studio (as in its text to image), from the generator that drew the start noise in diffusers
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DDIM", "Heun", "UniPC"])
def test_img2img_equals_diffusers_pipeline(tiny, sampler):
    j = job(sampler=sampler, init_image=noise_image(1), denoising_strength=0.6)
    ours = pixels(tiny.run(j))
    assert np.abs(ours - diffusers_img2img(tiny, j)).max() <= 1
    # and the init matters: another init gives another image
    flat = Image.new("RGB", (SIZE, SIZE), (250, 20, 20))
    assert np.abs(ours - pixels(tiny.run(job(sampler=sampler, init_image=flat, denoising_strength=0.6)))).max() > 3


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_sdxl_img2img_equals_diffusers_pipeline(tiny_xl, sampler):
    j = job(sampler=sampler, init_image=noise_image(3), denoising_strength=0.6)
    assert np.abs(pixels(tiny_xl.run(j)) - diffusers_img2img(tiny_xl, j)).max() <= 1


@pytest.mark.parametrize("fixture", ["tiny", "tiny_xl"])
def test_strength_one_is_text_to_image_and_zero_the_vae_round_trip(request, fixture):
    gen = request.getfixturevalue(fixture)
    init = noise_image(4)
    assert np.array_equal(pixels(gen.run(job(init_image=init, denoising_strength=1.0))), pixels(gen.run(job())))
    kept = gen.run(job(init_image=init, denoising_strength=0.0))
    assert np.abs(pixels(kept) - round_trip(gen.manager.current.pipe, init)).max() <= 1
    # a strength that keeps no whole step (5 x 0.1 < 1) keeps the image too
    assert np.array_equal(pixels(gen.run(job(init_image=init, denoising_strength=0.1))), pixels(kept))
    assert not np.array_equal(pixels(gen.run(job(init_image=init, denoising_strength=0.4))), pixels(kept))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", None])
def test_strength_outside_zero_to_one_is_refused(bad):
    with pytest.raises(ValueError, match="denoising strength"):
        job(init_image=noise_image(0), denoising_strength=bad).validate()


def test_bad_init_and_resize_mode_are_refused(tmp_path):
    with pytest.raises(ValueError, match="resize mode must be one of Just resize, Crop and resize, Resize and fill"):
        job(init_image=noise_image(0), resize_mode="Stretch").validate()
    with pytest.raises(ValueError, match="init image 'missing.png' does not exist"):
        job(init_image=tmp_path / "missing.png").validate()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    broken = job(init_image=tmp_path / "broken.png")
    broken.validate()
    with pytest.raises(ValueError, match="init image broken.png: .*not a readable image"):
        broken.init_picture()


def test_batch_images_equal_single_runs(tiny):
    init = noise_image(5)
    batch = tiny.run(job(init_image=init, denoising_strength=0.6, batch_size=2))
    single = tiny.run(job(init_image=init, denoising_strength=0.6, seed=8))
    assert [im.seed for im in batch.images] == [7, 8]
    assert np.abs(pixels(batch, 1) - pixels(single)).max() <= 1


def test_stop_and_progress_count_the_steps_that_run(tiny):
    import threading

    seen = []
    tiny.run(job(steps=10, init_image=noise_image(6), denoising_strength=0.5),
             on_progress=lambda done, total, info: seen.append((done, total)))
    assert seen[-1] == (5, 5)  # 10 steps x 0.5
    cancel = threading.Event()
    cancel.set()
    result = tiny.run(job(steps=10, init_image=noise_image(6), denoising_strength=0.5), cancel=cancel)
    assert result.interrupted


def wide_init() -> Image.Image:
    """128x64: red top rows, blue bottom rows, green between."""
    a = np.zeros((64, 128, 3), np.uint8)
    a[:] = (0, 200, 0)
    a[:8] = (255, 0, 0)
    a[-8:] = (0, 0, 255)
    return Image.fromarray(a)


def test_resize_modes_follow_a1111():
    init = wide_init()
    filled = np.asarray(resize_image(init, "Resize and fill", SIZE, SIZE)).astype(int)
    # fitted inside (64x32 in the middle), the bands above and below stretched from its edge rows
    assert np.abs(filled[:16] - (255, 0, 0)).max() <= 2 and np.abs(filled[48:] - (0, 0, 255)).max() <= 2
    assert np.abs(filled[24:40] - (0, 200, 0)).max() <= 2
    cropped = np.asarray(resize_image(init, "Crop and resize", SIZE, SIZE)).astype(int)
    assert np.abs(cropped[0] - (255, 0, 0)).max() <= 2  # covers the frame: the edge rows stay at the edges
    assert np.abs(cropped[32] - (0, 200, 0)).max() <= 2
    stretched = np.asarray(resize_image(init, "Just resize", SIZE, SIZE)).astype(int)
    assert stretched.shape == (SIZE, SIZE, 3) and not np.array_equal(stretched, filled)
    tall = np.asarray(resize_image(init.transpose(Image.Transpose.TRANSPOSE), "Resize and fill", SIZE, SIZE))
    assert np.abs(tall[:, :16].astype(int) - (255, 0, 0)).max() <= 2


@pytest.mark.parametrize("mode", ["Just resize", "Crop and resize", "Resize and fill"])
def test_an_init_of_another_size_is_resized_per_mode(tiny, mode):
    result = tiny.run(job(init_image=wide_init(), resize_mode=mode, denoising_strength=0.0))
    assert result.images[0].image.size == (SIZE, SIZE)
    fitted = resize_image(wide_init(), mode, SIZE, SIZE)
    assert np.abs(pixels(result) - round_trip(tiny.manager.current.pipe, fitted)).max() <= 1


def test_infotext_has_denoising_strength_and_pastes_back(tiny, tmp_path):
    init_file = tmp_path / "init.png"
    noise_image(7).save(init_file)
    result = tiny.run(job(init_image=str(init_file), denoising_strength=0.6), outputs_dir=tmp_path / "out")
    text = read_image_infotext(result.images[0].path)
    fields = to_fields(parse_infotext(text))
    assert "Denoising strength: 0.6," in text and (fields["width"], fields["height"]) == (SIZE, SIZE)
    assert denoising_strength(fields["extra"]) == 0.6
    assert "Denoising strength" not in tiny.run(job()).images[0].infotext
    assert denoising_strength({"Denoising strength": "1.7"}) is None


def test_micro_keeps_the_init_layout_and_takes_the_prompt_colour(tmp_path_factory):
    """A red circle top left, a prompt for a blue circle that names no place: image to image keeps the place
    (text to image puts such a circle elsewhere) and paints it blue."""
    from micro_kit import micro_generator, one_thread

    from studio.micro import oracle, world

    red = world.Scene(shape="circle", colour="red", size="small", position="top left", background="white")
    blue = world.Scene(shape="circle", colour="blue", size="small", position="top left", background="white")
    prompt = world.caption(blue).rsplit(",", 1)[0]  # "a small blue circle on a white background"
    init = Image.fromarray(world.render(red))
    settings = dict(prompt=prompt, steps=10, cfg_scale=5.0, width=SIZE, height=SIZE, sampler="DPM++ 2M",
                    schedule="Automatic")
    with one_thread():
        gen = micro_generator(home(tmp_path_factory))
        edited = [oracle.read(np.asarray(gen.run(GenerateJob(**settings, seed=s, init_image=init,
                                                             denoising_strength=0.6)).images[0].image))
                  for s in range(4)]
        drawn = [oracle.read(np.asarray(gen.run(GenerateJob(**settings, seed=s)).images[0].image)) for s in range(4)]
    assert [(r["colour"], r["shape"], r["position"]) for r in edited] == [("blue", "circle", "top left")] * 4
    assert any(r["position"] != "top left" for r in drawn)


# --- the VAE menu -------------------------------------------------------------------------------------------------


def write_vae(vae, path, perturb: float = 0.0, prefix: str = "", metadata: dict | None = None):
    """`vae` as a single original-layout file, its decoder weights moved by `perturb` (seeded)."""
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.startswith("decoder.") and v.is_floating_point():
            state[k] = v + perturb * torch.randn(v.shape, generator=g)
    tensors = {prefix + k: v.contiguous() for k, v in vae_to_original(state, dict(vae.config)).items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture
def vae_home(tmp_path):
    cfg = StudioConfig(device="cpu").with_home(tmp_path / "home")
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    return cfg, Generator(manager)


def test_a_vae_from_vae_folder_changes_the_image_and_none_restores_it(vae_home):
    cfg, gen = vae_home
    manager = gen.manager
    write_vae(manager.current.pipe.vae, cfg.vae_dir / "warm.safetensors", perturb=0.05, prefix="first_stage_model.")
    assert manager.vae_choices() == ["Automatic", "None", "warm.safetensors"]
    base = gen.run(job())
    assert "VAE" not in base.images[0].infotext
    manager.set_vae("warm.safetensors")
    swapped = gen.run(job())
    assert np.abs(pixels(swapped) - pixels(base)).max() > 10
    import hashlib

    digest = hashlib.sha256((cfg.vae_dir / "warm.safetensors").read_bytes()).hexdigest()[:10]
    fields = parse_infotext(swapped.images[0].infotext)
    assert (fields["VAE hash"], fields["VAE"]) == (digest, "warm.safetensors")
    assert vae_choice(fields, manager.vae_choices()) == ("warm.safetensors", None)
    # image to image encodes with the VAE in use too
    assert not np.array_equal(pixels(gen.run(job(init_image=noise_image(1), denoising_strength=0.5))),
                              pixels(swapped))
    manager.set_vae("None")
    assert np.array_equal(pixels(gen.run(job())), pixels(base))
    # the choice stays for the next model loaded
    manager.set_vae("warm.safetensors")
    manager.load("demo-tiny")
    assert manager.current.vae_choice.name == "warm.safetensors"


def test_a_vae_of_another_family_or_shape_is_refused(vae_home):
    cfg, gen = vae_home
    manager = gen.manager
    xl = build_tiny_pipeline("sdxl").vae  # the same shape as demo-tiny's: only its family tells them apart
    write_vae(xl, cfg.vae_dir / "tiny-xl.safetensors",
              metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    write_vae(xl, cfg.vae_dir / "sdxl_vae.safetensors")
    for name in ("tiny-xl.safetensors", "sdxl_vae.safetensors"):
        with pytest.raises(ModelLoadError, match=f"VAE {name} is made for SDXL models; the loaded model demo-tiny is "
                                                 r"SD 1.x: choose a VAE made for SD 1.x/2.x"):
            manager.set_vae(name)
    assert manager.current.vae_choice is None and manager.vae_setting == "Automatic"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(cfg.vae_dir / "half.safetensors"))
    with pytest.raises(ModelLoadError, match="half.safetensors lacks weight"):
        manager.set_vae("half.safetensors")
    with pytest.raises(ModelLoadError, match="there is no VAE 'nope' in vae/"):
        manager.set_vae("nope")


def test_automatic_picks_the_vae_beside_the_checkpoint(tmp_path):
    cfg = StudioConfig(device="cpu").with_home(tmp_path / "home")
    cfg.ensure_dirs()
    pipe = build_tiny_pipeline("sd1")
    save_single_file(pipe, cfg.models_dir / "tiny.safetensors", "sd1")
    manager = ModelManager(cfg)
    manager.load("tiny.safetensors")
    gen = Generator(manager)
    base = gen.run(job())
    write_vae(pipe.vae, cfg.models_dir / "tiny.vae.safetensors", perturb=0.05)
    assert [c for c in manager.choices() if c.startswith("tiny")] == ["tiny.safetensors"]  # the sidecar is no model
    manager.load("tiny.safetensors")
    assert manager.current.vae_choice.name == "tiny.vae.safetensors"
    beside = gen.run(job())
    assert "VAE: tiny.vae.safetensors" in beside.images[0].infotext
    assert np.abs(pixels(beside) - pixels(base)).max() > 10
    manager.set_vae("None")
    assert np.array_equal(pixels(gen.run(job())), pixels(base))
    # the VAE file given as a model: the message says where it goes
    with pytest.raises(ModelLoadError, match=r"tiny.vae.safetensors is a VAE, not a checkpoint: put it in vae/ .*"
                                             "used with checkpoint tiny"):
        manager.load("tiny.vae.safetensors")


def test_cli_image_to_image_with_a_vae(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "vae").mkdir(parents=True)
    write_vae(build_tiny_pipeline("sd1").vae, tmp_path / "home" / "vae" / "warm.safetensors", perturb=0.05)
    noise_image(9, 128, 64).save(tmp_path / "init.png")
    code = main(["generate", "--model", "demo-tiny", "--prompt", "a cat", "--steps", "4", "--width", "64",
                 "--height", "64", "--seed", "3", "--init-image", str(tmp_path / "init.png"), "--denoise", "0.6",
                 "--resize-mode", "crop", "--vae", "warm.safetensors", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    fields = parse_infotext(read_image_infotext(out.split()[0]))
    assert (fields["Denoising strength"], fields["VAE"], fields["Size"]) == ("0.6", "warm.safetensors", "64x64")
    assert main(["generate", "--model", "demo-tiny", "--prompt", "a cat", "--init-image", str(tmp_path / "init.png"),
                 "--denoise", "2"]) != 0
    assert "denoising strength must be between 0 and 1" in capsys.readouterr().err
