"""The explorer's Denoising, Hires steps, Hires upscale, Hires upscaler and VAE axes on demo-tiny (64 px, few
steps): their values and errors, cells equal to Generate's image for the same job (image to image, inpainting and
hires fix cells included), one pass per strength or hires setting, the VAE switched per group and restored, and
hires fix counted in the work limit."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from studio.config import LimitExceeded, Limits, StudioConfig
from studio.explorer.grid import AxisSpec, GridJob, GridRunner, plan_grid
from studio.explorer.syntax import AxisSyntaxError
from studio.files.convert import vae_to_original
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager

SIZE = 64


def write_vae(vae, path, perturb: float):
    """`vae` as a single original-layout file, its decoder weights moved by `perturb` (as tests/test_img2img.py)."""
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if k.startswith("decoder.") and v.is_floating_point():
            state[k] = v + perturb * torch.randn(v.shape, generator=g)
    tensors = {"first_stage_model." + k: v.contiguous() for k, v in vae_to_original(state, dict(vae.config)).items()}
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    write_vae(manager.current.pipe.vae, cfg.vae_dir / "warm.safetensors", perturb=0.05)
    files = tmp_path_factory.mktemp("files")
    init = files / "init.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(init)
    wide = files / "wide.png"  # "Only masked" inpainting lays its result back into this 80x72 picture
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(wide)
    mask = Image.new("L", (80, 72), 0)
    mask.paste(255, (20, 16, 60, 56))
    mask.save(files / "mask.png")
    gen = Generator(manager)
    return GridRunner(manager, gen), gen, cfg, files


def base(**kw) -> GenerateJob:
    values = dict(prompt="a red circle", negative_prompt="blurry", steps=2, width=SIZE, height=SIZE, seed=7,
                  sampler="Euler", schedule="Automatic", cfg_scale=7.0)
    values.update(kw)
    return GenerateJob(**values)


def hires_base(**kw) -> GenerateJob:
    values = dict(hires_fix=True, hires_upscaler="Latent", hires_scale=1.25, hires_steps=2, hires_denoising=0.5)
    return base(**{**values, **kw})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def grid(x: str, y: str | None = None, job: GenerateJob | None = None, **kw) -> GridJob:
    return GridJob(job or base(), x=AxisSpec.parse(x), y=AxisSpec.parse(y), **kw)


def generate(gen: Generator, cell) -> object:
    """Generate's image for the cell's job, with the cell's VAE chosen in the VAE menu (as a user would)."""
    manager = gen.manager
    before = manager.vae_setting
    if cell.vae:
        manager.set_vae(cell.vae)
    try:
        return gen.run(GenerateJob(**asdict(cell.job))).images[0]
    finally:
        if manager.vae_setting != before:
            manager.set_vae(before)


def assert_cells_equal_generate(result, gen):
    assert not result.interrupted and len(result.images) == len(result.plan.cells)
    for cell in result.plan.cells:
        single = generate(gen, cell)
        got = result.images[cell.index]
        assert got.image.size == single.image.size, cell.labels
        assert np.array_equal(pixels(got.image), pixels(single.image)), cell.labels
        assert got.infotext == single.infotext, cell.labels


class UnetCalls:
    def __init__(self, unet):
        self.batches: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.batches.append(args[0].shape[0]))

    def close(self):
        self.handle.remove()


# --- reading the axes (no model) -------------------------------------------------------------------------------


def values_of(x: str, job: GenerateJob):
    plan = plan_grid(grid(x, job=job))
    return plan.axes[0].type.name, plan.axes[0].values, plan.axes[0].labels


