"""Send to buttons on every tab that shows pictures (Generate's gallery, the explorer's cells, a storyboard's picked
candidate): each fills the Generate tab's image to image, inpaint, upscale or PNG-info input, opens its accordion and
shows the Generate tab; run in-process through Gradio's own processing (Blocks.process_api)."""

from __future__ import annotations

import asyncio

import gradio as gr
import pytest
from PIL import Image

TARGETS = {"img2img": ["init-image", "img2img"], "inpaint": ["init-image", "img2img", "inpaint"],
           "upscale": ["upscale-image", "upscale"], "png-info": ["png-info", "png-info-accordion"]}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from gradio.state_holder import SessionState

    from studio.config import StudioConfig
    from studio.ui import build_ui
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path_factory.mktemp("home")))
    state.manager.load("demo-tiny")
    demo = build_ui(state)
    session = SessionState(demo)

    def call(block_fn, inputs: list):
        return asyncio.run(demo.process_api(block_fn=block_fn, inputs=inputs, state=session))["data"]

    yield demo, session, call, state
    state.trainer.stop()


def send_event(demo, button_id: str):
    """The click event of the button with that elem_id."""
    for block_fn in demo.fns.values():
        for target_id, event in block_fn.targets:
            if event == "click" and getattr(demo.blocks.get(target_id), "elem_id", None) == button_id:
                return block_fn
    raise AssertionError(f"no click event on #{button_id}")


def ids(components) -> list:
    return [getattr(c, "elem_id", None) for c in components]


@pytest.mark.parametrize("prefix, switches", [("send", False), ("explorer-send", True), ("sb-send", True)])
def test_every_tabs_buttons_fill_generates_inputs_and_open_them(ui, prefix, switches):
    demo = ui[0]
    for target, wanted in TARGETS.items():
        event = send_event(demo, f"{prefix}-{target}")
        got = ids(event.outputs)
        assert got[:len(wanted)] == wanted and len(got) == len(wanted) + switches, (target, got)
        assert isinstance(event.outputs[-1], gr.Tabs) == switches  # other tabs show the Generate tab


def saved_picture(folder, name="cell.png"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", (64, 48), (200, 40, 40)).save(path)
    return path


def test_an_explorer_cell_goes_to_image_to_image_and_nothing_picked_changes_nothing(ui, monkeypatch):
    demo, session, call, state = ui
    path = saved_picture(state.cfg.outputs_dir / "grids")
    event = send_event(demo, "explorer-send-img2img")
    source = event.inputs[0]
    assert isinstance(source, gr.State)  # a path the server kept, never one the browser sends
    session[source._id] = str(path)
    sent, opened, tab = call(event, [None])
    assert sent["path"].endswith(".png") and Image.open(sent["path"]).size == (64, 48)
    assert opened == {"__type__": "update", "open": True} and tab["selected"] == "generate"
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    session[source._id] = None
    out = call(event, [None])
    assert all(o == {"__type__": "update"} for o in out) and "pick a cell first" in warnings[0]


def test_a_storyboards_picked_candidate_goes_to_inpaint(ui):
    from studio.storyboard.board import Frame, Shot, StoryboardStore, new_board

    demo, session, call, state = ui
    store = StoryboardStore(state.cfg.storyboards_dir)
    board = new_board("film")
    board.shots = [Shot("1", "close shot", "a face")]
    store.save(board)
    frames = [saved_picture(store.path("film") / "shots" / "1", f"0{k}.png") for k in range(2)]
    board.shots[0].frames = [Frame(1, "shots/1/00.png"), Frame(2, "shots/1/01.png")]
    board.shots[0].picked = 1
    store.save(board)
    call(send_event(demo, "sb-open"), ["film"])  # as the user opens it: the session's board and shot menu
    event = send_event(demo, "sb-send-inpaint")
    sent, img2img, inpaint, tab = call(event, [None, "1"])
    assert Image.open(sent["path"]).tobytes() == Image.open(frames[1]).tobytes()
    assert img2img["open"] and inpaint["open"] and tab["selected"] == "generate"
    # a shot without candidates sends nothing
    board.shots[0].frames = []
    store.save(board)
    out = call(event, [None, "1"])
    assert all(o == {"__type__": "update"} for o in out)
