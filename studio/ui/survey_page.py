"""The survey page (/survey?survey=NAME): what respondents see, without the studio around it. Each respondent
gets the pairs in a random order with a random A/B placement and answers three questions per pair."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.evaluate.survey import Survey, list_surveys, open_survey
from studio.ui.state import AppState

CHOICES = [("A", "A"), ("B", "B"), ("Neither / same", "neither")]
# Gradio adds a navbar to every page once an app has a second page; neither page needs it (gr.Navbar(visible=False)
# does not hide it in Gradio 6.31), so app.py passes this to launch()
NAV_CSS = ".nav-holder { display: none !important; }"
INTRO = ("Each question shows two pictures, **A** and **B**, made from the same prompt. Answer the three "
         "questions with A, B or *neither / same* when you see no difference. There are no right answers.")


def surveys_dir(state: AppState) -> Path:
    return Path(state.cfg.outputs_dir) / "surveys"


def build(state: AppState, demo: gr.Blocks) -> None:
    """Lay out the page inside `demo.route(...)` and wire it."""
    title = gr.Markdown("# Survey", elem_id="sv-title")
    gr.Markdown(INTRO)
    stored = gr.BrowserState({}, storage_key="studio-survey")  # survey name -> respondent id (a reload continues)
    current = gr.State(None)  # {"survey", "respondent", "pair"}
    status = gr.Markdown(elem_id="sv-status")
    with gr.Column(visible=False) as body:
        with gr.Row(equal_height=True):
            image_a = gr.Image(label="A", type="filepath", interactive=False, elem_id="sv-a", height=420,
                               buttons=[])
            image_b = gr.Image(label="B", type="filepath", interactive=False, elem_id="sv-b", height=420,
                               buttons=[])
        info = gr.Markdown(elem_id="sv-info")
        radios = [gr.Radio(CHOICES, label=q, elem_id=f"sv-{q}") for q in ("like", "style", "prompt")]
        next_btn = gr.Button("Next", variant="primary", elem_id="sv-next")

    def show(survey: Survey, record: dict, stored_v: dict):
        """Outputs for the respondent's next unanswered pair, or the thank-you screen."""
        cur = {"survey": survey.name, "respondent": record["respondent"], "pair": survey.next_pair(record)}
        stored_v = {**(stored_v or {}), survey.name: record["respondent"]}
        head = gr.update(value=f"# {survey.title}")
        answered, total = len(record["answers"]), len(record["order"])
        if cur["pair"] is None:
            return (head, f"**Thank you!** All {total} pairs are answered; you can close this page.",
                    gr.update(visible=False), None, None, "", *[gr.update(value=None)] * 3, cur, stored_v)
        pair = survey.pairs[cur["pair"]]
        questions = survey.question_text(cur["pair"])
        text = f"**Prompt:** {pair['prompt']}" + (f"  \n**Shot type / style:** {pair['category']}"
                                                   if pair.get("category") else "")
        return (head, f"Pair {answered + 1} of {total}", gr.update(visible=True),
                str(survey.image(cur["pair"], "A", record)), str(survey.image(cur["pair"], "B", record)), text,
                *[gr.update(value=None, label=t) for _, t in questions], cur, stored_v)

    outputs = [title, status, body, image_a, image_b, info, *radios, current, stored]

    def on_load(stored_v, request: gr.Request):
        name = (dict(request.query_params).get("survey") if request is not None else None) or ""
        if not name:
            names = list_surveys(surveys_dir(state))
            name = names[0] if names else ""
        if not name:
            return (gr.update(), "There is no survey to answer yet.", gr.update(visible=False), None, None, "",
                    *[gr.update()] * 3, None, stored_v)
        try:
            survey = open_survey(surveys_dir(state), name)
        except ValueError as e:
            return (gr.update(), str(e), gr.update(visible=False), None, None, "", *[gr.update()] * 3, None,
                    stored_v)
        record = survey.start((stored_v or {}).get(name))
        return show(survey, record, stored_v)

    def on_next(cur, stored_v, like, style, prompt):
        if not cur or not cur.get("pair"):
            raise gr.Error("reload the page to start the survey")
        answers = {"like": like, "style": style, "prompt": prompt}
        if any(v is None for v in answers.values()):
            raise gr.Error("please answer all three questions (A, B or neither)")
        survey = open_survey(surveys_dir(state), cur["survey"])
        try:
            record = survey.answer(cur["respondent"], cur["pair"], answers)
        except ValueError as e:
            raise gr.Error(str(e)) from e
        return show(survey, record, stored_v)

    demo.load(on_load, [stored], outputs, api_visibility="private")
    next_btn.click(on_next, [current, stored, *radios], outputs, api_visibility="private")