def test_denoising_axis_values_aliases_and_where_it_acts(studio):
    _, _, _, files = studio
    img2img = base(init_image=str(files / "init.png"))
    assert values_of("Denoising: 0.2-0.6 (+0.2), 1", img2img) == (
        "Denoising", [0.2, 0.4, 0.6, 1.0], ["Denoising: 0.2", "Denoising: 0.4", "Denoising: 0.6", "Denoising: 1"])
    for alias in ("denoising strength", "Strength", "DENOISE"):
        assert values_of(f"{alias}: 0.5", img2img)[:2] == ("Denoising", [0.5])
    plan = plan_grid(grid("Denoising: 0.25, 0.75", job=img2img))
    assert [c.job.denoising_strength for c in plan.cells] == [0.25, 0.75]
    # text to image with hires fix: A1111's denoising strength is the second pass's
    plan = plan_grid(grid("Denoising: 0.25, 0.75", job=hires_base()))
    assert [(c.job.hires_denoising, c.job.denoising_strength) for c in plan.cells] == [(0.25, 0.75), (0.75, 0.75)]


def test_hires_axes_values_and_aliases():
    job = hires_base()
    assert values_of("Hires steps: 0, 2-4", job) == ("Hires steps", [0, 2, 3, 4],
                                                     ["Hires steps: 0", "Hires steps: 2", "Hires steps: 3",
                                                      "Hires steps: 4"])
    assert values_of("hr steps: 5", job)[:2] == ("Hires steps", [5])
    assert values_of("Hires upscale: 1.5, 2", job) == ("Hires upscale", [1.5, 2.0],
                                                       ["Hires upscale: 1.5", "Hires upscale: 2"])
    assert values_of("hires scale: 1.25", job)[:2] == ("Hires upscale", [1.25])
    # names as the menu spells them, whatever the case
    assert values_of("Hires upscaler: latent (nearest), LANCZOS, Nearest", job) == (
        "Hires upscaler", ["Latent (nearest)", "Lanczos", "Nearest"],
        ["Hires upscaler: Latent (nearest)", "Hires upscaler: Lanczos", "Hires upscaler: Nearest"])
    assert values_of("hr upscaler: Latent", job)[:2] == ("Hires upscaler", ["Latent"])
    plan = plan_grid(grid("Hires upscale: 1.5, 2", "Hires steps: 1, 3", job=job))
    assert [(c.job.hires_scale, c.job.hires_steps) for c in plan.cells] == [(1.5, 1), (2, 1), (1.5, 3), (2, 3)]
    assert [c.size for c in plan.cells] == [(96, 96), (128, 128)] * 2  # the second pass's size
    assert plan.layout.col_widths == [96, 128]
    plan = plan_grid(grid("Hires upscaler: Lanczos, Latent", job=job))
    assert [c.job.hires_upscaler for c in plan.cells] == ["Lanczos", "Latent"]


@pytest.mark.parametrize("x, job, message", [
    ("Denoising: 0.5, 1.5", "img2img", "X axis (Denoising): denoising strength 1.5 is out of range; use 0 to 1"),
    ("Denoising: 0.5, x", "img2img", "X axis (Denoising): denoising strength 'x' is not a number"),
    ("Denoising: 0.5", "txt2img", "X axis (Denoising): the Denoising axis sets the denoising strength of image to "
                                  "image (or of the hires fix's second pass), and the base settings are text to "
                                  "image: add an init image or turn hires fix on"),
    ("Hires steps: 2, 200", "hires", "X axis (Hires steps): hires steps 200 is out of range; use 0 (the same as "
                                     "steps) to 150"),
    ("Hires steps: 2.5", "hires", "X axis (Hires steps): hires steps '2.5' is not a whole number"),
    ("Hires steps: 2", "txt2img", "X axis (Hires steps): the Hires steps axis changes the hires fix, which is off"),
    ("Hires upscale: 1.5, 5", "hires", "X axis (Hires upscale): hires upscale 5 is out of range; use 1 to 4"),
    ("Hires upscale: 2", "txt2img", "X axis (Hires upscale): the Hires upscale axis changes the hires fix"),
    ("Hires upscale: 2", "resized", "X axis (Hires upscale): the base settings resize the hires fix to 128x0"),
    ("Hires upscaler: Latent, Lanczoz", "hires", "X axis (Hires upscaler): unknown hires upscaler 'Lanczoz'"),
    ("Hires upscaler: Lanczoz", "hires", "did you mean 'Lanczos'"),
    ("Hires upscaler: None", "hires", "unknown hires upscaler 'None'"),  # it would not reach the hires size
    ("Hires upscaler: Lanczos", "txt2img", "X axis (Hires upscaler): the Hires upscaler axis changes the hires fix"),
    ("Hires upscaler: Lanczos", "img2img", "X axis (Hires upscaler): the Hires upscaler axis changes the hires fix"),
])
def test_bad_values_are_refused_naming_axis_and_value(studio, x, job, message):
    _, _, _, files = studio
    jobs = {"txt2img": base(), "img2img": base(init_image=str(files / "init.png")), "hires": hires_base(),
            "resized": hires_base(hires_width=128)}
    with pytest.raises(AxisSyntaxError) as e:
        plan_grid(grid(x, job=jobs[job]))
    assert message in str(e.value)


