"""The Explorer tab: A1111's X/Y/Z plot (axis pickers, value boxes with dropdown helpers, a preview of the cell
count and time), run as batched passes with progress and Stop; the grid in a zoomable view; send a cell to
Generate. The cells' base settings may start from an init image (image to image) or use hires fix."""

from __future__ import annotations

import csv
import html
import io

import gradio as gr

from studio.explorer.grid import AxisSpec, GridJob, GridPlan, GridRunner, hires_upscaler_choices
from studio.explorer.syntax import AXIS_TYPES, NONE_VALUE, NOTHING, lora_tags
from studio.generation import hires, samplers
from studio.generation.job import RESIZE_MODES, GenerateJob, load_init_image
from studio.ui import send_to
from studio.ui.progress import StepProgress
from studio.ui.state import AppState

AXIS_NAMES = list(AXIS_TYPES)
DEFAULT_AXES = ("CFG Scale", "Steps", NOTHING)
DEFAULT_VALUES = ("3, 7, 11", "10, 20", "")
PLACEHOLDERS = {
    "Seed": "1, 2, 3  ·  1-5  ·  -1 (random)", "Steps": "10, 20, 30  ·  10-30 [3]  ·  10-40 (+10)",
    "CFG Scale": "3, 7, 11  ·  3-11 [5]  ·  4-8 (+0.5)", "Sampler": "Euler a, DPM++ 2M",
    "Schedule type": "Automatic, Karras, Exponential", "Size": "512x512, 768x512, 512x768",
    "Prompt S/R": "the first value is searched in the prompt; each value replaces it: red, blue, green",
    "Negative prompt S/R": "searched in the negative prompt: blurry, noisy",
    "LoRA weight": "0, 0.25, 0.5, 0.75, 1  ·  0-1 [5]",
    "LoRA / embedding": "the first is in the prompt, the others replace it: inkwash, paperfold, None",
    "Checkpoint name": "model names from models/ (or demo-tiny, demo-tiny-xl)",
    "Denoising": "0.3, 0.5, 0.7  ·  0.2-0.8 [4]  (needs an init image, or hires fix on)",
    "Hires steps": "0, 10, 20  (0: the same as the sampling steps; needs hires fix on)",
    "Hires upscale": "1.5, 2  ·  1-2 (+0.25)  (needs hires fix on)",
    "Hires upscaler": "Latent, Lanczos, 4x-UltraSharp  (needs hires fix on)",
    "VAE": "Automatic, None, names of files in vae/",
}


def csv_join(values: list[str]) -> str:
    """Values as one A1111 value list, CSV-quoted where a value holds a comma or a quote."""
    out = []
    for value in values:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow([value])
        out.append(buf.getvalue())
    return ", ".join(out)


def helper_choices(state: AppState, axis_name: str) -> list[str] | None:
    """Choices for the dropdown helper of an axis (None: the axis has no list to pick from)."""
    kind = AXIS_TYPES[axis_name].kind
    if kind == "sampler":
        return list(samplers.SAMPLERS)
    if kind == "schedule":
        return list(samplers.SCHEDULE_TYPES)
    if kind == "checkpoint":
        return state.manager.choices()
    if kind == "network":
        lib = state.generator.networks
        return sorted(lib.loras().found) + sorted(lib.embeddings().found) + [NONE_VALUE]
    if kind == "hires_upscaler":
        return hires_upscaler_choices(state.cfg.upscalers_dir)
    if kind == "vae":
        return state.manager.vae_choices()
    return None


