"""The Storyboard tab: a project's shot list as an editable table (CSV import/export), shot types and style, per
shot a reference with a live canny preview and the ControlNet's scale and guidance, candidates to pick from,
regenerate one shot, lock its seed, refine a candidate (image to image or inpainting) or outpaint it to the board's
aspect as a new candidate, a board hires fix, the cast (characters drawn from their reference pictures through
IP-Adapters in every shot that names them), and export as PDF and contact sheet."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.config import Limits, number_from_text, whole_number
from studio.control.controlnet import controlnet_choices, default_controlnet
from studio.control.preprocess import canny_map, fit_to_frame, read_reference
from studio.files.names import UnsafeNameError
from studio.generation import samplers
from studio.generation.ip_adapter import list_ip_adapters
from studio.models.checkpoints import ModelLoadError
from studio.storyboard.board import (
    MAX_CAST,
    MAX_CHARACTER_PICTURES,
    BoardSettings,
    Character,
    Shot,
    ShotType,
    Storyboard,
    StoryboardStore,
    Style,
    apply_board_preset,
    cast_cell,
    cast_from_cell,
    check_board_name,
    list_board_presets,
    lock_seed,
    new_board,
    pick,
    unlock_seed,
)
from studio.storyboard.export import export_board
from studio.storyboard.runner import StoryboardRunner
from studio.ui import hires_panel, inpaint_panel, send_to
from studio.ui.checked_editor import CheckedImageEditor
from studio.ui.progress import StepProgress
from studio.ui.state import AppState

SHOT_COLUMNS = ["shot", "type", "description", "characters / notes", "reference", "seed", "candidates",
                "cast (empty = the names in its text, - = nobody)"]
CAST_COLUMNS = ["character", "prompt words", "IP-Adapter", "scale", "pictures"]
TYPE_COLUMNS = ["shot type", "prompt template", "LoRA", "LoRA weight"]
SETTING_NAMES = ["negative_prompt", "sampler", "schedule", "steps", "cfg_scale", "width", "height", "clip_skip",
                 "candidates", "controlnet", "aspect", "hires_fix", "hires_scale", "hires_upscaler", "hires_steps",
                 "hires_denoising"]
# the board's aspect menu (outpainting to it; the PDF's and contact sheet's frame boxes): "" = width x height
ASPECT_CHOICES = [("as width x height", ""), "16:9", "1.85:1", "2.39:1", "4:3", "3:2", "1:1", "9:16"]
ERRORS = (ValueError, RuntimeError, ModelLoadError, UnsafeNameError, OSError)
# the shipped presets by what they do (their names, which cite the paper, stay the values: files and tests use them)
BOARD_PRESET_LABELS = {"DreamShot shot types (seed 004)": "Film shot types: close, medium and long shot",
                       "DreamShot shot-type LoRAs (seed 004)": "Film shot types, each with its shot-type LoRA"}


# --- form <-> board (pure, tested without a browser) ------------------------------------------------------------


def board_preset_choices(presets) -> list[tuple[str, str]]:
    """(label, preset name) for the preset dropdown: the shipped presets by what they do, the user's by name."""
    return [(BOARD_PRESET_LABELS.get(name, name), name) for name in presets]


def shot_rows(board: Storyboard) -> list[list]:
    return [[s.shot, s.type, s.description, s.notes, s.reference, s.seed, s.candidates, cast_cell(s.cast)]
            for s in board.shots]


def cast_rows(board: Storyboard) -> list[list]:
    """The cast table: each character's name, prompt words, adapter ("" = the only one in ipadapter/), scale and
    number of pictures."""
    return [[c.name, c.prompt, c.ip_adapter or "(the only one in ipadapter/)", c.scale, len(c.pictures)]
            for c in board.cast]


def set_character(board: Storyboard, name, words, adapter, scale) -> Character:
    """The character called `name` (any case) with these prompt words, adapter and scale; a new name adds a
    character to the cast. Checked as the board file checks it (ValueError naming the character)."""
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise ValueError("type the character's name first (as the shots name them, e.g. Sarah)")
    try:
        character, new = board.character(name), False
    except ValueError:
        if len(board.cast) >= MAX_CAST:
            raise ValueError(f"the cast has {len(board.cast)} characters already; at most {MAX_CAST}") from None
        character, new = Character(name), True
    character.prompt = (words or "").strip()
    character.ip_adapter = (adapter or "").strip()
    character.scale = 0.6 if scale is None else scale
    character.validate()
    if new:
        board.cast.append(character)
    return character


