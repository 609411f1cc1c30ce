"""The blind A/B survey against its respondents: ids and tokens issued by the server, A/B placement drawn by the
server, nothing written before a first answer, limits per survey and per client address, images handed to the page
as pixels only (no survey file reachable through the file route), no filesystem paths in messages, survey names
checked like every other name."""

from __future__ import annotations

import json
import socket
import types
from pathlib import Path

import gradio as gr
import pytest
import requests
from PIL import Image

from studio.evaluate import survey as sv
from studio.files.names import UnsafeNameError
from studio.generation.infotext import png_info
from studio.ui import survey_page as page

RED, BLUE = (220, 20, 20), (20, 20, 220)
ALL_A = {"like": "A", "style": "A", "prompt": "A"}


def picture(path: Path, color, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, pnginfo=png_info(text))
    return path


def build(root: Path, n: int = 4, name: str = "shots", **limits) -> sv.Survey:
    """A survey in root/surveys/NAME whose fine-tuned images carry a LoRA tag in their parameters."""
    pairs = []
    for i in range(n):
        params = f"\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: {i}, Size: 16x16"
        b = picture(root / "src" / "base" / f"{i}.png", RED, f"a room {i}{params}")
        c = picture(root / "src" / "lora" / f"{i}.png", BLUE, f"a room {i} <lora:close-shot:1>{params}")
        pairs.append(sv.PairSource(b, c, f"a room {i}", "close shot", i))
    return sv.Survey(sv.create_survey(root / "surveys", name, pairs, "Shots", **limits))


def app_state(root: Path):
    """What the page reads of the AppState: outputs/ is `root` (so surveys are root/surveys)."""
    return types.SimpleNamespace(cfg=types.SimpleNamespace(outputs_dir=root))


def req(host: str = "10.0.0.1", survey: str = "shots"):
    """What the page reads of a gr.Request: the query string and the client's address."""
    return types.SimpleNamespace(query_params={"survey": survey}, client=types.SimpleNamespace(host=host))


# outputs of load_page / next_page: title, status, body, A, B, info, 3 radios, current (server state), stored
STATUS, IMAGE_A, IMAGE_B, CURRENT, STORED = 1, 3, 4, 9, 10


def answer_files(survey: sv.Survey) -> list[Path]:
    return sorted((survey.folder / "answers").glob("*.json"))


# 1. respondent ids and tokens


def test_ids_are_issued_by_the_server_and_only_the_token_resumes_a_record(tmp_path):
    survey = build(tmp_path)
    record, token = survey.start("00000000")  # a respondent choosing its own id gets a new, random one
    rid = record["respondent"]
    assert rid != "00000000" and len(rid) >= 16 and token.startswith(f"{rid}.") and len(token) > 50
    survey.answer(token, record["order"][0], ALL_A)
    on_disk = answer_files(survey)[0].read_text()
    assert answer_files(survey)[0].stem == rid and token.split(".")[1] not in on_disk  # only the secret's hash
    assert json.loads(on_disk)["token_sha256"]
    assert survey.start(token)[0]["respondent"] == rid  # the token resumes it
    # knowing the id (a file name) or guessing a secret gives a new respondent, never this record
    for forged in (rid, f"{rid}.{'A' * 43}", f"{rid}.{token.split('.')[1][:-1]}B", token + " ", None, 42):
        other, other_token = survey.start(forged)
        assert other["respondent"] != rid and other["answers"] == {} and other_token != token
        with pytest.raises(ValueError, match="unknown"):
            survey.answer(forged, record["order"][1], ALL_A)
    # an id that was never issued is refused, however well formed its token
    with pytest.raises(ValueError, match="unknown"):
        survey.answer(f"{'x' * 16}.{'y' * 43}", record["order"][1], ALL_A)
    assert [p.stem for p in answer_files(survey)] == [rid]


def test_the_page_keeps_only_a_server_issued_token_in_the_browser(tmp_path):
    survey = build(tmp_path)
    state = app_state(tmp_path)
    out = page.load_page(state, {"shots": "00000000"}, req())
    token = out[STORED]["shots"]
    assert token != "00000000" and out[CURRENT]["token"] == token and "respondent" not in out[CURRENT]
    out = page.next_page(state, out[CURRENT], out[STORED], "A", "B", "neither")
    (rid,) = [p.stem for p in answer_files(survey)]
    assert out[STATUS] == "Pair 2 of 4" and token.startswith(f"{rid}.")
    # a reload with the stored token continues; another browser that only knows the id does not
    assert page.load_page(state, {"shots": token}, req())[STATUS] == "Pair 2 of 4"
    forged = page.load_page(state, {"shots": rid}, req("10.0.0.9"))
    assert forged[STATUS] == "Pair 1 of 4" and forged[STORED]["shots"] != token
    assert page.load_page(state, "not a dict", req())[STATUS] == "Pair 1 of 4"


