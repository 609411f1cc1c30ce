"""The compiled UNet path gives the images the eager path gives (issue #10: optimized paths stay equivalent).

On the GPU the studio compiles with inductor (and CUDA graphs); here the same wiring runs on CPU with the
`aot_eager` backend: dynamo captures the UNet's graph (hooks, kwargs, peft-wrapped layers, merged LoRA weights)
and AOTAutograd traces it, so a capture that dropped a hook or read stale weights would change the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_networks import make_kohya_lora

from studio import speed
from studio.config import StudioConfig
from studio.generate import GenerateJob, Generator
from studio.models import ModelManager


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
