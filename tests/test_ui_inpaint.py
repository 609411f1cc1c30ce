"""The Generate tab's inpainting, outpainting, hires fix, upscale (Extras) and Send to buttons: the handlers run
in-process through Gradio's own preprocessing (Blocks.process_api, as a browser's event runs them) on demo-tiny,
and one browser test paints a mask, inpaints, sends the result to Upscale and upscales it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.ui import control_panel, ip_adapter_panel, regions_panel

BOX = (16, 16, 40, 40)  # the painted square (x1, y1, x2, y2) on a 64 x 64 init


def init_picture(path: Path) -> Path:
    """A 64 x 64 picture with structure (so a redraw shows), saved as PNG."""
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)
    return path


def painted_layer(path: Path, box=BOX, size=(64, 64)) -> Path:
    """What the editor sends for a stroke: a transparent RGBA layer, opaque where painted."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), box)
    layer.save(path)
    return path


def upload(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def editor_payload(*layers: Path) -> dict:
    return {"background": None, "layers": [upload(p) for p in layers], "composite": None, "id": None}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(call, fns, uploads, state): `call(name, inputs)` runs a Generate-tab handler through process_api."""
    from gradio.state_holder import SessionState

    from studio.config import StudioConfig
    from studio.ui import build_ui
    from studio.ui.state import AppState

    home = tmp_path_factory.mktemp("home")
    state = AppState.create(StudioConfig().with_home(home))
    state.manager.load("demo-tiny")
    demo = build_ui(state)
    fns = {}
    for d in demo.fns.values():
        if d.fn and d.fn.__module__.rsplit(".", 1)[-1] in ("generate_tab", "upscale_panel", "inpaint_panel"):
            fns.setdefault(d.api_name or d.fn.__name__, d)
    fns["_all"] = [d for d in demo.fns.values() if d.fn]  # every handler (the names above keep the first)
    uploads = Path(demo.GRADIO_CACHE) / f"test-inpaint-{time.time_ns()}"
    uploads.mkdir(parents=True)
    init_picture(uploads / "init.png")
    session = SessionState(demo)

    def call(name, inputs: list):
        """Run the handler `name` (or a BlockFunction) in this session."""
        block_fn = fns[name] if isinstance(name, str) else name
        out = asyncio.run(demo.process_api(block_fn=block_fn, inputs=inputs, state=session))
        return out["data"]

    yield call, fns, uploads, state
    state.trainer.stop()


def generate_inputs(fns, **values) -> list:
    """/generate's inputs as the browser sends them: every widget, by name, at its default unless given."""
    names = ["prompt", "negative", "sampler", "schedule", "steps", "cfg_scale", "seed", "width", "height",
             "batch_size", "batch_count", "clip_skip", "init_image", "denoising_strength", "resize_mode",
             "mask_editor", "mask_file", "mask_blur", "mask_mode", "masked_content", "inpaint_area",
             "inpaint_padding", "outpaint_left", "outpaint_right", "outpaint_top", "outpaint_bottom", "hires",
             "hires_scale", "hires_upscaler", "hires_steps", "hires_denoising", "hires_width", "hires_height",
             "hires_sampler", "hires_prompt", "hires_negative", *control_panel.input_names(),
             *regions_panel.INPUTS, *ip_adapter_panel.input_names()]
    blocks = fns["generate"].inputs
    assert len(blocks) == len(names), "the test's list of /generate's inputs is out of date"
    base = dict(prompt="a red circle", negative="", sampler="Euler", schedule="Automatic", steps=4, seed=7, width=64, height=64)
    out = []
    for name, block in zip(names, blocks, strict=True):
        value = values.get(name, base.get(name, block.value))
        out.append(value)
    return out


def gallery_images(data) -> list[Image.Image]:
    return [Image.open(item["image"]["path"]).convert("RGB") for item in data[0]]


def test_a_painted_mask_redraws_only_its_area(ui):
    call, fns, uploads, state = ui
    painted_layer(uploads / "stroke.png")
    init = np.asarray(Image.open(uploads / "init.png").convert("RGB")).astype(int)
    inside = np.zeros((64, 64), bool)
    inside[BOX[1]:BOX[3], BOX[0]:BOX[2]] = True

    data = call("generate", generate_inputs(fns, init_image=upload(uploads / "init.png"), denoising_strength=0.9,
                                            mask_editor=editor_payload(uploads / "stroke.png"), mask_blur=0))
    out = np.asarray(gallery_images(data)[0]).astype(int)
    assert out.shape == (64, 64, 3)
    assert (out[~inside] == init[~inside]).all(), "pixels outside the painted area changed"
    assert np.abs(out[inside] - init[inside]).mean() > 10, "the painted area was not redrawn"
    assert "Denoising strength: 0.9" in data[2] and "Mask blur" not in data[2]  # blur 0 is not written

    # the same with a mask file (white = redraw) instead of the painting, and Inpaint not masked: the inverse
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, BOX)
    mask.save(uploads / "mask.png")
    data = call("generate", generate_inputs(fns, init_image=upload(uploads / "init.png"), denoising_strength=0.9,
                                            mask_file=upload(uploads / "mask.png"), mask_blur=0,
                                            mask_mode="Inpaint not masked"))
    out = np.asarray(gallery_images(data)[0]).astype(int)
    assert (out[inside] == init[inside]).all() and np.abs(out[~inside] - init[~inside]).mean() > 10
    assert "Mask mode: Inpaint not masked" in data[2]


