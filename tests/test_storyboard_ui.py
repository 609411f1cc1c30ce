"""The Storyboard tab: its form <-> board helpers, and the real app in headless Chromium loading a small shot list,
adding a reference (live canny preview), generating through a tiny ControlNet, picking a candidate and exporting."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
SHOTS = "shot,type,description\n1,long shot,Sarah and Callum talking in a room\n2,close shot,Sarah speaking\n"


def drawing(path: Path) -> Path:
    im = Image.new("RGB", (80, 80), "white")
    ImageDraw.Draw(im).rectangle((15, 15, 60, 60), outline="black", width=3)
    im.save(path)
    return path


@pytest.fixture
def state(tmp_path):
    from studio.config import StudioConfig
    from studio.ui.state import AppState

    app_state = AppState.create(StudioConfig().with_home(tmp_path / "home"))
    app_state.manager.load("demo-tiny")
    return app_state


def test_the_tab_is_in_the_ui_with_its_api(state):
    from studio.ui import build_ui

    demo = build_ui(state)
    assert "Storyboard" in [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"sb-project", "sb-shots", "sb-csv", "sb-generate", "sb-regenerate", "sb-edges", "sb-gallery",
            "sb-export", "sb-lock"} <= ids
    assert {"storyboard_generate", "storyboard_export"} <= {d.api_name for d in demo.fns.values()}


def test_form_to_board_keeps_candidates_and_names_bad_rows(state, tmp_path):
    from studio.storyboard.board import Frame, StoryboardStore, new_board
    from studio.ui.storyboard_tab import (
        board_from_form,
        candidate_items,
        canny_preview,
        settings_values,
        shot_rows,
        type_rows,
    )

    store = StoryboardStore(state.cfg.storyboards_dir)
    board = new_board("film")
    board.settings.width = board.settings.height = 64
    table = [["1", "long shot", "a room", "Sarah", "", -1.0, 0.0], ["2", "close shot", "a face", "", "", 5.0, 3.0],
             ["", "", "", "", "", None, None]]
    values = [table, type_rows(board), "lora", "noir", 0.5, *settings_values(board)]
    made = board_from_form(board, *values)
    assert [(s.shot, s.notes, s.seed, s.candidates) for s in made.shots] == [("1", "Sarah", -1, 0), ("2", "", 5, 3)]
    assert made.style.prompt_part() == "<lora:noir:0.5>" and shot_rows(made)[1][5] == 5
    # a shot keeps its candidates and ControlNet settings when its row is edited
    made.shots[0].frames = [Frame(7, "shots/1/00-7.png")]
    made.shots[0].canny_low = 40
    table[0][2] = "a bigger room"
    again = board_from_form(made, table, *values[1:])
    assert again.shots[0].frames == made.shots[0].frames and again.shots[0].canny_low == 40
    assert again.shots[0].description == "a bigger room"
    bad = [row[:] for row in table]
    bad[1][5] = "lucky"
    with pytest.raises(ValueError, match="shot list row 2: shot 2: seed must be a whole number, got 'lucky'"):
        board_from_form(made, bad, *values[1:])
    with pytest.raises(ValueError, match="shot types row 1: .*LoRA weight must be a number, got 'heavy'"):
        board_from_form(made, table, [["close shot", "[description]", "cs", "heavy"]], *values[2:])
    # the canny preview is the reference's map at the frame size; candidates list their seeds
    store.save(again)
    store.add_reference(again, again.shots[0], drawing(tmp_path / "d.png"))
    preview = canny_preview(store, again, "1", 100, 200)
    assert preview.size == (64, 64) and np.asarray(preview).any()
    assert canny_preview(store, again, "2", 100, 200) is None
    (store.path("film") / "shots" / "1").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(store.path("film") / "shots" / "1" / "00-7.png")
    items, picked = candidate_items(store, again, "1")
    assert picked == 0 and items[0][1] == "#0 · seed 7 · picked"


def prepare_shared_home(home: Path) -> None:
    """A tiny ControlNet for demo-tiny in controlnet/, as users drop one there, before the shared app starts (see
    conftest's shared_app)."""
    from diffusers import ControlNetModel

    from studio.control.controlnet import save_controlnet_file
    from studio.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline("sd1").unet
    (home / "controlnet").mkdir(parents=True, exist_ok=True)
    save_controlnet_file(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16)),
                         home / "controlnet" / "tiny-canny.safetensors")


@pytest.fixture(scope="module")
def app(shared_app):
    """The app (launch_app opens it on demo-tiny) with that ControlNet (conftest's shared_app; this module's
    storyboard is 'film'); (url, home)."""
    return shared_app


