"""The Generate tab's regional prompts (the Regional Prompter extension's idea): a layout of columns or rows, one
prompt per region, and the mode; only widgets and the conversion to GenerateJob's fields (studio.generation.regions
does the work)."""

from __future__ import annotations

import gradio as gr

from studio.generation import regions

LAYOUTS = ["Off", "cols 1,1", "cols 1,1,1", "cols 2,1", "cols 1,2", "rows 1,1", "rows 1,1,1", "rows 2,1"]
INPUTS = ("regions_layout", "region_mode", *(f"region_{k}" for k in range(1, regions.MAX_REGIONS + 1)))


def build() -> dict:
    """The accordion; returns its inputs (in INPUTS' order) for the Generate event."""
    with gr.Accordion("Regional prompts", open=False, elem_id="regions"):
        gr.Markdown("Split the picture into columns or rows, each drawn from its own prompt (two characters keep "
                    "their own clothes and colours). The main prompt is what the regions share: setting, style.")
        with gr.Row():
            layout = gr.Dropdown(LAYOUTS, value="Off", allow_custom_value=True, label="Regions",
                                 info="columns or rows and their widths, e.g. cols 2,1", elem_id="regions-layout")
            mode = gr.Radio(list(regions.MODES), value=regions.MODES[0], label="Mode",
                            info="Attention: one pass, each region's prompt where it is; Latent: a prediction "
                                 "per region (slower)", elem_id="regions-mode")
        prompts = [gr.Textbox("", label=f"Region {k} (left to right, or top to bottom)", lines=1,
                              elem_id=f"region-{k}") for k in range(1, regions.MAX_REGIONS + 1)]
    return {"inputs": [layout, mode, *prompts]}


def job_fields(layout, mode, *prompts) -> dict:
    """GenerateJob's regions, region_prompts and region_mode from the widgets: "Off" (or empty) is no regions; the
    first N prompts are used for a layout of N regions (GenerateJob.validate names a missing one)."""
    text = str(layout or "").strip()
    if not text or text == "Off":
        return {"regions": "", "region_prompts": [], "region_mode": mode or regions.MODES[0]}
    _, shares = regions.parse_layout(text)
    chosen = [str(p or "") for p in prompts[: len(shares)]]
    missing = [k for k, p in enumerate(chosen, 1) if not p.strip()]
    if missing:
        raise ValueError(f"regions {text!r} has {len(shares)} regions: write a prompt for region "
                         f"{', '.join(map(str, missing))}")
    return {"regions": text, "region_prompts": chosen, "region_mode": mode or regions.MODES[0]}
