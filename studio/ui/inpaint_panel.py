"""The Generate tab's inpainting and outpainting widgets (A1111's img2img "Inpaint" and its outpainting script): a
mask editor over the accepted init image, a mask file, A1111's inpaint options, per-side outpaint pads, and the
fields a pasted infotext fills in. Only widgets and conversions: the engine (studio.generation) does the work."""

from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from studio.generation import masking
from studio.generation.job import load_mask
from studio.ui.checked_editor import CheckedImageEditor

ASPECTS = {"16:9": 16 / 9, "9:16": 9 / 16, "3:2": 3 / 2, "2:3": 2 / 3, "4:3": 4 / 3, "3:4": 3 / 4, "1:1": 1.0,
           "21:9": 21 / 9}


def mask_from_editor(value) -> Image.Image | None:
    """The painted area of the editor's layers as a black/white "L" mask (a layer's alpha: painted = redraw,
    as studio.generation.masking.binary_mask reads it); None when nothing is painted."""
    if not isinstance(value, dict):
        return None
    alphas = []
    for layer in value.get("layers") or []:
        if isinstance(layer, Image.Image):
            alphas.append(np.asarray(layer.convert("RGBA"))[..., 3])
        elif isinstance(layer, np.ndarray) and layer.ndim == 3 and layer.shape[2] == 4:
            alphas.append(layer[..., 3])
    alphas = [a for a in alphas if a.shape == alphas[0].shape] if alphas else []
    if not alphas:
        return None
    alpha = np.maximum.reduce(alphas)
    if not (alpha > 128).any():
        return None
    return Image.fromarray(alpha.astype(np.uint8), "L")


def editor_value(image: Image.Image | None) -> dict | None:
    """The editor's value for an accepted init image: the picture as the background, nothing painted."""
    if image is None:
        return None
    return {"background": image, "layers": [], "composite": image}


def whole(value):
    """A number box's 64.0 as 64 (the same number); anything else as it came, for the job to refuse."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def outpaint_value(left, right, top, bottom) -> dict:
    """The per-side boxes as the job's outpaint dict (zeros left out)."""
    pads = dict(zip(masking.OUTPAINT_SIDES, (left, right, top, bottom), strict=True))
    return {side: whole(v) for side, v in pads.items() if v not in (None, 0, 0.0)}


def pick_mask(editor, mask_file):
    """The job's mask: the mask file when one is given (checked by the job's load_mask), else what is painted in
    the editor, else None (plain image to image)."""
    if mask_file:
        return mask_file
    return mask_from_editor(editor)


def check_mask_file(path):
    """An uploaded mask, checked before decoding; a warning (and the upload cleared) when it is refused."""
    if not path:
        return gr.update()
    try:
        mask = load_mask(path)
    except ValueError as e:
        gr.Warning(str(e))
        return None
    gr.Info(f"mask of {mask.width}x{mask.height} accepted: white (or opaque) = redraw")
    return gr.update()


def build_inpaint() -> dict:
    """The "Inpaint" accordion; returns its components by name."""
    with gr.Accordion("Inpaint: paint what to redraw", open=False, elem_id="inpaint") as accordion:
        gr.Markdown("Load an init image under **Image to image** (or **Send to inpaint** under the gallery), then "
                    "paint over what should be redrawn. Nothing painted and no mask file = plain image to image.")
        editor = CheckedImageEditor(
            label="Mask: paint over the init image", sources=(), type="pil", image_mode="RGBA", layers=False,
            transforms=(), brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=12),
            eraser=gr.Eraser(default_size=12), format="png", height=420, elem_id="inpaint-editor")
        mask_file = gr.File(label="Or a mask file (white = redraw; used instead of the painting)",
                            file_types=["image"], elem_id="mask-file", height=90)
        mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="mask-blur")
        with gr.Row():
            mask_mode = gr.Radio(list(masking.MASK_MODES), value=masking.MASK_MODES[0], label="Mask mode",
                                 elem_id="mask-mode")
            masked_content = gr.Radio(list(masking.MASKED_CONTENT), value="original", label="Masked content",
                                      elem_id="masked-content")
        with gr.Row():
            inpaint_area = gr.Radio(list(masking.INPAINT_AREAS), value=masking.INPAINT_AREAS[0],
                                    label="Inpaint area", elem_id="inpaint-area")
            padding = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels",
                                elem_id="inpaint-padding")
    mask_file.change(check_mask_file, mask_file, mask_file, api_visibility="private")
    return {"accordion": accordion, "editor": editor, "mask_file": mask_file, "mask_blur": mask_blur,
            "mask_mode": mask_mode, "masked_content": masked_content, "inpaint_area": inpaint_area,
            "padding": padding}


def build_outpaint(width: gr.Slider, height: gr.Slider) -> dict:
    """The "Outpaint" accordion: pixels added per side, and pads that bring Width x Height to an aspect."""
    with gr.Accordion("Outpaint: extend the init image", open=False, elem_id="outpaint") as accordion:
        gr.Markdown("Pixels added on each side of the init image (fitted to Width x Height first), multiples of 8. "
                    "The new bands and a seam into the picture are drawn; the rest is kept.")
        with gr.Row():
            sides = [gr.Number(value=0, minimum=0, maximum=1024, step=8, label=side.capitalize(),
                               elem_id=f"outpaint-{side}", min_width=80) for side in masking.OUTPAINT_SIDES]
        with gr.Row():
            aspect = gr.Dropdown(list(ASPECTS), value="16:9", label="Aspect", scale=1, elem_id="outpaint-aspect")
            to_aspect = gr.Button("Pad to this aspect", scale=1, elem_id="outpaint-to-aspect")

    def pads(w, h, name):
        try:
            found = masking.pads_for_aspect(int(w), int(h), ASPECTS[name])
        except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
            raise gr.Error(f"cannot pad {w}x{h} to {name}: {e}") from e
        return tuple(found.get(side, 0) for side in masking.OUTPAINT_SIDES)

    to_aspect.click(pads, [width, height, aspect], sides, api_visibility="private")
    return {"accordion": accordion, "sides": sides}


def paste_fields(extra: dict) -> dict:
    """The inpainting options of a pasted infotext (A1111's labels) as widget values; only those present."""
    out = {}
    blur = str(extra.get("Mask blur", "")).strip()
    if blur.isdigit() and int(blur) <= 64:
        out["mask_blur"] = int(blur)
    for key, label, choices in (("mask_mode", "Mask mode", masking.MASK_MODES),
                                ("masked_content", "Masked content", masking.MASKED_CONTENT),
                                ("inpaint_area", "Inpaint area", masking.INPAINT_AREAS)):
        value = str(extra.get(label, "")).strip()
        if value in choices:
            out[key] = value
    padding = str(extra.get("Masked area padding", "")).strip()
    if padding.isdigit() and int(padding) <= 256:
        out["padding"] = int(padding)
    if out and "Outpaint" not in extra:  # an inpainting infotext: A1111 leaves out the options at their defaults
        defaults = {"mask_mode": masking.MASK_MODES[0], "masked_content": "original",
                    "inpaint_area": masking.INPAINT_AREAS[0]}
        out = {**defaults, **out}
    return out
