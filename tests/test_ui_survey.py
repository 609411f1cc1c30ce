"""The A/B survey in the real app, in headless Chromium: build it in the Evaluate tab, answer it on its own page
(/survey) as a respondent, reload midway, then read the report; the counts must match what the page showed."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from studio.generation.infotext import png_info

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
RED, BLUE = (220, 20, 20), (20, 20, 220)
N_PAIRS = 3


@pytest.fixture(scope="module")
def app(shared_app):
    """`python app.py` with a throwaway home (conftest's shared_app; this module's survey is 'shots'); (url, home)."""
    return shared_app


def pictures(folder: Path, color, lora: str = "") -> Path:
    folder.mkdir(parents=True)
    for i in range(N_PAIRS):
        text = f"a man in a room {i}{lora}\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: {i}, Size: 64x64"
        Image.new("RGB", (64, 64), color).save(folder / f"{i:05d}-{i}.png", pnginfo=png_info(text))
    return folder


def shown_side(page, elem_id: str) -> str:
    """'baseline' (red) or 'candidate' (blue): what the browser really shows in #elem_id."""
    src = page.locator(f"#{elem_id} img").first.get_attribute("src")
    assert "/surveys/" not in src  # the page gets Gradio's copy of the pixels, never a survey file
    body = page.request.get(src).body()
    return "baseline" if Image.open(io.BytesIO(body)).convert("RGB").getpixel((5, 5)) == RED else "candidate"


def choose(page, question: str, answer: str) -> None:
    page.locator(f"#sv-{question}").get_by_text(answer, exact=True).click()


@pytest.mark.browser
def test_browser_survey_build_answer_report(app, tmp_path, browser):
    url, home = app
    base = pictures(tmp_path / "baseline", RED)
    cand = pictures(tmp_path / "lora", BLUE, lora=" <lora:close-shot:1>")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    expected = {q: {"baseline": 0, "candidate": 0, "neither": 0} for q in ("like", "style", "prompt")}
    # 1. the studio user builds the survey in the Evaluate tab
    studio = browser.new_page(viewport={"width": 1400, "height": 1000})
    studio.goto(url)
    studio.get_by_role("tab", name="Evaluate").click()
    studio.get_by_text("A/B survey: which image do viewers prefer?").click()
    studio.locator("#sv-build-name input, #sv-build-name textarea").first.fill("shots")
    studio.locator("#sv-build-title input, #sv-build-title textarea").first.fill("Close shots")
    studio.locator("#sv-build-a input, #sv-build-a textarea").first.fill(str(base))
    studio.locator("#sv-build-b input, #sv-build-b textarea").first.fill(str(cand))
    studio.locator("#sv-build-category input, #sv-build-category textarea").first.fill("close shot")
    studio.locator("#sv-build-btn").click()
    studio.wait_for_function("() => document.querySelector('#sv-built')?.innerText.includes('Built')",
                             timeout=60_000)
    built = studio.locator("#sv-built").inner_text()
    # 2. a respondent answers on the survey page: like = the fine-tuned one (wherever it is), style = A,
    # prompt = neither; the expected report comes from the colours the browser really showed
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(url.rstrip("/") + "/survey?survey=shots")
    statuses = []
    for k in range(N_PAIRS):
        page.wait_for_function(
            f"() => document.querySelector('#sv-status')?.innerText.includes('Pair {k + 1} of')", timeout=60_000)
        page.wait_for_function("() => document.querySelector('#sv-a img') && document.querySelector('#sv-b img')",
                               timeout=30_000)
        statuses.append(page.locator("#sv-status").inner_text())
        a, b = shown_side(page, "sv-a"), shown_side(page, "sv-b")
        assert {a, b} == {"baseline", "candidate"}
        assert "close shot" in page.locator("#sv-info").inner_text()
        if k == 0:
            page.screenshot(path=str(ARTIFACTS / "survey.png"), full_page=True)
        choose(page, "like", "A" if a == "candidate" else "B")
        choose(page, "style", "A")
        choose(page, "prompt", "Neither / same")
        expected["like"]["candidate"] += 1
        expected["style"][a] += 1
        expected["prompt"]["neither"] += 1
        page.locator("#sv-next").click()
        if k == 0:  # a reload continues with the same respondent at the next pair
            page.wait_for_function("() => document.querySelector('#sv-status')?.innerText.includes('Pair 2 of')",
                                   timeout=60_000)
            page.reload()
    page.wait_for_function("() => document.querySelector('#sv-status')?.innerText.includes('Thank you')",
                           timeout=60_000)
    # 3. the studio user reads the report
    studio.locator("#sv-report-btn").click()
    studio.wait_for_function("() => document.querySelector('#sv-report')?.innerText.includes('respondent')",
                             timeout=60_000)
    report_text = studio.locator("#sv-report").inner_text()
    studio.screenshot(path=str(ARTIFACTS / "survey_report.png"), full_page=True)

    assert f"with {N_PAIRS} pairs" in built and "/survey?survey=shots" in built
    assert statuses == [f"Pair {k + 1} of {N_PAIRS}" for k in range(N_PAIRS)]
    answers = list((home / "outputs" / "surveys" / "shots" / "answers").glob("*.json"))
    assert len(answers) == 1  # one respondent, also across the reload
    record = json.loads(answers[0].read_text())
    assert len(record["answers"]) == N_PAIRS
    from studio.evaluate.survey import open_survey

    report = open_survey(home / "outputs" / "surveys", "shots").report()
    assert report["respondents"] == 1
    for q, counts in expected.items():
        assert {o: report["overall"][q][o] for o in counts} == counts
    style_pct = 100 * expected["style"]["baseline"] / N_PAIRS
    assert "1 respondent(s), 3 pairs" in report_text
    assert "Which picture do you like most?\t0.00\t100.00\t0.00\t3" in report_text  # table cells: tabs
    assert f"{style_pct:.2f}" in report_text
