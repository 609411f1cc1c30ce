"""The Gradio UI: one module per tab, each only wiring widgets to engine functions. Top layer, beside cli/:
it may import every engine package, and no engine package imports it (the engine never imports Gradio)."""

from __future__ import annotations

import gradio as gr

from studio.models.checkpoints import ModelLoadError
from studio.ui import (
    dataset_tab,
    evaluate_tab,
    explorer_tab,
    generate_tab,
    models_tab,
    storyboard_tab,
    survey_page,
    train_tab,
)
from studio.ui.state import AppState


def banner_text(state: AppState) -> str:
    model = state.manager.current
    if model is None:
        return "No model is loaded."
    if model.is_demo:
        return "⚠ " + generate_tab.DEMO_BANNER.format(models=state.cfg.models_dir)
    pred = " · v-prediction" if model.prediction_type == "v_prediction" else ""
    return f"Loaded **{model.name}** ({model.family_info.label}{pred}, {model.native_size} px native)"


def build_ui(state: AppState) -> gr.Blocks:
    current = state.manager.current.name if state.manager.current else None
    with gr.Blocks(title="Studio") as demo:
        with gr.Row(equal_height=True):
            model_dd = gr.Dropdown(state.manager.choices(), value=current, label="Model", scale=4,
                                   elem_id="model")
            refresh_btn = gr.Button("↻", scale=0, min_width=40)
        banner = gr.Markdown(banner_text(state), elem_id="model-banner")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                gen = generate_tab.build(state, model_dd)
            with gr.Tab("Explorer", id="explorer"):
                explorer_tab.build(state, gen, tabs)
            with gr.Tab("Storyboard", id="storyboard"):
                board = storyboard_tab.build(state, gen, tabs)
            with gr.Tab("Models", id="models"):
                models_tab.build(state, model_dd)
            with gr.Tab("Dataset", id="dataset"):
                dataset = dataset_tab.build(state)
            with gr.Tab("Train", id="train") as train_page:
                train = train_tab.build(state, model_dd, gen["networks_refresh"], gen["networks_outputs"])
            with gr.Tab("Evaluate", id="evaluate"):
                evaluate = evaluate_tab.build(state)

        def load(spec, progress=gr.Progress(track_tqdm=True)):
            progress(0, desc=f"loading {spec}")
            try:
                model = state.manager.load(spec)
            except (ValueError, ModelLoadError) as e:
                raise gr.Error(str(e)) from e
            size = model.native_size
            return (banner_text(state), gr.update(value=size), gr.update(value=size),
                    *gen["networks_refresh"](), *train["on_model_loaded"](), *dataset["on_model_loaded"]())

        model_dd.input(load, model_dd, [banner, gen["width"], gen["height"], *gen["networks_outputs"],
                                        *train["model_outputs"], *dataset["model_outputs"]],
                       concurrency_id="gpu", concurrency_limit=1, api_name="load_model", show_progress_on=banner)
        # cards are read when the page opens, so files added while the studio runs show up on reload
        demo.load(gen["networks_refresh"], None, gen["networks_outputs"], api_visibility="private")
        # a training run outlives the page: a reload shows it again (and polls it while it runs)
        demo.load(train["on_page_load"], None, train["page_outputs"], api_visibility="private")
        # every list that names files is read when the page opens: what was made since start-up can be picked
        demo.load(lambda: gr.update(choices=state.manager.choices()), None, model_dd, api_visibility="private")
        for tab in (board, evaluate, train):
            demo.load(tab["lists"], None, tab["list_outputs"], api_visibility="private")
        # datasets saved in the Dataset tab (and new runs) show up when the Train tab opens
        train_page.select(train["lists"], None, train["list_outputs"], api_visibility="private")
        refresh_btn.click(lambda: gr.update(choices=state.manager.choices()), None, model_dd,
                          api_visibility="private")
    # the A/B survey's own page, for respondents who do not run the studio (not in the navbar)
    with demo.route("Survey", "/survey", show_in_navbar=False):
        survey_page.build(state, demo)
    return demo


def startup_model(state: AppState, requested: str | None) -> str:
    """The model to open with: the one asked for, else the first in models/, else micro, else demo-tiny."""
    return requested or state.manager.default_choice()
