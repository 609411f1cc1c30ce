"""The Generate tab's "IP-Adapter (image prompt)" accordion: two units, each one or more checked pictures of a
character, a face or a style, an adapter file from ipadapter/, a scale and the steps it acts in; and the
`IP-Adapter` fields of a pasted infotext. Widgets and conversions only: the units are
studio.generation.ip_adapter.IPAdapterUnit, which the Generator runs."""

from __future__ import annotations

import re

import gradio as gr

from studio.generation.ip_adapter import MAX_IMAGES, IPAdapterUnit, list_ip_adapters
from studio.generation.job import load_init_image
from studio.ui.state import AppState

UNITS = 2
FIELDS = ("enabled", "images", "name", "scale", "start", "end")  # one unit's inputs, in the Generate event's order
PASTED = ("enabled", "name", "scale", "start", "end")  # what a pasted infotext fills (never the pictures)


def input_names() -> list[str]:
    """The Generate event's IP-Adapter inputs by name (ip0_enabled, ip0_images, ..., ip1_end)."""
    return [f"ip{i}_{name}" for i in range(UNITS) for name in FIELDS]


def _paths(files) -> list[str]:
    """A gr.File (multiple) value as file paths: it sends a list of paths, or one path, or nothing."""
    if not files:
        return []
    files = files if isinstance(files, (list, tuple)) else [files]
    return [str(getattr(f, "name", None) or (f.get("path") if isinstance(f, dict) else f)) for f in files]


def unit_from_values(index: int, enabled, images, name, scale, start, end) -> IPAdapterUnit | None:
    """The unit's IPAdapterUnit, None when it is not enabled; an enabled unit without a picture or an adapter is an
    error (generating without the reference it was asked for would waste the run)."""
    if not enabled:
        return None
    where = f"IP-Adapter {index + 1}"
    paths = _paths(images)
    if not paths:
        raise ValueError(f"{where} is enabled but has no picture: upload one or more, or untick Enable")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} is enabled but has no adapter: pick one in its Adapter menu (files go in "
                         "ipadapter/)")
    return IPAdapterUnit(name=name.strip(), images=paths, scale=scale, start=start, end=end)


