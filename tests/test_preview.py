"""Live previews (studio.generation.preview): the fitted latent-to-colour map shows micro's picture forming (the last
preview is close to the decoded image), previews come every N steps and change no image, and the Generate tab's
session gets them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from micro_kit import micro_generator, one_thread
from PIL import Image

from studio.config import StudioConfig
from studio.generation.job import GenerateJob
from studio.generation.preview import Preview, approximate, preview_grid


def test_due_every_n_steps_and_never_after_the_last():
    p = Preview(3, lambda pictures: None)
    assert [s for s in range(1, 11) if p.due(s, 10)] == [3, 6, 9]
    assert [s for s in range(1, 10) if p.due(s, 9)] == [3, 6]  # step 9 is the real image
    assert not any(Preview(0, print).due(s, 10) for s in range(1, 11))


def test_the_grid_keeps_the_aspect_and_bounds_the_size():
    pictures = [Image.new("RGB", (12, 8), (k * 40, 0, 0)) for k in range(6)]
    sheet = preview_grid(pictures, 1536, 1024)
    assert sheet.size == (512, 2 * 85) and sheet.getpixel((130, 10)) == (40, 0, 0)  # 4 a row, second tile red 40
    assert preview_grid(pictures[:1], 64, 48).size == (64, 48)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    with one_thread():
        yield micro_generator(cfg)


def test_micro_previews_show_the_picture_forming_and_change_nothing(micro):
    from studio.micro import world

    job = GenerateJob(prompt=world.caption(world.sample_scene(np.random.default_rng(3))), steps=12, seed=11,
                      width=world.SIZE, height=world.SIZE, sampler="Euler", schedule="Automatic", cfg_scale=5.0)
    shown: list[list[Image.Image]] = []
    with one_thread():
        plain = micro.run(job)
        with_previews = micro.run(job, preview=Preview(4, shown.append))
    assert np.array_equal(np.asarray(plain.images[0].image), np.asarray(with_previews.images[0].image))
    # micro's small VAE is not linear in its latents: its previews are decoded (A1111's "Full"), at full size
    assert len(shown) == 2 and shown[0][0].size == (world.SIZE, world.SIZE)  # steps 4 and 8 of 12
    final = np.asarray(plain.images[0].image).astype(float)
    first, last = (np.asarray(pictures[0]).astype(float) for pictures in shown)
    assert np.abs(last - final).mean() < 40, np.abs(last - final).mean()  # step 8 of 12: some noise is left
    assert np.abs(last - final).mean() < np.abs(first - final).mean()  # it converges


def test_the_linear_map_is_used_only_where_it_fits(micro):
    from studio.generation import preview

    vae = micro.manager.current.pipe.vae
    weights, explained = preview.fit_latent_to_rgb(vae)
    assert weights.shape == (vae.config.latent_channels + 1, 3) and explained < preview.MIN_FIT
    assert preview.latent_to_rgb(vae) is None  # so micro's previews are decoded
    # the map itself: colour = [latent, 1] @ weights, in [-1, 1] -> 0..255, one picture per batch row
    w = torch.zeros(5, 3)
    w[0, 0], w[1, 2], w[4] = 1.0, -1.0, torch.tensor([0.0, 0.5, 0.0])
    z = torch.zeros(2, 4, 3, 5)
    z[1, 0] = 1.0
    z[1, 1] = 2.0  # beyond the range: clamped
    pictures = approximate(z, w)
    assert [p.size for p in pictures] == [(5, 3), (5, 3)]
    assert np.asarray(pictures[0])[0, 0].tolist() == [128, 191, 128]
    assert np.asarray(pictures[1])[0, 0].tolist() == [255, 191, 0]


def test_the_generate_tab_hands_its_session_the_previews(tmp_path):
    from gradio.state_holder import SessionState

    from studio.ui import build_ui
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path / "home"))
    state.manager.load("demo-tiny")
    demo = build_ui(state)
    run = next(d for d in demo.fns.values() if d.api_name == "generate")
    names = [n for n in __import__("inspect").signature(run.fn).parameters if n not in ("request", "progress")]
    values = dict(prompt="a red circle", negative="", sampler="Euler", schedule="Automatic", steps=6, seed=3,
                  width=64, height=64)
    inputs = [values.get(n, b.value) for n, b in zip(names, run.inputs, strict=True)]
    session = SessionState(demo)
    state.set_preview_every(None, 2)
    asyncio.run(demo.process_api(block_fn=run, inputs=inputs, state=session))
    picture = state.take_preview(None)
    assert picture is not None and picture.size == (64, 64)  # the step-4 preview, at the generation's size
    assert state.take_preview(None) is None  # shown once
    state.set_preview_every(None, 0)
    asyncio.run(demo.process_api(block_fn=run, inputs=inputs, state=session))
    assert state.take_preview(None) is None  # off: none made
    state.trainer.stop()
