"""The parameter explorer on demo-tiny: cells equal single Generate calls, grouping into batched passes, the
labelled grid image, its files and table, Stop, the size guard, and the `grid` command."""

from __future__ import annotations

import csv
import json
import random
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from studio.config import Limits
from studio.explorer.grid import AxisSpec, GridJob, GridRunner, plan_grid
from studio.explorer.grid_image import GAP, _draw_lines, legend_font
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext, to_fields
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager
from studio.models.tiny import build_tiny_pipeline


def kohya_lora(pipe, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on the attention layers of a tiny pipeline (UNet and text encoder)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, model, ends in (("lora_unet_", pipe.unet, ("to_q", "to_k", "to_v")),
                                ("lora_te_text_model_", pipe.text_encoder, ("q_proj", "v_proj"))):
        for path, module in model.named_modules():
            if path.endswith(ends):
                name = prefix + path.replace(".", "_")
                out[f"{name}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * scale
                out[f"{name}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * scale
                out[f"{name}.alpha"] = torch.tensor(4.0)
    return out


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.config import StudioConfig
    from studio.files.convert import save_single_file

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    pipe = manager.current.pipe
    save_file(kohya_lora(pipe, 1), str(cfg.loras_dir / "ink.safetensors"))
    save_file(kohya_lora(pipe, 2), str(cfg.loras_dir / "paper.safetensors"))
    width = pipe.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(5)
    save_file({"emb_params": torch.randn(2, width, generator=g)}, str(cfg.embeddings_dir / "monet-style.safetensors"))
    save_file({"emb_params": torch.randn(1, width, generator=g)}, str(cfg.embeddings_dir / "kohya-emb.safetensors"))
    save_single_file(build_tiny_pipeline("sd1", seed=11), cfg.models_dir / "tiny-b.safetensors", "sd1")
    gen = Generator(manager)
    return GridRunner(manager, gen), gen, cfg


def base(**kw) -> GenerateJob:
    values = dict(prompt="a red circle", negative_prompt="blurry", steps=2, width=64, height=64, seed=7,
                  sampler="Euler a", schedule="Automatic", cfg_scale=7.0)
    values.update(kw)
    return GenerateJob(**values)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


class UnetCalls:
    """Counts the UNet forward calls (one per denoising step of a pass, whatever its batch)."""

    def __init__(self, unet):
        self.n = 0
        self.batches: list[int] = []
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1
        self.batches.append(args[0].shape[0])

    def close(self):
        self.handle.remove()


def assert_cells_equal_generate(result, gen):
    for cell in result.plan.cells:
        single = gen.run(GenerateJob(**asdict(cell.job))).images[0]
        got = result.images[cell.index]
        assert np.array_equal(pixels(got.image), pixels(single.image)), cell.labels
        assert got.infotext == single.infotext


# --- 3 x 2 x 2: one batched pass, pixel-equal cells, the grid image ---------------------------------------------


@pytest.fixture(scope="module")
def plot_3x2x2(studio):
    runner, gen, cfg = studio
    job = GridJob(base(), x=AxisSpec.parse("Seed: 1-3"), y=AxisSpec.parse("CFG Scale: 1, 7"),
                  z=AxisSpec.parse("Prompt S/R: red, blue"), cells_per_pass=12)
    calls = UnetCalls(gen.manager.current.pipe.unet)
    try:
        result = runner.run(job, outputs_dir=cfg.outputs_dir)
    finally:
        calls.close()
    return result, calls


def test_cells_share_one_batched_pass_and_equal_single_generate_calls(studio, plot_3x2x2):
    _, gen, _ = studio
    result, calls = plot_3x2x2
    # seed, CFG and prompt differ per cell: still one group, one pass of 12, one UNet call per step
    assert len(result.plan.groups) == 1 and result.plan.passes == [list(range(12))]
    assert result.passes_run == 1
    assert calls.n == 2 and calls.batches == [24, 24]  # [uncond; cond] of 12 cells, 2 steps
    assert not result.interrupted and len(result.images) == 12
    # Euler a draws noise at every step: each cell's noise still comes from its own seed
    assert_cells_equal_generate(result, gen)
    seeds = [c.job.seed for c in result.plan.cells]
    assert seeds == [1, 2, 3] * 4
    assert [c.job.prompt for c in result.plan.cells] == ["a red circle"] * 6 + ["a blue circle"] * 6
    assert [c.job.cfg_scale for c in result.plan.cells[:6]] == [1, 1, 1, 7, 7, 7]


def test_grid_image_has_the_layout_size_and_legends(plot_3x2x2):
    result, _ = plot_3x2x2
    drawing = result.drawing
    layout = drawing.layout
    # two Z grids side by side, each: Y legend + 3 columns of 64 px, Z title + X legend + 2 rows of 64 px
    assert layout.left > 0 and layout.top > 0 and layout.title > 0
    sub_w, sub_h = layout.left + 3 * 64, layout.title + layout.top + 2 * 64
    assert drawing.image.size == (2 * sub_w + GAP, sub_h)
    assert Image.open(result.grid_path).size == drawing.image.size
    texts = [label.text for label in drawing.labels]
    expected_x, expected_y = ["Seed: 1", "Seed: 2", "Seed: 3"], ["CFG Scale: 1", "CFG Scale: 7"]
    assert texts == ["red", *expected_x, *expected_y, "blue", *expected_x, *expected_y]  # S/R: the bare value
    font = legend_font(layout.font_size)
    for label in drawing.labels:
        crop = drawing.image.crop(label.box)
        assert np.asarray(crop).min() < 100, f"legend {label.text!r} is blank"
        # the region holds exactly this text, drawn the drawer's way (no OCR needed)
        ref = Image.new("RGB", crop.size, (255, 255, 255))
        _draw_lines(ImageDraw.Draw(ref), [label.text], (0, 0, *crop.size), layout, font)
        assert np.array_equal(np.asarray(crop), np.asarray(ref)), label.text
    # every cell image sits in its box, pixel for pixel
    for cell in result.plan.cells:
        box = drawing.cell_boxes[cell.pos]
        assert np.array_equal(pixels(drawing.image.crop(box)), pixels(result.images[cell.index].image))
    # one grid per Z value as well
    assert [p.name for p in result.z_paths] == [f"{result.grid_path.stem}-z1.png", f"{result.grid_path.stem}-z2.png"]
    assert Image.open(result.z_paths[0]).size == (sub_w, sub_h)


def test_grid_files_infotext_and_table(studio, plot_3x2x2):
    _, _, cfg = studio
    result, _ = plot_3x2x2
    path = result.grid_path
    assert path.parent.parent == cfg.outputs_dir / "grids" and path.name.endswith("-grid.png")
    info = parse_infotext(read_image_infotext(path))
    assert info["prompt"] == "a red circle" and info["negative_prompt"] == "blurry"
    assert info["Script"] == "X/Y/Z plot"
    assert (info["X Type"], info["X Values"]) == ("Seed", "1-3")
    assert (info["Y Type"], info["Y Values"]) == ("CFG Scale", "1, 7")
    assert (info["Z Type"], info["Z Values"]) == ("Prompt S/R", "red, blue")
    assert info["Model"] == "demo-tiny" and len(info["Model hash"]) == 10
    table = json.loads(path.with_suffix(".json").read_text())
    assert [a["type"] for a in table["axes"]] == ["Seed", "CFG Scale", "Prompt S/R"]
    assert table["passes"] == 1 and len(table["cells"]) == 12
    rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert [r["x_label"] for r in rows[:3]] == ["Seed: 1", "Seed: 2", "Seed: 3"]
    assert rows[7]["prompt"] == "a blue circle" and rows[7]["status"] == "done"
    for row in rows:
        fields = to_fields(parse_infotext(read_image_infotext(row["file"])))
        assert fields["seed"] == int(row["seed"]) and fields["cfg_scale"] == float(row["cfg_scale"])
        assert fields["prompt"] == row["prompt"]


# --- grouping --------------------------------------------------------------------------------------------------


def test_cells_differing_in_steps_or_size_run_in_separate_passes(studio):
    runner, gen, _ = studio
    job = GridJob(base(sampler="Euler"), x=AxisSpec.parse("Seed: 1, 2"), y=AxisSpec.parse("Steps: 1, 2"),
                  z=AxisSpec.parse("Size: 64, 64x96"))
    plan = runner.plan(job)
    # four (steps, size) groups of two seeds each
    assert [sorted(plan.cells[i].job.seed for i in p) for p in plan.passes] == [[1, 2]] * 4
    calls = UnetCalls(gen.manager.current.pipe.unet)
    try:
        result = runner.run(plan)
    finally:
        calls.close()
    assert result.passes_run == 4
    assert calls.n == 2 * (1 + 2) and set(calls.batches) == {4}  # steps summed over the passes, 2 cells each
    # the Z grids share one layout: rows as tall as the tallest cell, smaller cells centred in their slot
    assert result.drawing.layout.row_heights == [96, 96] and result.images[4].image.size == (64, 96)
    assert_cells_equal_generate(result, gen)


def test_pass_wide_noise_sampler_runs_one_cell_per_pass(studio):
    runner, gen, _ = studio
    # DPM++ SDE's Brownian noise is seeded once per pass: a cell equals Generate only in a pass of its own
    job = GridJob(base(sampler="DPM++ SDE", schedule="Karras"), x=AxisSpec.parse("Seed: 1, 2"),
                  y=AxisSpec.parse("CFG Scale: 3, 7"))
    result = runner.run(job)
    assert result.plan.passes == [[0], [1], [2], [3]] and result.passes_run == 4
    assert_cells_equal_generate(result, gen)


def test_groups_put_the_checkpoint_outermost_and_the_model_is_restored(studio):
    runner, gen, _ = studio
    manager = gen.manager
    # Checkpoint on X, the fastest axis: planning still loads each checkpoint once
    job = GridJob(base(), x=AxisSpec.parse("Checkpoint name: demo-tiny, tiny-b.safetensors"),
                  y=AxisSpec.parse("Seed: 1, 2"), z=AxisSpec.parse("CFG Scale: 3, 7"))
    plan = runner.plan(job)
    assert [g.checkpoint for g in plan.groups] == ["demo-tiny", "tiny-b.safetensors"]
    assert [len(p) for p in plan.passes] == [4, 4]
    loads = []
    real_load = manager.load
    manager.load = lambda spec, *a, **k: (loads.append(spec), real_load(spec, *a, **k))[1]
    try:
        result = runner.run(plan)
    finally:
        del manager.load
    assert loads == ["tiny-b.safetensors", "demo-tiny"]  # one switch, then back to the model the grid found
    assert manager.current.name == "demo-tiny"
    assert [c.labels[0] for c in plan.cells[:2]] == ["demo-tiny", "tiny-b"]
    b_cells = [c for c in plan.cells if c.checkpoint == "tiny-b.safetensors"]
    assert "Model: tiny-b" in result.images[b_cells[0].index].infotext
    manager.load("tiny-b.safetensors")
    try:
        for cell in b_cells:
            single = gen.run(GenerateJob(**asdict(cell.job))).images[0]
            assert np.array_equal(pixels(single.image), pixels(result.images[cell.index].image))
    finally:
        manager.load("demo-tiny")


def test_lora_weight_axis_groups_by_lora_set_and_matches_generate(studio):
    runner, gen, _ = studio
    job = GridJob(base(prompt="a lighthouse <lora:ink:0.8>", sampler="Euler"), x=AxisSpec.parse("LoRA weight: 0, 1"),
                  y=AxisSpec.parse("Seed: 3, 4"))
    result = runner.run(job)
    assert [c.job.prompt for c in result.plan.cells] == ["a lighthouse <lora:ink:0>", "a lighthouse <lora:ink:1>"] * 2
    assert result.passes_run == 2  # a LoRA set per pass
    assert result.plan.cells[0].labels[0] == "LoRA weight: 0"
    assert not np.array_equal(pixels(result.images[0].image), pixels(result.images[1].image))
    assert_cells_equal_generate(result, gen)
    info = parse_infotext(result.infotext)
    assert info["X Type"] == "LoRA weight (ink)"


def test_network_axis_swaps_loras_and_embeddings(studio):
    runner, gen, _ = studio
    plan = runner.plan(GridJob(base(prompt="a lighthouse <lora:ink:0.8>"),
                               x=AxisSpec.parse("LoRA / embedding: ink, paper, None")))
    assert [c.job.prompt for c in plan.cells] == ["a lighthouse <lora:ink:0.8>", "a lighthouse <lora:paper:0.8>",
                                                  "a lighthouse "]
    assert len(plan.passes) == 3
    job = GridJob(base(prompt="a monet-style harbour", sampler="Euler"),
                  x=AxisSpec.parse("LoRA / embedding: monet-style, kohya-emb"))
    result = runner.run(job)
    assert result.passes_run == 1  # embeddings do not change the model: one pass
    assert [c.job.prompt for c in result.plan.cells] == ["a monet-style harbour", "a kohya-emb harbour"]
    assert "TI hashes" in result.images[1].infotext and "kohya-emb" in result.images[1].infotext
    assert_cells_equal_generate(result, gen)
    with pytest.raises(ValueError, match="X axis \\(LoRA / embedding\\): value 'nosuch'"):
        runner.plan(GridJob(base(prompt="a <lora:ink:1>"), x=AxisSpec.parse("LoRA / embedding: ink, nosuch")))


# --- Stop, seeds, errors, the size guard ----------------------------------------------------------------------


def test_stop_keeps_the_finished_cells(studio, tmp_path):
    runner, gen, _ = studio
    cancel = threading.Event()
    job = GridJob(base(), x=AxisSpec.parse("Seed: 1-6"), cells_per_pass=2)

    def progress(done, total, info):
        if done > 2:  # the second pass has begun
            cancel.set()

    result = runner.run(job, grid_path=tmp_path / "stopped.png", on_progress=progress, cancel=cancel)
    assert result.interrupted and "2 of 6 cells" in result.message
    assert sorted(result.images) == [0, 1] and result.passes_run == 1
    assert sorted(p.name for p in (tmp_path / "stopped-cells").iterdir()) == ["0000-1.png", "0001-2.png"]
    # the grid is drawn with the finished cells, the others grey
    grid = Image.open(tmp_path / "stopped.png")
    assert grid.size == result.drawing.image.size and set(result.drawing.cell_boxes) == {(0, 0, 0), (1, 0, 0)}
    rows = json.loads((tmp_path / "stopped.json").read_text())
    assert rows["interrupted"] and [c["status"] for c in rows["cells"]] == ["done"] * 2 + ["not run"] * 4
    single = gen.run(GenerateJob(**asdict(result.plan.cells[1].job))).images[0]
    assert np.array_equal(pixels(single.image), pixels(result.images[1].image))


def test_random_seeds_are_shared_unless_kept():
    job = GridJob(base(seed=-1), x=AxisSpec.parse("CFG Scale: 3, 7"), y=AxisSpec.parse("Seed: -1, 5, -1"))
    plan = plan_grid(job, random.Random(1))
    seeds = [c.job.seed for c in plan.cells]
    assert seeds[0] == seeds[1] and seeds[2:4] == [5, 5] and seeds[4] == seeds[5]
    assert seeds[0] != seeds[4] and -1 not in seeds
    assert plan.axes[1].fixed_seeds == [seeds[0], 5, seeds[4]]
    kept = plan_grid(GridJob(base(seed=-1), x=AxisSpec.parse("CFG Scale: 3, 7, 9"), keep_random_seeds=True),
                     random.Random(1))
    assert len({c.job.seed for c in kept.cells}) == 3  # "keep -1": every cell its own


@pytest.mark.parametrize("axes, message", [
    (dict(x="Steps: 10, 0"), "cell X 'Steps: 0': steps must be between 1 and 150, got 0"),
    (dict(x="Sampler: Euler a, Eulr"), "X axis (Sampler): unknown sampler 'Eulr'"),
    (dict(x="CFG Scale: 3, x7"), "X axis (CFG Scale): CFG Scale 'x7' is not a number"),
    (dict(x="Seed: 1", y="Prompt S/R: green, blue"), "Y axis (Prompt S/R): Prompt S/R did not find 'green'"),
    (dict(x="Size: 512x500"), "cell X 'Size: 512x500': height must be a multiple of 8, got 500"),
    (dict(x="Schedule type: Karras"), "cell X 'Schedule type: Karras': Euler a does not support schedule type"),
    (dict(x="Steps: 1", y="Steps: 2"), "two axes are both 'Steps'"),
    (dict(x="Seed:"), "X axis (Seed): no values"),
    (dict(x="LoRA weight: 0, 1"), "needs a <lora:name:weight> tag"),
    (dict(), "choose at least one axis"),
])
def test_bad_axes_are_refused_naming_the_value(axes, message):
    job = GridJob(base(), **{k: AxisSpec.parse(v) for k, v in axes.items()})
    with pytest.raises(ValueError) as e:
        plan_grid(job)
    assert message in str(e.value)


def test_unknown_checkpoint_is_refused_before_running(studio):
    runner, _, _ = studio
    with pytest.raises(ValueError, match="X axis \\(Checkpoint name\\): value 'nosuch.safetensors': model"):
        runner.plan(GridJob(base(), x=AxisSpec.parse("Checkpoint name: demo-tiny, nosuch.safetensors")))


def test_size_guard_gives_the_limits():
    big = GridJob(base(), x=AxisSpec.parse("Size: 2048x2048"), y=AxisSpec.parse("Seed: 1-60"))
    with pytest.raises(ValueError) as e:
        plan_grid(big)
    limits = Limits()
    assert f"the limit is {limits.max_grid_megapixels} (max_grid_megapixels)" in str(e.value)
    many = GridJob(base(), x=AxisSpec.parse("Seed: 1-40"), y=AxisSpec.parse("Steps: 1-26"))
    with pytest.raises(ValueError, match="the grid has 1,040 cells .*; the limit is 1,000 \\(max_grid_cells\\)"):
        plan_grid(many)
    ok = plan_grid(GridJob(base(), x=AxisSpec.parse("Size: 2048x2048"), y=AxisSpec.parse("Seed: 1-30")))
    w, h = ok.layout.size
    assert w * h <= limits.max_grid_megapixels * 1e6 and len(ok.cells) == 30


def test_plan_summary_and_estimate():
    plan = plan_grid(GridJob(base(), x=AxisSpec.parse("Seed: 1-3"), y=AxisSpec.parse("Steps: 2, 4")))
    assert plan.summary().startswith("6 cells (3 × 2) in 2 denoising passes (2 groups)")
    assert plan.total_steps == 6
    assert plan.estimate_seconds(None) is None
    # 3 cells × 64² px = 0.012288 MP per step; 6 steps
    assert plan.estimate_seconds(1.0) == pytest.approx(3 * 64 * 64 / 1e6 * 6)


# --- command line ----------------------------------------------------------------------------------------------


def test_cli_grid_writes_the_grid_its_table_and_cells(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    out = tmp_path / "plot.png"
    code = main(["grid", "--model", "demo-tiny", "--prompt", "a red circle", "--x", "CFG Scale: 3,7",
                 "--y", "Steps: 1,2", "--z", "Sampler: Euler a, Euler", "--width", "64", "--height", "64",
                 "--seed", "1", "--out", str(out)])
    assert code == 0
    assert out.is_file() and out.with_suffix(".json").is_file() and out.with_suffix(".csv").is_file()
    assert len(list((tmp_path / "plot-cells").glob("*.png"))) == 8
    info = parse_infotext(read_image_infotext(out))
    assert info["Z Type"] == "Sampler" and info["Z Values"] == "Euler a, Euler"
    assert str(out) in capsys.readouterr().out
    code = main(["grid", "--model", "demo-tiny", "--prompt", "x", "--x", "Steps: 0", "--width", "64",
                 "--height", "64", "--out", str(tmp_path / "bad.png")])
    assert code == 2 and "steps must be between 1 and 150, got 0" in capsys.readouterr().err
