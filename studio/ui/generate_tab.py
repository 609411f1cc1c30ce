"""The Generate tab: prompt and A1111 parameters -> gallery, with progress, Stop, image to image, inpainting,
outpainting, hires fix, ControlNet units, IP-Adapter units, regional prompts, upscaling (Extras), Send to buttons,
the VAE menu, PNG info and presets."""

from __future__ import annotations

import gradio as gr

from studio.generation import samplers
from studio.generation.expand import DEFAULT_EXPANDER, ExpandError, ExpandJob
from studio.generation.hires import DEFAULT_UPSCALER
from studio.generation.infotext import parse_infotext, read_image_infotext, rng_note, to_fields
from studio.generation.job import RESIZE_MODES, GenerateJob, load_init_image
from studio.generation.paste import denoising_strength, restore_lora_names, vae_choice
from studio.generation.presets import PresetExistsError, apply_preset, list_presets, save_preset
from studio.generation.preview import Preview, preview_grid
from studio.models.checkpoints import ModelLoadError
from studio.ui import (
    control_panel,
    hires_panel,
    inpaint_panel,
    ip_adapter_panel,
    networks_panel,
    regions_panel,
    send_to,
    upscale_panel,
)
from studio.ui.progress import StepProgress
from studio.ui.state import DEFAULT_PREVIEW_EVERY, AppState

DEMO_BANNER = (
    "**demo-tiny is loaded: a tiny model with random weights, so its images are noise.** "
    "It is here to explore the studio. To make real images, copy an SD 1.x/2.x `.safetensors` or `.ckpt` "
    "file (or a diffusers folder) into `{models}`, then pick it in the Model menu (↻ to refresh)."
)


def job_from_inputs(prompt, negative, sampler, schedule, steps, cfg_scale, seed, width, height, batch_size,
                    batch_count, clip_skip=1, init_image=None, denoising_strength=0.75,
                    resize_mode="Just resize", mask=None, mask_blur=4, mask_mode="Inpaint masked",
                    masked_content="original", inpaint_area="Whole picture", inpaint_padding=32, outpaint=None,
                    hires_fix=False, hires_scale=2.0, hires_upscaler=DEFAULT_UPSCALER, hires_steps=0,
                    hires_denoising=0.7, hires_width=0, hires_height=0, hires_sampler="", hires_prompt="",
                    hires_negative_prompt="", controls=None, regions=None, ip_adapters=None) -> GenerateJob:
    """The job exactly as the widgets (or the API) sent it: GenerateJob.validate refuses what is not a valid value
    (2.7 steps, a bool, None) instead of rounding it here. An init image (a file path) makes it image to image; a
    mask (a file path or an image) with it inpainting, outpaint pads ({"left": 64}) outpainting; controls are
    ControlNet units (ControlUnit or dicts), ip_adapters IP-Adapter units (IPAdapterUnit or dicts). The inputs after resize_mode have defaults, so callers that send the
    older, shorter list still get the same job."""
    return GenerateJob(prompt=prompt, negative_prompt=negative, sampler=sampler, schedule=schedule, steps=steps,
                       cfg_scale=cfg_scale, seed=seed, width=width, height=height, batch_size=batch_size,
                       batch_count=batch_count, clip_skip=clip_skip, init_image=init_image or None,
                       denoising_strength=denoising_strength, resize_mode=resize_mode,
                       mask=None if isinstance(mask, str) and not mask else mask,
                       mask_blur=mask_blur, mask_mode=mask_mode, masked_content=masked_content,
                       inpaint_area=inpaint_area, inpaint_padding=inpaint_padding, outpaint=outpaint or None,
                       hires_fix=hires_fix, hires_scale=hires_scale, hires_upscaler=hires_upscaler,
                       hires_steps=hires_steps, hires_denoising=hires_denoising, hires_width=hires_width,
                       hires_height=hires_height, hires_sampler=hires_sampler or "", hires_prompt=hires_prompt or "",
                       hires_negative_prompt=hires_negative_prompt or "", controls=list(controls or []),
                       ip_adapters=list(ip_adapters or []), **(regions or {}))