@pytest.mark.browser
def test_browser_shot_list_generate_pick_and_export(app, browser, tmp_path):
    from pypdf import PdfReader

    url, home = app
    (tmp_path / "shots.csv").write_text(SHOTS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    page.get_by_role("tab", name="Storyboard").click()
    box = page.locator("#sb-project input")
    box.fill("film")
    page.locator("#sb-open").click()
    page.get_by_text("new storyboard 'film'").first.wait_for(timeout=30_000)
    # a small shot list from a CSV file
    page.locator("#sb-csv input[type=file]").set_input_files(str(tmp_path / "shots.csv"))
    page.locator("#sb-shots").get_by_text("Sarah speaking").first.wait_for(timeout=30_000)
    # shot 1 gets a sketch: its canny edges appear at once
    page.locator("#sb-reference input[type=file]").set_input_files(str(drawing(tmp_path / "sketch.png")))
    page.locator("#sb-edges img").first.wait_for(state="visible", timeout=60_000)
    # the tiny ControlNet from controlnet/, 2 candidates per shot, few steps
    page.get_by_text("Generation settings and ControlNet").click()
    cn = page.locator("#sb-controlnet input")
    cn.fill("tiny-canny.safetensors")
    cn.press("Enter")
    for slider, value in (("#sb-steps", "4"), ("#sb-candidates-default", "2")):
        number = page.locator(f"{slider} input[type=number]")
        number.fill(value)
        number.press("Enter")
    # shot 2 is selected while all shots render: it stays selected afterwards (it used to jump back to shot 1)
    from playwright.sync_api import expect

    shot = page.locator("#sb-shot input")
    shot.fill("2")
    shot.press("Enter")
    page.locator("#sb-generate").click()
    page.locator("#sb-status").get_by_text("generated shots: 1, 2").wait_for(timeout=120_000)
    expect(shot).to_have_value(re.compile(r"^2\b"), timeout=10_000)
    shot.fill("1")
    shot.press("Enter")
    page.locator("#sb-gallery .thumbnail-item").nth(1).wait_for(timeout=30_000)
    page.locator("#sb-gallery .thumbnail-item").nth(1).click()
    page.locator("#sb-status").get_by_text("candidate #1").wait_for(timeout=30_000)
    page.locator("#sb-export").click()
    page.locator("#sb-status").get_by_text("exported").wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "storyboard.png"), full_page=True)
    page.close()
    folder = home / "storyboards" / "film"
    project = json.loads((folder / "project.json").read_text())
    first, second = project["shots"]
    assert first["reference"].startswith("references/1-") and first["picked"] == 1
    assert [f["controlnet"] for f in first["frames"]] == [True, True]
    assert [f["controlnet"] for f in second["frames"]] == [False, False]
    assert project["settings"]["controlnet"] == "tiny-canny.safetensors" and project["settings"]["steps"] == 4
    text = PdfReader(folder / "export" / "film.pdf").pages[0].extract_text()
    assert "Shot 1 · long shot" in text and "Shot 2 · close shot" in text and "Page 1 of 1" in text
    assert (folder / "export" / "film-contact.png").is_file()
    assert (folder / "export" / "film-frames" / "1.png").read_bytes() == \
        (folder / first["frames"][1]["file"]).read_bytes()


def test_the_controlnet_picker_offers_micro_canny_and_starts_on_it_with_micro(tmp_path):
    from studio.config import StudioConfig
    from studio.models.builtin import micro_available, micro_controlnet_available
    from studio.ui import build_ui
    from studio.ui.state import AppState

    cfg = StudioConfig().with_home(tmp_path / "home")
    if not (micro_available(cfg.assets_dir) and micro_controlnet_available(cfg.assets_dir)):
        pytest.skip("assets/micro or assets/micro-controlnet-canny is missing")
    app_state = AppState.create(cfg)
    app_state.manager.load("micro")
    demo = build_ui(app_state)
    picker = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "sb-controlnet")
    assert picker.value == "micro-canny"
    assert [c[0] if isinstance(c, tuple) else c for c in picker.choices][-2:] == \
        ["micro-canny", "lllyasviel/control_v11p_sd15_canny"]


def test_long_events_show_their_progress_in_one_place(state):
    """An event that reports progress and writes many outputs shows Gradio's progress on one component, not as an
    overlay over every output (the Storyboard's "Generate all shots" covered the whole tab with ~25 copies)."""
    from studio.ui import build_ui

    demo = build_ui(state)
    crowded = []
    for fn in demo.fns.values():
        if fn.tracks_progress and len(fn.outputs) > 3 and fn.show_progress != "hidden":
            where = fn.show_progress_on or fn.outputs
            if len(where) != 1:
                crowded.append(f"{fn.name} ({len(where)} overlays)")
    assert not crowded, crowded
    generate = next(fn for fn in demo.fns.values() if fn.api_name == "storyboard_generate")
    assert len(generate.show_progress_on) == 1 and generate.show_progress_on[0] not in generate.inputs


def test_lists_of_files_are_read_again_when_the_page_loads(state):
    """A board, a ControlNet and a model made after the UI was built can be picked after a page reload."""
    from studio.storyboard.board import StoryboardStore, new_board
    from studio.ui import build_ui

    demo = build_ui(state)
    StoryboardStore(state.cfg.storyboards_dir).save(new_board("made-later"))
    (state.cfg.models_dir / "later-model").mkdir(parents=True)
    (state.cfg.models_dir / "later-model" / "model_index.json").write_text("{}")
    on_load = [fn for fn in demo.fns.values() if any(event == "load" for _, event in fn.targets)
               and not fn.inputs and fn.outputs and "request" not in inspect.signature(fn.fn).parameters]
    outputs = {}
    for fn in on_load:
        values = fn.fn()
        values = values if isinstance(values, tuple) else (values,)
        for block, value in zip(fn.outputs, values, strict=False):
            outputs[getattr(block, "elem_id", None) or id(block)] = value
    def names(elem_id):
        return [c if isinstance(c, str) else c[0] for c in outputs[elem_id]["choices"]]

    assert "made-later" in names("sb-project")
    assert "later-model" in names("model")
