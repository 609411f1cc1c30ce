"""The Generate tab's "Hires fix" accordion (A1111's text-to-image hires fix) and the hires fields of a pasted
infotext. Widgets and conversions only: the two passes run in studio.generation."""

from __future__ import annotations

import math
from pathlib import Path

import gradio as gr

from studio.generation import hires, samplers
from studio.upscale.library import NONE, upscaler_choices

SAME_SAMPLER = "Use same sampler"  # A1111's first choice of the hires sampler menu


def hires_upscalers(folder: Path) -> list[str]:
    """The hires upscaler menu, as A1111's: the latent upscalers, then Lanczos, Nearest and the files in
    upscalers/ (not "None": a hires fix needs an upscale)."""
    return [*hires.LATENT_UPSCALERS, *(name for name in upscaler_choices(folder) if name != NONE)]


def sampler_value(choice) -> str:
    """The job's hires_sampler for the menu's choice: "" for "Use same sampler"."""
    return "" if choice in (None, SAME_SAMPLER) else choice


def build(folder: Path) -> dict:
    """The accordion; returns its components by name (inputs in the order job_from_inputs takes them)."""
    with gr.Accordion("Hires fix", open=False, elem_id="hires") as accordion:
        enabled = gr.Checkbox(False, label="Hires fix: draw at this size, then again larger (text to image)",
                              elem_id="hires-fix")
        with gr.Row():
            upscaler = gr.Dropdown(hires_upscalers(folder), value=hires.DEFAULT_UPSCALER, label="Upscaler",
                                   scale=3, elem_id="hires-upscaler")
            refresh = gr.Button("↻", scale=0, min_width=40, elem_id="hires-upscaler-refresh")
            steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0 = as sampling steps)", scale=3,
                              elem_id="hires-steps")
            denoising = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength", scale=3,
                                  elem_id="hires-denoising")
        with gr.Row():
            scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="hires-scale")
            width = gr.Slider(0, 2048, value=0, step=8, label="Resize width to (0 = by scale)",
                              elem_id="hires-width")
            height = gr.Slider(0, 2048, value=0, step=8, label="Resize height to (0 = by scale)",
                               elem_id="hires-height")
        sampler = gr.Dropdown([SAME_SAMPLER, *samplers.SAMPLERS], value=SAME_SAMPLER, label="Hires sampler",
                              elem_id="hires-sampler")
        prompt = gr.Textbox("", label="Hires prompt (empty = the prompt)", lines=2, elem_id="hires-prompt")
        negative = gr.Textbox("", label="Hires negative prompt (empty = the negative prompt)", lines=2,
                              elem_id="hires-negative-prompt")

    def menu():
        return gr.update(choices=hires_upscalers(folder))

    refresh.click(menu, None, upscaler, api_visibility="private")
    gr.on(None, menu, None, upscaler, api_visibility="private")  # no triggers: when the page loads
    return {"accordion": accordion, "inputs": [enabled, scale, upscaler, steps, denoising, width, height, sampler,
                                               prompt, negative],
            "enabled": enabled, "scale": scale, "upscaler": upscaler, "steps": steps, "denoising": denoising,
            "width": width, "height": height, "sampler": sampler, "prompt": prompt, "negative": negative}


def _number(raw, low: float, high: float) -> float | None:
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and low <= value <= high else None


def paste_fields(extra: dict) -> dict:
    """The hires fix of a pasted infotext (A1111's labels: Hires upscale / resize, steps, upscaler, sampler,
    prompts, and Denoising strength, which belongs to the hires pass when hires fields are there) as widget
    values. Without hires fields the fix is unticked (as A1111 pastes): the pasted image was made without it."""
    if not any(key.startswith("Hires ") for key in extra):
        return {"enabled": False}
    out: dict = {"enabled": True, "width": 0, "height": 0, "steps": 0, "sampler": SAME_SAMPLER, "prompt": "",
                 "negative": ""}
    scale = _number(extra.get("Hires upscale", ""), 1, 4)
    if scale is not None:
        out["scale"] = scale
    resize = str(extra.get("Hires resize", "")).lower()
    w, sep, h = resize.partition("x")
    if sep and w.strip().isdigit() and h.strip().isdigit():
        out["width"], out["height"] = int(w), int(h)
    steps = str(extra.get("Hires steps", "")).strip()
    if steps.isdigit() and int(steps) <= 150:
        out["steps"] = int(steps)
    upscaler = str(extra.get("Hires upscaler", "")).strip()
    if upscaler:
        out["upscaler"] = upscaler
    sampler = str(extra.get("Hires sampler", "")).strip()
    if sampler in samplers.SAMPLERS:
        out["sampler"] = sampler
    for key, label in (("prompt", "Hires prompt"), ("negative", "Hires negative prompt")):
        if label in extra:
            out[key] = str(extra[label])
    strength = _number(extra.get("Denoising strength", ""), 0, 1)
    if strength is not None:
        out["denoising"] = strength
    return out
