"""The parameter explorer on demo-tiny-xl: every cell of sampler, CFG, size and prompt S/R axes is the image
Generate makes for it, and a checkpoint axis mixing demo-tiny and demo-tiny-xl runs each cell on its own
model (grouped by model) and leaves the model it found."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from studio.explorer.grid import AxisSpec, GridJob, GridRunner
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny-xl")
    gen = Generator(manager)
    return GridRunner(manager, gen), gen, cfg


def base(**kw) -> GenerateJob:
    values = dict(prompt="a red circle", negative_prompt="blurry", steps=2, width=64, height=64, seed=7,
                  sampler="Euler a", schedule="Automatic", cfg_scale=7.0)
    values.update(kw)
    return GenerateJob(**values)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def assert_cells_equal_generate(result, gen, cells=None):
    """Each cell against a single Generate run of its job on the loaded model, bit for bit: batched cells give the
    images a pass of one gives (denoise runs SDXL's text-time MLP one row at a time)."""
    for cell in cells or result.plan.cells:
        single = gen.run(GenerateJob(**asdict(cell.job))).images[0]
        got = result.images[cell.index]
        diff = np.abs(pixels(got.image) - pixels(single.image)).max()
        assert diff == 0, (cell.labels, diff)
        assert got.infotext == single.infotext


def test_sampler_and_cfg_cells_equal_generate(xl):
    runner, gen, _ = xl
    job = GridJob(base(), x=AxisSpec.parse("Sampler: Euler a, DPM++ 2M Karras"), y=AxisSpec.parse("CFG Scale: 1, 7"))
    result = runner.run(job)
    assert not result.interrupted and len(result.images) == 4
    assert result.plan.passes == [[0, 2], [1, 3]]  # a pass per sampler, both CFG scales in it
    assert all("Model: demo-tiny-xl" in item.infotext for item in result.images.values())
    assert_cells_equal_generate(result, gen)
    first, second = (pixels(result.images[i].image) for i in (0, 2))  # Euler a at CFG 1 and 7
    assert np.abs(first - second).max() > 8


def test_size_and_prompt_cells_equal_generate(xl):
    runner, gen, _ = xl
    # the size conditioning is (height, width): a non-square size is its own group
    job = GridJob(base(), x=AxisSpec.parse("Size: 64x64, 64x96"), y=AxisSpec.parse("Prompt S/R: red, blue"))
    result = runner.run(job)
    assert len(result.plan.groups) == 2 and len(result.images) == 4
    assert result.images[1].image.size == (64, 96)
    assert_cells_equal_generate(result, gen)


def test_checkpoint_axis_mixing_demo_tiny_and_demo_tiny_xl(xl):
    runner, gen, cfg = xl
    manager = gen.manager
    job = GridJob(base(), x=AxisSpec.parse("Checkpoint name: demo-tiny, demo-tiny-xl"),
                  y=AxisSpec.parse("CFG Scale: 1, 7"))
    plan = runner.plan(job)
    # grouped by model: one group (and one pass) per checkpoint, each holding only its own cells
    assert [g.checkpoint for g in plan.groups] == ["demo-tiny", "demo-tiny-xl"]
    assert all({plan.cells[i].checkpoint for i in g.cells} == {g.checkpoint} for g in plan.groups)
    assert len(plan.passes) == 2
    result = runner.run(plan, outputs_dir=cfg.outputs_dir)
    assert not result.interrupted and len(result.images) == 4
    assert manager.current.name == "demo-tiny-xl"  # the grid leaves the model it found
    for cell in plan.cells:
        assert f"Model: {cell.checkpoint}," in result.images[cell.index].infotext
        size = result.images[cell.index].image.size
        assert size == (64, 64)
    xl_cells = [c for c in plan.cells if c.checkpoint == "demo-tiny-xl"]
    sd1_cells = [c for c in plan.cells if c.checkpoint == "demo-tiny"]
    assert_cells_equal_generate(result, gen, xl_cells)
    sd1 = ModelManager(cfg)
    sd1.load("demo-tiny")
    assert_cells_equal_generate(result, Generator(sd1), sd1_cells)
    # the two models make different images of the same cell
    a, b = (pixels(result.images[c.index].image) for c in (sd1_cells[1], xl_cells[1]))
    assert np.abs(a - b).max() > 8
    # the table names each cell's checkpoint
    table = result.table_paths[0].read_text()
    assert '"checkpoint": "demo-tiny"' in table and '"checkpoint": "demo-tiny-xl"' in table
