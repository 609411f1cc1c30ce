"""The Explorer tab builds inside the whole UI on demo-tiny, and its handlers read the widgets into a GridJob."""

from __future__ import annotations

import gradio as gr
import pytest

from studio.explorer.syntax import NOTHING


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    from studio.config import StudioConfig
    from studio.ui.state import AppState

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    app_state = AppState.create(cfg)
    app_state.manager.load("demo-tiny")
    return app_state


def test_build_ui_has_the_explorer_tab_and_its_api(state):
    from studio.ui import build_ui

    demo = build_ui(state)
    assert isinstance(demo, gr.Blocks)
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert "Explorer" in [t.label for t in tabs]
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"explorer-run", "explorer-stop", "explorer-grid", "explorer-cells", "explorer-send-img2img", "explorer-send-png-info",
            "explorer-preview"} <= ids
    assert "grid" in {d.api_name for d in demo.fns.values()}


def test_explorer_preview_and_inputs(state):
    from studio.ui import explorer_tab

    with gr.Blocks():
        tab = explorer_tab.build(state)
    values = ["a red circle", "blurry", "Euler a", "Automatic", 2, 7, 1, 64, 64, 1,
              "Seed", "1-3", None, "CFG Scale", "3, 7", None, "Prompt S/R", "red, blue", None, False, 12]
    job = explorer_tab.grid_job_from_inputs(*values)
    assert (job.x.type, job.x.values, job.y.type, job.z.values) == ("Seed", "1-3", "CFG Scale", "red, blue")
    assert job.base.width == 64 and job.cells_per_pass == 12
    text = tab["plan_preview"](*values)
    assert text.startswith("**12 cells (3 × 2 × 2) in 1 denoising pass (1 group)")
    assert "estimated time" in text
    bad = list(values)
    bad[17] = "green, blue"
    assert "Prompt S/R did not find 'green'" in tab["plan_preview"](*bad)
    nothing = list(values)
    nothing[10] = nothing[13] = nothing[16] = NOTHING
    assert "choose at least one axis" in tab["plan_preview"](*nothing)


def test_helpers_fill_value_lists(state):
    from studio.ui import explorer_tab

    assert explorer_tab.csv_join(["Euler a", "DPM++ 2M"]) == "Euler a, DPM++ 2M"
    assert explorer_tab.csv_join(["a, b", "c"]) == '"a, b", c'
    assert "Euler a" in explorer_tab.helper_choices(state, "Sampler")
    assert "demo-tiny" in explorer_tab.helper_choices(state, "Checkpoint name")
    assert explorer_tab.helper_choices(state, "LoRA / embedding")[-1] == "None"
    assert explorer_tab.helper_choices(state, "Seed") is None
    html = explorer_tab.zoom_html("/tmp/x grid.png", 300, 200)
    assert "width:600px" in html and "pixelated" in html and "/gradio_api/file=/tmp/x grid.png" in html


def test_the_explorer_can_take_the_generate_tab_s_prompt(state):
    """Issue 28: the Explorer's prompt was separate from Generate's; one button copies both prompts over."""
    from studio.ui import build_ui

    demo = build_ui(state)
    take = next(fn for fn in demo.fns.values()
                if any(getattr(demo.blocks.get(target), "elem_id", None) == "explorer-take-prompt"
                       for target, _ in fn.targets))
    assert [b.elem_id for b in take.inputs] == ["prompt", "negative-prompt"]
    assert [b.elem_id for b in take.outputs] == ["explorer-prompt", "explorer-negative"]
    assert take.fn("a castle at dusk", "blurry") == ("a castle at dusk", "blurry")