def type_rows(board: Storyboard) -> list[list]:
    return [[t.name, t.template, t.lora, t.lora_weight] for t in board.shot_types]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _rows(table) -> list[list[str]]:
    """Table rows as text, blank rows dropped (a Dataframe sends lists, or a pandas frame)."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        table = table.values.tolist()
    return [[_cell(v) for v in row] for row in table if any(_cell(v) for v in row)]


def board_from_form(base: Storyboard, shots_table, types_table, style_kind, style_name, style_weight,
                    *settings, limits: Limits | None = None) -> Storyboard:
    """The board as the form shows it. Shots keep their candidates and ControlNet settings by shot number (a row
    whose number is new starts without candidates). Raises ValueError naming the bad row and value."""
    board = Storyboard.from_dict(base.to_dict())
    old = {s.shot: s for s in board.shots}
    shots = []
    for i, row in enumerate(_rows(shots_table), start=1):
        row = (row + [""] * len(SHOT_COLUMNS))[: len(SHOT_COLUMNS)]
        number, kind, description, notes, reference, seed, candidates, cast = row
        shot = old.get(number) or Shot(number, kind, description)
        shot.shot, shot.type, shot.description, shot.notes, shot.reference = number, kind, description, notes, reference
        try:
            # table cells are text: read as numbers here, checked (never rounded) by Shot.validate
            shot.seed = number_from_text(f"shot {number}: seed", seed, whole=True) if seed != "" else -1
            shot.candidates = (number_from_text(f"shot {number}: candidates", candidates, whole=True)
                               if candidates != "" else 0)
            shot.cast = cast_from_cell(cast)
            shot.validate(limits)
            board.shot_cast(shot)  # a name that is not in the cast
        except ValueError as e:
            raise ValueError(f"shot list row {i}: {e}") from None
        shots.append(shot)
    board.shots = shots
    types = []
    for i, row in enumerate(_rows(types_table), start=1):
        row = (row + [""] * 4)[:4]
        try:
            weight = number_from_text(f"shot type {row[0]!r}: LoRA weight", row[3]) if row[3] != "" else 1.0
            types.append(ShotType(row[0], row[1] or "[description]", row[2], weight))
            types[-1].validate(limits)
        except ValueError as e:
            raise ValueError(f"shot types row {i}: {e}") from None
    board.shot_types = types
    board.style = Style(style_kind or "none", (style_name or "").strip(), style_weight if style_weight is not None
                        else 1.0)
    values = dict(zip(SETTING_NAMES, settings, strict=True))
    for name in ("steps", "width", "height", "clip_skip", "candidates", "hires_steps"):
        value = values[name]
        values[name] = int(value) if isinstance(value, float) and value.is_integer() else value
    values["negative_prompt"] = values["negative_prompt"] or ""
    values["controlnet"] = (values["controlnet"] or "").strip()
    values["aspect"] = (values["aspect"] or "").strip()
    values["hires_fix"] = bool(values["hires_fix"])
    values["hires_upscaler"] = (values["hires_upscaler"] or "").strip()
    board.settings = BoardSettings(**values)
    board.validate(limits)
    return board


def settings_values(board: Storyboard) -> list:
    return [getattr(board.settings, name) for name in SETTING_NAMES]


def candidate_items(store: StoryboardStore, board: Storyboard, number: str | None) -> tuple[list, int | None]:
    """Gallery items (path, caption) of a shot's candidates and the picked one's index."""
    if not number:
        return [], None
    try:
        shot = board.shot(number)
    except ValueError:
        return [], None
    folder = store.path(board.name)
    index = {f.file: k for k, f in enumerate(shot.frames)}

    def caption(k, f) -> str:
        made = f" · {f.action} of #{index[f.source]}" if f.source in index else (
            f" · {f.action}" if f.action != "generate" else "")
        return f"#{k} · seed {f.seed}{made}" + (" · picked" if k == shot.picked else "")

    items = [(str(folder / f.file), caption(k, f)) for k, f in enumerate(shot.frames) if (folder / f.file).is_file()]
    return items, (shot.picked if items else None)


def picked_picture(store: StoryboardStore, board: Storyboard, number: str | None):
    """The shot's picked candidate as the mask editor's background (None when it has none)."""
    from PIL import Image

    if not number:
        return None
    try:
        frame = board.shot(number).picked_frame
        if frame is None:
            return None
        with Image.open(store.path(board.name) / frame.file) as im:
            return inpaint_panel.editor_value(im.convert("RGB"))
    except (ValueError, OSError):
        return None


def canny_preview(store: StoryboardStore, board: Storyboard, number: str | None, low, high):
    """The canny map the shot's ControlNet will see (its reference fitted to the frame size), or None."""
    if not number:
        return None
    shot = board.shot(number)
    if not shot.reference:
        return None
    ref = read_reference(store.reference_path(board, shot))
    s = board.settings
    low, high = whole_number("canny low threshold", low), whole_number("canny high threshold", high)  # no int()
    return canny_map(fit_to_frame(ref.image, s.width, s.height), low, high)


# --- the tab ---------------------------------------------------------------------------------------------------


