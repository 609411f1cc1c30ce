"""SDXL generation on demo-tiny-xl: both text encoders, the pooled embedding and the size conditioning, equal to
diffusers' StableDiffusionXLPipeline from the same starting latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from studio.generation.denoise import initial_latents
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.generation.samplers import make_scheduler
from studio.models.manager import ModelManager


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny-xl")
    return manager, Generator(manager)


def _job(**kw) -> GenerateJob:
    values = dict(prompt="a red circle on a blue background", negative_prompt="", sampler="Euler",
                  schedule="Automatic", steps=4, cfg_scale=7.0, seed=5, width=64, height=96)
    values.update(kw)
    return GenerateJob(**values)


def _diffusers(pipe, job: GenerateJob) -> np.ndarray:
    """diffusers' own SDXL pipeline on the same components, scheduler and starting noise (A1111 encodes an empty
    negative prompt instead of zeroing it, so force_zeros_for_empty_prompt is off)."""
    ref = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet,
                                    scheduler=make_scheduler(job.sampler, job.schedule, dict(pipe.scheduler.config)),
                                    force_zeros_for_empty_prompt=False, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    latents = initial_latents(pipe, [job.seed], job.width, job.height)
    out = ref(prompt=job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
              guidance_scale=job.cfg_scale, width=job.width, height=job.height, latents=latents)
    return np.asarray(out.images[0]).astype(int)


@pytest.mark.parametrize("negative", ["", "blurry, grainy"])
def test_sdxl_image_equals_diffusers_pipeline_from_the_same_latents(xl, negative):
    manager, gen = xl
    assert manager.current.is_xl
    job = _job(negative_prompt=negative)
    ours = np.asarray(gen.run(job).images[0].image).astype(int)
    theirs = _diffusers(manager.current.pipe, job)
    assert ours.shape == (96, 64, 3)
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()


def test_sdxl_conditioning_is_both_encoders_and_the_pooled_embedding(xl):
    manager, gen = xl
    pipe = manager.current.pipe
    encoder = gen.prompt_encoder(manager.current, {}, 1)
    encoded = encoder.encode("a red circle")
    ids = [t(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for t in (pipe.tokenizer, pipe.tokenizer_2)]
    with torch.no_grad():
        one = pipe.text_encoder(ids[0], output_hidden_states=True)
        two = pipe.text_encoder_2(ids[1], output_hidden_states=True)
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert encoded.embeds.shape == (1, 77, width)
    # diffusers' choice: each encoder's penultimate layer, concatenated; the pooled vector of encoder 2
    assert torch.allclose(encoded.embeds, torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1), atol=1e-6)
    assert torch.allclose(encoded.pooled, two.text_embeds, atol=1e-6)
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407  # SDXL's two pad tokens
    # long prompts: 75-token chunks on both encoders, the pooled vector from the first chunk
    long = encoder.encode(", ".join(["a red circle"] * 40))
    chunks = encoder.count_chunks(", ".join(["a red circle"] * 40))
    assert chunks >= 2 and long.embeds.shape == (1, 77 * chunks, width)
    assert long.pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)


def test_sdxl_batch_weights_edits_and_infotext(xl):
    manager, gen = xl
    single = [np.asarray(gen.run(_job(seed=s)).images[0].image) for s in (7, 8)]
    batch = gen.run(_job(seed=7, batch_size=2))
    # a batch of two gives each image bit for bit (denoise runs SDXL's text-time MLP one row at a time)
    assert all(np.array_equal(np.asarray(im.image), ref) for im, ref in zip(batch.images, single, strict=True))
    info = batch.images[0].infotext
    assert "Seed: 7," in info and "Size: 64x96" in info and "Model: demo-tiny-xl" in info
    plain = np.asarray(gen.run(_job()).images[0].image).astype(int)
    weighted = np.asarray(gen.run(_job(prompt="a (red:1.6) circle on a blue background")).images[0].image).astype(int)
    assert np.abs(plain - weighted).mean() > 0  # emphasis reaches the image
    encoder = gen.prompt_encoder(manager.current, {}, 1)
    a, b = encoder.encode("a red circle").embeds, encoder.encode("a (red:1.6) circle").embeds
    half = manager.current.pipe.text_encoder.config.hidden_size
    # ... and both encoders' halves of the conditioning (A1111 weights each embedder's output)
    assert not torch.allclose(a[..., :half], b[..., :half]) and not torch.allclose(a[..., half:], b[..., half:])
    edited = np.asarray(gen.run(_job(prompt="[a green square:a red circle on a blue background:0]")).images[0].image)
    assert np.array_equal(edited.astype(int), plain)


def test_sdxl_explorer_cells_equal_generate(xl):
    from studio.explorer.grid import AxisSpec, GridJob, GridRunner

    manager, gen = xl
    result = GridRunner(manager, gen).run(GridJob(_job(), x=AxisSpec.parse("CFG Scale: 1, 7"), cells_per_pass=2))
    for cell in result.plan.cells:
        single = np.asarray(gen.run(cell.job).images[0].image).astype(int)
        got = np.asarray(result.images[cell.index].image).astype(int)
        assert np.array_equal(got, single), cell.labels  # batched cells: bit for bit


def test_sdxl_clip_skip_follows_a1111(xl):
    """A1111 and ComfyUI leave SDXL's conditioning alone under clip skip (both encoders' penultimate layer); with
    A1111's "apply to CLIP-L" option, CLIP-L alone takes hidden_states[-clip_skip]."""
    manager, gen = xl
    pipe = manager.current.pipe
    ids = [t(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for t in (pipe.tokenizer, pipe.tokenizer_2)]
    with torch.no_grad():
        one = pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states
        two = pipe.text_encoder_2(ids[1], output_hidden_states=True).hidden_states
    with manager.lock:
        default = gen.prompt_encoder(manager.current, {}, 1).encode("a red circle").embeds
        skipped = gen.prompt_encoder(manager.current, {}, 2).encode("a red circle").embeds
        l_skip = gen.prompt_encoder(manager.current, {}, 3, clip_l_skip=True).encode("a red circle").embeds
    assert torch.equal(skipped, default)
    assert torch.allclose(l_skip, torch.cat([one[-3], two[-2]], dim=-1), atol=1e-6)
    # the infotext still says what the user set, as A1111 writes it
    assert "Clip skip: 2" in gen.run(_job(clip_skip=2)).images[0].infotext
