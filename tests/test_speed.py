"""The compiled UNet path gives the images the eager path gives (issue #10: optimized paths stay equivalent).

On the GPU the studio compiles with inductor (and CUDA graphs); here the same wiring runs on CPU with the
`aot_eager` backend: dynamo captures the UNet's graph (hooks, kwargs, peft-wrapped layers, merged LoRA weights)
and AOTAutograd traces it, so a capture that dropped a hook or read stale weights would change the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_networks import make_kohya_lora

from studio.config import StudioConfig
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.models import speed
from studio.models.manager import ModelManager


def _studio(home):
    cfg = StudioConfig().with_home(home)
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    save_file(make_kohya_lora(manager.current.pipe, 1), str(cfg.loras_dir / "inkwash.safetensors"))
    return manager, Generator(manager)


def _image(gen, prompt, **kw) -> np.ndarray:
    job = GenerateJob(prompt=prompt, negative_prompt="blurry", steps=4, width=64, height=64, seed=11,
                      sampler="DPM++ 2M", schedule="Karras", cfg_scale=6.0, **kw)
    return np.stack([np.asarray(r.image).astype(np.int16) for r in gen.run(job).images])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    eager = _studio(tmp_path_factory.mktemp("eager"))
    compiled = _studio(tmp_path_factory.mktemp("compiled"))
    torch._dynamo.reset()
    assert speed.compile_unet(compiled[0].current.pipe.unet, "default", backend="aot_eager")
    return eager[1], compiled[1]


def test_compiled_unet_gives_the_eager_images(pair):
    from torch._dynamo.utils import counters

    eager, compiled = pair
    assert speed.is_compiled(compiled.manager.current.pipe.unet)
    assert not speed.is_compiled(eager.manager.current.pipe.unet)
    before = counters["stats"]["unique_graphs"]
    for kw in ({}, {"batch_size": 2}):
        a, b = _image(eager, "a lighthouse at dusk", **kw), _image(compiled, "a lighthouse at dusk", **kw)
        assert np.abs(a - b).max() <= 1, kw  # AOTAutograd's decompositions may round the last bit differently
    assert counters["stats"]["unique_graphs"] > before  # the UNet really went through the compiler


def test_compiled_unet_sees_lora_merges_and_their_removal(pair):
    eager, compiled = pair
    base = _image(compiled, "a lighthouse")
    with_lora = _image(compiled, "a lighthouse <lora:inkwash:0.8>")
    assert np.abs(with_lora - base).max() > 10  # the merged weights reach the compiled module
    assert np.abs(with_lora - _image(eager, "a lighthouse <lora:inkwash:0.8>")).max() <= 1
    assert np.abs(_image(compiled, "a lighthouse") - base).max() <= 1  # and the restore does too


def test_compile_mode_is_checked_and_ignored_off_cuda(studio_cfg):
    with pytest.raises(ValueError, match="'turbo'"):
        speed.check_compile_mode("turbo")
    manager = ModelManager(studio_cfg)
    manager.load("demo-tiny")
    note = manager.set_memory_options(False, False, False, compile="reduce-overhead")
    assert "only applies on CUDA" in note
    assert not speed.is_compiled(manager.current.pipe.unet)
    assert not speed.compile_unet(torch.nn.Linear(2, 2), "off")


def test_storyboard_compiles_the_controlnet_like_the_unet_and_frames_stay_the_same(tmp_path):
    """A compiled UNet makes the storyboard compile its ControlNet the same way (the UNet alone compiled leaves the
    ControlNet's half of every step eager), and the frame equals the eager runner's frame."""
    from test_storyboard import settings, sketch, tiny_controlnet
    from torch._dynamo.utils import counters

    from studio.control.controlnet import save_controlnet_file
    from studio.storyboard.board import Shot, StoryboardStore, new_board
    from studio.storyboard.runner import StoryboardRunner

    def frame(name: str, compiled: bool) -> tuple[np.ndarray, StoryboardRunner]:
        cfg = StudioConfig().with_home(tmp_path / name)
        cfg.ensure_dirs()
        manager = ModelManager(cfg)
        manager.load("demo-tiny")
        save_controlnet_file(tiny_controlnet(manager.current.pipe.unet), cfg.controlnet_dir / "tiny-canny.safetensors")
        if compiled:
            assert speed.compile_unet(manager.current.pipe.unet, "default", backend="aot_eager")
        store = StoryboardStore(cfg.storyboards_dir)
        runner = StoryboardRunner(manager, store, cfg.controlnet_dir)
        board = new_board("b", settings(candidates=1))
        store.path("b").mkdir(parents=True, exist_ok=True)
        board.shots = [Shot("1", "close shot", "a face", seed=9)]
        store.add_reference(board, board.shots[0], sketch(store.path("b") / "drawing.png"))
        runner.run(board, on_progress=lambda done, total, message: notes.append(message))
        return np.asarray(Image.open(store.path("b") / board.shots[0].frames[0].file).convert("RGB")).astype(
            np.int16), runner

    notes: list[str] = []
    torch._dynamo.reset()
    eager, eager_runner = frame("eager", False)
    assert not any(speed.COMPILE_NOTE in m for m in notes)
    notes.clear()
    before = counters["stats"]["unique_graphs"]
    compiled, runner = frame("compiled", True)
    cn = next(reversed(runner.controlnets._kept.values())).model
    assert speed.compiled_as(cn) == ("default", "aot_eager")
    assert not speed.is_compiled(next(reversed(eager_runner.controlnets._kept.values())).model)
    assert counters["stats"]["unique_graphs"] >= before + 2  # UNet and ControlNet both went through the compiler
    assert np.abs(compiled - eager).max() <= 1
    assert sum(speed.COMPILE_NOTE in m for m in notes) == 1  # progress says why the first frame waits


def test_progress_says_when_the_first_image_at_a_size_compiles(pair):
    """The first pass of a compiled UNet at a new size waits for the compiler: progress says so, once per size;
    the eager path never does."""
    eager, compiled = pair

    def notes(gen, width):
        messages = []
        job = GenerateJob(prompt="a lighthouse", steps=2, width=width, height=64, seed=1, sampler="Euler",
                          schedule="Automatic", cfg_scale=5.0)
        gen.run(job, on_progress=lambda done, total, message: messages.append(message))
        return sum(m == speed.COMPILE_NOTE for m in messages)

    assert (notes(compiled, 72), notes(compiled, 72), notes(compiled, 80)) == (1, 0, 1)
    assert notes(eager, 88) == 0


def test_grid_progress_says_when_a_pass_compiles(pair):
    from studio.explorer.grid import AxisSpec, GridJob, GridRunner

    eager, compiled = pair
    for gen, expected in ((compiled, 1), (eager, 0)):
        messages = []
        job = GridJob(GenerateJob(prompt="a lighthouse", steps=2, width=64, height=96, seed=1, sampler="Euler",
                                  schedule="Automatic", cfg_scale=5.0), x=AxisSpec.parse("Seed: 1, 2"))
        GridRunner(gen.manager, gen).run(job, on_progress=lambda done, total, m, out=messages: out.append(m))
        assert sum(speed.COMPILE_NOTE in m for m in messages) == expected, messages


def test_compile_caches_go_to_the_studio_cache_folder_unless_the_user_chose_one(tmp_path, monkeypatch):
    monkeypatch.delenv(speed.COMPILE_CACHE_ENV, raising=False)
    folder = speed.use_compile_cache(tmp_path / "torch-compile")
    assert folder == tmp_path / "torch-compile" and folder.is_dir()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()) == folder  # where inductor will write its FX graphs and kernels
    monkeypatch.setenv(speed.COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert speed.use_compile_cache(tmp_path / "torch-compile") == tmp_path / "mine"