def units_from_values(values) -> list[IPAdapterUnit]:
    """The enabled units of the flat input list (FIELDS per unit, as the Generate event sends them)."""
    values = list(values)
    n = len(FIELDS)
    if len(values) % n:
        raise ValueError(f"the IP-Adapter inputs come in groups of {n}, got {len(values)} values")
    found = [unit_from_values(i, *values[i * n:(i + 1) * n]) for i in range(len(values) // n)]
    return [unit for unit in found if unit is not None]


def _label(index: int) -> str:
    return "IP-Adapter" if index == 0 else f"IP-Adapter {index + 1}"


def _number(raw, low: float, high: float) -> float | None:
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return value if low <= value <= high else None


def paste_fields(extra: dict, names: list[str]) -> tuple[list, list[str]]:
    """The units' PASTED widgets for a pasted infotext's extra fields (UNITS x PASTED values or updates) and notes.
    A unit the image was made without is unticked; an adapter that is not in ipadapter/ is named."""
    updates, notes = [], []
    for i in range(UNITS):
        label = _label(i)
        text = extra.get(label)
        if not text:
            updates += [False] + [gr.update()] * (len(PASTED) - 1)
            continue
        name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(text)).strip()
        if name in names:
            chosen = name
        else:
            chosen = gr.update()
            notes.append(f"{label}: adapter {name!r} is not in ipadapter/; pick one in its Adapter menu")
        scale = _number(extra.get(f"{label} scale", 1), 0, 2)
        start = _number(extra.get(f"{label} start", 0), 0, 1)
        end = _number(extra.get(f"{label} end", 1), 0, 1)
        updates += [True, chosen, *(gr.update() if v is None else v for v in (scale, start, end))]
        notes.append(f"{label} filled in; an infotext carries no picture: upload the reference in the unit")
    return updates, notes


def build(state: AppState) -> dict:
    """The accordion, wired; returns its components ("inputs": the Generate event's, in input_names() order;
    "pasted": the widgets a pasted infotext fills, in paste_fields' order; "names": the adapters now here)."""
    folder = state.cfg.ipadapter_dir

    def names() -> list[str]:
        return list_ip_adapters(folder)

    units = []
    with gr.Accordion("IP-Adapter (image prompt)", open=False, elem_id="ip-adapter") as accordion:
        gr.Markdown("Show the model a picture of a character, a face or a style and it draws that beside the prompt: "
                    "the same character from shot to shot. Put an adapter file of the loaded model's family in "
                    f"`{state.shown(folder)}` with its `image_encoder/` folder (e.g. h94/IP-Adapter's "
                    "`ip-adapter_sd15.safetensors` and `models/image_encoder`), ↻ rescans. Several pictures in one "
                    "unit are one reference; a scale of 0.5-0.8 leaves the prompt room.")
        with gr.Tabs():
            for i in range(UNITS):
                with gr.Tab(f"IP-Adapter {i + 1}", id=f"ip-unit-{i}"):
                    units.append(_build_unit(i, names()))

    menus = [u["name"] for u in units]

    def refresh():
        choices = names()
        return tuple(gr.update(choices=choices) for _ in menus)

    for unit in units:
        unit["refresh"].click(refresh, None, menus, api_visibility="private")
    gr.on(None, refresh, None, menus, api_visibility="private")  # no triggers: when the page loads

    for unit in units:
        def show_pictures(files, index=unit["index"]):
            paths = _paths(files)
            if not paths:
                return [], gr.update()
            if len(paths) > MAX_IMAGES:
                gr.Warning(f"IP-Adapter {index + 1}: at most {MAX_IMAGES} pictures, got {len(paths)}")
                return [], gr.update()
            shown = []
            for path in paths:
                try:
                    shown.append(load_init_image(path))  # header checked before decoding
                except ValueError as e:
                    gr.Warning(f"IP-Adapter {index + 1}: {e}")
                    return [], gr.update()
            return shown, True  # pictures enable their unit, as the ControlNet units do

        unit["images"].change(show_pictures, unit["images"], [unit["gallery"], unit["enabled"]],
                              api_visibility="private")

    inputs = [u[name] for u in units for name in FIELDS]
    pasted = [u[name] for u in units for name in PASTED]
    return {"accordion": accordion, "inputs": inputs, "pasted": pasted, "units": units, "names": names}


def _build_unit(index: int, choices: list[str]) -> dict:
    i = index
    with gr.Row():
        with gr.Column(scale=1, min_width=200):
            # files, not gr.Image: gr.Image decodes an upload before any check
            images = gr.File(label="Reference pictures (PNG, JPEG, WebP)", file_types=["image"],
                             file_count="multiple", elem_id=f"ip{i}-images", height=90)
            enabled = gr.Checkbox(False, label="Enable", elem_id=f"ip{i}-enable")
        gallery = gr.Gallery(label="Reference", interactive=False, height=200, columns=4, elem_id=f"ip{i}-gallery",
                             scale=2)
    with gr.Row():
        name = gr.Dropdown(choices, value=choices[0] if choices else "", allow_custom_value=True, label="Adapter",
                           scale=3, elem_id=f"ip{i}-name", info="ipadapter/ files (plain, Plus, Plus Face)")
        refresh = gr.Button("↻", scale=0, min_width=40, elem_id=f"ip{i}-refresh")
    with gr.Row():
        scale = gr.Slider(0, 2, value=0.7, step=0.05, label="Scale (how strongly the pictures steer)",
                          elem_id=f"ip{i}-scale")
        start = gr.Slider(0, 1, value=0, step=0.01, label="Starting step", elem_id=f"ip{i}-start")
        end = gr.Slider(0, 1, value=1, step=0.01, label="Ending step", elem_id=f"ip{i}-end")
    return {"index": index, "enabled": enabled, "images": images, "gallery": gallery, "name": name,
            "refresh": refresh, "scale": scale, "start": start, "end": end}
