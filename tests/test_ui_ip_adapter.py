"""The Generate tab's IP-Adapter accordion: its handlers run in-process through Gradio's own preprocessing
(Blocks.process_api, as a browser's event runs them) on demo-tiny with a tiny adapter and image encoder in
ipadapter/: an enabled unit steers the image and is written in the infotext, unticked or at scale 0 it is the plain
image, PNG info fills the unit back."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from test_ip_adapter import picture, tiny_encoder, tiny_ip_state

NAME = "tiny"


def upload(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(call, fns, uploads, state): `call(name, inputs)` runs a handler through process_api in one session."""
    from gradio.state_holder import SessionState

    from studio.config import StudioConfig
    from studio.ui import build_ui
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path_factory.mktemp("home")))
    state.manager.load("demo-tiny")
    folder = state.cfg.ipadapter_dir
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_ip_state(state.manager.current.pipe.unet), str(folder / f"{NAME}.safetensors"))
    tiny_encoder().save_pretrained(folder / "image_encoder")
    demo = build_ui(state)
    fns = {}
    for d in demo.fns.values():
        if d.fn and d.fn.__module__.rsplit(".", 1)[-1] in ("generate_tab", "ip_adapter_panel"):
            fns.setdefault(d.api_name or d.fn.__name__, d)
    fns["_all"] = [d for d in demo.fns.values() if d.fn]
    uploads = Path(demo.GRADIO_CACHE) / f"test-ip-{time.time_ns()}"
    uploads.mkdir(parents=True)
    picture(1).save(uploads / "face.png")
    picture(2).save(uploads / "coat.png")
    session = SessionState(demo)

    def call(name, inputs: list):
        block_fn = fns[name] if isinstance(name, str) else name
        return asyncio.run(demo.process_api(block_fn=block_fn, inputs=inputs, state=session))["data"]

    yield call, fns, uploads, state
    state.trainer.stop()


def generate_inputs(fns, **values) -> list:
    """/generate's inputs as the browser sends them, named as `run`'s parameters, each at its widget's default
    unless given."""
    block = fns["generate"]
    names = [p for p in inspect.signature(block.fn).parameters if p not in ("request", "progress")]
    assert len(names) == len(block.inputs)
    base = dict(prompt="a red circle", negative="", sampler="Euler", schedule="Automatic", steps=4, seed=7, width=64,
                height=64)
    unknown = set(values) - set(names)
    assert not unknown, unknown
    return [values.get(n, base.get(n, b.value)) for n, b in zip(names, block.inputs, strict=True)]


def generated(data) -> np.ndarray:
    return np.asarray(Image.open(data[0][0]["image"]["path"]).convert("RGB")).astype(int)


def by_id(block_fn, out) -> dict:
    return dict(zip([getattr(b, "elem_id", None) for b in block_fn.outputs], out, strict=True))


def test_the_menu_lists_ipadapter_files_and_an_enabled_unit_steers_and_is_written(ui):
    call, fns, uploads, _ = ui
    names = [p for p in inspect.signature(fns["generate"].fn).parameters if p not in ("request", "progress")]
    menu = fns["generate"].inputs[names.index("ip0_name")]
    assert [c[1] for c in menu.choices] == [NAME] and menu.value == NAME  # the image encoder folder is no adapter
    face = [upload(uploads / "face.png")]
    plain = call("generate", generate_inputs(fns))
    assert "IP-Adapter" not in plain[2]
    steered = call("generate", generate_inputs(fns, ip0_enabled=True, ip0_images=face, ip0_scale=1.0))
    assert np.abs(generated(steered) - generated(plain)).max() > 3, "the enabled unit did not change the image"
    assert f"IP-Adapter: {NAME} [" in steered[2] and "IP-Adapter scale: 1," in steered[2]
    other = call("generate", generate_inputs(fns, ip0_enabled=True, ip0_images=[upload(uploads / "coat.png")],
                                             ip0_scale=1.0))
    assert not np.array_equal(generated(other), generated(steered)), "the picture made no difference"
    # unticked, or at scale 0, it is the image without the adapter
    off = call("generate", generate_inputs(fns, ip0_enabled=False, ip0_images=face))
    assert np.array_equal(generated(off), generated(plain)) and "IP-Adapter" not in off[2]
    zero = call("generate", generate_inputs(fns, ip0_enabled=True, ip0_images=face, ip0_scale=0))
    assert np.array_equal(generated(zero), generated(plain))
    with pytest.raises(Exception, match="IP-Adapter 2 is enabled but has no picture"):
        call("generate", generate_inputs(fns, ip1_enabled=True))
    with pytest.raises(Exception, match="must stay inside ipadapter/"):
        call("generate", generate_inputs(fns, ip0_enabled=True, ip0_images=face, ip0_name="../elsewhere"))
    with pytest.raises(Exception, match="'missing' not found in .*there: tiny"):
        call("generate", generate_inputs(fns, ip0_enabled=True, ip0_images=face, ip0_name="missing"))


def test_pictures_are_checked_shown_and_enable_their_unit(ui, monkeypatch):
    import gradio as gr

    call, fns, uploads, _ = ui
    show = next(d for d in fns["_all"] if d.fn.__name__ == "show_pictures" and d.outputs[0].elem_id == "ip1-gallery")
    shown, enabled = call(show, [[upload(uploads / "face.png"), upload(uploads / "coat.png")]])
    assert len(shown) == 2 and enabled is True
    (uploads / "fake.png").write_bytes(b"not a picture at all")
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    shown, enabled = call(show, [[upload(uploads / "fake.png")]])
    assert shown == [] and enabled.get("__type__") == "update" and "IP-Adapter 2" in warnings[0]


def test_png_info_fills_the_unit_from_a_generated_image(ui, monkeypatch):
    import gradio as gr

    call, fns, uploads, state = ui
    call("generate", generate_inputs(fns, ip0_enabled=True, ip0_images=[upload(uploads / "face.png")],
                                     ip0_scale=0.55, ip0_start=0.1, ip0_end=0.9, seed=5151))
    saved = list(state.cfg.outputs_dir.rglob("*-5151.png"))
    assert len(saved) == 1
    notes = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: notes.append(message))
    got = by_id(fns["read_png"], call("read_png", [upload(saved[0])]))
    assert got["ip0-enable"] is True and got["ip0-name"] == NAME
    assert (got["ip0-scale"], got["ip0-start"], got["ip0-end"]) == (0.55, 0.1, 0.9)
    assert got["ip1-enable"] is False  # the image was made without a second unit
    assert any("carries no picture" in n for n in notes)