def test_vae_and_upscaler_names_come_from_the_studio_folders(studio):
    runner, _, cfg, _ = studio
    (cfg.upscalers_dir / "4x-tiny.safetensors").write_bytes(b"")  # listed by name; not loaded when planned
    try:
        plan = runner.plan(grid("VAE: automatic, WARM.safetensors, none", "Hires upscaler: 4x-tiny, Latent",
                                job=hires_base()))
    finally:
        (cfg.upscalers_dir / "4x-tiny.safetensors").unlink()
    assert plan.axes[0].values == ["Automatic", "warm.safetensors", "None"]
    assert plan.axes[0].labels == ["VAE: Automatic", "VAE: warm.safetensors", "VAE: None"]
    assert plan.axes[1].values == ["4x-tiny", "Latent"]
    assert [c.vae for c in plan.cells[:3]] == ["Automatic", "warm.safetensors", "None"]
    assert runner.plan(grid("sd vae: None")).axes[0].values == ["None"]
    with pytest.raises(AxisSyntaxError, match="X axis \\(VAE\\): unknown VAE 'cold.safetensors'; choose one of: "
                                              "Automatic, None, warm.safetensors"):
        runner.plan(grid("VAE: Automatic, cold.safetensors"))
    with pytest.raises(AxisSyntaxError, match="X axis \\(Hires upscaler\\): unknown hires upscaler '4x-tiny'"):
        runner.plan(grid("Hires upscaler: 4x-tiny", job=hires_base()))  # the file is gone


def test_work_limit_counts_the_hires_second_passes():
    # each cell: 10 steps at 64x64 (0.04) + 10 at 128x128 (0.16), under the limit of 1; five cells are 1.02
    job = grid("Seed: 1-5", job=hires_base(steps=10, hires_steps=10, hires_scale=2))
    with pytest.raises(LimitExceeded, match="1 \\(max_work\\)") as e:
        plan_grid(job, limits=Limits(max_work=1))
    assert "hires fix second passes included" in str(e.value)
    plan_grid(grid("Seed: 1-5", job=base(steps=10)), limits=Limits(max_work=1))  # without hires fix it fits


# --- cells equal Generate ----------------------------------------------------------------------------------------


def test_denoising_axis_runs_one_img2img_pass_per_strength_and_equals_generate(studio):
    runner, gen, _, files = studio
    job = grid("Denoising: 0.25, 0.5, 1", "Seed: 1, 2", job=base(steps=4, init_image=str(files / "init.png")))
    plan = runner.plan(job)
    assert [sorted(plan.cells[i].job.seed for i in p) for p in plan.passes] == [[1, 2]] * 3
    assert [plan.cells[p[0]].job.denoising_strength for p in plan.passes] == [0.25, 0.5, 1]
    assert plan.total_steps == 1 + 2 + 4  # image to image runs steps x strength (of 4)
    assert "image to image" in plan.summary()
    calls = UnetCalls(gen.manager.current.pipe.unet)
    try:
        result = runner.run(plan)
    finally:
        calls.close()
    assert result.passes_run == 3 and calls.batches == [4] * 7  # [uncond; cond] of 2 cells, 1 + 2 + 4 steps
    assert_cells_equal_generate(result, gen)
    assert "Denoising strength: 0.25" in result.images[0].infotext
    assert not np.array_equal(pixels(result.images[0].image), pixels(result.images[1].image))


