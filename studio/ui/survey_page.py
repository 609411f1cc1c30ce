"""The survey page (/survey?survey=NAME): what respondents see, without the studio around it. Each respondent
gets the pairs in a random order with a random A/B placement and answers three questions per pair.

The browser holds only an opaque token the server issued; images go out as pixels, never as survey-folder paths."""

from __future__ import annotations

import re
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
    # survey name -> the respondent's opaque token, issued by the server (a reload continues)
    stored = gr.BrowserState({}, storage_key="studio-survey")
    current = gr.State(None)  # on the server: {"survey", "token", "pair"}
    status = gr.Markdown(elem_id="sv-status")
    with gr.Column(visible=False) as body:
        with gr.Row(equal_height=True):
            # pixels handed over as PIL images: Gradio caches its own copy, the survey folder is never a URL
            image_a = gr.Image(label="A", type="pil", format="png", interactive=False, elem_id="sv-a", height=420,
                               buttons=[])
            image_b = gr.Image(label="B", type="pil", format="png", interactive=False, elem_id="sv-b", height=420,
                               buttons=[])
        info = gr.Markdown(elem_id="sv-info")
        radios = [gr.Radio(CHOICES, label=q, elem_id=f"sv-{q}") for q in ("like", "style", "prompt")]
        next_btn = gr.Button("Next", variant="primary", elem_id="sv-next")
    outputs = [title, status, body, image_a, image_b, info, *radios, current, stored]

    def on_load(stored_v, request: gr.Request):
        return load_page(state, stored_v, request)

    def on_next(cur, stored_v, like, style, prompt):
        return next_page(state, cur, stored_v, like, style, prompt)

    demo.load(on_load, [stored], outputs, api_visibility="private")
    next_btn.click(on_next, [current, stored, *radios], outputs, api_visibility="private")


def _stored(stored_v) -> dict:
    """The browser's {survey name: token}, whatever the browser sent."""
    if not isinstance(stored_v, dict):
        return {}
    return {k: v for k, v in stored_v.items() if isinstance(k, str) and isinstance(v, str)}


def _message(state: AppState, text: str) -> str:
    """`text` without filesystem paths: the studio's folders become relative names, any other path `<path>`."""
    for folder, shown in ((surveys_dir(state), "surveys"), (Path(state.cfg.outputs_dir), "outputs")):
        for form in {str(folder), str(Path(folder).resolve())}:
            text = text.replace(form, shown)
    return _PATH_RE.sub("<path>", text)


# a quoted absolute path (spaces allowed), else an unquoted one up to a space; POSIX or a Windows drive
_PATH_RE = re.compile(r"""(['"])(?:[A-Za-z]:[\\/]|/)[^'"]*\1|(?<![\w/.])(?:[A-Za-z]:[\\/]|/)[^\s'"`<>|]+""")


def _closed(state: AppState, text: str, stored_v) -> tuple:
    return (gr.update(), _message(state, text), gr.update(visible=False), None, None, "", *[gr.update()] * 3,
            None, stored_v)


def _show(survey: Survey, record: dict, token: str, stored_v: dict) -> tuple:
    """Outputs for the respondent's next unanswered pair, or the thank-you screen."""
    cur = {"survey": survey.name, "token": token, "pair": survey.next_pair(record)}
    stored_v = {**stored_v, survey.name: token}
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
            survey.picture(cur["pair"], "A", record), survey.picture(cur["pair"], "B", record), text,
            *[gr.update(value=None, label=t) for _, t in questions], cur, stored_v)


def load_page(state: AppState, stored_v, request) -> tuple:
    """The page load: the survey of ?survey=NAME (else the newest), resumed by the browser's token or a respondent
    newly issued to the client's address."""
    stored_v = _stored(stored_v)
    query = getattr(request, "query_params", None) or {}
    name = dict(query).get("survey") or ""
    if not name:
        names = list_surveys(surveys_dir(state))
        name = names[0] if names else ""
    if not name:
        return _closed(state, "There is no survey to answer yet.", stored_v)
    client = getattr(getattr(request, "client", None), "host", "") or ""
    try:
        survey = open_survey(surveys_dir(state), name)
        record, token = survey.start(stored_v.get(name), client=client)
        return _show(survey, record, token, stored_v)
    except (ValueError, OSError) as e:
        return _closed(state, str(e), stored_v)


def next_page(state: AppState, cur, stored_v, like, style, prompt) -> tuple:
    """Next: store this pair's answers for the respondent of this page (server-side state), show the next pair."""
    stored_v = _stored(stored_v)
    if not isinstance(cur, dict) or not cur.get("pair") or not cur.get("token"):
        raise gr.Error("reload the page to start the survey")
    answers = {"like": like, "style": style, "prompt": prompt}
    if any(v is None for v in answers.values()):
        raise gr.Error("please answer all three questions (A, B or neither)")
    try:
        survey = open_survey(surveys_dir(state), cur["survey"])
        record = survey.answer(cur["token"], cur["pair"], answers)
        return _show(survey, record, cur["token"], stored_v)
    except (ValueError, OSError) as e:
        raise gr.Error(_message(state, str(e))) from e
