""""Send to" buttons (A1111's): a saved picture of any tab goes to the Generate tab's image to image, inpaint,
upscale or PNG-info box, that accordion opens and the Generate tab is shown. The picture is a path the server kept
(a gallery's saved PNG, a storyboard's picked frame), never a path sent by the browser."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gradio as gr

# target -> button label; the Generate tab's components each fills are named in targets()
LABELS = {"img2img": "Send to image to image", "inpaint": "Send to inpaint", "upscale": "Send to upscale",
          "png_info": "Read its parameters"}


def targets(gen: dict) -> dict[str, list]:
    """For each target, the Generate tab's components it fills: the file input first, then the accordions to open."""
    return {"img2img": [gen["init_image"], gen["img2img_accordion"]],
            "inpaint": [gen["init_image"], gen["img2img_accordion"], gen["inpaint"]["accordion"]],
            "upscale": [gen["upscale"]["source"], gen["upscale"]["accordion"]],
            "png_info": [gen["png_info"], gen["png_accordion"]]}


def sender(count: int, what: str = "an image", resolve: Callable | None = None, switch: bool = False) -> Callable:
    """The handler of one button: the picture's path (the input itself, or `resolve(*inputs)`) into the file input,
    `count` accordions opened and, with `switch`, the Generate tab shown; a warning (and nothing changed) when there
    is no picture yet or it is gone."""
    def send(*values):
        path = resolve(*values) if resolve is not None else values[0]
        if not path or not Path(path).is_file():
            gr.Warning(f"nothing to send: pick {what} first" if not path else f"{Path(path).name} is gone")
            return (gr.update(),) * (count + 1 + switch)
        shown = (gr.Tabs(selected="generate"),) if switch else ()
        return (str(path), *(gr.update(open=True),) * count, *shown)
    return send


def buttons(prefix: str = "send", only: tuple[str, ...] = tuple(LABELS)) -> dict[str, gr.Button]:
    """The row of Send to buttons (laid out where it is called; wire() gives them their events)."""
    with gr.Row():
        return {target: gr.Button(LABELS[target], size="sm", elem_id=f"{prefix}-{target.replace('_', '-')}")
                for target in only}


def wire(found: dict[str, gr.Button], gen: dict, source, tabs: gr.Tabs | None = None, what: str = "an image",
         resolve: Callable | None = None) -> None:
    """Each button sends the picture whose server-side path `source` holds (a gr.State; or, with `resolve`, the
    path resolve(*source values) names) to its target, and shows the Generate tab (`tabs`) when it sent one."""
    for target, button in found.items():
        outputs = targets(gen)[target]
        handler = sender(len(outputs) - 1, what, resolve, switch=tabs is not None)
        button.click(handler, source, outputs + ([tabs] if tabs is not None else []), api_visibility="private")