def test_img2img_base_job_is_not_run_as_text_to_image(studio):
    runner, gen, _, files = studio
    result = runner.run(grid("Seed: 4", job=base(init_image=str(files / "init.png"), denoising_strength=0.5)))
    assert result.passes_run == 1
    assert_cells_equal_generate(result, gen)
    txt2img = gen.run(base(seed=4)).images[0]
    assert not np.array_equal(pixels(result.images[0].image), pixels(txt2img.image))
    assert parse_infotext(result.images[0].infotext)["Denoising strength"] == "0.5"


def test_only_masked_inpainting_cells_equal_generate(studio):
    runner, gen, _, files = studio
    job = base(init_image=str(files / "wide.png"), mask=str(files / "mask.png"), inpaint_area="Only masked",
               denoising_strength=0.75)
    result = runner.run(grid("Seed: 1", job=job))
    assert result.images[0].image.size == (80, 72)  # laid back into the init picture
    assert result.drawing.layout.col_widths == [80] and result.drawing.layout.row_heights == [72]
    assert_cells_equal_generate(result, gen)
    original = pixels(Image.open(files / "wide.png"))
    assert np.array_equal(pixels(result.images[0].image)[:4], original[:4])  # kept outside the (blurred) mask
    assert not np.array_equal(pixels(result.images[0].image), original)


def test_hires_steps_and_denoising_axes_equal_generate(studio):
    runner, gen, _, _ = studio
    job = grid("Hires steps: 0, 3", "Denoising: 0.7", job=hires_base(seed=5))
    plan = runner.plan(job)
    assert len(plan.passes) == 2 and "hires fix on" in plan.summary()
    assert [c.job.hires_denoising for c in plan.cells] == [0.7, 0.7]
    # 2 first-pass steps each, then (hires steps, or the 2 steps) x 0.7: 1 and 2
    assert plan.total_steps == 2 * 2 + 1 + 2
    result = runner.run(plan)
    assert result.images[0].image.size == (80, 80)
    assert_cells_equal_generate(result, gen)
    info = parse_infotext(result.images[1].infotext)
    assert (info["Hires steps"], info["Denoising strength"], info["Hires upscaler"]) == ("3", "0.7", "Latent")
    assert "Hires steps" not in parse_infotext(result.images[0].infotext)
    assert not np.array_equal(pixels(result.images[0].image), pixels(result.images[1].image))


def test_hires_upscaler_and_upscale_axes_equal_generate(studio):
    runner, gen, _, _ = studio
    job = grid("Hires upscaler: Latent, Lanczos", "Hires upscale: 1.25, 1.5", job=hires_base(seed=9))
    result = runner.run(job)
    assert result.passes_run == 4
    assert [result.images[i].image.size for i in range(4)] == [(80, 80)] * 2 + [(96, 96)] * 2
    assert result.drawing.layout.row_heights == [80, 96] and result.drawing.layout.col_widths == [96, 96]
    assert_cells_equal_generate(result, gen)
    assert "Hires upscaler: Lanczos" in result.images[1].infotext and "Hires upscale: 1.5" in result.images[3].infotext
    assert not np.array_equal(pixels(result.images[0].image), pixels(result.images[1].image))


