"""The Generate tab's "ControlNet" accordion (A1111's ControlNet extension): three units, each a checked picture,
a preprocessor with its parameters on three generic sliders (Resolution, Threshold A, Threshold B, relabelled and
re-ranged per preprocessor as A1111 does), a ControlNet of the loaded model's family, weight, guidance start/end,
control mode, resize mode and a Preview of the map; and the `ControlNet N` fields of a pasted infotext. Widgets and
conversions only: the units are studio.generation.controls.ControlUnit, the maps studio.control.preprocessors'."""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr
from PIL import Image

from studio.control import preprocessors
from studio.control.controlnet import WEIGHT_EXTS, controlnet_choices, default_controlnet
from studio.generation.controls import RESIZE_MODES, ControlUnit
from studio.generation.denoise import CONTROL_MODES
from studio.generation.job import load_init_image, resize_image
from studio.models.checkpoints import ModelLoadError
from studio.ui.state import AppState

UNITS = 3
DEFAULT_MODULE = "canny"
NEEDS_WEIGHTS = " (needs weight files)"
# one unit's inputs, in the order the Generate event (and its API) takes them after the hires fix's
FIELDS = ("enabled", "image", "module", "resolution", "threshold_a", "threshold_b", "model", "weight", "start",
          "end", "mode", "resize_mode")
# a pasted infotext fills these of each unit (the picture cannot come from a text)
PASTED = ("enabled", "module", "resolution", "threshold_a", "threshold_b", "model", "weight", "start", "end", "mode",
          "resize_mode")
# the threshold sliders' range until a page load narrows it to the preprocessor's: an API call (no page, no
# narrowing) may send any preprocessor's value; the unit's check_params still holds it to the preprocessor's range
WIDE = (0, 2**32 - 1)


def input_names() -> list[str]:
    """The Generate event's ControlNet inputs by name (cn0_enabled, cn0_image, ..., cn2_resize_mode)."""
    return [f"cn{i}_{name}" for i in range(UNITS) for name in FIELDS]


def module_choices() -> list[tuple[str, str]]:
    """The preprocessor menu as (label, name): those that work offline first, then those needing weight files."""
    offline = preprocessors.offline_names()
    return ([(name, name) for name in offline]
            + [(name + NEEDS_WEIGHTS, name) for name in preprocessors.names() if name not in offline])


def slots(module: str) -> list[preprocessors.Param | None]:
    """The preprocessor's parameters on the three sliders: its resolution, then its other two (as the `Processor
    Res`, `Threshold A` and `Threshold B` of the infotext); None where it has none."""
    params = preprocessors.get(module).params
    rest = [p for p in params if p.name != "resolution"]
    return [next((p for p in params if p.name == "resolution"), None), *(rest + [None, None])[:2]]


def slider_updates(module: str, values=None, keep: bool = False) -> list[dict]:
    """gr.updates relabelling and re-ranging the three sliders for `module`: each at `values[k]` (when given and in
    range), else at its default, or with its value left alone (`keep`); hidden where the preprocessor has none."""
    out = []
    for k, param in enumerate(slots(module)):
        if param is None:  # hidden, and wide: whatever value it still holds is ignored, never refused
            out.append(gr.update(visible=False, minimum=WIDE[0], maximum=WIDE[1]))
            continue
        update = dict(visible=True, label=param.label, minimum=param.minimum, maximum=param.maximum,
                      step=param.step)
        given = values[k] if values is not None else None
        if given is not None and param.minimum <= given <= param.maximum:
            update["value"] = given
        elif not keep:
            update["value"] = param.default
        out.append(gr.update(**update))
    return out


def _whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def params_from(module: str, resolution, threshold_a, threshold_b) -> dict:
    """The preprocessor's params dict from the three sliders (the ones it does not have are ignored)."""
    out = {}
    for param, value in zip(slots(module), (resolution, threshold_a, threshold_b), strict=True):
        if param is not None and value is not None:
            out[param.name] = _whole(value) if param.integer else value
    return out


def unit_from_values(index: int, enabled, image, module, resolution, threshold_a, threshold_b, model, weight, start,
                     end, mode, resize_mode) -> ControlUnit | None:
    """The unit's ControlUnit, None when it is not enabled; an enabled unit without a picture or a model is an
    error (generating without the control it was asked for would waste the run)."""
    if not enabled:
        return None
    where = f"ControlNet Unit {index}"
    if not image:
        raise ValueError(f"{where} is enabled but has no picture: upload one or untick Enable")
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"{where} is enabled but has no model: pick a ControlNet in its Model menu")
    module = module or "none"
    try:
        params = params_from(module, resolution, threshold_a, threshold_b)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return ControlUnit(model=model.strip(), image=image, module=module, weight=weight, start=start, end=end,
                       mode=mode, resize_mode=resize_mode, params=params)