def grid_job_from_inputs(prompt, negative, sampler, schedule, steps, cfg_scale, seed, width, height, clip_skip,
                         x_type, x_values, x_lora, y_type, y_values, y_lora, z_type, z_values, z_lora, keep_seeds,
                         cells_per_pass, init_image=None, denoising_strength=0.75, resize_mode="Just resize",
                         hires_fix=False, hires_upscaler=hires.DEFAULT_UPSCALER, hires_scale=2.0, hires_steps=0,
                         hires_denoising=0.7) -> GridJob:
    # the values as sent: validation refuses 2.7 steps or None instead of a silent int() here; the image to image
    # and hires fix inputs have defaults, so callers sending the text-to-image values still work
    base = GenerateJob(prompt=prompt, negative_prompt=negative, sampler=sampler, schedule=schedule, steps=steps,
                       cfg_scale=cfg_scale, seed=seed, width=width, height=height, clip_skip=clip_skip,
                       init_image=init_image or None, denoising_strength=denoising_strength, resize_mode=resize_mode,
                       hires_fix=hires_fix, hires_upscaler=hires_upscaler, hires_scale=hires_scale,
                       hires_steps=hires_steps, hires_denoising=hires_denoising)
    axes = [AxisSpec(t or NOTHING, v or "", (lora or "") if t == "LoRA weight" else "")
            for t, v, lora in ((x_type, x_values, x_lora), (y_type, y_values, y_lora), (z_type, z_values, z_lora))]
    return GridJob(base, *axes, keep_random_seeds=bool(keep_seeds), cells_per_pass=cells_per_pass)


def describe(plan: GridPlan, seconds: float | None) -> str:
    when = f"about {seconds:.0f} s" if seconds is not None and seconds >= 1 else (
        "under a second" if seconds is not None else "known after the first pass on this model")
    return f"**{plan.summary()}** · estimated time: {when}"


def zoom_html(path: str | None, width: int, zoom: float) -> str:
    """The grid in a scrollable box at `zoom` percent (nearest-neighbour above 100 %, so pixels stay sharp)."""
    if not path:
        return "<div class='explorer-zoom' style='padding:2em;color:#888'>The grid appears here.</div>"
    src = "/gradio_api/file=" + html.escape(str(path), quote=True)
    shown = max(1, int(width * zoom / 100))
    rendering = "pixelated" if zoom > 100 else "auto"
    return (f"<div class='explorer-zoom' style='overflow:auto;max-height:75vh;border:1px solid #ccc'>"
            f"<img src='{src}' alt='grid' style='width:{shown}px;max-width:none;image-rendering:{rendering}'></div>"
            f"<a href='{src}' target='_blank'>open the full-size grid</a>")


