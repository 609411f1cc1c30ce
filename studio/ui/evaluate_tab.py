"""The Evaluate tab: metrics on a folder of images, method comparison tables (seed 000's tables 1 and 2), and
the A/B survey (build, link, report). Only wiring: the work is in studio.evaluate."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from studio.config import ROOT
from studio.dataset.captioning import DEFAULT_CAPTIONER, KNOWN_CAPTIONERS
from studio.dataset.clipscore import DEFAULT_CLIP
from studio.evaluate.encoders import DEFAULT_DINO, FID_FEATURES
from studio.evaluate.folders import METRICS, Cancelled, EvaluateJob, evaluate_folders, write_report
from studio.ui.state import AppState

METRIC_HELP = {"clip-i": "CLIP-I (accuracy)", "clip-t": "CLIP-T (editability)", "dino": "DINO", "fid": "FID",
               "kid": "KID", "captions": "BLIP captions"}
SHIPPED_EXPERIMENTS = ROOT / "presets" / "experiments"


REPLACE_EXPERIMENT_LABEL = "Redo finished cells whose settings changed (their results are replaced)"
REPLACE_SURVEY_LABEL = "Replace the survey of that name (its answers are lost)"
# the shipped experiment files by what they compare (their file names cite the paper they repeat)
EXPERIMENT_LABELS = {"seed000": "Ten painters' styles: prompt words against three kinds of embedding (shipped)"}


def experiment_files(state: AppState) -> list[tuple[str, str]]:
    """(label, path) of the experiment files: the shipped ones by what they compare, the user's by file name."""
    folders = [SHIPPED_EXPERIMENTS, Path(state.cfg.presets_dir) / "experiments"]
    seen, out = set(), []
    for folder in folders:
        for p in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                shipped = p.resolve().parent == SHIPPED_EXPERIMENTS.resolve()
                out.append((EXPERIMENT_LABELS.get(p.stem, p.name) if shipped else p.name, str(p)))
    return out


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def build(state: AppState):
    cancel = threading.Event()

    def progress_fn(progress, unit):
        return lambda done, total, info: progress((done, max(total, 1)), desc=info, unit=unit)

    stop_kwargs = dict(concurrency_limit=None, api_visibility="private")

    # --- 1. metrics on a folder ---
    with gr.Accordion("Metrics on a folder of images", open=True):
        gr.Markdown("CLIP-I compares generated and reference images (per prompt: mean over the generated "
                    "images, then the best reference), CLIP-T each image with its prompt minus the style phrase, "
                    "DINO generated with reference images; FID and KID compare the two sets (they need thousands "
                    "of images to mean much). Prompts come from the images' generation parameters, a `.txt` beside "
                    "each, or a prompts file.")
        with gr.Row():
            generated = gr.Textbox(label="Generated images folder", elem_id="ev-generated")
            references = gr.Textbox(label="Reference images folder", elem_id="ev-references")
            prompts = gr.Textbox(label="Prompts file (optional: .txt or .json)", elem_id="ev-prompts")
        metrics = gr.CheckboxGroup([(METRIC_HELP[m], m) for m in METRICS], value=["clip-i", "clip-t"],
                                   label="Metrics", elem_id="ev-metrics")
        with gr.Row():
            clip_model = gr.Dropdown([DEFAULT_CLIP, "ViT-B-32", "demo-tiny"], value=DEFAULT_CLIP,
                                     allow_custom_value=True, label="CLIP model", elem_id="ev-clip")
            dino_model = gr.Dropdown([DEFAULT_DINO, "demo-tiny"], value=DEFAULT_DINO, allow_custom_value=True,
                                     label="DINO model", elem_id="ev-dino")
            fid_features = gr.Dropdown(list(FID_FEATURES), value="inception", allow_custom_value=True,
                                       label="FID / KID features", elem_id="ev-fid")
            captioner = gr.Dropdown([*KNOWN_CAPTIONERS, "demo-tiny"], value=DEFAULT_CAPTIONER,
                                    allow_custom_value=True, label="Captioner", elem_id="ev-captioner")
        style_phrases = gr.Textbox(label="Style phrases to remove for CLIP-T (comma separated; 'in the style of …' "
                                         "and <lora:…> tags always go)", elem_id="ev-style")
        with gr.Row():
            run_btn = gr.Button("Evaluate", variant="primary", elem_id="ev-run")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="ev-stop")
        summary = gr.Markdown(elem_id="ev-summary")
        per_prompt = gr.Dataframe(headers=["prompt", "compared text", "images", "CLIP-I", "CLIP-T", "DINO"],
                                  interactive=False, wrap=True, label="Per prompt", elem_id="ev-per-prompt")
        per_image = gr.Dataframe(headers=["file", "prompt", "CLIP-T", "BLIP caption"], interactive=False, wrap=True,
                                 label="Per image", max_height=320, elem_id="ev-per-image")
        report_file = gr.File(label="Report (JSON)", elem_id="ev-report")

    def do_evaluate(gen_v, ref_v, prompts_v, metrics_v, clip_v, dino_v, fid_v, cap_v, style_v,
                    progress=gr.Progress()):
        job = EvaluateJob(generated=(gen_v or "").strip(), references=(ref_v or "").strip(),
                          prompts=(prompts_v or "").strip(), metrics=list(metrics_v or []), clip_model=clip_v,
                          dino_model=dino_v, fid_features=fid_v, caption_model=cap_v,
                          style_phrases=[s.strip() for s in (style_v or "").split(",") if s.strip()],
                          device=state.cfg.device)
        cancel.clear()
        try:
            report = evaluate_folders(job, state.cfg.cache_dir, progress_fn(progress, "steps"), cancel)
        except Cancelled:
            raise gr.Error("stopped") from None
        except (ValueError, RuntimeError, OSError) as e:
            raise gr.Error(str(e)) from e
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = write_report(report, Path(state.cfg.outputs_dir) / "evaluations" / f"evaluation-{stamp}.json")
        m = report["metrics"]
        names = {"clip_i": "CLIP-I (accuracy)", "clip_t": "CLIP-T (editability)", "dino": "DINO", "fid": "FID",
                 "kid_mean": "KID", "kid_std": "KID std"}
        lines = [" · ".join(f"**{names[k]}** {v:.4f}" for k, v in m.items() if v is not None) or "no metric",
                 f"{report['counts']['generated']} generated, {report['counts']['references']} reference images; "
                 f"models: {', '.join(f'{k} {v}' for k, v in report.get('models', {}).items())}"]
        lines += [f"⚠ {w}" for w in report["warnings"]]
        lines += [f"skipped {k}: {v}" for k, v in report["skipped"].items()]
        rows = [[r["prompt"], r["text"], r["images"], _fmt(r.get("clip_i")), _fmt(r.get("clip_t")),
                 _fmt(r.get("dino"))] for r in report["per_prompt"]]
        images = [[r["file"], r["prompt"], _fmt(r.get("clip_t")), r.get("caption", "")] for r in report["images"]]
        return "\n\n".join(lines), rows, images, str(path)

    run_btn.click(do_evaluate, [generated, references, prompts, metrics, clip_model, dino_model, fid_features,
                                captioner, style_phrases], [summary, per_prompt, per_image, report_file],
                  concurrency_id="gpu", concurrency_limit=1, api_visibility="private", show_progress_on=summary)
    stop_btn.click(lambda: cancel.set(), None, None, **stop_kwargs)

    # --- 2. experiments ---
    with gr.Accordion("Experiment: method comparison tables (methods × styles)", open=False, elem_id="ex-accordion"):
        gr.Markdown("An experiment file lists styles (reference images), methods (pe, ti, ti-att, ti-moe, lora, "
                    "finetune), prompts and training settings. The run trains, generates with fixed seeds, scores "
                    "and writes the tables and the accuracy-vs-editability plot under `outputs/experiments/NAME/`. "
                    "Cells finished earlier are not redone, so a stopped run continues where it was.")
        with gr.Row():
            exp_file = gr.Dropdown(experiment_files(state), value=None, allow_custom_value=True, scale=4,
                                   label="Experiment file (.yaml)", elem_id="ex-file",
                                   info="the shipped seed000.yaml repeats seed 000's tables 1 and 2")
            exp_refresh = gr.Button("↻", scale=0, min_width=40)
        with gr.Row():
            exp_replace = gr.Checkbox(False, label=REPLACE_EXPERIMENT_LABEL, elem_id="ex-replace")
            exp_run = gr.Button("Run experiment", variant="primary", elem_id="ex-run")
            exp_stop = gr.Button("Stop", variant="stop", elem_id="ex-stop")
        exp_status = gr.Markdown(elem_id="ex-status")
        with gr.Row():
            table1 = gr.Markdown(elem_id="ex-table1")
            plot = gr.Image(label="Accuracy vs editability", type="filepath", interactive=False, elem_id="ex-plot")
        table2 = gr.Markdown(elem_id="ex-table2")

    def do_experiment(path_v, replace_v=False, progress=gr.Progress()):
        from studio.evaluate.experiment import ExperimentChangedError, ExperimentRunner, load_experiment

        if not path_v:
            raise gr.Error("choose an experiment file")
        log: list[str] = []
        cancel.clear()
        try:
            exp = load_experiment(Path(path_v.strip()), state.cfg)
            runner = ExperimentRunner(state.cfg, progress_fn(progress, "cells"), log.append, cancel)
            result = runner.run(exp, replace=bool(replace_v))
        except ExperimentChangedError as e:
            raise gr.Error(f"Nothing was run: {e}. Tick '{REPLACE_EXPERIMENT_LABEL}' to redo them.") from e
        except (ValueError, RuntimeError, OSError) as e:
            raise gr.Error(str(e)) from e
        done = sum(c.status == "done" for c in result.cells)
        status = (f"{'Stopped' if result.stopped else 'Finished'}: {done} cell(s) run, {result.skipped} finished "
                  f"before; results in `{result.out_dir}`")
        files = result.files

        def read(name: str) -> str:
            return files[name].read_text(encoding="utf-8") if name in files else ""

        plot_path = str(files["plot.png"]) if "plot.png" in files else None
        return "\n\n".join([status, *log[-20:]]), read("table1.md"), plot_path, read("table2.md"), False

    exp_run.click(do_experiment, [exp_file, exp_replace], [exp_status, table1, plot, table2, exp_replace],
                  concurrency_id="gpu",
                  show_progress_on=exp_status,
                  concurrency_limit=1, api_visibility="private")
    exp_stop.click(lambda: cancel.set(), None, None, **stop_kwargs)
    exp_refresh.click(lambda: gr.update(choices=experiment_files(state)), None, exp_file, api_visibility="private")

    # --- 3. the A/B survey ---
    from studio.evaluate import survey as sv
    from studio.ui.survey_page import surveys_dir

    with gr.Accordion("A/B survey: which image do viewers prefer?", open=False, elem_id="sv-accordion"):
        gr.Markdown("Pairs of a baseline and a fine-tuned image (same prompt and seed) are shown to respondents in "
                    "random order and random A/B placement, with three questions. Respondents open the survey page "
                    "(start the studio with `--listen` so that others on your network can reach it); answers are "
                    "kept per respondent under `outputs/surveys/NAME/answers/`.")
        with gr.Row():
            sv_name = gr.Textbox(label="Survey name", elem_id="sv-build-name")
            sv_title = gr.Textbox(label="Title shown to respondents", elem_id="sv-build-title")
            sv_per = gr.Number(value=0, precision=0, label="Pairs per respondent (0 = all)",
                               info="seed 004's survey showed each respondent 36 pairs", elem_id="sv-build-per")
        sv_source = gr.Radio([("two folders", "folders"), ("an experiment", "experiment")], value="folders",
                             label="Pairs from", elem_id="sv-build-source")
        with gr.Row():
            sv_a = gr.Textbox(label="Baseline images folder — or experiment folder", elem_id="sv-build-a")
            sv_b = gr.Textbox(label="Fine-tuned images folder — or the experiment's baseline,candidate methods "
                                    "(e.g. pe,lora)", elem_id="sv-build-b")
            sv_category = gr.Textbox(label="Category (shot type or style; folders only)", elem_id="sv-build-category")
        with gr.Row():
            sv_replace = gr.Checkbox(False, label=REPLACE_SURVEY_LABEL, elem_id="sv-build-replace")
            sv_build = gr.Button("Build survey", elem_id="sv-build-btn")
        sv_built = gr.Markdown(elem_id="sv-built")
        with gr.Row():
            sv_pick = gr.Dropdown(sv.list_surveys(surveys_dir(state)), label="Survey", scale=4, elem_id="sv-pick")
            sv_refresh = gr.Button("↻", scale=0, min_width=40)
            sv_report_btn = gr.Button("Report", elem_id="sv-report-btn")
        sv_report = gr.Markdown(elem_id="sv-report")

    def link(name: str) -> str:
        url = f"/survey?survey={quote(name)}"  # survey names may hold spaces and brackets
        return f"[{url}]({url})"

    def do_build(name_v, title_v, per_v, source_v, a_v, b_v, category_v, replace_v=False):
        try:
            if source_v == "experiment":
                methods = [m.strip() for m in (b_v or "").split(",") if m.strip()]
                if len(methods) != 2:
                    raise ValueError("for an experiment give the baseline and candidate methods, e.g. pe,lora")
                pairs = sv.experiment_pairs(Path((a_v or "").strip()).expanduser(), *methods)
                unmatched = []
            else:
                pairs, unmatched = sv.match_pairs(Path((a_v or "").strip()), Path((b_v or "").strip()),
                                                  (category_v or "").strip())
            folder = sv.create_survey(surveys_dir(state), (name_v or "").strip(), pairs, (title_v or "").strip(),
                                      int(per_v or 0), replace=bool(replace_v))
        except sv.SurveyExistsError as e:
            raise gr.Error(f"Nothing was built: {e}. Type another name, or tick '{REPLACE_SURVEY_LABEL}'.") from e
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from e
        note = f"; {len(unmatched)} image(s) without a partner: {', '.join(unmatched[:8])}" if unmatched else ""
        return (f"Built **{folder.name}** with {len(pairs)} pairs{note}. Respondents open {link(folder.name)}",
                gr.update(choices=sv.list_surveys(surveys_dir(state)), value=folder.name), False)

    def do_report(name_v):
        if not name_v:
            raise gr.Error("choose a survey")
        try:
            survey = sv.open_survey(surveys_dir(state), name_v)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return sv.report_markdown(survey.report()) + f"\nSurvey page: {link(name_v)}\n"

    sv_build.click(do_build, [sv_name, sv_title, sv_per, sv_source, sv_a, sv_b, sv_category, sv_replace],
                   [sv_built, sv_pick, sv_replace], api_visibility="private")
    sv_report_btn.click(do_report, sv_pick, sv_report, api_visibility="private")
    sv_refresh.click(lambda: gr.update(choices=sv.list_surveys(surveys_dir(state))), None, sv_pick,
                     api_visibility="private")

    def lists():
        """Experiment files and surveys, read again (on page load)."""
        return gr.update(choices=experiment_files(state)), gr.update(choices=sv.list_surveys(surveys_dir(state)))

    return {"lists": lists, "list_outputs": [exp_file, sv_pick]}