def test_nothing_painted_is_plain_image_to_image(ui):
    call, fns, uploads, _ = ui
    empty = uploads / "empty-layer.png"
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(empty)
    init = np.asarray(Image.open(uploads / "init.png").convert("RGB")).astype(int)
    data = call("generate", generate_inputs(fns, init_image=upload(uploads / "init.png"), denoising_strength=0.9,
                                            mask_editor=editor_payload(empty)))
    out = np.asarray(gallery_images(data)[0]).astype(int)
    assert (np.abs(out - init).sum(axis=-1) > 0).mean() > 0.9  # the whole picture redrawn
    assert "Mask blur" not in data[2] and "Denoising strength: 0.9" in data[2]


def test_the_mask_editor_checks_its_layers_before_decoding(ui, monkeypatch):
    """A crafted request cannot push a decompression bomb through the editor: its layers pass the same header
    check as uploads, its background and composite are not decoded at all."""
    from test_security_uploads import SIDE, one_bit_bomb

    call, fns, uploads, _ = ui
    one_bit_bomb(uploads / "bomb.png")
    decoded = []
    original = Image.Image.load

    def spy(self):
        decoded.append(self.size)
        return original(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    payload = {"background": upload(uploads / "bomb.png"), "layers": [upload(uploads / "bomb.png")],
               "composite": upload(uploads / "bomb.png"), "id": None}
    with pytest.raises(Exception, match="mask layer 1: oversized: 13000x13000"):
        call("generate", generate_inputs(fns, init_image=upload(uploads / "init.png"), mask_editor=payload))
    assert (SIDE, SIDE) not in decoded
    # and the editor offers no upload of its own in the browser
    assert not fns["generate"].inputs[15].sources


def test_outpaint_adds_the_bands(ui):
    call, fns, uploads, _ = ui
    data = call("generate", generate_inputs(fns, init_image=upload(uploads / "init.png"), outpaint_left=16.0,
                                            outpaint_right=16, denoising_strength=0.9))
    out = gallery_images(data)[0]
    assert out.size == (96, 64) and 'Outpaint: "left 16, right 16"' in data[2]
    # the helper's pads to 16:9 for 64 x 64
    pads = call("pads", [64, 64, "16:9"])
    assert pads == [24, 24, 0, 0]


def test_hires_fix_from_the_widgets_doubles_the_size(ui):
    call, fns, _, _ = ui
    data = call("generate", generate_inputs(fns, hires=True, hires_scale=2, hires_upscaler="Latent",
                                            hires_steps=2, hires_denoising=0.5))
    assert gallery_images(data)[0].size == (128, 128)
    assert "Hires upscale: 2" in data[2] and "Hires upscaler: Latent" in data[2] and "Size: 64x64" in data[2]
    data = call("generate", generate_inputs(fns, hires=True, hires_upscaler="Lanczos", hires_width=96,
                                            hires_height=64, hires_sampler="DPM++ 2M"))
    assert gallery_images(data)[0].size == (96, 64)
    assert "Hires resize: 96x64" in data[2] and "Hires sampler: DPM++ 2M" in data[2]
    data = call("generate", generate_inputs(fns))  # unticked: text to image at the size
    assert gallery_images(data)[0].size == (64, 64) and "Hires" not in data[2]


def test_pasted_png_info_fills_hires_and_inpaint_fields(ui):
    from studio.generation.infotext import png_info

    call, fns, uploads, _ = ui
    text = ("a castle\nNegative prompt: lowres\nSteps: 28, Sampler: Euler, CFG scale: 6, Seed: 3344, Size: 64x48, "
            "Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (bicubic)")
    Image.new("RGB", (64, 48), "white").save(uploads / "hires.png", pnginfo=png_info(text))
    out = call("read_png", [upload(uploads / "hires.png")])
    names = [getattr(b, "elem_id", None) for b in fns["read_png"].outputs]
    got = dict(zip(names, out, strict=True))
    assert got["hires-fix"] is True and got["hires-scale"] == 1.5 and got["hires-steps"] == 12
    assert got["hires-upscaler"] == "Latent (bicubic)" and got["hires-denoising"] == 0.45
    assert got["denoising-strength"].get("__type__") == "update"  # not the image-to-image strength
    assert out[0] == "a castle" and out[-2].startswith("a castle")

    text = ("a door\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 0.6, "
            "Mask blur: 8, Masked content: fill, Inpaint area: Only masked, Masked area padding: 48")
    Image.new("RGB", (64, 64), "white").save(uploads / "inpaint.png", pnginfo=png_info(text))
    got = dict(zip(names, call("read_png", [upload(uploads / "inpaint.png")]), strict=True))
    assert got["mask-blur"] == 8 and got["masked-content"] == "fill" and got["inpaint-area"] == "Only masked"
    assert got["inpaint-padding"] == 48 and got["mask-mode"] == "Inpaint masked"
    assert got["denoising-strength"] == 0.6 and got["hires-fix"] is False  # unticked: made without it


def test_upscale_saves_with_the_extras_note_and_menus_list_files(ui):
    from studio.upscale.output import read_source

    call, fns, uploads, state = ui
    result, info = call("upscale", [upload(uploads / "init.png"), "Lanczos", 2, 192])
    saved = list((state.cfg.outputs_dir / "extras-images").glob("init-Lanczos-x2*.png"))
    assert len(saved) == 1 and "64x64 → 128x128" in info and "extras-images" in info
    source = read_source(saved[0])
    assert source.image.size == (128, 128) and Image.open(result["path"]).size == (128, 128)
    assert source.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    with pytest.raises(Exception, match="choose an image to upscale"):
        call("upscale", [None, "Lanczos", 2, 192])

    # a model file dropped in upscalers/ is offered after a page load (or ↻), in both menus
    from studio.ui import hires_panel, upscale_panel

    state.cfg.upscalers_dir.mkdir(parents=True, exist_ok=True)
    (state.cfg.upscalers_dir / "4x-Test.safetensors").write_bytes(b"not read by the menu")
    assert "4x-Test" in upscale_panel.upscalers(state.cfg.upscalers_dir)
    menu = hires_panel.hires_upscalers(state.cfg.upscalers_dir)
    assert menu[0] == "Latent" and menu[-1] == "4x-Test" and "None" not in menu and "Lanczos" in menu
    from studio.ui import build_ui

    demo = build_ui(state)
    on_load = [fn for fn in demo.fns.values() if any(event == "load" for _, event in fn.targets)
               and fn.fn and fn.fn.__name__ == "menu"]
    ids = {fn.outputs[0].elem_id: fn.fn()["choices"] for fn in on_load}
    assert "4x-Test" in ids["upscaler"] and "4x-Test" in ids["hires-upscaler"]
    (state.cfg.upscalers_dir / "4x-Test.safetensors").unlink()


def test_stop_ends_an_upscale_with_a_model_and_saves_nothing(ui, monkeypatch):
    """Stop (the tab's /stop) sets the event the upscale checks between tiles; a model file in upscalers/ runs."""
    from safetensors.torch import save_file
    from test_upscale import tiny_compact

    from studio.ui import upscale_panel

    call, fns, uploads, state = ui
    state.cfg.upscalers_dir.mkdir(parents=True, exist_ok=True)
    save_file(tiny_compact(), state.cfg.upscalers_dir / "Compact-2x.safetensors")
    real, seen = upscale_panel.upscale, []

    def stop_after_first_tile(*args, on_progress=None, **kwargs):
        def progress(done, total, info):
            seen.append((done, total))
            on_progress(done, total, info)
            if done == 1:
                call("stop", [])  # the Stop button, as the browser presses it
        return real(*args, on_progress=progress, **kwargs)

    # the menu offers the new file after ↻ (Gradio then accepts the name in this session)
    refresh = next(fn for fn in fns["_all"] if fn.fn.__name__ == "menu" and fn.outputs[0].elem_id == "upscaler")
    call(refresh, [])
    monkeypatch.setattr(upscale_panel, "upscale", stop_after_first_tile)
    result, info = call("upscale", [upload(uploads / "init.png"), "Compact-2x", 2, 32])
    assert info == "stopped" and seen[0] == (1, 9) and len(seen) < 9
    assert not list((state.cfg.outputs_dir / "extras-images").glob("init-Compact-2x*"))
    monkeypatch.setattr(upscale_panel, "upscale", real)
    result, info = call("upscale", [upload(uploads / "init.png"), "Compact-2x", 2, 0])  # and it runs after a Stop
    assert "64x64 → 128x128" in info and "2x" in info
    (state.cfg.upscalers_dir / "Compact-2x.safetensors").unlink()

def test_send_to_uses_the_saved_png_of_the_selection(ui):
    """The gallery's selection names a saved PNG kept on the server; Send to puts it into the init, the upscale
    and the PNG info uploads (and opens their accordions)."""
    import gradio as gr

    call, fns, uploads, state = ui
    data = call("generate", generate_inputs(fns, batch_size=2))
    pick = fns["pick"].fn
    paths = [p for p in Path(state.cfg.outputs_dir).rglob("*.png") if "extras" not in p.parts[-2]]
    assert paths
    saved = sorted(paths, key=lambda p: p.stat().st_mtime)[-2:]
    second = pick([str(p) for p in saved], gr.SelectData(None, {"index": 1, "value": {"image": {"path": "/etc/x"}}}))
    assert second == str(saved[1])  # the server's path, never the browser's
    assert pick([str(p) for p in saved], gr.SelectData(None, {"index": 5, "value": None})) is None
    assert len(data[0]) == 2
    send = [fn for fn in fns["_all"] if fn.fn.__name__ == "send" and not isinstance(fn.outputs[-1], gr.Tabs)]
    targets = {fn.outputs[0].elem_id: fn for fn in send}  # the Generate tab's own (others also show the tab)
    assert set(targets) == {"init-image", "upscale-image", "png-info"}
    out = targets["upscale-image"].fn(second)
    assert out[0] == second and out[1]["open"] is True


@pytest.fixture(scope="module")
def app(shared_app):
    """The shared `python app.py` on demo-tiny (conftest's shared_app): this module's files have names of its own."""
    return shared_app


@pytest.mark.browser
def test_browser_paint_inpaint_send_to_upscale(app, browser):
    """Load an init, paint a stroke in the editor, Generate (inpaint: only around the stroke changes), then Send to
    upscale and Upscale: the 2x result is shown and saved."""
    import re

    url, home = app
    init = init_picture(home / "inpaint-init.png")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_text("random weights").first.wait_for(timeout=60_000)
    for elem, value in (("#steps", "4"), ("#width", "64"), ("#height", "64")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#prompt textarea").fill("a red circle")
    page.locator("#img2img").get_by_text("Image to image").first.click()
    page.locator("#init-image input[type=file]").set_input_files(str(init))
    page.locator("#init-preview img").wait_for(state="visible", timeout=30_000)
    page.locator("#inpaint").get_by_text("Inpaint: paint").first.click()
    editor = page.locator("#inpaint-editor")
    canvas = editor.locator("canvas").first
    canvas.wait_for(state="visible", timeout=30_000)
    editor.get_by_role("button", name="Brush", exact=True).click()
    frame = canvas.bounding_box()
    cx, cy = frame["x"] + frame["width"] / 2, frame["y"] + frame["height"] / 2
    page.mouse.move(cx - 20, cy)
    page.mouse.down()
    page.mouse.move(cx + 20, cy, steps=8)
    page.mouse.up()

    page.locator("#generate-btn").click()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('Mask blur: 4')", timeout=60_000)
    infotext = page.locator("#infotext textarea").input_value()
    seed = re.search(r"Seed: (\d+)", infotext)[1]
    saved = [p for p in (home / "outputs").rglob(f"*-{seed}.png") if "Mask blur: 4" in Image.open(p).info.get(
        "parameters", "")]
    assert len(saved) == 1, saved
    out = np.asarray(Image.open(saved[0]).convert("RGB")).astype(int)
    before = np.asarray(Image.open(init).convert("RGB")).astype(int)
    assert (out[:8] == before[:8]).all() and (out[-8:] == before[-8:]).all(), "pixels far from the stroke changed"
    assert np.abs(out[28:36, 28:36] - before[28:36, 28:36]).mean() > 10, "the stroke's area was not redrawn"

    page.locator("#send-upscale").click()
    page.locator("#upscale-image").get_by_text(saved[0].stem).first.wait_for(timeout=30_000)
    page.locator("#upscale-btn").click()
    page.locator("#upscale-result img").wait_for(state="visible", timeout=30_000)
    page.locator("#upscale-info").get_by_text("64x64 → 128x128").wait_for(timeout=30_000)
    upscaled = list((home / "outputs" / "extras-images").glob(f"{saved[0].stem}-Lanczos-x2*.png"))
    assert len(upscaled) == 1 and Image.open(upscaled[0]).size == (128, 128)
    assert "Postprocess upscaler: Lanczos" in Image.open(upscaled[0]).info["postprocessing"]
    assert Image.open(upscaled[0]).info["parameters"] == Image.open(saved[0]).info["parameters"]
    page.close()
