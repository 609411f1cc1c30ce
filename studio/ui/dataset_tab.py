"""The Dataset tab: import images, check crops and duplicates, caption, CLIP-check and save a training set."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
from pathlib import Path

import gradio as gr

from studio.dataset import curate as ds
from studio.dataset.captioning import DEFAULT_CAPTIONER, KNOWN_CAPTIONERS, CaptionerLoadError, load_captioner
from studio.dataset.clipscore import DEFAULT_CLIP, ClipLoadError, load_clip_scorer
from studio.dataset.crop import CROP_MODES
from studio.files.names import UnsafeNameError, safe_child
from studio.ui.state import AppState

INTRO = ("Bring 4 to 200 pictures. The studio checks every file, converts what it can, crops to the training "
         "size and shows each decision; nothing is written until you **Save**, and your files are never "
         "changed.")
CROP_HELP = {"center": "center", "smart": "smart (saliency)", "entropy": "entropy (most detail)",
             "bucket": "bucket (keep aspect ratio)"}
REPLACE_LABEL = "Replace the dataset of that name"
GRID_HEADERS = ["image", "file", "keep", "caption", "CLIP score", "note"]
DUP_HEADERS = ["pair", "A", "B", "kind", "similarity", "keep (a / b / both)"]


def size_defaults(state: AppState) -> tuple[int, int]:
    """(training size, smallest shorter side kept) for the loaded model: its native size and half of it (micro's
    64-px pictures are not skipped as too small for SD's 512); 512 and 256 with no model loaded."""
    model = state.manager.current
    native = model.native_size if model is not None else 512
    return native, max(8, native // 2)


def build(state: AppState):
    """Lay out the tab and wire it to the engine (studio.dataset). Returns its hook for a model load (the size
    defaults follow the model)."""
    cancel = threading.Event()
    gr.Markdown(INTRO)
    session = gr.State(None)  # this browser tab's ds.Curation
    with gr.Row():
        with gr.Column(scale=3):
            source = gr.Textbox(label="Folder or .zip on this computer", elem_id="ds-source",
                                placeholder="/home/me/pictures/my-style  or  /home/me/my-style.zip")
            upload = gr.File(label="…or upload images, captions (.txt) or a .zip", file_count="multiple",
                             elem_id="ds-upload", height=120)
        with gr.Column(scale=2):
            native, smallest = size_defaults(state)
            with gr.Row():
                size = gr.Number(value=native, precision=0, elem_id="ds-size",
                                 label="Training size (the loaded model's native size; 512: SD 1.x, 1024: SDXL)")
                min_side = gr.Number(value=smallest, precision=0, label="Skip images whose shorter side is below",
                                     elem_id="ds-min-side")
            crop = gr.Radio([(CROP_HELP[m], m) for m in CROP_MODES], value="center", label="Crop",
                            elem_id="ds-crop")
            non_rgb = gr.Radio([("convert to RGB", "convert"), ("leave them out", "prune")],
                               value="convert", label="Grayscale images",
                               info="seed 004 left grayscale pictures out of its training sets")
            with gr.Row():
                import_btn = gr.Button("Import", variant="primary", elem_id="ds-import-btn")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="ds-stop-btn")
    summary = gr.Markdown(elem_id="ds-summary")
    problems = gr.Dataframe(headers=["file", "status", "reason"], interactive=False, wrap=True,
                            max_height=260, label="Skipped and removed files", elem_id="ds-problems")
    crops = gr.Gallery(label="Crop preview: the bright box is what will be written", columns=6, height=300,
                       elem_id="ds-crops", format="png")

    with gr.Accordion("Duplicates", open=False):
        gr.Markdown("Exact duplicates (same file or same pixels) are found on import. Near duplicates need a "
                    "CLIP model. Pairs show side by side (A left, B right); the **keep** column decides.")
        with gr.Row():
            near = gr.Slider(0.8, 1.0, value=0.95, step=0.001,
                             label="Near-duplicate CLIP cosine (at or above)")
            near_btn = gr.Button("Find near duplicates", scale=0)
        dup_gallery = gr.Gallery(label="Pairs: A | B", columns=2, height=300, elem_id="ds-dups", format="png")
        dup_table = gr.Dataframe(headers=DUP_HEADERS, interactive=True, static_columns=[0, 1, 2, 3, 4],
                                 type="array", elem_id="ds-dup-table")
        apply_dups_btn = gr.Button("Apply duplicate choices")

    with gr.Accordion("Captions", open=True):
        with gr.Row():
            captioner = gr.Dropdown(["demo-tiny", *KNOWN_CAPTIONERS], value=DEFAULT_CAPTIONER,
                                    allow_custom_value=True, scale=3, elem_id="ds-captioner",
                                    label="Captioning model: BLIP or BLIP-2 hub id, or a local folder")
            batch = gr.Number(value=8, precision=0, label="Batch", scale=1, min_width=80)
        with gr.Row():
            prefix = gr.Textbox(label="Prefix", placeholder="sks, / a painting in the style of",
                                elem_id="ds-prefix")
            suffix = gr.Textbox(label="Suffix", elem_id="ds-suffix")
            replace = gr.Checkbox(False, label="Replace captions that came with the images or were edited")
        caption_btn = gr.Button("Caption", variant="primary", elem_id="ds-caption-btn")
        grid = gr.Dataframe(headers=GRID_HEADERS, type="array", interactive=True, wrap=True, max_height=600,
                            datatype=["markdown", "str", "bool", "str", "number", "str"],
                            static_columns=[0, 1, 4, 5], elem_id="ds-captions",
                            column_widths=["90px", "130px", "76px", "auto", "80px", "160px"],
                            label="Captions: double-click a caption to edit it; untick keep to leave "
                                  "an image out")

    with gr.Accordion("Caption check: drop pairs whose caption does not match the image", open=False,
                      elem_id="ds-clip-check"):
        with gr.Row():
            clip_model = gr.Dropdown([DEFAULT_CLIP, "ViT-B-32", "ViT-H-14", "demo-tiny"], value=DEFAULT_CLIP,
                                     allow_custom_value=True, scale=3, elem_id="ds-clip-model",
                                     label="open_clip model (ARCH, ARCH:TAG, ARCH:/weights, local-dir:/dir)")
            threshold = gr.Number(value=0.2, label="Threshold", scale=1, elem_id="ds-threshold",
                                  info="CLIP image-caption score; seed 001 removed pairs under 0.2")
        score_btn = gr.Button("Score image-caption pairs", elem_id="ds-score-btn")
        scores = gr.Dataframe(headers=["file", "CLIP score", "caption", "below threshold"], interactive=False,
                              wrap=True, max_height=400, elem_id="ds-scores", label="Lowest scores first")

    with gr.Accordion("Save", open=True):
        with gr.Row():
            name = gr.Textbox(label=f"Dataset name (saved in {Path(state.cfg.datasets_dir).name}/)", elem_id="ds-name")
            repeats = gr.Number(value=0, precision=0, minimum=0, elem_id="ds-repeats",
                                label="Repeats per epoch (0: from kohya <repeats>_<name> folders, else 1)")
        with gr.Row():
            flip = gr.Radio([("no flip", "none"), ("random flip in training", "random"),
                             ("store mirrored copies", "stored")], value="none", label="Horizontal flip")
            flip_p = gr.Slider(0, 1, value=0.5, step=0.05, label="Flip probability")
        with gr.Row():
            drop_low = gr.Checkbox(True, label="Leave out pairs under the CLIP threshold (scored pairs only)")
            kohya = gr.Checkbox(False, label="Also export kohya's <repeats>_<name> folder")
            replace_ds = gr.Checkbox(False, label=REPLACE_LABEL, elem_id="ds-replace")
        save_btn = gr.Button("Save dataset", variant="primary", elem_id="ds-save-btn")
        saved = gr.Markdown(elem_id="ds-saved")

    views = [summary, problems, crops, dup_gallery, dup_table, grid, scores]

    def render(curation: ds.Curation | None, threshold_value=None):
        if curation is None:
            return ("", [], [], [], [], [], [])
        return (summary_text(curation), problem_rows(curation), crop_items(curation), dup_items(curation),
                dup_rows(curation), grid_rows(curation), score_rows(curation, threshold_value))

    def progress_fn(progress, unit):
        return lambda done, total, info: progress((done, total), desc=info, unit=unit)

    # --- import
    def do_import(src, files, size_v, min_side_v, crop_v, non_rgb_v, progress=gr.Progress()):
        inputs = [Path(src.strip()).expanduser()] if src and src.strip() else []
        inputs += [Path(f) for f in (files or [])]
        if not inputs:
            raise gr.Error("give a folder or .zip path, or upload images")
        job = ds.CurateJob(inputs=inputs, size=_int(size_v, "training size"), crop=crop_v,
                           min_side=_int(min_side_v, "minimum side"), non_rgb=non_rgb_v)
        cancel.clear()
        progress((0, 1), desc="scanning", unit="files")
        try:
            curation = ds.import_images(job, progress_fn(progress, "files"), cancel)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
        default_name = ds.dataset_name(ds.CurateJob(), inputs[0]) if src and src.strip() else "dataset"
        return (curation, *render(curation), default_name, "")

    import_btn.click(do_import, [source, upload, size, min_side, crop, non_rgb],
                     [session, *views, name, saved], show_progress_on=summary, api_visibility="private")
    stop_btn.click(lambda: cancel.set(), None, None, concurrency_limit=None, api_visibility="private")

    def do_recrop(curation, grid_v, size_v, crop_v, progress=gr.Progress()):
        if curation is None:
            return (None, *render(None))
        _apply_grid(curation, grid_v)
        cancel.clear()
        try:
            done = ds.recrop(curation, _int(size_v, "training size"), crop_v,
                             progress_fn(progress, "images"), cancel)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        if not done:
            gr.Warning("stopped: the earlier crops are kept")
        return (curation, *render(curation))

    # a new crop mode or size re-crops what was imported, keeping captions and choices
    crop.input(do_recrop, [session, grid, size, crop], [session, *views], show_progress_on=summary,
               api_visibility="private")
    size.submit(do_recrop, [session, grid, size, crop], [session, *views], show_progress_on=summary,
                api_visibility="private")

    # --- duplicates
    def do_near(curation, rows, grid_v, threshold_v, model, progress=gr.Progress()):
        curation = _need(curation)
        _apply_grid(curation, grid_v)
        _apply_dup_rows(curation, rows)
        cancel.clear()
        progress((0, 1), desc=f"loading {model}", unit="images")
        scorer = _load_clip(model, state)
        ds.near_duplicate_pass(curation, scorer, float(threshold_v), progress_fn(progress, "images"), cancel)
        found = sum(p.kind == "near" for p in curation.pairs)
        gr.Info(f"{found} near-duplicate pair(s) at cosine ≥ {float(threshold_v):.3f}")
        return (curation, *render(curation))

    near_btn.click(do_near, [session, dup_table, grid, near, clip_model], [session, *views], show_progress_on=summary,
                   concurrency_id="gpu", concurrency_limit=1, api_visibility="private")

    def do_apply_dups(curation, rows, grid_v):
        curation = _need(curation)
        _apply_grid(curation, grid_v)
        _apply_dup_rows(curation, rows)
        return (curation, *render(curation))

    apply_dups_btn.click(do_apply_dups, [session, dup_table, grid], [session, *views], show_progress_on=summary,
                         api_visibility="private")

    # --- captions
    def do_caption(curation, grid_v, model, prefix_v, suffix_v, replace_v, batch_v, progress=gr.Progress()):
        curation = _need(curation)
        _apply_grid(curation, grid_v)
        curation.job = dataclasses.replace(curation.job, caption_model=model, caption_prefix=prefix_v or "",
                                           caption_suffix=suffix_v or "", keep_captions=not replace_v,
                                           caption_batch=_int(batch_v, "caption batch"))
        try:
            curation.job.validate()
        except ValueError as e:
            raise gr.Error(str(e)) from e
        cancel.clear()
        progress((0, 1), desc=f"loading {model}", unit="images")
        try:
            captioner_obj = load_captioner(model, state.cfg.cache_dir, state.cfg.device, state.cfg.precision)
        except CaptionerLoadError as e:
            raise gr.Error(str(e)) from e
        n = ds.caption_items(curation, captioner_obj, progress_fn(progress, "images"), cancel)
        if n == 0:
            gr.Info("nothing to caption: every kept image has a caption (tick 'Replace' to caption them "
                    "again)")
        elif captioner_obj.name == "demo-tiny":
            gr.Warning("demo-tiny has random weights: its captions are gibberish; edit them or use a real "
                       "model")
        return (curation, *render(curation))

    caption_btn.click(do_caption, [session, grid, captioner, prefix, suffix, replace, batch],
                      [session, *views], show_progress_on=summary, concurrency_id="gpu", concurrency_limit=1,
                      api_visibility="private")

    # --- CLIP check
    def do_score(curation, grid_v, model, threshold_v, progress=gr.Progress()):
        curation = _need(curation)
        _apply_grid(curation, grid_v)
        if not any(it.caption for it in curation.usable()):
            raise gr.Error("caption the images first: the caption check compares each image with its caption")
        cancel.clear()
        progress((0, 1), desc=f"loading {model}", unit="images")
        scorer = _load_clip(model, state)
        ds.score_items(curation, scorer, progress_fn(progress, "images"), cancel)
        return (curation, *render(curation, threshold_v))

    score_btn.click(do_score, [session, grid, clip_model, threshold], [session, *views], show_progress_on=summary,
                    concurrency_id="gpu", concurrency_limit=1, api_visibility="private")
    threshold.change(lambda c, t: score_rows(c, t) if c else [], [session, threshold], scores,
                     api_visibility="private")

    # --- save
    def do_save(curation, grid_v, rows, name_v, repeats_v, flip_v, flip_p_v, drop_v, threshold_v, kohya_v,
                replace_v=False, progress=gr.Progress()):
        curation = _need(curation)
        _apply_grid(curation, grid_v)
        _apply_dup_rows(curation, rows)
        rep = None if repeats_v in (None, "", 0) else _int(repeats_v, "repeats")
        curation.job = dataclasses.replace(curation.job, name=name_v or "", flip=flip_v,
                                           flip_p=float(flip_p_v), repeats=rep,
                                           clip_threshold=float(threshold_v) if drop_v else None)
        try:
            curation.job.validate()
            slug = ds.dataset_name(curation.job, None)
            target = safe_child(state.cfg.datasets_dir, slug)
            ds.apply_clip_filter(curation, curation.job.clip_threshold)
            kohya_parent = state.cfg.datasets_dir / f"{slug}-kohya"
            if kohya_v:  # refused before anything is written
                ds.kohya_target(kohya_parent, slug, curation.repeats, bool(replace_v))
            progress((0, 1), desc="writing", unit="files")
            out = ds.write_dataset(curation, target, replace=bool(replace_v))
            kohya_dir = None
            if kohya_v:
                kohya_dir = ds.export_kohya(out, kohya_parent, slug, curation.repeats, replace=bool(replace_v))
        except ds.DatasetExistsError as e:
            raise gr.Error(f"Nothing was saved: {e}. Type another name, or tick '{REPLACE_LABEL}'.") from e
        except (ValueError, UnsafeNameError, OSError) as e:
            raise gr.Error(str(e)) from e
        kept = len(curation.kept())
        where = Path(state.cfg.datasets_dir).name
        text = (f"Saved **{kept}** image(s) with captions to `{where}/{out.name}` (dataset.json, metadata.jsonl, "
                f"report.json); {curation.repeats} repeat(s) per epoch, flip: {curation.job.flip}.")
        if kohya_v:
            text += f"\n\nkohya folder: `{where}/{kohya_dir.name}`"
        return (curation, *render(curation, threshold_v), text, False)

    save_btn.click(do_save,
                   [session, grid, dup_table, name, repeats, flip, flip_p, drop_low, threshold, kohya, replace_ds],
                   [session, *views, saved, replace_ds], show_progress_on=summary, api_visibility="private")
    return {"session": session, "on_model_loaded": lambda: size_defaults(state), "model_outputs": [size, min_side]}


# --- views: pure functions of a Curation -------------------------------------------------------------


def summary_text(curation: ds.Curation) -> str:
    report = ds.build_report(curation)
    c = report["counts"]
    text = (f"**{c['kept']}** kept of {c['inputs']} file(s) · {c['converted']} converted · "
            f"{c['removed']} removed · {c['skipped']} skipped · size {curation.job.size} px, "
            f"crop: {curation.job.crop}")
    if curation.interrupted:
        text += "\n\n⚠ stopped before the end: the files not reached are listed as skipped"
    notes = [f"`{it.source.label}`: {'; '.join(it.notes)}" for it in curation.kept() if it.notes]
    if notes:
        text += "\n\n<details><summary>Conversions and corrections</summary>\n\n" + "\n".join(
            f"- {n}" for n in notes) + "\n</details>"
    return text


def problem_rows(curation: ds.Curation) -> list[list[str]]:
    rows = [[it.source.label, "skipped", it.skipped] for it in curation.items if it.skipped]
    removed = [it for it in curation.items if it.removed and not it.skipped]
    return rows + [[it.source.label, "removed", it.removed] for it in removed]


def crop_items(curation: ds.Curation) -> list[tuple]:
    return [(it.thumb, f"{it.source.label} · {it.original_size[0]}×{it.original_size[1]} → "
                       f"{it.out_size[0]}×{it.out_size[1]}{'' if it.kept else ' (left out)'}")
            for it in curation.usable()]


def dup_items(curation: ds.Curation) -> list[tuple]:
    out = []
    for k, p in enumerate(curation.pairs, 1):
        a, b = curation.items[p.a], curation.items[p.b]
        out += [(a.image, f"{k}A {a.source.label}{' ✓' if p.keep in ('a', 'both') else ''}"),
                (b.image, f"{k}B {b.source.label}{' ✓' if p.keep in ('b', 'both') else ''}")]
    return out


def dup_rows(curation: ds.Curation) -> list[list]:
    items = curation.items
    return [[k, items[p.a].source.label, items[p.b].source.label, p.kind, p.similarity, p.keep]
            for k, p in enumerate(curation.pairs, 1)]


def grid_rows(curation: ds.Curation) -> list[list]:
    """Every usable image: kept ones first, then the ones left out (with why)."""
    items = curation.kept() + [it for it in curation.usable() if not it.kept]
    return [[_thumb_markdown(it), it.name, it.kept, it.caption, it.clip_score, it.removed] for it in items]


def score_rows(curation: ds.Curation, threshold=None) -> list[list]:
    scored = [it for it in curation.usable() if it.clip_score is not None]
    scored.sort(key=lambda it: it.clip_score)
    t = float(threshold) if threshold not in (None, "") else None
    return [[it.name, it.clip_score, it.caption, "yes" if t is not None and it.clip_score < t else ""]
            for it in scored]


def _thumb_markdown(item: ds.Item) -> str:
    """A small inline JPEG, so the grid needs no file serving."""
    thumb = item.image.copy()
    thumb.thumbnail((72, 72))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return f"![{item.name}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"


# --- helpers ---------------------------------------------------------------------------------------


def _apply_grid(curation: ds.Curation, rows) -> None:
    """Take hand edits from the caption grid (rows matched by file name): captions and keep ticks."""
    by_name = {it.name: i for i, it in enumerate(curation.items) if not it.skipped}
    for row in rows or []:
        if len(row) < 4 or row[1] not in by_name:
            continue
        index = by_name[row[1]]
        ds.set_caption(curation, index, str(row[3] if row[3] is not None else ""))
        ds.set_kept(curation, index, row[2] in (True, 1, "true", "True"))


def _apply_dup_rows(curation: ds.Curation, rows) -> None:
    for row in rows or []:
        if len(row) < 6 or row[0] in (None, ""):
            continue
        k = int(row[0]) - 1
        choice = str(row[5]).strip().lower()
        if not 0 <= k < len(curation.pairs):
            continue
        if choice not in ("a", "b", "both"):
            raise gr.Error(f"pair {k + 1}: keep must be a, b or both, got {row[5]!r}")
        curation.pairs[k].keep = choice
    ds.apply_duplicate_choices(curation)


def _load_clip(model: str, state: AppState):
    try:
        return load_clip_scorer(model, state.cfg.cache_dir, state.cfg.device)
    except ClipLoadError as e:
        raise gr.Error(str(e)) from e


def _need(curation):
    if curation is None:
        raise gr.Error("import images first")
    return curation


def _int(value, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{what} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise gr.Error(f"{what} must be a whole number, got {value!r}")
    return int(number)
