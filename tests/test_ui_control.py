"""The Generate tab's ControlNet accordion: its handlers run in-process through Gradio's own preprocessing
(Blocks.process_api, as a browser's event runs them) on demo-tiny with a tiny ControlNet in controlnet/, and one
browser test uploads a picture, previews its canny map and generates with it."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

NET = "tinycn"  # the in-process tests' ControlNet in controlnet/
BROWSER_NET = "ui-control-net"  # the browser test's, in the shared app's home


def tiny_controlnet(unet, seed: int = 0):
    """A ControlNet of demo-tiny's shape whose output convs steer (from_unet zeroes them)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return net


def reference(path: Path) -> Path:
    """A 96 x 80 picture with edges (another size than the 64 x 64 generation)."""
    picture = Image.new("RGB", (96, 80), "white")
    draw = ImageDraw.Draw(picture)
    draw.rectangle((20, 15, 70, 60), outline="black", width=3)
    draw.ellipse((40, 30, 90, 75), fill=(200, 40, 40))
    picture.save(path)
    return path


def upload(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(call, fns, uploads, state): `call(name, inputs)` runs a handler through process_api in one session."""
    from gradio.state_holder import SessionState

    from studio.config import StudioConfig
    from studio.control.controlnet import save_controlnet_file
    from studio.ui import build_ui
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path_factory.mktemp("home")))
    state.manager.load("demo-tiny")
    state.cfg.controlnet_dir.mkdir(parents=True, exist_ok=True)
    save_controlnet_file(tiny_controlnet(state.manager.current.pipe.unet), state.cfg.controlnet_dir / f"{NET}.safetensors")
    demo = build_ui(state)
    fns = {}
    for d in demo.fns.values():
        if d.fn and d.fn.__module__.rsplit(".", 1)[-1] in ("generate_tab", "control_panel"):
            fns.setdefault(d.api_name or d.fn.__name__, d)
    fns["_all"] = [d for d in demo.fns.values() if d.fn]
    uploads = Path(demo.GRADIO_CACHE) / f"test-control-{time.time_ns()}"
    uploads.mkdir(parents=True)
    reference(uploads / "ref.png")
    session = SessionState(demo)

    def call(name, inputs: list):
        block_fn = fns[name] if isinstance(name, str) else name
        return asyncio.run(demo.process_api(block_fn=block_fn, inputs=inputs, state=session))["data"]

    yield call, fns, uploads, state
    state.trainer.stop()


def generate_inputs(fns, **values) -> list:
    """/generate's inputs as the browser sends them, named as `run`'s parameters: each widget at its default unless
    given (the ControlNet units' models at the tiny one)."""
    block = fns["generate"]
    names = [p for p in inspect.signature(block.fn).parameters if p not in ("request", "progress")]
    assert len(names) == len(block.inputs)
    base = dict(prompt="a red circle", negative="", sampler="Euler", schedule="Automatic", steps=4, seed=7, width=64,
                height=64, cn0_model=f"{NET}.safetensors", cn1_model=NET, cn2_model=NET)
    unknown = set(values) - set(names)
    assert not unknown, unknown
    return [values.get(n, base.get(n, b.value)) for n, b in zip(names, block.inputs, strict=True)]


def generated(data) -> np.ndarray:
    return np.asarray(Image.open(data[0][0]["image"]["path"]).convert("RGB")).astype(int)


def by_id(block_fn, out) -> dict:
    return dict(zip([getattr(b, "elem_id", None) for b in block_fn.outputs], out, strict=True))


def handler(fns, name: str, elem_id: str):
    """The handler `name` whose first output is `elem_id` (the units' handlers share their names)."""
    return next(d for d in fns["_all"] if d.fn.__name__ == name and d.outputs[0].elem_id == elem_id)


def test_an_enabled_unit_steers_and_is_written_a_disabled_one_or_weight_0_is_not(ui):
    call, fns, uploads, _ = ui
    ref = upload(uploads / "ref.png")
    plain = call("generate", generate_inputs(fns))
    assert "ControlNet" not in plain[2]
    steered = call("generate", generate_inputs(fns, cn0_enabled=True, cn0_image=ref))
    assert np.abs(generated(steered) - generated(plain)).max() > 3, "the enabled unit did not change the image"
    assert f'ControlNet 0: "Module: canny, Model: {NET} [' in steered[2]
    assert "Threshold A: 100, Threshold B: 200" in steered[2] and "ControlNet 1" not in steered[2]
    # the same unit unticked, or at weight 0, is the image without control
    off = call("generate", generate_inputs(fns, cn0_enabled=False, cn0_image=ref))
    assert np.array_equal(generated(off), generated(plain)) and "ControlNet" not in off[2]
    zero = call("generate", generate_inputs(fns, cn0_enabled=True, cn0_image=ref, cn0_weight=0))
    assert np.array_equal(generated(zero), generated(plain))
    # an enabled unit without a picture is refused, naming the unit
    with pytest.raises(Exception, match="ControlNet Unit 1 is enabled but has no picture"):
        call("generate", generate_inputs(fns, cn1_enabled=True))


def test_preview_shows_the_map_at_the_generation_size_or_the_offline_message(ui):
    from studio.control import preprocessors
    from studio.generation.job import load_init_image, resize_image

    call, fns, uploads, _ = ui
    ref = upload(uploads / "ref.png")
    out = call("controlnet_preview_0", [ref, "canny", 512, 50, 150, "Crop and Resize", 96, 64])
    made = np.asarray(Image.open(out[0]["path"]).convert("RGB"))
    expected = preprocessors.preview("canny", resize_image(load_init_image(uploads / "ref.png"), "Crop and resize",
                                                           96, 64), {"low": 50, "high": 150})
    assert made.shape == (64, 96, 3) and np.array_equal(made, np.asarray(expected))
    assert 0 < (made == 255).all(axis=-1).mean() < 0.5  # edges, white on black
    t = time.perf_counter()
    with pytest.raises(Exception, match=r"ControlNet Unit 1: preprocessor openpose needs .*body_pose_model\.pth"
                                        r".*hf download lllyasviel/Annotators"):
        call("controlnet_preview_1", [ref, "openpose", 512, 0, 0, "Crop and Resize", 64, 64])
    assert time.perf_counter() - t < 5


def test_the_preprocessor_menu_relabels_the_sliders_and_a_picture_enables_its_unit(ui, monkeypatch):
    import gradio as gr

    from studio.ui import control_panel

    call, fns, uploads, _ = ui
    names = [p for p in inspect.signature(fns["generate"].fn).parameters if p not in ("request", "progress")]
    choices = fns["generate"].inputs[names.index("cn2_module")].choices  # unit 2's preprocessor menu: (label, name)
    labels = [label for label, _ in choices]
    assert labels.index("canny") < labels.index("openpose (needs weight files)")
    assert [n for _, n in choices] == control_panel.preprocessors.offline_names() + [
        n for n in control_panel.preprocessors.names() if n not in control_panel.preprocessors.offline_names()]
    pick = handler(fns, "pick_module", "cn0-resolution")
    got = by_id(pick, call(pick, ["threshold"]))
    assert got["cn0-resolution"]["visible"] is True and got["cn0-resolution"]["value"] == 512
    a = got["cn0-threshold-a"]
    assert (a["label"], a["minimum"], a["maximum"], a["value"]) == ("Binary threshold", 0, 255, 0)
    assert got["cn0-threshold-b"]["visible"] is False and "works offline" in got["cn0-note"]
    got = by_id(pick, call(pick, ["mlsd"]))
    assert got["cn0-threshold-b"]["label"] == "MLSD distance threshold" and got["cn0-threshold-b"]["maximum"] == 20
    got = by_id(pick, call(pick, ["tile_resample"]))
    assert got["cn0-resolution"]["visible"] is False and got["cn0-threshold-a"]["label"] == "Down sampling rate"
    assert "mlsd_large_512_fp32.pth" in by_id(pick, call(pick, ["mlsd"]))["cn0-note"]

    # an accepted picture is shown and enables its unit; a refused one warns and enables nothing
    show = handler(fns, "show_picture", "cn1-picture")
    shown, enabled = call(show, [upload(uploads / "ref.png")])
    assert Image.open(shown["path"]).size == (96, 80) and enabled is True
    (uploads / "fake.png").write_bytes(b"not a picture at all")
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    shown, enabled = call(show, [upload(uploads / "fake.png")])
    assert shown is None and enabled.get("__type__") == "update" and "ControlNet Unit 1" in warnings[0]


def test_png_info_fills_the_units_from_a_generated_image(ui, monkeypatch):
    import gradio as gr

    call, fns, uploads, state = ui
    call(handler(fns, "pick_module", "cn0-resolution"), ["threshold"])  # as the browser does: its sliders' ranges
    data = call("generate", generate_inputs(fns, cn0_enabled=True, cn0_image=upload(uploads / "ref.png"),
                                            cn0_module="threshold", cn0_resolution=256, cn0_threshold_a=40,
                                            cn0_weight=0.6, cn0_start=0.1, cn0_end=0.8,
                                            cn0_mode="My prompt is more important", cn0_resize_mode="Just Resize",
                                            seed=4242))
    assert 'ControlNet 0: "Module: threshold' in data[2]
    saved = [p for p in state.cfg.outputs_dir.rglob("*-4242.png")]
    assert len(saved) == 1
    notes = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: notes.append(message))
    got = by_id(fns["read_png"], call("read_png", [upload(saved[0])]))
    assert got["cn0-enable"] is True and got["cn0-module"] == "threshold" and got["cn0-model"] == f"{NET}.safetensors", notes
    assert (got["cn0-weight"], got["cn0-start"], got["cn0-end"]) == (0.6, 0.1, 0.8)
    assert got["cn0-mode"] == "My prompt is more important" and got["cn0-resize-mode"] == "Just Resize"
    assert got["cn0-resolution"]["value"] == 256
    assert got["cn0-threshold-a"]["value"] == 40 and got["cn0-threshold-a"]["label"] == "Binary threshold"
    assert got["cn0-threshold-b"]["visible"] is False
    assert got["cn1-enable"] is False and got["cn1-module"].get("__type__") == "update"
    assert any("Unit 0" in n and "no picture" in n for n in notes)

    # another studio's ControlNet and preprocessor: the rest is filled in, those two are named
    from studio.generation.infotext import png_info

    text = ("a door\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, ControlNet 0: \"Module: "
            "dw_openpose_full, Model: control_v11p_sd15_openpose [cab727d4], Weight: 0.5, Resize Mode: Crop and Resize, "
            "Processor Res: 512, Threshold A: -1, Threshold B: -1, Guidance Start: 0, Guidance End: 1, Pixel Perfect: "
            "False, Control Mode: ControlNet is more important\"")
    Image.new("RGB", (64, 64), "white").save(uploads / "other.png", pnginfo=png_info(text))
    notes.clear()
    got = by_id(fns["read_png"], call("read_png", [upload(uploads / "other.png")]))
    assert got["cn0-enable"] is True and got["cn0-weight"] == 0.5 and got["cn0-mode"] == "ControlNet is more important"
    assert got["cn0-module"].get("__type__") == "update" and got["cn0-model"].get("__type__") == "update"
    assert any("dw_openpose_full" in n for n in notes) and any("control_v11p_sd15_openpose" in n for n in notes)


def prepare_shared_home(home: Path) -> None:
    """The browser test's tiny ControlNet in controlnet/ before the shared app starts (conftest's shared_app)."""
    from studio.control.controlnet import save_controlnet_file
    from studio.models.tiny import build_tiny_pipeline

    (home / "controlnet").mkdir(parents=True, exist_ok=True)
    save_controlnet_file(tiny_controlnet(build_tiny_pipeline("sd1").unet), home / "controlnet" / f"{BROWSER_NET}.safetensors")


@pytest.fixture(scope="module")
def app(shared_app):
    """The shared `python app.py` on demo-tiny; this module's files have names of their own."""
    return shared_app


def test_api_callers_sending_the_older_short_list_still_generate(app):
    from gradio_client import Client

    url, _ = app
    client = Client(url, verbose=False)
    gallery, _, infotext = client.predict("a red circle", "", "Euler", "Automatic", 3, 7, 43, 64, 64, 1, 1, 1,
                                          api_name="/generate")
    assert len(gallery) == 1 and "Seed: 43" in infotext and "ControlNet" not in infotext


@pytest.mark.browser
def test_browser_controlnet_preview_and_generate(app, browser):
    from playwright.sync_api import expect

    url, home = app
    ref = reference(home / "control-ref.png")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_text("random weights").first.wait_for(timeout=60_000)
    for elem, value in (("#steps", "4"), ("#width", "64"), ("#height", "64")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#prompt textarea").fill("a red circle")
    page.locator("#controlnet").get_by_text("ControlNet").first.click()
    page.locator("#cn0-image input[type=file]").set_input_files(str(ref))
    page.locator("#cn0-picture img").wait_for(state="visible", timeout=30_000)
    expect(page.locator("#cn0-enable input")).to_be_checked(timeout=10_000)  # the picture enabled the unit
    for module, label in (("threshold", "Binary threshold"), ("canny", "Canny low threshold")):
        page.locator("#cn0-module input").click()
        page.get_by_role("option", name=module, exact=True).click()
        expect(page.locator("#cn0-threshold-a")).to_contain_text(label, timeout=10_000)
    page.locator("#cn0-model input").click()
    page.get_by_role("option", name=f"{BROWSER_NET}.safetensors", exact=True).click()
    page.locator("#cn0-preview").click()
    page.locator("#cn0-map img").wait_for(state="visible", timeout=30_000)
    page.locator("#generate-btn").click()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('ControlNet 0')", timeout=60_000)
    infotext = page.locator("#infotext textarea").input_value()
    assert f'ControlNet 0: "Module: canny, Model: {BROWSER_NET} [' in infotext
    page.close()


def test_regional_prompts_from_the_widgets(ui):
    """The Regional prompts accordion: a layout and a prompt per region reach the job; Off is no regions."""
    call, fns, _, _ = ui
    plain = call("generate", generate_inputs(fns, prompt="a garden"))
    split = call("generate", generate_inputs(fns, prompt="a garden", regions_layout="cols 1,1",
                                             region_1="a red fox", region_2="a blue bird"))
    assert np.abs(generated(split) - generated(plain)).max() > 3
    assert 'Regions: "cols 1,1", Region mode: Attention, Region 1 prompt: a red fox' in split[2]
    off = call("generate", generate_inputs(fns, prompt="a garden", regions_layout="Off", region_1="a red fox"))
    assert np.array_equal(generated(off), generated(plain)) and "Regions" not in off[2]
    with pytest.raises(Exception, match="write a prompt for region 2"):
        call("generate", generate_inputs(fns, prompt="a garden", regions_layout="cols 1,1", region_1="a red fox"))