# 2. placement drawn by the server


def test_order_and_placement_are_drawn_by_the_server_at_issue_and_kept(tmp_path, monkeypatch):
    survey = build(tmp_path, n=8)
    drawn = []

    class Recorded(sv.random.SystemRandom):
        def __init__(self, *args):
            drawn.append(args)
            super().__init__(*args)

    def seeded(*_):
        raise AssertionError("a seeded random.Random would let a respondent predict the draw")

    monkeypatch.setattr(sv.random, "SystemRandom", Recorded)
    monkeypatch.setattr(sv.random, "Random", seeded)
    (first, t1), (second, _) = survey.start("0000aaaa"), survey.start("0000aaaa")  # the same client value twice
    assert drawn == [(), ()]  # the system's random source, with nothing from the client
    assert first["order"] != second["order"]  # equal by chance: p = 1/40320
    survey.answer(t1, first["order"][0], ALL_A)
    stored = json.loads(answer_files(survey)[0].read_text())
    assert stored["order"] == first["order"] and stored["placement"] == first["placement"]
    assert stored["answers"][first["order"][0]]["a"] == first["placement"][first["order"][0]]
    assert survey.start(t1)[0]["placement"] == first["placement"]


# 3. nothing written before a first answer


def test_bare_page_loads_write_nothing_and_a_first_answer_writes_one_file(tmp_path):
    survey = build(tmp_path)
    state = app_state(tmp_path)
    outs = [page.load_page(state, {}, req()) for _ in range(20)]
    assert all(o[STATUS] == "Pair 1 of 4" for o in outs)
    assert answer_files(survey) == [] and sorted(p.name for p in survey.folder.iterdir()) == [
        "answers", "images", "survey.json"]
    page.next_page(state, outs[0][CURRENT], outs[0][STORED], "A", "A", "A")
    assert len(answer_files(survey)) == 1


# 4. limits


def test_limits_have_named_defaults_stored_in_the_survey(tmp_path, monkeypatch):
    survey = build(tmp_path)
    assert (sv.MAX_RESPONDENTS, sv.MAX_NEW_PER_CLIENT_HOUR) == (500, 20)
    assert survey.data["max_respondents"] == 500 and survey.data["max_new_per_client_hour"] == 20
    assert (survey.max_respondents, survey.max_new_per_client_hour) == (500, 20)
    monkeypatch.setattr(sv, "MAX_RESPONDENTS", 7)  # a caller's own default
    assert build(tmp_path / "own").data["max_respondents"] == 7
    del survey.data["max_respondents"]  # a survey from before the setting: the module's default
    assert survey.max_respondents == 7
    with pytest.raises(ValueError, match="max respondents must be a whole number of at least 1"):
        build(tmp_path / "x", max_respondents=0)


def test_new_respondents_per_client_address_per_hour(tmp_path, monkeypatch):
    build(tmp_path, max_new_per_client_hour=3)
    state = app_state(tmp_path)
    now = [1000.0]
    monkeypatch.setattr(sv, "_clock", lambda: now[0])
    first = page.load_page(state, {}, req("10.0.0.1"))
    for _ in range(5):  # reloads with the stored token continue that respondent and issue no new one
        assert page.load_page(state, first[STORED], req("10.0.0.1"))[CURRENT] == first[CURRENT]
    for _ in range(2):
        assert page.load_page(state, {}, req("10.0.0.1"))[STATUS] == "Pair 1 of 4"
    refused = page.load_page(state, {}, req("10.0.0.1"))
    assert "too many new respondents from your address in the last hour (3)" in refused[STATUS]
    assert refused[CURRENT] is None and refused[IMAGE_A] is None
    assert page.load_page(state, {}, req("10.0.0.2"))[STATUS] == "Pair 1 of 4"  # another address
    assert page.load_page(state, first[STORED], req("10.0.0.1"))[STATUS] == "Pair 1 of 4"  # still resumes
    # one IPv6 /64 is one client
    for host in ("2001:db8::1", "2001:db8::2", "2001:db8::3"):
        assert page.load_page(state, {}, req(host))[STATUS] == "Pair 1 of 4"
    assert "too many" in page.load_page(state, {}, req("2001:db8::ffff"))[STATUS]
    assert page.load_page(state, {}, req("2001:db8:0:1::1"))[STATUS] == "Pair 1 of 4"
    now[0] += 3601  # an hour later
    assert page.load_page(state, {}, req("10.0.0.1"))[STATUS] == "Pair 1 of 4"