def build(state: AppState, gen: dict | None = None, tabs: gr.Tabs | None = None) -> dict:
    cfg = state.cfg
    store = StoryboardStore(cfg.storyboards_dir, cfg.limits)
    runner = StoryboardRunner(state.manager, store, cfg.controlnet_dir, state.generator)

    def new_settings() -> BoardSettings:
        """A new board's settings for the loaded model: its native size and its ControlNet (micro-canny for micro)."""
        model = state.manager.current
        side = model.native_size if model else 512
        return BoardSettings(width=side, height=side, controlnet=default_controlnet(model, cfg.assets_dir))

    defaults = new_board("new storyboard", new_settings())
    size = defaults.settings.width

    gr.Markdown("A shot list becomes frames, each drawn as its shot type (close, medium, long shot…). Shots with a "
                "reference picture or sketch follow its canny edges through a ControlNet. Make several candidates "
                "per shot, pick one, regenerate a shot on its own, and export a PDF and a contact sheet.")
    with gr.Row(equal_height=True):
        project = gr.Dropdown(store.names(), value=None, label="Storyboard (pick one, or type a new name)",
                              allow_custom_value=True, scale=3, elem_id="sb-project")
        open_btn = gr.Button("Open / create", scale=1, elem_id="sb-open")
        csv_in = gr.File(label="Import shot list (CSV: shot,type,description[,notes,reference,seed,...])",
                         file_types=[".csv"], type="filepath", scale=3, elem_id="sb-csv")
    shots = gr.Dataframe(value=[], headers=SHOT_COLUMNS, type="array", interactive=True, wrap=True,
                         datatype=["str", "str", "str", "str", "str", "number", "number", "str"],
                         column_count=len(SHOT_COLUMNS), max_height=420, elem_id="sb-shots",
                         label="Shot list: edit cells, add rows; seed -1 = new random seeds each time, "
                               "candidates 0 = the board's default")
    with gr.Accordion("Shot types and style", open=False):
        presets = list_board_presets(cfg.presets_dir)
        with gr.Row():
            preset = gr.Dropdown(board_preset_choices(presets), value=None, scale=1, elem_id="sb-preset",
                                 label="Preset (shot types and settings)",
                                 info="the shipped presets follow the storyboard of seed 004 (§5.6)")
            preset_info = gr.Markdown()
        types = gr.Dataframe(value=type_rows(defaults), headers=TYPE_COLUMNS, type="array", interactive=True,
                             datatype=["str", "str", "str", "number"], column_count=4, elem_id="sb-types",
                             label="[shot type], [description] and [notes] are filled in; a LoRA (name in "
                                   "loras/) is added to every shot of its type")
        with gr.Row():
            style_kind = gr.Radio(["none", "embedding", "lora"], value="none", label="Style of the whole board")
            style_name = gr.Textbox(label="Embedding or LoRA name")
            style_weight = gr.Number(value=1.0, label="Weight")
    adapters = list_ip_adapters(cfg.ipadapter_dir)
    with gr.Accordion("Cast: characters who look the same in every shot", open=False, elem_id="sb-cast"):
        gr.Markdown("A character named in a shot's description or *characters / notes* (as a whole word, any case: "
                    "*Sarah*, *Sarah's*) is drawn from their reference pictures in that shot, and their prompt words "
                    "are added to its prompt. The pictures steer through an IP-Adapter: put an adapter file of the "
                    f"model's family in `{state.shown(cfg.ipadapter_dir)}` with its `image_encoder/` folder (↻ "
                    "rescans). The shot list's *cast* column overrides the names found (`-` = nobody). Up to "
                    f"{MAX_CAST} characters, {MAX_CHARACTER_PICTURES} pictures each, 4 with pictures per shot.")
        cast_table = gr.Dataframe(value=[], headers=CAST_COLUMNS, type="array", interactive=False,
                                  column_count=len(CAST_COLUMNS), elem_id="sb-cast-table",
                                  label="Cast (pick a character below to change them)")
        with gr.Row():
            cast_pick = gr.Dropdown([], value=None, allow_custom_value=True, scale=2, elem_id="sb-cast-pick",
                                    label="Character (pick one, or type a new name)")
            cast_words = gr.Textbox(label="Prompt words (added to the shots they are in)", scale=3,
                                    placeholder="red coat, short grey hair", elem_id="sb-cast-words")
        with gr.Row():
            cast_adapter = gr.Dropdown(adapters, value=adapters[0] if adapters else "", allow_custom_value=True,
                                       label="IP-Adapter (a file in ipadapter/)", scale=3, elem_id="sb-cast-adapter")
            cast_refresh = gr.Button("↻", scale=0, min_width=40, elem_id="sb-cast-refresh")
            cast_scale = gr.Slider(0, 2, value=0.6, step=0.05, scale=3, elem_id="sb-cast-scale",
                                   label="Scale (how strongly the pictures steer; 0.5-0.8 leaves the prompt room)")
        with gr.Row():
            # files, not gr.Image: gr.Image decodes an upload before any check
            cast_upload = gr.File(label="Add reference pictures of the character (PNG, JPEG, WebP)",
                                  file_types=["image"], file_count="multiple", height=90, scale=1,
                                  elem_id="sb-cast-upload")
            cast_gallery = gr.Gallery(label="Their reference pictures", interactive=False, columns=4, height=180,
                                      scale=2, elem_id="sb-cast-gallery")
        with gr.Row():
            cast_save_btn = gr.Button("Add or update this character", elem_id="sb-cast-save")
            cast_clear_btn = gr.Button("Remove their pictures", elem_id="sb-cast-clear")
            cast_remove_btn = gr.Button("Remove this character", elem_id="sb-cast-remove")
    with gr.Accordion("Generation settings and ControlNet", open=False):
        with gr.Row():
            negative = gr.Textbox(label="Negative prompt", scale=3)
            controlnet = gr.Dropdown(controlnet_choices(cfg.controlnet_dir, cfg.assets_dir, state.manager.current),
                                     value=defaults.settings.controlnet,
                                     allow_custom_value=True, label="ControlNet (canny)", scale=2,
                                     elem_id="sb-controlnet")
        with gr.Row():
            sampler = gr.Dropdown(list(samplers.SAMPLERS), value=defaults.settings.sampler, label="Sampler")
            schedule = gr.Dropdown(samplers.SCHEDULE_TYPES, value=defaults.settings.schedule, label="Schedule type")
            steps = gr.Slider(1, 150, value=defaults.settings.steps, step=1, label="Steps", elem_id="sb-steps")
            cfg_scale = gr.Slider(0, 30, value=defaults.settings.cfg_scale, step=0.5, label="CFG scale")
        with gr.Row():
            width = gr.Slider(64, 2048, value=size, step=8, label="Width")
            height = gr.Slider(64, 2048, value=size, step=8, label="Height")
            clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip")
            candidates = gr.Slider(1, 64, value=defaults.settings.candidates, step=1, label="Candidates per shot",
                                   elem_id="sb-candidates-default")
            aspect = gr.Dropdown(ASPECT_CHOICES, value="", allow_custom_value=True, elem_id="sb-aspect",
                                 label="Board aspect (Outpaint to board aspect; the export's frame boxes)")
        with gr.Group(elem_id="sb-hires"):
            s0 = defaults.settings
            hires_fix = gr.Checkbox(s0.hires_fix, elem_id="sb-hires-fix",
                                    label="Hires fix: generated frames drawn at this size, then again larger "
                                          "(export quality; the second pass runs without the ControlNet)")
            with gr.Row():
                hires_scale = gr.Slider(1, 4, value=s0.hires_scale, step=0.05, label="Upscale by",
                                        elem_id="sb-hires-scale")
                hires_upscaler = gr.Dropdown(hires_panel.hires_upscalers(cfg.upscalers_dir), value=s0.hires_upscaler,
                                             allow_custom_value=True, label="Upscaler", elem_id="sb-hires-upscaler")
                hires_steps = gr.Slider(0, 150, value=s0.hires_steps, step=1, label="Hires steps (0 = as steps)",
                                        elem_id="sb-hires-steps")
                hires_denoising = gr.Slider(0, 1, value=s0.hires_denoising, step=0.01, label="Denoising strength",
                                            elem_id="sb-hires-denoising")
    setting_inputs = [negative, sampler, schedule, steps, cfg_scale, width, height, clip_skip, candidates, controlnet,
                      aspect, hires_fix, hires_scale, hires_upscaler, hires_steps, hires_denoising]
    form = [shots, types, style_kind, style_name, style_weight, *setting_inputs]
    with gr.Row():
        save_btn = gr.Button("Save (and shots.csv)", elem_id="sb-save")
        generate_btn = gr.Button("Generate all shots", variant="primary", elem_id="sb-generate")
        missing_btn = gr.Button("Generate shots without frames", elem_id="sb-generate-missing")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="sb-stop")
    status = gr.Markdown(elem_id="sb-status")
    with gr.Row():
        with gr.Column(scale=2):
            shot_pick = gr.Dropdown([], value=None, label="Shot", elem_id="sb-shot")
            # a file, not gr.Image: gr.Image converts uploads to RGB (a full decode) before any check
            reference = gr.File(label="Reference picture or sketch (upload)", file_types=["image"], height=90,
                                elem_id="sb-reference")
            reference_view = gr.Image(label="Reference", interactive=False, height=220,
                                      elem_id="sb-reference-preview")
            with gr.Row():
                low = gr.Slider(1, 255, value=100, step=1, label="Canny low threshold", elem_id="sb-low")
                high = gr.Slider(1, 255, value=200, step=1, label="Canny high threshold", elem_id="sb-high")
            edges = gr.Image(label="Canny edges (what the ControlNet sees)", interactive=False, height=220,
                             elem_id="sb-edges")
            with gr.Row():
                scale = gr.Slider(0, 2, value=1, step=0.05, label="Conditioning scale")
                start = gr.Slider(0, 1, value=0, step=0.05, label="Guidance start")
                end = gr.Slider(0, 1, value=1, step=0.05, label="Guidance end")
            with gr.Row():
                apply_btn = gr.Button("Keep these ControlNet settings for the shot")
                clear_ref_btn = gr.Button("Remove reference")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Candidates (click one to pick it for the storyboard)", columns=4,
                                 height=360, format="png", elem_id="sb-gallery")
            with gr.Row():
                regen_btn = gr.Button("Regenerate this shot", elem_id="sb-regenerate")
                lock_btn = gr.Button("Lock the picked seed", elem_id="sb-lock")
                unlock_btn = gr.Button("Unlock seed")
            # the picked candidate to the Generate tab (image to image, inpaint, upscale, its parameters)
            send_buttons = send_to.buttons("sb-send") if gen is not None else {}
            with gr.Accordion("Refine or outpaint the picked candidate (a new candidate; the others stay)",
                              open=False, elem_id="sb-refine"):
                with gr.Row():
                    refine_strength = gr.Slider(0, 1, value=0.5, step=0.01, label="Denoising strength (refine)",
                                                elem_id="sb-refine-strength")
                    refine_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="sb-refine-blur")
                refine_text = gr.Textbox("", label="Description for the refinement (empty = the shot's; the shot "
                                                   "type's template, LoRA and the board's style stay)",
                                         elem_id="sb-refine-description")
                refine_editor = CheckedImageEditor(
                    label="Mask (optional): paint over the picked candidate what to redraw; nothing painted = "
                          "image to image", sources=(), type="pil", image_mode="RGBA", layers=False, transforms=(),
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=8),
                    eraser=gr.Eraser(default_size=8), format="png", height=300, elem_id="sb-refine-editor")
                refine_mask = gr.File(label="Or a mask file (white = redraw; used instead of the painting)",
                                      file_types=["image"], height=90, elem_id="sb-refine-mask")
                with gr.Row():
                    refine_btn = gr.Button("Refine frame", elem_id="sb-refine-btn")
                    outpaint_strength = gr.Slider(0, 1, value=1.0, step=0.01, elem_id="sb-outpaint-strength",
                                                  label="Denoising strength (outpaint)")
                    outpaint_btn = gr.Button("Outpaint to board aspect", elem_id="sb-outpaint-btn")
            export_btn = gr.Button("Export PDF and contact sheet", variant="primary", elem_id="sb-export")
            files = gr.File(label="Exported files", file_count="multiple", interactive=False, elem_id="sb-files")
            sheet = gr.Image(label="Contact sheet", interactive=False, elem_id="sb-sheet")
    current = gr.State(None)  # the open storyboard's name

    # helpers -----------------------------------------------------------------------------------------------------

    def load(name: str) -> Storyboard:
        if not name:
            raise gr.Error("open or create a storyboard first")
        try:
            return store.load(name)
        except ERRORS as e:
            raise gr.Error(str(e)) from e

    def from_form(name, *values) -> Storyboard:
        try:
            return board_from_form(load(name), *values, limits=cfg.limits)
        except ERRORS as e:
            raise gr.Error(str(e)) from e

    def save(board: Storyboard) -> None:
        try:
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e

    def shot_view(board: Storyboard, number: str | None):
        """Shot picker, shot controls, canny preview and candidates for `number`."""
        numbers = [s.shot for s in board.shots]
        number = number if number in numbers else (numbers[0] if numbers else None)
        shot = board.shot(number) if number else None
        items, picked = candidate_items(store, board, number)
        ref = str(store.path(board.name) / shot.reference) if shot and shot.reference else None
        try:
            preview = canny_preview(store, board, number, shot.canny_low, shot.canny_high) if shot else None
        except ERRORS:
            preview = None
        return (gr.update(choices=numbers, value=number), None, ref,
                shot.canny_low if shot else 100, shot.canny_high if shot else 200, preview,
                shot.control_scale if shot else 1.0, shot.control_start if shot else 0.0,
                shot.control_end if shot else 1.0, gr.update(value=items, selected_index=picked),
                picked_picture(store, board, number))

    shot_outputs = [shot_pick, reference, reference_view, low, high, edges, scale, start, end, gallery,
                    refine_editor]

    def cast_view(board: Storyboard, who: str | None = None):
        """The cast table, the character picker and `who`'s (default: the first character's) fields and pictures."""
        names = [c.name for c in board.cast]
        chosen = next((c for c in board.cast if c.name.lower() == (who or "").strip().lower()),
                      board.cast[0] if board.cast else None)
        try:
            pictures = [str(p) for p in store.character_pictures(board, chosen)] if chosen else []
        except ERRORS:
            pictures = []
        default = (list_ip_adapters(cfg.ipadapter_dir) or [""])[0]
        return (cast_rows(board), gr.update(choices=names, value=chosen.name if chosen else None),
                chosen.prompt if chosen else "", chosen.ip_adapter if chosen else default,
                chosen.scale if chosen else 0.6, pictures)

    cast_outputs = [cast_table, cast_pick, cast_words, cast_adapter, cast_scale, cast_gallery]

    def everything(board: Storyboard, number: str | None = None):
        values = settings_values(board)
        values[SETTING_NAMES.index("controlnet")] = gr.update(choices=controlnet_choices(cfg.controlnet_dir, cfg.assets_dir, state.manager.current),
                               value=board.settings.controlnet)
        return (board.name, gr.update(choices=store.names(), value=board.name), shot_rows(board), type_rows(board),
                board.style.kind, board.style.name, board.style.weight, *values, *shot_view(board, number),
                *cast_view(board))

    # the form's outputs in the form's order after [current, project]; the cast's after the shot's
    all_outputs = [current, project, shots, types, style_kind, style_name, style_weight, *setting_inputs,
                   *shot_outputs, *cast_outputs]

    # projects ------------------------------------------------------------------------------------------------

    def open_project(name):
        name = (name or "").strip()
        try:
            check_board_name(name)
            if store.exists(name):
                board = store.load(name)
            else:
                board = new_board(name, new_settings())
                store.create(board)  # never over another board (a name differing only in case is refused)
                gr.Info(f"new storyboard {name!r}")
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        return everything(board)

    open_btn.click(open_project, project, all_outputs, api_name="storyboard_open")
    project.input(open_project, project, all_outputs, api_visibility="private")

    def import_csv(path, name, *values):
        if not path:
            return (gr.skip(),) * len(all_outputs)
        board = from_form(name, *values)
        try:
            # an uploaded CSV sits alone in a temporary folder: its references are names in the project folder
            # (references/..., as its exported shots.csv writes them); pictures are added per shot below
            notes = store.import_csv(board, Path(path), confine=True, reference_dir=store.path(board.name))
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        for note in notes:
            gr.Info(note)
        gr.Info(f"{len(board.shots)} shots imported from {Path(path).name}")
        return everything(board)

    csv_in.upload(import_csv, [csv_in, current, *form], all_outputs, api_visibility="private")

    def save_form(name, *values):
        board = from_form(name, *values)
        save(board)
        csv_path = store.export_csv(board)
        return (f"saved `{state.shown(store.path(board.name) / 'project.json')}` and `{csv_path.name}`", [str(csv_path)],
                *shot_view(board, None))

    save_btn.click(save_form, [current, *form], [status, files, *shot_outputs], api_name="storyboard_save")

    def use_preset(chosen, name, *values):
        if chosen not in presets:
            return (gr.skip(),) * (len(all_outputs) + 1)
        board = from_form(name, *values)
        apply_board_preset(board, presets[chosen])
        save(board)
        return presets[chosen].description, *everything(board)

    preset.input(use_preset, [preset, current, *form], [preset_info, *all_outputs], api_visibility="private")

    # generating ----------------------------------------------------------------------------------------------

    def generate(request, name, number, only_missing, *values, progress=gr.Progress(), keep=None):
        """Render shot `number` (or every shot); the shot shown afterwards is `number`, else the one the user had
        selected (`keep`), else the first rendered."""
        board = from_form(name, *values)
        save(board)
        if state.manager.current is None:
            raise gr.Error("no model is loaded; pick one in the Model menu")
        cancel = state.cancel_for(request)  # Stop ends this browser session's run only
        cancel.clear()

        on_progress = StepProgress(progress)  # the bar, with the speed so far and an ETA

        try:
            result = runner.run(board, [number] if number else None, only_missing=only_missing,
                                on_progress=on_progress, cancel=cancel)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        for note in result.notes:
            gr.Warning(note)
        done = ", ".join(r.shot for r in result.shots) or "none"
        text = f"generated shots: {done} on {board.model}"
        if result.interrupted or result.message:
            text = f"⚠ {result.message} · {text}"
        numbers = [shot.shot for shot in board.shots]
        shown = number or (keep if keep in numbers else None) or (result.shots[0].shot if result.shots else None)
        return text, *everything(board, shown)

    # `request` first: Gradio passes it only to parameters before *values (it names the browser session)
    def generate_all(request: gr.Request, name, selected, *values, progress=gr.Progress()):
        return generate(request, name, None, False, *values, progress=progress, keep=selected)

    def generate_missing(request: gr.Request, name, selected, *values, progress=gr.Progress()):
        return generate(request, name, None, True, *values, progress=progress, keep=selected)

    def regenerate(request: gr.Request, name, number, *values, progress=gr.Progress()):
        if not number:
            raise gr.Error("pick a shot first")
        return generate(request, name, number, False, *values, progress=progress)

    def stop(request: gr.Request = None):
        state.cancel_for(request).set()

    gen_outputs = [status, *all_outputs]
    # progress in one place (the status line), not as an overlay over each of the ~25 outputs
    # the shot the user is looking at stays selected after the run
    generate_btn.click(generate_all, [current, shot_pick, *form], gen_outputs, concurrency_id="gpu",
                       concurrency_limit=1, api_name="storyboard_generate", show_progress_on=status)
    missing_btn.click(generate_missing, [current, shot_pick, *form], gen_outputs, concurrency_id="gpu",
                      concurrency_limit=1, api_visibility="private", show_progress_on=status)
    regen_btn.click(regenerate, [current, shot_pick, *form], gen_outputs, concurrency_id="gpu", concurrency_limit=1,
                    api_name="storyboard_regenerate", show_progress_on=status)
    stop_btn.click(stop, None, None, concurrency_limit=None, api_visibility="private")

    # refine / outpaint the picked candidate: a new candidate of the same shot, the shot kept selected ----------

    def derive(request, name, number, how, *values, progress):
        if not number:
            raise gr.Error("pick a shot first")
        board = from_form(name, *values)
        save(board)
        if state.manager.current is None:
            raise gr.Error("no model is loaded; pick one in the Model menu")
        cancel = state.cancel_for(request)
        cancel.clear()

        on_progress = StepProgress(progress)  # the bar, with the speed so far and an ETA

        try:
            result = how(board, on_progress, cancel)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        for note in result.notes:
            gr.Warning(note)
        text = f"⚠ {result.message}" if result.interrupted else result.message
        return text, *shot_view(board, number)

    def refine_frame(request: gr.Request, name, number, strength, description, editor, mask_file, blur, *values,
                     progress=gr.Progress()):
        mask = inpaint_panel.pick_mask(editor, mask_file)
        return derive(request, name, number, lambda board, on_progress, cancel: runner.refine(
            board, number, strength=strength, mask=mask, description=(description or "").strip(),
            mask_blur=inpaint_panel.whole(blur), on_progress=on_progress, cancel=cancel), *values, progress=progress)

    def outpaint_frame(request: gr.Request, name, number, strength, blur, *values, progress=gr.Progress()):
        return derive(request, name, number, lambda board, on_progress, cancel: runner.outpaint(
            board, number, strength=strength, mask_blur=inpaint_panel.whole(blur), on_progress=on_progress,
            cancel=cancel), *values, progress=progress)

    derive_outputs = [status, *shot_outputs]
    refine_btn.click(refine_frame, [current, shot_pick, refine_strength, refine_text, refine_editor, refine_mask,
                                    refine_blur, *form], derive_outputs, concurrency_id="gpu", concurrency_limit=1,
                     api_name="storyboard_refine", show_progress_on=status)
    outpaint_btn.click(outpaint_frame, [current, shot_pick, outpaint_strength, refine_blur, *form], derive_outputs,
                       concurrency_id="gpu", concurrency_limit=1, api_name="storyboard_outpaint",
                       show_progress_on=status)
    refine_mask.change(inpaint_panel.check_mask_file, refine_mask, refine_mask, api_visibility="private")

    # one shot: reference, canny preview, ControlNet settings, pick, lock --------------------------------------

    def select_shot(name, number):
        return shot_view(load(name), number)

    shot_pick.input(select_shot, [current, shot_pick], shot_outputs, api_visibility="private")

    def upload_reference(name, number, path, *values):
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        board = from_form(name, *values)
        if not number:
            raise gr.Error("pick a shot first")
        try:
            notes = store.add_reference(board, board.shot(number), Path(path))
            store.save(board)
            shot = board.shot(number)
            preview = canny_preview(store, board, number, shot.canny_low, shot.canny_high)
            shown = str(store.reference_path(board, shot))  # the accepted picture, as the project keeps it
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        for note in notes:
            gr.Info(note)
        return shot_rows(board), preview, shown

    reference.upload(upload_reference, [current, shot_pick, reference, *form], [shots, edges, reference_view],
                     api_visibility="private")

    def live_edges(name, number, lo, hi):
        if not name or not number:
            return None
        try:
            return canny_preview(store, load(name), number, lo, hi)
        except ERRORS as e:
            raise gr.Error(str(e)) from e

    gr.on([low.change, high.change], live_edges, [current, shot_pick, low, high], edges, trigger_mode="always_last",
          concurrency_limit=None, show_progress="hidden", api_visibility="private")

    def apply_control(name, number, lo, hi, sc, st, en):
        board = load(name)
        try:
            shot = board.shot(number)
            # the values as sent: Shot.validate (in save) refuses 2.7 or None instead of a silent int() here
            shot.canny_low, shot.canny_high = lo, hi
            shot.control_scale, shot.control_start, shot.control_end = sc, st, en
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        return (f"shot {number}: canny {shot.canny_low}–{shot.canny_high}, scale {shot.control_scale:g}, "
                f"guidance {shot.control_start:g}–{shot.control_end:g}")

    apply_btn.click(apply_control, [current, shot_pick, low, high, scale, start, end], status,
                    api_visibility="private")

    def clear_reference(name, number):
        board = load(name)
        try:
            board.shot(number).reference = ""
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        return shot_rows(board), *shot_view(board, number)

    clear_ref_btn.click(clear_reference, [current, shot_pick], [shots, *shot_outputs], api_visibility="private")

    def pick_candidate(name, number, evt: gr.SelectData):
        board = load(name)
        try:
            frame = pick(board, number, evt.index)
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        items, picked = candidate_items(store, board, number)
        return f"shot {number}: candidate #{evt.index} (seed {frame.seed}) picked", \
            gr.update(value=items, selected_index=picked), picked_picture(store, board, number)

    gallery.select(pick_candidate, [current, shot_pick], [status, gallery, refine_editor], api_visibility="private")

    def picked_path(name, number):
        """The shot's picked candidate's file (None when the board or shot has none)."""
        if not name or not number:
            return None
        try:
            frame = load(name).shot(number).picked_frame
        except (gr.Error, *ERRORS):
            return None
        return str(store.path(name) / frame.file) if frame is not None else None

    if gen is not None:
        send_to.wire(send_buttons, gen, [current, shot_pick], tabs, what="a shot's candidate", resolve=picked_path)

    def lock(name, number, unlock=False):
        board = load(name)
        try:
            if unlock:
                unlock_seed(board, number)
                text = f"shot {number}: seed unlocked (new random seeds each time)"
            else:
                text = f"shot {number}: seed locked to {lock_seed(board, number)}"
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        return text, shot_rows(board)

    lock_btn.click(lock, [current, shot_pick], [status, shots], api_visibility="private")
    unlock_btn.click(lambda name, number: lock(name, number, True), [current, shot_pick], [status, shots],
                     api_visibility="private")

    # the cast: characters, their prompt words, adapter, scale and reference pictures ------------------------------

    def pick_character(name, who):
        if not name:
            return (gr.skip(),) * 4
        board = load(name)
        if not any(c.name.lower() == (who or "").strip().lower() for c in board.cast):
            return gr.skip(), gr.skip(), gr.skip(), []  # a new name: its fields as typed, no pictures yet
        return cast_view(board, who)[2:]

    cast_pick.input(pick_character, [current, cast_pick], [cast_words, cast_adapter, cast_scale, cast_gallery],
                    api_visibility="private")

    def save_character(name, who, words, adapter, weight, *values):
        board = from_form(name, *values)
        try:
            character = set_character(board, who, words, adapter, weight)
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        return (f"character {character.name}: saved ({len(character.pictures)} reference picture"
                f"{'s' if len(character.pictures) != 1 else ''})", shot_rows(board), *cast_view(board, character.name))

    cast_inputs = [current, cast_pick, cast_words, cast_adapter, cast_scale]
    cast_save_btn.click(save_character, [*cast_inputs, *form], [status, shots, *cast_outputs],
                        api_name="storyboard_character")

    def add_character_pictures(name, who, words, adapter, weight, files, *values):
        paths = [str(getattr(f, "name", None) or (f.get("path") if isinstance(f, dict) else f))
                 for f in (files if isinstance(files, (list, tuple)) else [files] if files else [])]
        if not paths:
            return (gr.skip(),) * (len(cast_outputs) + 3)
        board = from_form(name, *values)
        try:
            character = set_character(board, who, words, adapter, weight)
            # each picture checked before decoding, as a shot's reference is, and copied into references/cast/
            notes = store.add_character_pictures(board, character, [Path(p) for p in paths])
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        for note in notes:
            gr.Info(note)
        return (f"character {character.name}: {len(paths)} picture{'s' if len(paths) != 1 else ''} added "
                f"({len(character.pictures)} in all)", shot_rows(board), None, *cast_view(board, character.name))

    cast_upload.upload(add_character_pictures, [*cast_inputs, cast_upload, *form],
                       [status, shots, cast_upload, *cast_outputs], api_visibility="private")

    def change_character(name, who, how, *values):
        board = from_form(name, *values)
        try:
            character = board.character(who or "")
            if how == "remove":
                board.remove_character(character.name)
                text = f"character {character.name} removed from the cast (their pictures stay in references/cast/)"
            else:
                character.pictures = []
                text = f"character {character.name}: pictures removed (only their prompt words are used)"
            store.save(board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        return text, shot_rows(board), *cast_view(board, None if how == "remove" else character.name)

    def remove_character(name, who, *values):
        return change_character(name, who, "remove", *values)

    def clear_character_pictures(name, who, *values):
        return change_character(name, who, "clear", *values)

    def refresh_adapters():
        return gr.update(choices=list_ip_adapters(cfg.ipadapter_dir))

    cast_remove_btn.click(remove_character, [current, cast_pick, *form], [status, shots, *cast_outputs],
                          api_visibility="private")
    cast_clear_btn.click(clear_character_pictures, [current, cast_pick, *form], [status, shots, *cast_outputs],
                         api_visibility="private")
    cast_refresh.click(refresh_adapters, None, cast_adapter, api_visibility="private")

    # export ----------------------------------------------------------------------------------------------------

    def export(name, *values):
        board = from_form(name, *values)
        save(board)
        try:
            out = export_board(store, board)
        except ERRORS as e:
            raise gr.Error(str(e)) from e
        for note in out.notes:
            gr.Warning(note)
        text = f"exported `{state.shown(out.pdf)}` ({out.pages} page{'s' if out.pages != 1 else ''}) and `{out.sheet.name}`"
        return text, [str(out.pdf), str(out.sheet)], str(out.sheet)

    export_btn.click(export, [current, *form], [status, files, sheet], api_name="storyboard_export")

    def lists():
        """The lists that name files, read again (on page load): boards, presets and ControlNets made since the
        studio started."""
        return (gr.update(choices=store.names()), gr.update(choices=board_preset_choices(list_board_presets(cfg.presets_dir))),
                gr.update(choices=controlnet_choices(cfg.controlnet_dir, cfg.assets_dir, state.manager.current)),
                gr.update(choices=list_ip_adapters(cfg.ipadapter_dir)))

    return {"project": project, "open": open_btn, "shots": shots, "generate": generate_btn, "export": export_btn,
            "gallery": gallery, "form": form, "lists": lists,
            "list_outputs": [project, preset, controlnet, cast_adapter]}
