"""The UNet replayed from CUDA graphs gives the eager images (issue 25: optimized paths stay equivalent).

On the CPU a stand-in records nothing and replays by running the forward on the recording's static inputs, which
is what a graph replay computes: an input not copied in at a step (the timestep, a prompt edit's new text, SDXL's
added conditioning, img2img's start) would change the image, and the key tests say when a pass records anew. The
tests marked cuda run the real recordings on a GPU (the device bench runs them); there a LoRA merged after
recording must reach the replay through the same weight storage."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from test_generate_control import tiny_controlnet
from test_networks import make_kohya_lora

from studio.config import StudioConfig
from studio.control.controlnet import save_controlnet_file
from studio.generation.controls import ControlUnit
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.models import cuda_graphs, speed
from studio.models.manager import ModelManager


class ReplayedOnCPU(cuda_graphs.Recorded):
    """A recording that replays by running the recorded function on its static inputs (no CUDA needed)."""

    recorded = 0

    @staticmethod
    def warm_up(fn, args):
        return fn(*args)

    def record(self):
        ReplayedOnCPU.recorded += 1
        return self.fn(*self.args)

    def replay(self):
        self.out.copy_(self.fn(*self.args))


def _studio(home, model: str, graphs: bool, device: str = "cpu"):
    cfg = replace(StudioConfig(device=device).with_home(home), cuda_graphs=graphs)
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load(model)
    if graphs and device == "cpu":
        cuda_graphs.enable(manager.current.pipe.unet, True, record=ReplayedOnCPU)
    save_file(make_kohya_lora(manager.current.pipe, 1), str(cfg.loras_dir / "inkwash.safetensors"))
    if model == "demo-tiny":
        for seed, name in ((0, "edges"), (1, "shapes")):
            net = tiny_controlnet(manager.current.pipe.unet, seed)
            save_controlnet_file(net, cfg.controlnet_dir / f"{name}.safetensors")
    return Generator(manager)


def _images(gen, prompt, **kw) -> np.ndarray:
    job = GenerateJob(**{"prompt": prompt, "negative_prompt": "blurry", "steps": 5, "width": 64, "height": 64,
                         "seed": 11, "sampler": "DPM++ 2M", "schedule": "Karras", "cfg_scale": 6.0, **kw})
    return np.stack([np.asarray(r.image).astype(np.int16) for r in gen.run(job).images])


def _recordings(gen) -> int:
    graphs = getattr(gen.manager.current.pipe.unet, "_studio_cuda_graphs", None)
    return 0 if graphs is None else len(graphs.graphs)


def _reference() -> Image.Image:  # a line drawing the "invert" preprocessor turns into a map (no extra packages)
    picture = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(picture).ellipse((10, 12, 50, 56), fill=(200, 40, 40), outline="black", width=3)
    return picture


CONTROLS = [  # demo-tiny only: ControlNets built from its UNet
    ("a red circle", {"controls": [ControlUnit("edges", _reference(), "invert", 0.9)]}),
    ("a red circle", {"controls": [  # two at once, the second off after 75 % of the steps and weighting its mode
        ControlUnit("edges", _reference(), "invert", 0.9),
        ControlUnit("shapes", _reference(), "invert", 0.5, 0.0, 0.75, resize_mode="Just Resize",
                    mode="ControlNet is more important")]}),
]
CASES = [
    ("a lighthouse at dusk", {}),
    ("a lighthouse at dusk", {"batch_size": 2, "cfg_scale": 1.0}),  # no CFG: the padded batch of one
    ("a [lighthouse:castle:0.5] at dusk", {"sampler": "Euler"}),  # the text changes mid-pass
    ("a lighthouse at dusk", {"init_image": Image.new("RGB", (64, 64), (200, 40, 40)), "denoising_strength": 0.6}),
]


@pytest.fixture(scope="module", params=["demo-tiny", "demo-tiny-xl"])
def pair(request, tmp_path_factory):
    model = request.param
    return (_studio(tmp_path_factory.mktemp("eager"), model, graphs=False),
            _studio(tmp_path_factory.mktemp("graphs"), model, graphs=True))


@pytest.mark.parametrize("prompt,kw", CASES + CONTROLS,
                         ids=["plain", "no-cfg-batch", "prompt-edit", "img2img", "controlnet", "two-controlnets"])
def test_replayed_unet_gives_the_eager_images(pair, prompt, kw):
    eager, graphed = pair
    if "controls" in kw and eager.manager.current.family != "sd1":
        pytest.skip("the test ControlNets are built from demo-tiny's UNet")
    kw = {**kw, "init_image": kw["init_image"].copy()} if "init_image" in kw else kw
    assert not cuda_graphs.usable(eager.manager.current.pipe.unet)
    assert cuda_graphs.usable(graphed.manager.current.pipe.unet)
    a = _images(eager, prompt, **kw)
    before = ReplayedOnCPU.recorded
    b = _images(graphed, prompt, **kw)
    assert np.array_equal(a, b)
    if "controls" in kw:  # the ControlNets were recorded with the UNet (not left to the eager path)
        assert ReplayedOnCPU.recorded > before
    assert _recordings(graphed) >= 1  # the second pass at this shape replayed (the first one warmed up)
    assert np.array_equal(_images(graphed, prompt, **kw), a)


def test_a_recording_is_not_replayed_for_another_control_mode_or_weight(pair):
    eager, graphed = pair
    if eager.manager.current.family != "sd1":
        pytest.skip("the test ControlNets are built from demo-tiny's UNet")
    for mode, weight in (("Balanced", 0.9), ("Balanced", 0.9), ("My prompt is more important", 0.9),
                         ("Balanced", 0.4)):  # the same ControlNet and input shapes each time
        kw = {"controls": [ControlUnit("edges", _reference(), "invert", weight, mode=mode)]}
        assert np.array_equal(_images(graphed, "a red circle", **kw), _images(eager, "a red circle", **kw)), mode


def test_recordings_are_kept_per_shape_and_redone_when_the_unet_changes(tmp_path):
    gen = _studio(tmp_path, "demo-tiny", graphs=True)
    unet = gen.manager.current.pipe.unet
    cuda_graphs.release(unet)
    start = ReplayedOnCPU.recorded
    _images(gen, "a lighthouse")  # warm-up at step 1, recorded at step 2, replayed after
    assert ReplayedOnCPU.recorded == start + 1
    _images(gen, "a lighthouse <lora:inkwash:1>")  # a kohya file's first use adds peft layers: a new UNet
    assert ReplayedOnCPU.recorded == start + 2
    _images(gen, "a lighthouse <lora:inkwash:0.5>")  # merges in place: the same storage, the same recording
    _images(gen, "a lighthouse")
    assert ReplayedOnCPU.recorded == start + 2
    _images(gen, "a lighthouse", width=96)  # another shape: its own recording, the last one kept
    assert ReplayedOnCPU.recorded == start + 3 and _recordings(gen) == 2
    _images(gen, "a lighthouse", width=128)  # a third: the oldest goes (MAX_GRAPHS)
    assert _recordings(gen) == cuda_graphs.MAX_GRAPHS
    key = cuda_graphs.module_key(unet)
    gen.manager.set_memory_options(attention_slicing=True, vae_tiling=False, cpu_offload=False)  # new processors
    assert cuda_graphs.module_key(unet) != key
    assert _recordings(gen) == 0  # the manager's setting applied again: recordings dropped (off on a CPU)
    cuda_graphs.enable(unet, True, record=ReplayedOnCPU)
    before = ReplayedOnCPU.recorded
    _images(gen, "a lighthouse")
    assert ReplayedOnCPU.recorded == before + 1


def test_the_manager_turns_recording_on_only_where_it_applies(tmp_path):
    cfg = StudioConfig(device="cpu").with_home(tmp_path)
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    unet = manager.current.pipe.unet
    assert not cuda_graphs.usable(unet)  # a CPU UNet: no CUDA graphs
    cuda_graphs.enable(unet, True)
    assert not cuda_graphs.usable(unet)  # enabled, but the real recorder needs CUDA
    cuda_graphs.enable(unet, True, record=ReplayedOnCPU)
    assert cuda_graphs.usable(unet)
    unet.train()
    assert not cuda_graphs.usable(unet)  # training previews and the trainer run it eagerly
    unet.eval()
    assert speed.compile_unet(unet, "default", backend="eager")
    assert not cuda_graphs.usable(unet)  # compiled: reduce-overhead records its own graphs
    assert StudioConfig.from_env().cuda_graphs


def test_studio_cuda_graphs_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("STUDIO_CUDA_GRAPHS", "0")
    assert not StudioConfig.from_env().cuda_graphs


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device bench runs these)")


@cuda
@pytest.mark.parametrize("model", ["demo-tiny", "demo-tiny-xl"])
def test_cuda_replays_give_the_eager_images_and_see_lora_merges(tmp_path, model):
    eager = _studio(tmp_path / "a", model, graphs=False, device="cuda")
    graphed = _studio(tmp_path / "b", model, graphs=True, device="cuda")
    assert cuda_graphs.usable(graphed.manager.current.pipe.unet)
    for prompt, kw in CASES + (CONTROLS if model == "demo-tiny" else []):
        kw = {**kw, "init_image": kw["init_image"].copy()} if "init_image" in kw else kw
        a = _images(eager, prompt, **kw)
        assert np.array_equal(_images(graphed, prompt, **kw), a), prompt
        assert np.array_equal(_images(graphed, prompt, **kw), a), prompt  # replayed from the recording
    # recorded without the LoRA, replayed with it merged (and unmerged) in place
    plain = _images(eager, "a lighthouse at dusk")
    assert np.array_equal(_images(graphed, "a lighthouse at dusk"), plain)
    with_lora = _images(eager, "a lighthouse at dusk <lora:inkwash:1>")
    assert not np.array_equal(with_lora, plain)
    assert np.array_equal(_images(graphed, "a lighthouse at dusk <lora:inkwash:1>"), with_lora)
    assert np.array_equal(_images(graphed, "a lighthouse at dusk"), plain)
    assert _recordings(graphed) >= 1


def test_a_broadcast_input_runs_eagerly_instead_of_being_recorded():
    graphs = cuda_graphs.UNetGraphs(cuda_graphs.OrderedDict(), set(), ReplayedOnCPU)
    image = torch.rand(1, 3, 4, 4)
    for _ in range(3):  # warm-up, record, replay: none of them for an expanded (stride-0) input
        out = graphs.call(("key",), lambda x: x * 2, (image.expand(2, -1, -1, -1),))
        assert torch.equal(out, image.expand(2, -1, -1, -1) * 2)
    assert not graphs.graphs and not graphs.warmed
    graphs.call(("key",), lambda x: x * 2, (image.repeat(2, 1, 1, 1),))
    graphs.call(("key",), lambda x: x * 2, (image.repeat(2, 1, 1, 1),))
    assert len(graphs.graphs) == 1
