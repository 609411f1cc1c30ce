"""The shipped micro model: loads offline through the studio, is the default without a checkpoint, follows prompts."""

from __future__ import annotations

import numpy as np
import pytest

from studio.config import StudioConfig
from studio.micro import oracle, world
from studio.models.builtin import MICRO_NAME, micro_available

pytestmark = pytest.mark.skipif(not micro_available(StudioConfig().assets_dir), reason="assets/micro is missing")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from studio.models.manager import ModelManager

    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load(MICRO_NAME)
    return manager


def test_loads_offline_as_an_sd1_model(micro):
    model = micro.current
    assert (model.name, model.source, model.family, model.prediction_type) == ("micro", "micro", "sd1", "v_prediction")
    assert model.native_size == world.SIZE and not model.is_demo
    assert len(model.pipe.tokenizer) == 49408  # the real CLIP tokenizer
    assert micro.choices()[-2:] == ["micro", "demo-tiny"]
    assert micro.default_choice() == "micro"  # models/ is empty


def test_a_real_checkpoint_comes_before_micro(studio_cfg, tiny_pipe):
    from studio.files.convert import save_single_file
    from studio.models.manager import ModelManager

    save_single_file(tiny_pipe, studio_cfg.models_dir / "mine.safetensors", "sd1")
    assert ModelManager(studio_cfg).default_choice() == "mine.safetensors"


def test_generated_images_show_the_prompted_attributes(micro):
    """Nine prompts of the fixed evaluation set, one per position, through the studio's own sampling loop (v-prediction,
    A1111 sampler names): background, colour, shape, size and position read back by the oracle."""
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob

    evals = world.eval_scenes(200)
    scenes = [next(s for s in evals if s.position == p) for p in world.POSITIONS]
    gen = Generator(micro)
    images = []
    for i, scene in enumerate(scenes):
        job = GenerateJob(prompt=world.caption(scene), sampler="DPM++ 2M", schedule="Automatic", steps=20, cfg_scale=5.0,
                          seed=i, width=world.SIZE, height=world.SIZE)
        images.append(np.asarray(gen.run(job).images[0].image.convert("RGB")))
    acc = oracle.accuracy(scenes, images, attributes=("background", "colour", "shape", "size", "position"))
    assert acc["background"] == 1.0 and acc["colour"] == 1.0, acc
    assert acc["position"] >= 7 / 9, acc  # chance is 1/9
    assert acc["mean"] >= 0.85, acc