def test_vae_axis_switches_per_group_equals_generate_and_restores_the_vae(studio):
    runner, gen, _, _ = studio
    manager = gen.manager
    assert manager.vae_setting == "Automatic" and manager.current.vae_choice is None
    calls = []
    real = manager.set_vae
    manager.set_vae = lambda name: (calls.append(name), real(name))[1]
    try:
        plan = runner.plan(grid("VAE: Automatic, warm.safetensors", "Seed: 1, 2"))
        assert [[plan.cells[i].vae for i in p] for p in plan.passes] == [["Automatic"] * 2, ["warm.safetensors"] * 2]
        result = runner.run(plan)
    finally:
        del manager.set_vae
    assert calls == ["warm.safetensors", "Automatic"]  # one switch, then the VAE the grid found
    assert manager.vae_setting == "Automatic" and manager.current.vae_choice is None
    assert_cells_equal_generate(result, gen)
    assert "VAE: warm.safetensors" in result.images[1].infotext and "VAE" not in parse_infotext(
        result.images[0].infotext)
    assert not np.array_equal(pixels(result.images[0].image), pixels(result.images[1].image))
    # a user's own VAE choice comes back too
    manager.set_vae("warm.safetensors")
    try:
        runner.run(grid("VAE: None"))
        assert manager.vae_setting == "warm.safetensors" and manager.current.vae_choice.name == "warm.safetensors"
    finally:
        manager.set_vae("Automatic")


# --- the Explorer tab ----------------------------------------------------------------------------------------------


def test_explorer_tab_offers_the_axes_and_the_base_job_modes(studio):
    from studio.ui import explorer_tab
    from studio.ui.state import AppState

    runner, gen, cfg, files = studio
    state = AppState.create(cfg)
    state.manager.load("demo-tiny")
    assert {"Denoising", "Hires steps", "Hires upscale", "Hires upscaler", "VAE"} <= set(explorer_tab.AXIS_NAMES)
    assert explorer_tab.helper_choices(state, "VAE") == ["Automatic", "None", "warm.safetensors"]
    assert explorer_tab.helper_choices(state, "Hires upscaler")[:2] == ["Latent", "Latent (antialiased)"]
    with gr.Blocks():
        tab = explorer_tab.build(state)
    values = ["a red circle", "", "Euler", "Automatic", 2, 7, 1, 64, 64, 1,
              "Denoising", "0.3, 0.6", None, "Nothing", "", None, "Nothing", "", None, False, 8]
    assert "add an init image or turn hires fix on" in tab["plan_preview"](*values)
    with_init = [*values, str(files / "init.png"), 0.5, "Just resize"]
    assert tab["plan_preview"](*with_init).startswith("**2 cells (2) in 2 denoising passes")
    assert "image to image" in tab["plan_preview"](*with_init)
    job = explorer_tab.grid_job_from_inputs(*values, None, 0.75, "Just resize", True, "Lanczos", 1.5, 2, 0.4)
    assert (job.base.hires_fix, job.base.hires_upscaler, job.base.hires_scale, job.base.hires_steps,
            job.base.hires_denoising) == (True, "Lanczos", 1.5, 2, 0.4)
    assert [c.job.hires_denoising for c in runner.plan(job).cells] == [0.3, 0.6]


def test_cli_grid_with_an_init_image_and_hires_fix(tmp_path, monkeypatch, capsys):
    """`python -m studio grid --init-image ... --x 'Denoising: ...'` and a hires axis from the command line."""
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    base = ["grid", "--model", "demo-tiny", "--prompt", "a cat", "--steps", "4", "--width", "64", "--height", "64",
            "--seed", "2"]
    assert main([*base, "--init-image", str(tmp_path / "i.png"), "--x", "Denoising: 0.3, 0.9"]) == 0
    grid = Path(capsys.readouterr().out.strip())
    assert grid.is_file()
    cells = sorted((grid.parent / f"{grid.stem.removesuffix('-grid')}-cells").glob("*.png"))
    assert [Image.open(c).info["parameters"].count("Denoising strength: ") for c in cells] == [1, 1]
    assert main([*base, "--hires-scale", "2", "--hires-steps", "2", "--x", "Hires upscaler: Latent, Lanczos"]) == 0
    grid = Path(capsys.readouterr().out.strip())
    cells = list((grid.parent / f"{grid.stem.removesuffix('-grid')}-cells").glob("*.png"))
    assert len(cells) == 2 and all(Image.open(c).size == (128, 128) for c in cells)
    assert main([*base, "--x", "Denoising: 0.5"]) == 2  # text to image: the axis has nothing to act on
    assert "add an init image or turn hires fix on" in capsys.readouterr().err
