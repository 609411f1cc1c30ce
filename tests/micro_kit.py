"""Shared pieces of the tests that run the micro model (test_micro_learning, test_micro_palette,
test_storyboard_micro): one CPU thread, a studio home holding a captioned dataset of world renders and a TI
template, a Generator on micro, and images of a list of prompts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from studio.config import StudioConfig
from studio.micro import world
from studio.models.builtin import MICRO_NAME


@contextmanager
def one_thread() -> Iterator[None]:
    """The micro model's small matrices run fastest on one thread; two threads on a busy 2-core machine are many
    times slower. One thread also keeps the results the same on machines with more cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dataset_home(folder, data: str, scenes: list[world.Scene], caption: Callable[[world.Scene], str], slot: str,
                 template: str) -> StudioConfig:
    """A CPU studio home in `folder` with dataset `data` (the scenes' renders, each with the .txt caption
    `caption(scene)` minus its leading `slot`) and the user template `template`: "<slot>[name] [filewords]", which
    puts the slot back with the token right after it."""
    cfg = StudioConfig(device="cpu").with_home(folder)
    cfg.ensure_dirs()
    images = cfg.datasets_dir / data
    images.mkdir()
    for i, scene in enumerate(scenes):
        Image.fromarray(world.render(scene)).save(images / f"{i:02d}.png")
        text = caption(scene)
        assert text.startswith(slot), text
        (images / f"{i:02d}.txt").write_text(text.removeprefix(slot), encoding="utf-8")
    templates = cfg.presets_dir / "templates"  # a user template, picked by name
    templates.mkdir(parents=True, exist_ok=True)
    (templates / f"{template}.txt").write_text(f"{slot}[name] [filewords]\n", encoding="utf-8")
    return cfg


def micro_generator(cfg: StudioConfig):
    from studio.generation.generate import Generator
    from studio.models.manager import ModelManager

    manager = ModelManager(cfg)
    manager.load(MICRO_NAME)
    return Generator(manager)


def generate(generator, prompts: list[str], settings: dict) -> list[np.ndarray]:
    """One image per prompt, seed = its index."""
    from studio.generation.job import GenerateJob

    return [np.asarray(generator.run(GenerateJob(prompt=p, seed=i, **settings)).images[0].image.convert("RGB"))
            for i, p in enumerate(prompts)]