def build(state: AppState, model_dropdown: gr.Dropdown):
    """Lay out the tab and wire it to the engine. Returns the components other tabs update."""
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", placeholder="a painting of a lighthouse")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative-prompt")
        with gr.Column(scale=1, min_width=160):
            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                sampler = gr.Dropdown(list(samplers.SAMPLERS), value="DPM++ 2M", label="Sampler")
                schedule = gr.Dropdown(samplers.SCHEDULE_TYPES, value="Karras", label="Schedule type")
                vae = gr.Dropdown(state.manager.vae_choices(), value=state.manager.vae_setting, label="VAE",
                                  elem_id="vae", info="Automatic: NAME.vae.safetensors beside the model, else its own")
                vae_refresh = gr.Button("↻", scale=0, min_width=40, elem_id="vae-refresh")
            steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="steps")
            with gr.Row():
                size = state.manager.current.native_size if state.manager.current else 512
                width = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id="width")
                height = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id="height")
            with gr.Row():
                batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count")
                batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size")
            with gr.Row():
                cfg_scale = gr.Slider(0, 30, value=7, step=0.5, label="CFG scale", scale=3)
                clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", scale=1, elem_id="clip-skip")
            with gr.Row():
                # no precision: Gradio would round 2.7 to 3 before the job could refuse it
                seed = gr.Number(value=-1, label="Seed (-1 = random)", elem_id="seed")
                random_btn = gr.Button("Random", scale=0, min_width=70)
                reuse_btn = gr.Button("Reuse", scale=0, min_width=70)
            with gr.Accordion("Image to image", open=False, elem_id="img2img") as img2img_acc:
                # a file, not gr.Image: gr.Image decodes an upload before any check (see PNG info below)
                init_in = gr.File(label="Init image (PNG, JPEG, WebP): start from it instead of noise",
                                  file_types=["image"], elem_id="init-image", height=90)
                init_preview = gr.Image(label="Init image", interactive=False, height=200, elem_id="init-preview")
                strength = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength (0 keeps the image, "
                                     "1 redraws it all)", elem_id="denoising-strength")
                resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode",
                                       elem_id="resize-mode")
            inpaint = inpaint_panel.build_inpaint()
            outpaint = inpaint_panel.build_outpaint(width, height)
            hires_fix = hires_panel.build(state.cfg.upscalers_dir)
            control = control_panel.build(state, width, height)
            regional = regions_panel.build()
            ip_refs = ip_adapter_panel.build(state)
            with gr.Accordion("Presets", open=False):
                presets = list_presets(state.cfg.presets_dir)
                preset = gr.Dropdown(list(presets), value=None, label="Preset", elem_id="preset")
                preset_info = gr.Markdown()
                with gr.Row():
                    preset_name = gr.Textbox(label="Save current settings as", scale=3, elem_id="preset-name")
                    save_btn = gr.Button("Save preset", scale=1, elem_id="preset-save")
                preset_replace = gr.Checkbox(False, label="Replace the preset of that name", elem_id="preset-replace")
            with gr.Accordion("PNG info: drop an image from A1111 or the studio", open=False,
                              elem_id="png-info-accordion") as png_acc:
                # a file, not gr.Image: gr.Image converts uploads to RGB (a full decode) before any check
                png_in = gr.File(label="Image (PNG, JPEG, WebP)", file_types=["image"], elem_id="png-info",
                                 height=90)
                png_preview = gr.Image(label="Accepted image", interactive=False, height=200,
                                       elem_id="png-info-preview")
                png_text = gr.Textbox(label="Parameters found", lines=4, interactive=False)
            networks_refresh, networks_outputs = networks_panel.build(state, prompt)
            with gr.Accordion("Prompt expansion (GPT-2)", open=False, elem_id="expansion"):
                gr.Markdown("A GPT-2 model trained on Stable Diffusion prompts continues your prompt with details. "
                            "Pick a variant, then **Use it**. `demo-tiny` is a tiny offline model (its words are "
                            "random-ish); the default needs a download once.")
                with gr.Row():
                    expander_model = gr.Textbox(value=DEFAULT_EXPANDER, label="Model (hub id, folder, demo-tiny)",
                                                scale=3, elem_id="expander-model")
                    expander_seed = gr.Number(value=-1, precision=0, label="Seed", scale=1)
                    variants = gr.Slider(1, 8, value=3, step=1, label="Variants", scale=1)
                expand_btn = gr.Button("Expand prompt", elem_id="expand-btn")
                expansions = gr.Radio([], label="Expansions", elem_id="expansions")
                use_btn = gr.Button("Use it", elem_id="use-expansion")
        with gr.Column(scale=3):
            with gr.Row():
                live = gr.Image(label="Live preview (approximate colours, while it denoises)", interactive=False,
                                height=160, elem_id="live-preview", format="png", scale=3)
                live_every = gr.Slider(0, 20, value=DEFAULT_PREVIEW_EVERY, step=1, scale=1, elem_id="live-every",
                                       label="Preview every N steps (0 = off)")
            gallery = gr.Gallery(label="Images", columns=2, height=520, elem_id="gallery", format="png")
            used_seed = gr.Markdown(elem_id="used-seed")
            infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id="infotext")
            send_buttons = send_to.buttons("send")
            upscale = upscale_panel.build(state)
    saved_paths = gr.State([])  # the saved PNGs of the last run, in the gallery's order (None: not saved)
    selected = gr.State(None)  # the saved PNG the gallery has selected (server-side: never a path from the browser)

    # the text-to-image and image-to-image inputs (presets and the older API read only these), then the new ones
    params = [prompt, negative, sampler, schedule, steps, cfg_scale, seed, width, height, batch_size, batch_count,
              clip_skip, init_in, strength, resize_mode]
    inpaint_inputs = [inpaint["editor"], inpaint["mask_file"], inpaint["mask_blur"], inpaint["mask_mode"],
                      inpaint["masked_content"], inpaint["inpaint_area"], inpaint["padding"], *outpaint["sides"]]
    all_inputs = [*params, *inpaint_inputs, *hires_fix["inputs"], *control["inputs"], *regional["inputs"],
                  *ip_refs["inputs"]]

    def run(request: gr.Request, prompt, negative, sampler, schedule, steps, cfg_scale, seed, width, height,
            batch_size, batch_count, clip_skip, init_image=None, denoising_strength=0.75, resize_mode="Just resize",
            mask_editor=None, mask_file=None, mask_blur=4, mask_mode="Inpaint masked", masked_content="original",
            inpaint_area="Whole picture", inpaint_padding=32, outpaint_left=0, outpaint_right=0, outpaint_top=0,
            outpaint_bottom=0, hires=False, hires_scale=2.0, hires_upscaler=DEFAULT_UPSCALER, hires_steps=0,
            hires_denoising=0.7, hires_width=0, hires_height=0, hires_sampler=hires_panel.SAME_SAMPLER,
            hires_prompt="", hires_negative="",
            cn0_enabled=False, cn0_image=None, cn0_module=control_panel.DEFAULT_MODULE, cn0_resolution=512,
            cn0_threshold_a=100, cn0_threshold_b=200, cn0_model="", cn0_weight=1.0, cn0_start=0.0, cn0_end=1.0,
            cn0_mode="Balanced", cn0_resize_mode="Crop and Resize",
            cn1_enabled=False, cn1_image=None, cn1_module=control_panel.DEFAULT_MODULE, cn1_resolution=512,
            cn1_threshold_a=100, cn1_threshold_b=200, cn1_model="", cn1_weight=1.0, cn1_start=0.0, cn1_end=1.0,
            cn1_mode="Balanced", cn1_resize_mode="Crop and Resize",
            cn2_enabled=False, cn2_image=None, cn2_module=control_panel.DEFAULT_MODULE, cn2_resolution=512,
            cn2_threshold_a=100, cn2_threshold_b=200, cn2_model="", cn2_weight=1.0, cn2_start=0.0, cn2_end=1.0,
            cn2_mode="Balanced", cn2_resize_mode="Crop and Resize", regions_layout="Off", region_mode="Attention",
            region_1="", region_2="", region_3="", region_4="",
            ip0_enabled=False, ip0_images=None, ip0_name="", ip0_scale=0.7, ip0_start=0.0, ip0_end=1.0,
            ip1_enabled=False, ip1_images=None, ip1_name="", ip1_scale=0.7, ip1_start=0.0, ip1_end=1.0,
            progress=gr.Progress()):
        # `request` first (it names the session); every input after the twelve text-to-image values has a default,
        # so API callers that send only those (or the image-to-image three too) still work. The ControlNet units
        # come next, control_panel.FIELDS per unit (control_panel.input_names()), then regions_panel.INPUTS, then
        # ip_adapter_panel.FIELDS per unit (ip_adapter_panel.input_names())
        try:
            regional_fields = regions_panel.job_fields(regions_layout, region_mode, region_1, region_2, region_3,
                                                       region_4)
            controls = control_panel.units_from_values([
                cn0_enabled, cn0_image, cn0_module, cn0_resolution, cn0_threshold_a, cn0_threshold_b, cn0_model,
                cn0_weight, cn0_start, cn0_end, cn0_mode, cn0_resize_mode,
                cn1_enabled, cn1_image, cn1_module, cn1_resolution, cn1_threshold_a, cn1_threshold_b, cn1_model,
                cn1_weight, cn1_start, cn1_end, cn1_mode, cn1_resize_mode,
                cn2_enabled, cn2_image, cn2_module, cn2_resolution, cn2_threshold_a, cn2_threshold_b, cn2_model,
                cn2_weight, cn2_start, cn2_end, cn2_mode, cn2_resize_mode])
            ip_units = ip_adapter_panel.units_from_values([
                ip0_enabled, ip0_images, ip0_name, ip0_scale, ip0_start, ip0_end,
                ip1_enabled, ip1_images, ip1_name, ip1_scale, ip1_start, ip1_end])
            mask = inpaint_panel.pick_mask(mask_editor, mask_file)
            job = job_from_inputs(prompt, negative, sampler, schedule, steps, cfg_scale, seed, width, height,
                                  batch_size, batch_count, clip_skip, init_image, denoising_strength, resize_mode,
                                  mask, mask_blur, mask_mode, masked_content, inpaint_area, inpaint_padding,
                                  inpaint_panel.outpaint_value(outpaint_left, outpaint_right, outpaint_top,
                                                               outpaint_bottom),
                                  hires, hires_scale, hires_upscaler, hires_steps, hires_denoising, hires_width,
                                  hires_height, hires_panel.sampler_value(hires_sampler), hires_prompt,
                                  hires_negative, controls, regional_fields, ip_units)
            job.validate(state.cfg.limits)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        if state.manager.current is None:
            raise gr.Error("no model is loaded; pick one in the Model menu")
        cancel = state.cancel_for(request)
        cancel.clear()
        progress((0, job.steps * job.batch_count), desc="starting", unit="steps")

        on_progress = StepProgress(progress)  # the bar, with the speed so far and an ETA

        every = state.preview_every(request)
        preview = Preview(every, lambda pictures: state.put_preview(
            request, preview_grid(pictures, job.width, job.height))) if every else None
        try:
            result = state.generator.run(job, state.cfg.outputs_dir, on_progress=on_progress, cancel=cancel,
                                         preview=preview)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e)) from e
        for note in result.notes:
            gr.Warning(note)
        items = [(str(im.path) if im.path else im.image, f"seed {im.seed}") for im in result.images]
        seeds = ", ".join(str(im.seed) for im in result.images[:8])
        note = f"\n\n⚠ {result.message}" if result.interrupted else ""
        saved = result.images[0].path.parent if result.images and result.images[0].path else None
        where = f" · saved to `{state.shown(saved)}`" if saved else ""
        text = result.images[0].infotext if result.images else ""
        paths = [str(im.path) if im.path else None for im in result.images]
        return items, f"**Seed:** {seeds}{where}{note}", text, paths, next((p for p in paths if p), None)

    outputs = [gallery, used_seed, infotext, saved_paths, selected]  # the States are not part of the API's answer
    # the live preview: a timer polls the session's newest preview while a run is on (it is a setting of the
    # session, not an input of /generate: it changes no image)
    timer = gr.Timer(0.5, active=False)

    def set_every(every, request: gr.Request):
        state.set_preview_every(request, every)

    live_every.change(set_every, live_every, None, api_visibility="private", show_progress="hidden")

    def poll(request: gr.Request):
        image = state.take_preview(request)
        return image if image is not None else gr.update()

    timer.tick(poll, None, live, api_visibility="private", show_progress="hidden")
    def start_previews(request: gr.Request):
        state.take_preview(request)  # none left over from the last run
        return gr.Timer(active=True)

    def stop_previews():
        return gr.Timer(active=False), None

    runs = [generate_btn.click(run, all_inputs, outputs, concurrency_id="gpu", concurrency_limit=1,
                               show_progress_on=gallery, api_name="generate"),
            prompt.submit(run, all_inputs, outputs, concurrency_id="gpu", concurrency_limit=1,
                          show_progress_on=gallery, api_visibility="private")]
    for trigger, event in zip((generate_btn.click, prompt.submit), runs, strict=True):
        trigger(start_previews, None, timer, api_visibility="private", show_progress="hidden",
                concurrency_limit=None)
        event.then(stop_previews, None, [timer, live], api_visibility="private", show_progress="hidden")
    def stop(request: gr.Request = None):
        state.cancel_for(request).set()  # this session's generation only

    stop_btn.click(stop, None, None, concurrency_limit=None, api_name="stop")

    random_btn.click(lambda: -1, None, seed, api_visibility="private")

    # image to image: the upload checked before decoding, shown as it was accepted, and put under the mask editor
    # (the editor takes no upload of its own: its picture is always this checked one)
    def show_init(path):
        if not path:
            return None, None
        try:
            image = load_init_image(path)
        except ValueError as e:
            gr.Warning(str(e))
            return None, None
        return image, inpaint_panel.editor_value(image)

    init_in.change(show_init, init_in, [init_preview, inpaint["editor"]], api_visibility="private")

    # the gallery's selection, as the saved PNG's path kept on the server, and the Send to buttons
    def pick(paths, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else -1
        return paths[index] if paths and 0 <= index < len(paths) else None

    gallery.select(pick, saved_paths, selected, api_visibility="private")

    send_to.wire(send_buttons, {"init_image": init_in, "img2img_accordion": img2img_acc, "inpaint": inpaint,
                                "upscale": upscale, "png_info": png_in, "png_accordion": png_acc}, selected,
                 what="an image in the gallery (a stopped run's images are not saved)")

    # the VAE menu: the manager swaps it (and keeps it for the models loaded after)
    def pick_vae(name):
        try:
            gr.Info(state.manager.set_vae(name))
        except (ModelLoadError, ValueError) as e:
            gr.Warning(str(e))
            return gr.update(value=state.manager.vae_setting)
        return gr.update()

    vae.input(pick_vae, vae, vae, concurrency_id="gpu", concurrency_limit=1, api_name="set_vae")
    vae_refresh.click(lambda: gr.update(choices=state.manager.vae_choices(), value=state.manager.vae_setting),
                      None, vae, api_visibility="private")

    def reuse(text):
        try:
            return to_fields(parse_infotext(text))["seed"] if text else -1
        except (ValueError, KeyError):
            return -1

    reuse_btn.click(reuse, infotext, seed, api_visibility="private")

    # prompt expansion: shown first, used only when the user picks it
    def expand(text, model_spec, seed_value, n, progress=gr.Progress()):
        try:
            job = ExpandJob(prompt=text or "", model=model_spec or "", seed=int(seed_value),
                            num_variants=int(n)).validate()
            progress(0, desc=f"loading {job.model}")
            result = state.get_expander().expand(job)
        except (ValueError, ExpandError) as e:
            raise gr.Error(str(e)) from e
        return gr.update(choices=result.texts, value=result.texts[0], label=f"Expansions (seed {result.seed})")

    expand_btn.click(expand, [prompt, expander_model, expander_seed, variants], expansions, concurrency_id="gpu",
                     concurrency_limit=1, api_name="expand_prompt")
    use_btn.click(lambda chosen, current: chosen or current, [expansions, prompt], prompt, api_visibility="private")

    # presets
    def pick_preset(name, *values):
        found = list_presets(state.cfg.presets_dir)
        if name not in found:
            return (gr.update(),) * 9 + ("",)
        try:
            job = apply_preset(job_from_inputs(*values), found[name])
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return (job.sampler, job.schedule, job.steps, job.cfg_scale, job.seed, job.width, job.height,
                job.batch_size, job.batch_count, found[name].description)

    preset.input(pick_preset, [preset, *params],
                 [sampler, schedule, steps, cfg_scale, seed, width, height, batch_size, batch_count, preset_info],
                 api_visibility="private")

    def do_save(name, replace, *values):
        try:
            path = save_preset(state.cfg.presets_dir, name, job_from_inputs(*values), overwrite=bool(replace))
        except PresetExistsError as e:
            raise gr.Error(f"{e}: tick 'Replace the preset of that name'") from e
        except ValueError as e:
            raise gr.Error(str(e)) from e
        found = list_presets(state.cfg.presets_dir)
        return gr.update(choices=list(found), value=name), f"saved `{path.name}`", False

    save_btn.click(do_save, [preset_name, preset_replace, *params], [preset, preset_info, preset_replace],
                   api_visibility="private")

    # PNG info: the text-to-image fields, then the hires fix's and the inpainting options when the text has them,
    # then the text and the accepted image (last, in this order)
    hires_keys = ["enabled", "scale", "steps", "upscaler", "denoising", "width", "height", "sampler", "prompt",
                  "negative"]
    inpaint_keys = ["mask_blur", "mask_mode", "masked_content", "inpaint_area", "padding"]
    pasted = [hires_fix[k] for k in hires_keys] + [inpaint[k] for k in inpaint_keys] + control["pasted"] + ip_refs["pasted"]
    unchanged = 11 + len(pasted)

    def pasted_values(extra):
        found = hires_panel.paste_fields(extra)
        if "upscaler" in found and found["upscaler"] not in hires_panel.hires_upscalers(state.cfg.upscalers_dir):
            gr.Info(f"hires upscaler {found.pop('upscaler')!r} is not here (files go in upscalers/); kept the "
                    "current one")
        found_inpaint = inpaint_panel.paste_fields(extra)
        found_control, notes = control_panel.paste_fields(extra, control["models"]())
        found_ip, ip_notes = ip_adapter_panel.paste_fields(extra, ip_refs["names"]())
        notes += ip_notes
        for note in notes:
            gr.Info(note)
        return ([found.get(k, gr.update()) for k in hires_keys] + [found_inpaint.get(k, gr.update())
                                                                    for k in inpaint_keys]
                + found_control + found_ip), found["enabled"]

    def read_png(path):
        if not path:
            return (gr.update(),) * unchanged + ("", None)
        try:
            text = read_image_infotext(path)  # header checked before anything is decoded
        except (ValueError, OSError) as e:
            gr.Warning(str(e))
            return (gr.update(),) * unchanged + (f"(refused: {e})", None)
        if not text:
            gr.Warning("this image carries no generation parameters")
            return (gr.update(),) * unchanged + ("(no parameters in this image)", path)
        try:
            f = to_fields(parse_infotext(text))
        except ValueError as e:
            raise gr.Error(f"could not read this image's parameters: {e}") from e
        sampler_value, schedule_value = f.get("sampler"), f.get("schedule_type", "Automatic")
        if sampler_value not in samplers.SAMPLERS:
            gr.Warning(f"sampler {sampler_value!r} is not available here; kept the current one")
            sampler_value = gr.update()
        if schedule_value not in samplers.SCHEDULE_TYPES:
            schedule_value = gr.update()
        restored, notes = restore_lora_names(f.get("prompt", ""), f["extra"].get("Lora hashes", ""),
                                             state.generator.networks)
        for note in notes:
            gr.Info(note)
        rng = rng_note(f["extra"])  # RNG and Version are not job fields: they stay in extra
        if rng:
            gr.Info(rng)
        skip = f["extra"].get("Clip skip", "1")
        extra_values, has_hires = pasted_values(f["extra"])
        # an image-to-image infotext; with hires fields it is the hires pass's strength (filled in above)
        pasted_strength = None if has_hires else denoising_strength(f["extra"])
        vae_name, vae_missing = vae_choice(f["extra"], state.manager.vae_choices())
        if vae_missing:
            gr.Info(vae_missing)
        elif vae_name and vae_name != state.manager.vae_setting:
            gr.Info(f"this image was made with VAE {vae_name}: choose it in the VAE menu for the same colours")
        return (restored, f.get("negative_prompt", ""), sampler_value, schedule_value,
                f.get("steps", gr.update()), f.get("cfg_scale", gr.update()), f.get("seed", gr.update()),
                f.get("width", gr.update()), f.get("height", gr.update()),
                int(skip) if skip.isdigit() else gr.update(),
                pasted_strength if pasted_strength is not None else gr.update(), *extra_values, text, path)

    png_in.change(read_png, png_in, [prompt, negative, sampler, schedule, steps, cfg_scale, seed, width, height,
                                     clip_skip, strength, *pasted, png_text, png_preview], api_visibility="private")

    return {"prompt": prompt, "negative": negative, "width": width, "height": height, "gallery": gallery, "upscale": upscale, "inpaint": inpaint,
            "hires": hires_fix, "selected": selected, "vae": vae, "networks_refresh": networks_refresh,
            "networks_outputs": networks_outputs, "png_info": png_in, "png_accordion": png_acc,
            "init_image": init_in, "img2img_accordion": img2img_acc, "control": control,
            "ip_adapter": ip_refs}
