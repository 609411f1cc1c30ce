"""The shipped micro model: loads offline through the studio, is the default without a checkpoint, follows prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.config import StudioConfig
from studio.micro import MICRO_NAME, micro_available, oracle, world

pytestmark = pytest.mark.skipif(not micro_available(StudioConfig().assets_dir), reason="assets/micro is missing")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from studio.models import ModelManager

    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load(MICRO_NAME)
    return manager


def test_loads_offline_as_an_sd1_model(micro):
    model = micro.current
    assert (model.name, model.source, model.family, model.prediction_type) == ("micro", "micro", "sd1", "epsilon")
    assert model.native_size == world.SIZE and not model.is_demo
    assert len(model.pipe.tokenizer) == 49408  # the real CLIP tokenizer
    assert micro.choices()[-2:] == ["micro", "demo-tiny"]
    assert micro.default_choice() == "micro"  # models/ is empty


def test_a_real_checkpoint_comes_before_micro(studio_cfg, tiny_pipe):
    from studio.convert import save_single_file
    from studio.models import ModelManager

    save_single_file(tiny_pipe, studio_cfg.models_dir / "mine.safetensors", "sd1")
    assert ModelManager(studio_cfg).default_choice() == "mine.safetensors"


def test_generated_images_show_the_prompted_attributes(micro):
    """Four prompts of the fixed evaluation set: background, colour, shape and size read back by the oracle."""
    scenes = [world.eval_scenes(200)[i] for i in (0, 7, 14, 22)]
    pipe = micro.current.pipe
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(scenes))]
    out = pipe([world.caption(s) for s in scenes], num_inference_steps=20, guidance_scale=5.0, generator=gens,
               output_type="np").images
    images = [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out]
    acc = oracle.accuracy(scenes, images, attributes=("background", "colour", "shape", "size"))
    assert acc["background"] == 1.0 and acc["colour"] == 1.0, acc
    assert acc["mean"] >= 0.8, acc