def units_from_values(values) -> list[ControlUnit]:
    """The enabled units of the flat input list (FIELDS per unit, as the Generate event sends them)."""
    values = list(values)
    n = len(FIELDS)
    if len(values) % n:
        raise ValueError(f"the ControlNet inputs come in groups of {n}, got {len(values)} values")
    found = [unit_from_values(i, *values[i * n:(i + 1) * n]) for i in range(len(values) // n)]
    return [unit for unit in found if unit is not None]


def module_note(module: str, annotators_dir: Path) -> str:
    """One line under the preprocessor menu: what it makes, and for one needing weight files whether they are here."""
    try:
        pre = preprocessors.get(module)
    except ValueError:
        return ""
    if not pre.needs_weights:
        return f"{pre.label}: works offline."
    files = ", ".join(w.filename for w in pre.weights)
    try:
        preprocessors.weight_paths(module, annotators_dir, download=False)
        return f"{pre.label}: weight files {files} found."
    except preprocessors.MissingWeights:
        return (f"{pre.label}: needs {files} ({pre.weights[0].repo}), not found in `{annotators_dir}` or the Hugging "
                "Face cache; downloaded on first use when online (Preview says how to fetch them).")


def make_preview(image, module, resolution, threshold_a, threshold_b, resize_mode, width, height,
                 annotators_dir: Path) -> Image.Image:
    """The map the ControlNet will see: the picture (checked before decoding) fitted to the generation size by the
    resize mode, through the preprocessor. Every refusal (a bad picture or parameter, missing weight files) is a
    ValueError or ModelLoadError whose message says what to do."""
    picture = load_init_image(image)
    fitted = resize_image(picture, RESIZE_MODES[resize_mode], int(width), int(height))
    return preprocessors.preview(module, fitted, params_from(module, resolution, threshold_a, threshold_b),
                                 annotators_dir)


# --- the `ControlNet N` infotext fields (sd-webui-controlnet's) ---

_OLD_RESIZE = {"ResizeMode.RESIZE": "Just Resize", "ResizeMode.INNER": "Crop and Resize",
               "ResizeMode.OUTER": "Resize and Fill"}
_OLD_MODES = {"ControlMode.BALANCED": CONTROL_MODES[0], "ControlMode.PROMPT": CONTROL_MODES[1],
              "ControlMode.CONTROL": CONTROL_MODES[2]}
_KEY_SPLIT = re.compile(r",\s*(?=[A-Za-z][A-Za-z ]*:)")


def parse_unit_field(text: str) -> dict[str, str]:
    """'Module: canny, Model: x [hash], Weight: 1, ...' as {"module": "canny", "model": "x [hash]", ...} (keys in
    lower case: older versions wrote `preprocessor`, `weight`)."""
    out = {}
    for part in _KEY_SPLIT.split(str(text)):
        key, sep, value = part.partition(":")
        if sep:
            out[key.strip().lower()] = value.strip()
    return out


def _number(raw, low: float, high: float) -> float | None:
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return value if value == value and low <= value <= high else None


def match_model(name: str, models: list[str]) -> str | None:
    """The menu's entry for an infotext's model name, which is a file's stem ("canny" for canny.safetensors, also
    in a sub-folder), a folder's name or a hub id's last part, as the Generator writes it; None when none is."""
    if not name:
        return None
    for choice in models:
        stem = Path(choice).with_suffix("") if choice.lower().endswith(WEIGHT_EXTS) else Path(choice)
        if name in (choice, stem.as_posix(), stem.name):
            return choice
    return None


def paste_unit(text: str, models: list[str]) -> tuple[dict, list[str]]:
    """One `ControlNet N` field as widget values ({field: value} of PASTED, slider values as a list under
    "sliders") and notes for the user (a preprocessor or model that is not here)."""
    found = parse_unit_field(text)
    notes = []
    out: dict = {"enabled": True}
    module = found.get("module", found.get("preprocessor", "")).strip()
    if module in preprocessors.names():
        out["module"] = module
    elif module:
        notes.append(f"preprocessor {module!r} is not here; kept the current one")
    model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", found.get("model", "")).strip()
    choice = match_model(model, models)
    if choice:
        out["model"] = choice
    elif model and model.lower() != "none":
        notes.append(f"ControlNet {model!r} is not in controlnet/; pick one in the unit's Model menu")
    for key, label, low, high in (("weight", "weight", 0, 2), ("start", "guidance start", 0, 1),
                                  ("end", "guidance end", 0, 1)):
        value = _number(found.get(label, ""), low, high)
        if value is not None:
            out[key] = value
    mode = found.get("control mode", "")
    mode = _OLD_MODES.get(mode, mode)
    if mode in CONTROL_MODES:
        out["mode"] = mode
    resize = found.get("resize mode", "")
    resize = _OLD_RESIZE.get(resize, resize)
    if resize in RESIZE_MODES:
        out["resize_mode"] = resize
    if "module" in out:
        raw = (found.get("processor res"), found.get("threshold a"), found.get("threshold b"))
        values = []
        for param, value in zip(slots(out["module"]), raw, strict=True):
            number = _number(value, param.minimum, param.maximum) if param is not None and value else None
            values.append(_whole(number) if param is not None and param.integer and number is not None else number)
        out["sliders"] = values
    return out, notes


def paste_fields(extra: dict, models: list[str]) -> tuple[list, list[str]]:
    """The units' PASTED widgets for a pasted infotext's extra fields (updates, UNITS x PASTED in order) and notes.
    A unit without a `ControlNet N` field is unticked (the image was made without it), as hires fix pastes."""
    updates, notes = [], []
    for i in range(UNITS):
        text = extra.get(f"ControlNet {i}")
        if not text:
            updates += [False] + [gr.update()] * (len(PASTED) - 1)
            continue
        values, unit_notes = paste_unit(text, models)
        notes += [f"ControlNet {i}: {note}" for note in unit_notes]
        module = values.get("module")
        sliders = slider_updates(module, values["sliders"]) if module else [gr.update()] * 3
        for name in PASTED:
            if name == "resolution":
                updates += sliders
            elif name in ("threshold_a", "threshold_b"):
                continue
            else:
                updates.append(values.get(name, gr.update()))
        notes.append(f"ControlNet Unit {i} filled in ({values.get('module', 'its preprocessor')}); an infotext "
                     "carries no picture: upload one in the unit")
    more = [key for key in extra if key.startswith("ControlNet ") and key[11:].isdigit() and int(key[11:]) >= UNITS]
    if more:
        notes.append(f"{', '.join(more)}: this tab has {UNITS} units; the rest were left out")
    return updates, notes


def build(state: AppState, width: gr.Slider, height: gr.Slider) -> dict:
    """The accordion, wired; returns its components ("inputs": the Generate event's, in input_names() order;
    "pasted": the widgets a pasted infotext fills, in paste_fields' order; "units": each unit's by field)."""
    cfg = state.cfg
    annotators_dir = cfg.cache_dir / "annotators"  # where the Generator's units read weight files

    def models() -> list[str]:
        return controlnet_choices(cfg.controlnet_dir, cfg.assets_dir, state.manager.current)

    units = []
    with gr.Accordion("ControlNet", open=False, elem_id="controlnet") as accordion:
        gr.Markdown("Steer the image with a picture's edges, pose or depth. Upload a picture (it enables its unit), "
                    "pick a preprocessor and a ControlNet of the loaded model's family (files go in `controlnet/`, "
                    "↻ rescans), then **Preview** the map it makes at the generation size. Units add up.")
        with gr.Tabs():
            for i in range(UNITS):
                with gr.Tab(f"ControlNet Unit {i}", id=f"cn-unit-{i}"):
                    unit = _build_unit(i, models(), default_controlnet(state.manager.current, cfg.assets_dir),
                                       annotators_dir)
                    units.append(unit)

    model_menus = [u["model"] for u in units]

    def refresh():
        choices = models()
        return tuple(gr.update(choices=choices) for _ in model_menus)

    for unit in units:
        unit["refresh"].click(refresh, None, model_menus, api_visibility="private")
    gr.on(None, refresh, None, model_menus, api_visibility="private")  # no triggers: when the page loads

    def narrow(*modules):
        """On page load: the sliders ranged for the units' preprocessors (values kept)."""
        out = []
        for module in modules:
            out += slider_updates(module if module in preprocessors.names() else "none", keep=True)
        return tuple(out)

    gr.on(None, narrow, [u["module"] for u in units], [s for u in units for s in u["sliders"]],
          api_visibility="private")

    for unit in units:
        def pick_module(module, index=unit["index"]):
            try:
                return (*slider_updates(module), module_note(module, annotators_dir))
            except ValueError as e:
                raise gr.Error(f"ControlNet Unit {index}: {e}") from e

        unit["module"].input(pick_module, unit["module"], [*unit["sliders"], unit["note"]],
                             api_visibility="private")

        def show_picture(path, index=unit["index"]):
            if not path:
                return None, gr.update()
            try:
                image = load_init_image(path)
            except ValueError as e:
                gr.Warning(f"ControlNet Unit {index}: {e}")
                return None, gr.update()
            return image, True  # a picture enables its unit, as A1111's extension does

        unit["image"].change(show_picture, unit["image"], [unit["picture"], unit["enabled"]],
                             api_visibility="private")

        def preview(image, module, resolution, threshold_a, threshold_b, resize_mode, w, h, index=unit["index"]):
            if not image:
                gr.Warning(f"ControlNet Unit {index}: upload a picture first")
                return None
            try:
                return make_preview(image, module, resolution, threshold_a, threshold_b, resize_mode, w, h,
                                    annotators_dir)
            except (ValueError, ModelLoadError) as e:
                raise gr.Error(f"ControlNet Unit {index}: {e}") from e
            except Exception as e:  # a detector's own failure: one line, never a traceback
                raise gr.Error(f"ControlNet Unit {index}: preprocessor {module} failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from e

        unit["preview"].click(preview, [unit["image"], unit["module"], *unit["sliders"], unit["resize_mode"], width,
                                        height], unit["map"], api_name=f"controlnet_preview_{unit['index']}")

    inputs = [u[name] for u in units for name in FIELDS]
    pasted = [u[name] for u in units for name in PASTED]
    return {"accordion": accordion, "inputs": inputs, "pasted": pasted, "units": units, "models": models}


def _build_unit(index: int, choices: list[str], default_model: str, annotators_dir: Path) -> dict:
    i = index
    with gr.Row():
        with gr.Column(scale=1, min_width=200):
            # a file, not gr.Image: gr.Image decodes an upload before any check (as the init image)
            image = gr.File(label="Picture (PNG, JPEG, WebP)", file_types=["image"], elem_id=f"cn{i}-image",
                            height=90)
            enabled = gr.Checkbox(False, label="Enable", elem_id=f"cn{i}-enable")
        picture = gr.Image(label="Picture", interactive=False, height=200, elem_id=f"cn{i}-picture", scale=1)
        control_map = gr.Image(label="Preprocessor preview (at Width x Height)", interactive=False, format="png",
                               height=200, elem_id=f"cn{i}-map", scale=1)
    with gr.Row():
        module = gr.Dropdown(module_choices(), value=DEFAULT_MODULE, label="Preprocessor", scale=2,
                             elem_id=f"cn{i}-module")
        model = gr.Dropdown(choices, value=default_model, allow_custom_value=True, label="Model", scale=3,
                            elem_id=f"cn{i}-model", info="controlnet/ files of the loaded model's family, or a hub id")
        refresh = gr.Button("↻", scale=0, min_width=40, elem_id=f"cn{i}-model-refresh")
        preview = gr.Button("Preview", scale=0, min_width=90, elem_id=f"cn{i}-preview")
    note = gr.Markdown(module_note(DEFAULT_MODULE, annotators_dir), elem_id=f"cn{i}-note")
    first = slots(DEFAULT_MODULE)
    with gr.Row():
        resolution = gr.Slider(64, 2048, value=512, step=8, label="Resolution", visible=first[0] is not None,
                               elem_id=f"cn{i}-resolution")
        # wide until the page load narrows them (see WIDE); labelled as the default preprocessor's
        thresholds = [gr.Slider(*WIDE, value=p.default if p else 0, step=p.step if p else 1,
                                label=p.label if p else name, visible=p is not None,
                                elem_id=f"cn{i}-threshold-{name[-1].lower()}")
                      for p, name in zip(first[1:], ("Threshold A", "Threshold B"), strict=True)]
    with gr.Row():
        weight = gr.Slider(0, 2, value=1, step=0.05, label="Control weight", elem_id=f"cn{i}-weight")
        start = gr.Slider(0, 1, value=0, step=0.01, label="Starting control step", elem_id=f"cn{i}-start")
        end = gr.Slider(0, 1, value=1, step=0.01, label="Ending control step", elem_id=f"cn{i}-end")
    with gr.Row():
        mode = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0], label="Control mode", elem_id=f"cn{i}-mode")
        resize_mode = gr.Radio(list(RESIZE_MODES), value="Crop and Resize", label="Resize mode",
                               elem_id=f"cn{i}-resize-mode")
    return {"index": index, "enabled": enabled, "image": image, "picture": picture, "map": control_map,
            "module": module, "resolution": resolution, "threshold_a": thresholds[0], "threshold_b": thresholds[1],
            "sliders": [resolution, *thresholds], "model": model, "refresh": refresh, "preview": preview,
            "note": note, "weight": weight, "start": start, "end": end, "mode": mode, "resize_mode": resize_mode}
