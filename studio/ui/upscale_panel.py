"""The Generate tab's "Upscale" accordion (A1111's Extras, one image): a checked image file (or the gallery's
selected image, sent here), an upscaler (Lanczos, Nearest or a file in upscalers/), a scale and a tile size; the
result shown and saved under outputs/extras-images/ with A1111's postprocessing note. The work is
studio.upscale's."""

from __future__ import annotations

import gradio as gr

from studio.ui.state import AppState
from studio.upscale.library import LANCZOS, NONE, upscaler_choices
from studio.upscale.output import output_path, postprocess_note, read_source, save_png
from studio.upscale.run import upscale
from studio.upscale.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, UpscaleCancelled

EXTRAS_FOLDER = "extras-images"  # under outputs/, as A1111 and `python -m studio upscale` save them


def upscalers(folder) -> list[str]:
    """Lanczos, Nearest, then the model files in upscalers/ ("None" would leave the image as it is)."""
    return [name for name in upscaler_choices(folder) if name != NONE]


def whole(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def build(state: AppState) -> dict:
    """The accordion, wired; returns its components by name."""
    folder = state.cfg.upscalers_dir
    with gr.Accordion("Upscale (Extras)", open=False, elem_id="upscale") as accordion:
        source = gr.File(label="Image to upscale (PNG, JPEG, WebP), or Send to upscale under the gallery",
                         file_types=["image"], elem_id="upscale-image", height=90)
        with gr.Row():
            upscaler = gr.Dropdown(upscalers(folder), value=LANCZOS, label="Upscaler", scale=3,
                                   elem_id="upscaler", info="model files go in upscalers/ (↻ to rescan)")
            refresh = gr.Button("↻", scale=0, min_width=40, elem_id="upscaler-refresh")
        with gr.Row():
            scale = gr.Slider(1, 8, value=2, step=0.25, label="Scale by", elem_id="upscale-scale")
            tile = gr.Slider(0, 1024, value=DEFAULT_TILE, step=32, label="Tile size (models; 0 = whole image)",
                             elem_id="upscale-tile")
        button = gr.Button("Upscale", variant="primary", elem_id="upscale-btn")
        result = gr.Image(label="Upscaled", interactive=False, format="png", height=320, elem_id="upscale-result")
        info = gr.Markdown(elem_id="upscale-info")

    def run(request: gr.Request, path, name, factor, tile_size, progress=gr.Progress()):
        if not path:
            raise gr.Error("choose an image to upscale, or select one in the gallery and press Send to upscale")
        try:
            picture = read_source(path)  # the header checked before anything is decoded
        except ValueError as e:
            raise gr.Error(str(e)) from e
        cancel = state.cancel_for(request)
        cancel.clear()
        progress(0, desc=f"upscaling with {name}")

        def on_progress(done, total, what):
            progress((done, total), desc=f"{name}: {what}", unit="tiles")

        try:
            out = upscale(picture.image, name, whole(factor), folder=folder, tile=whole(tile_size),
                          overlap=DEFAULT_OVERLAP, device=state.manager.device, on_progress=on_progress,
                          cancel=cancel)
        except UpscaleCancelled:
            gr.Warning("upscale stopped; nothing was saved")
            return gr.update(), "stopped"
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e)) from e
        target = state.cfg.outputs_dir / EXTRAS_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        saved = save_png(out.image, output_path(target, path, out.upscaler, whole(factor)), picture.text,
                         postprocess_note(out.upscaler, whole(factor)))
        w, h = picture.image.size
        how = f"{out.architecture} {out.model_scale}x, {out.dtype}" if out.architecture else out.upscaler
        notes = "".join(f" · {note}" for note in picture.notes)
        return str(saved), (f"**{w}x{h} → {out.image.width}x{out.image.height}** with {how} · saved to "
                            f"`{state.shown(saved)}`{notes}")

    button.click(run, [source, upscaler, scale, tile], [result, info], concurrency_id="gpu", concurrency_limit=1,
                 show_progress_on=result, api_name="upscale")

    def menu():
        return gr.update(choices=upscalers(folder))

    refresh.click(menu, None, upscaler, api_visibility="private")
    gr.on(None, menu, None, upscaler, api_visibility="private")  # no triggers: when the page loads
    return {"accordion": accordion, "source": source, "upscaler": upscaler, "scale": scale, "tile": tile,
            "button": button, "result": result, "info": info}