def build(state: AppState, gen: dict | None = None, tabs: gr.Tabs | None = None) -> dict:
    """Lay out the tab and wire it to the engine. `gen["png_info"]` (the Generate tab's PNG-info box) receives
    cells sent to Generate; `tabs` switches to the Generate tab when given."""
    runner = GridRunner(state.manager, state.generator)

    # the preview: cells, passes, grid size and time, or what is wrong (nothing runs)
    def plan_preview(*values):
        try:
            plan = runner.plan(grid_job_from_inputs(*values))
        except (ValueError, RuntimeError) as e:
            return f"⚠ {e}"
        return describe(plan, runner.estimate(plan))

    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="explorer-prompt",
                                placeholder="a lighthouse at dusk <lora:inkwash:0.8>")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="explorer-negative")
        with gr.Column(scale=1, min_width=160):
            run_btn = gr.Button("Run grid", variant="primary", elem_id="explorer-run")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="explorer-stop")
            take_btn = gr.Button("Take Generate's prompt", size="sm", elem_id="explorer-take-prompt",
                                 visible=gen is not None and "prompt" in gen)
    if gen is not None and "prompt" in gen:  # the prompts typed in the Generate tab, copied here
        take_btn.click(lambda p, n: (p, n), [gen["prompt"], gen["negative"]], [prompt, negative],
                       api_visibility="private", show_progress="hidden")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Accordion("Settings of every cell (the axes change some of them)", open=False):
                with gr.Row():
                    sampler = gr.Dropdown(list(samplers.SAMPLERS), value="DPM++ 2M", label="Sampler")
                    # Automatic: each sampler its own default, so a Sampler axis never meets a schedule it lacks
                    schedule = gr.Dropdown(samplers.SCHEDULE_TYPES, value=samplers.AUTOMATIC, label="Schedule type")
                steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps")
                cfg_scale = gr.Slider(0, 30, value=7, step=0.5, label="CFG scale")
                with gr.Row():
                    size = state.manager.current.native_size if state.manager.current else 512
                    width = gr.Slider(64, 2048, value=size, step=8, label="Width")
                    height = gr.Slider(64, 2048, value=size, step=8, label="Height")
                with gr.Row():
                    seed = gr.Number(value=-1, label="Seed (-1 = one random seed for all cells)")  # no rounding
                    clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
            with gr.Accordion("Image to image (every cell starts from the init image)", open=False):
                # a file, not gr.Image: gr.Image decodes an upload before any check (as on the Generate tab)
                init_in = gr.File(label="Init image (PNG, JPEG, WebP): needed for a Denoising axis without hires fix",
                                  file_types=["image"], elem_id="explorer-init-image", height=90)
                strength = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength (a Denoising axis "
                                     "sets it per cell)", elem_id="explorer-denoising")
                resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode")
            with gr.Accordion("Hires fix (text to image)", open=False):
                hires_fix = gr.Checkbox(value=False, label="Hires fix: a second pass at a larger size",
                                        elem_id="explorer-hires")
                with gr.Row():
                    hires_upscaler = gr.Dropdown(hires_upscaler_choices(state.cfg.upscalers_dir),
                                                 value=hires.DEFAULT_UPSCALER, label="Upscaler")
                    hires_scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by")
                with gr.Row():
                    hires_steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: the same)")
                    hires_denoising = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength")
            axis_inputs, axis_rows = [], []
            for letter, default, value in zip("XYZ", DEFAULT_AXES, DEFAULT_VALUES, strict=True):
                with gr.Group():
                    with gr.Row():
                        axis_type = gr.Dropdown(AXIS_NAMES, value=default, label=f"{letter} type", scale=1,
                                                elem_id=f"explorer-{letter.lower()}-type")
                        values = gr.Textbox(value=value, label=f"{letter} values", scale=3,
                                            placeholder=PLACEHOLDERS.get(default, ""),
                                            elem_id=f"explorer-{letter.lower()}-values")
                    with gr.Row():
                        helper = gr.Dropdown([], value=[], multiselect=True, label=f"{letter}: pick values",
                                             visible=False, scale=3)
                        lora = gr.Dropdown([], value=None, label="LoRA to vary", visible=False, scale=1,
                                           allow_custom_value=True)
                axis_inputs += [axis_type, values, lora]
                axis_rows.append((axis_type, values, helper, lora))
            with gr.Row():
                keep_seeds = gr.Checkbox(value=False, label="Keep -1 for seeds (each cell its own random seed)")
                cells_per_pass = gr.Slider(1, 64, value=8, step=1, label="Cells per denoising pass",
                                           info="lower it when GPU memory runs out")
            defaults = ["", "", "DPM++ 2M", samplers.AUTOMATIC, 20, 7, -1, size, size, 1]
            for default, value in zip(DEFAULT_AXES, DEFAULT_VALUES, strict=True):
                defaults += [default, value, None]
            preview = gr.Markdown(plan_preview(*defaults, False, 8), elem_id="explorer-preview")
        with gr.Column(scale=3):
            zoom = gr.Slider(10, 400, value=100, step=10, label="Zoom (%)", elem_id="explorer-zoom")
            grid_view = gr.HTML(zoom_html(None, 0, 100), elem_id="explorer-grid")
            status = gr.Markdown(elem_id="explorer-status")
            files = gr.File(label="Grid, table (JSON, CSV)", file_count="multiple", interactive=False)
            cells = gr.Gallery(label="Cells (click one to select it)", columns=6, height=280, format="png",
                               elem_id="explorer-cells")
            cell_info = gr.Textbox(label="Selected cell's parameters", lines=3, interactive=False)
            # the selected cell to the Generate tab: image to image, inpaint, upscale, or its parameters
            send_buttons = send_to.buttons("explorer-send") if gen is not None else {}
    grid_state = gr.State((None, 0))  # (grid path, width)
    cell_paths = gr.State([])
    selected = gr.State(None)

    inputs = [prompt, negative, sampler, schedule, steps, cfg_scale, seed, width, height, clip_skip, *axis_inputs,
              keep_seeds, cells_per_pass, init_in, strength, resize_mode, hires_fix, hires_upscaler, hires_scale,
              hires_steps, hires_denoising]

    # the init image checked on upload as Generate checks it (header before decoding, size limits)
    def check_init(path):
        if not path:
            return
        try:
            load_init_image(path)
        except ValueError as e:
            gr.Warning(str(e))

    init_in.change(check_init, init_in, None, api_visibility="private")

    # axis pickers: the helper dropdown lists what the axis can take
    for axis_type, values, helper, lora in axis_rows:
        def on_type(name, prompt_text):
            choices = helper_choices(state, name) if name in AXIS_TYPES else None
            loras = list(dict.fromkeys(n for n, _ in lora_tags(prompt_text or "")))
            return (gr.update(choices=choices or [], value=[], visible=choices is not None),
                    gr.update(placeholder=PLACEHOLDERS.get(name, "")),
                    gr.update(choices=loras, value=loras[0] if len(loras) == 1 else None,
                              visible=name == "LoRA weight"))

        axis_type.change(on_type, [axis_type, prompt], [helper, values, lora], api_visibility="private")
        helper.input(lambda picked: csv_join(list(picked or [])), helper, values, api_visibility="private")

    gr.on([c.change for c in inputs], plan_preview, inputs, preview, trigger_mode="always_last",
          concurrency_limit=None, show_progress="hidden", api_visibility="private")

    def run(request: gr.Request, *values, progress=gr.Progress()):
        # `request` first: Gradio passes it only to parameters before *values (it names the session)
        try:
            plan = runner.plan(grid_job_from_inputs(*values))
        except ValueError as e:
            raise gr.Error(str(e)) from e
        if state.manager.current is None:
            raise gr.Error("no model is loaded; pick one in the Model menu")
        cancel = state.cancel_for(request)
        cancel.clear()
        progress((0, plan.total_steps), desc=plan.summary(), unit="steps")

        on_progress = StepProgress(progress)  # the bar, with the speed so far and an ETA

        try:
            result = runner.run(plan, state.cfg.outputs_dir, on_progress=on_progress, cancel=cancel)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e)) from e
        for note in result.notes:
            gr.Warning(note)
        done = [c for c in plan.cells if c.index in result.images]
        items = [(str(result.images[c.index].path), " · ".join(t for t in c.labels if t)) for c in done]
        paths = [str(result.images[c.index].path) for c in done]
        passes = f"{result.passes_run} pass" + ("" if result.passes_run == 1 else "es")
        text = f"saved `{state.shown(result.grid_path)}` · {len(done)} cells in {passes}, {result.seconds:.1f} s"
        if result.interrupted:
            text = f"⚠ {result.message} · {text}"
        grid = (str(result.grid_path), result.grid.width)
        out_files = [str(result.grid_path), *map(str, result.table_paths)]
        return zoom_html(grid[0], grid[1], 100), gr.update(value=100), text, out_files, items, paths, grid, None, ""

    run_btn.click(run, inputs, [grid_view, zoom, status, files, cells, cell_paths, grid_state, selected, cell_info],
                  concurrency_id="gpu", concurrency_limit=1, api_name="grid", show_progress_on=grid_view)
    def stop(request: gr.Request = None):
        state.cancel_for(request).set()  # this session's grid only

    stop_btn.click(stop, None, None, concurrency_limit=None, api_visibility="private")
    zoom.change(lambda z, g: zoom_html(g[0], g[1], z), [zoom, grid_state], grid_view, api_visibility="private",
                show_progress="hidden")

    def pick(paths, evt: gr.SelectData):
        path = paths[evt.index] if paths and evt.index is not None and evt.index < len(paths) else None
        if path is None:
            return None, ""
        from studio.generation.infotext import read_image_infotext

        return path, read_image_infotext(path) or ""

    cells.select(pick, cell_paths, [selected, cell_info], api_visibility="private")

    if gen is not None:
        send_to.wire(send_buttons, gen, selected, tabs, what="a cell")
    return {"run": run_btn, "preview": preview, "plan_preview": plan_preview, "inputs": inputs}