def test_respondents_per_survey(tmp_path, monkeypatch):
    survey = build(tmp_path, max_respondents=2)
    now = [1000.0]
    monkeypatch.setattr(sv, "_clock", lambda: now[0])
    (r1, t1), _ = survey.start(client="10.0.0.1"), survey.start(client="10.0.0.2")
    with pytest.raises(ValueError, match=r"this survey has all the respondents it takes \(2\)"):
        survey.start(client="10.0.0.3")
    refused = page.load_page(app_state(tmp_path), {}, req("10.0.0.3"))
    assert "all the respondents it takes (2)" in refused[STATUS]
    survey.answer(t1, r1["order"][0], ALL_A)
    now[0] += sv.PENDING_TTL_S + 1  # the one that never answered is forgotten; the answered one still counts
    survey.start(client="10.0.0.3")
    with pytest.raises(ValueError, match="all the respondents"):
        survey.start(client="10.0.0.4")
    assert survey.start(t1)[0]["respondent"] == r1["respondent"]  # existing respondents continue


# 5. images: pixels only, never the survey folder


def test_images_reach_the_page_as_pixels_without_parameters(tmp_path):
    survey = build(tmp_path)
    for image in (survey.folder / "images").iterdir():  # the copies lost the LoRA tag of their parameters
        assert b"lora" not in image.read_bytes() and "parameters" not in Image.open(image).info
    out = page.load_page(app_state(tmp_path), {}, req())
    component = gr.Image(type="pil", format="png")
    colors = set()
    for value in (out[IMAGE_A], out[IMAGE_B]):
        assert isinstance(value, Image.Image) and value.info == {}  # not a path into the survey folder
        served = Path(component.postprocess(value).path)  # where Gradio puts what the browser fetches
        assert survey.folder.resolve() not in served.resolve().parents and b"lora" not in served.read_bytes()
        colors.add(Image.open(served).convert("RGB").getpixel((0, 0)))
    assert colors == {RED, BLUE}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(url, home) of app.py's create_app and launch options, served on a loopback port in this process."""
    import app as app_module

    home = tmp_path_factory.mktemp("survey-home")
    (home / "outputs").mkdir()
    Image.new("RGB", (8, 8), "red").save(home / "outputs" / "shown.png")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = app_module.parse_args(["--port", str(port), "--home", str(home), "--model", "demo-tiny"])
    network, _ = app_module.network_options(args)
    demo, launch, state = app_module.create_app(args, network)
    demo.launch(**launch, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", home
    finally:
        state.trainer.stop()
        demo.close()


def test_the_launched_app_serves_no_survey_file(launched):
    url, home = launched
    survey = build(home / "outputs", name="s1")
    record, token = survey.start()
    survey.answer(token, record["order"][0], ALL_A)

    def get(path):
        return requests.get(f"{url}/gradio_api/file={path}", timeout=30).status_code

    assert get(home / "outputs" / "shown.png") == 200
    files = [survey.folder / "survey.json", *answer_files(survey), *(survey.folder / "images").iterdir()]
    assert len(files) == 2 + 2 * 4
    for path in files:
        assert get(path) == 403, path
        assert get(str(path).replace("/surveys/", "/Surveys/")) == 403, path


# 6. no filesystem paths in messages


def test_messages_to_respondents_hold_no_filesystem_paths(tmp_path, monkeypatch):
    survey = build(tmp_path)
    state = app_state(tmp_path)
    out = page.load_page(state, {}, req())
    (survey.folder / "survey.json").write_text("{broken")
    with pytest.raises(ValueError) as e:
        sv.Survey(survey.folder)
    assert str(tmp_path) not in str(e.value)
    broken = page.load_page(state, {}, req())[STATUS]
    assert "cannot be read" in broken and str(tmp_path) not in broken and "/" not in broken
    build(tmp_path / "again")
    state = app_state(tmp_path / "again")
    out = page.load_page(state, {}, req())

    def denied(path, *_a, **_k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sv, "write_text", denied)
    with pytest.raises(gr.Error) as e:
        page.next_page(state, out[CURRENT], out[STORED], "A", "A", "A")
    assert "Permission denied" in str(e.value) and str(tmp_path) not in str(e.value) and "/tmp" not in str(e.value)
    text = page._message(state, "at '/srv/my studio/outputs/x.json', C:\\studio\\x and /etc/passwd; A/B or neither")
    assert text == "at <path>, <path> and <path> A/B or neither"


# 7. survey names


def test_survey_names_are_checked_like_every_other_name(tmp_path):
    pair = [sv.PairSource(picture(tmp_path / "a.png", RED, "x"), picture(tmp_path / "b.png", BLUE, "x"), "p", "c")]
    for bad in ("../up", "a/b", ".hidden", "CON", "x" * 101, "tab\there"):
        with pytest.raises(UnsafeNameError, match="survey name"):
            sv.create_survey(tmp_path / "surveys", bad, pair)
    assert sv.create_survey(tmp_path / "surveys", "close shots (v2)", pair).name == "close shots (v2)"
    assert sv.open_survey(tmp_path / "surveys", "close shots (v2)").name == "close shots (v2)"
