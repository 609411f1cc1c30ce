"""The A/B survey engine: pairing images, blind placement per respondent, answers kept per respondent and the
report's percentages (overall and per category)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from studio.evaluate import survey as sv
from studio.generation.infotext import png_info

RED, BLUE = (220, 20, 20), (20, 20, 220)


def folder(path: Path, color, names, seeds=None, prompt="a man in a room", lora="") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        seed = seeds[i] if seeds else i
        text = f"{prompt}{lora}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: {seed}, Size: 32x32"
        Image.new("RGB", (32, 32), color).save(path / name, pnginfo=png_info(text))
    return path


def test_pairs_by_file_name_else_by_seed_and_prompt(tmp_path):
    base = folder(tmp_path / "base", RED, ["a.png", "b.png", "x.png"], seeds=[1, 2, 9])
    cand = folder(tmp_path / "cand", BLUE, ["a.png", "other.png", "y.png"], seeds=[1, 2, 7],
                  lora=" <lora:close-shot:0.8>")
    pairs, unmatched = sv.match_pairs(base, cand, "close shot")
    assert [(p.baseline.name, p.candidate.name) for p in pairs] == [("a.png", "a.png"), ("b.png", "other.png")]
    assert pairs[1].prompt == "a man in a room" and pairs[1].seed == 2 and pairs[1].category == "close shot"
    assert sorted(unmatched) == ["x.png", "y.png"]


def make_survey(tmp_path, n=4, per_respondent=0) -> sv.Survey:
    pairs = []
    for i in range(n):
        category = "close shot" if i % 2 == 0 else "long shot"
        b = folder(tmp_path / f"b{i}", RED, [f"{i}.png"])
        c = folder(tmp_path / f"c{i}", BLUE, [f"{i}.png"])
        pairs.append(sv.PairSource(b / f"{i}.png", c / f"{i}.png", f"prompt {i}", category, i))
    return sv.Survey(sv.create_survey(tmp_path / "surveys", "shots", pairs, "Shots", per_respondent))


def is_red(path: Path) -> bool:
    return Image.open(path).convert("RGB").getpixel((0, 0)) == RED


def test_images_are_blind_and_placement_is_random_per_respondent(tmp_path):
    survey = make_survey(tmp_path, n=8)
    names = {p.name for p in (survey.folder / "images").iterdir()}
    assert len(names) == 16 and not any("base" in n or "cand" in n for n in names)
    (first, token), (second, _) = survey.start(), survey.start()
    assert first["respondent"] != second["respondent"]  # new respondents get random ids
    assert sorted(first["order"]) == sorted(survey.pairs) and first["order"] != second["order"]
    placements = [*first["placement"].values(), *second["placement"].values()]
    assert set(placements) == {"baseline", "candidate"}  # both placements occur (all 16 alike: p = 2^-15)
    for pair_id, role in first["placement"].items():  # A shows the baseline exactly when placement says so
        assert is_red(survey.image(pair_id, "A", first)) == (role == "baseline")
        assert is_red(survey.image(pair_id, "B", first)) == (role != "baseline")
        assert (survey.picture(pair_id, "A", first).getpixel((0, 0)) == RED) == (role == "baseline")
    # the same respondent continues where it was
    assert survey.start(token)[0]["order"] == first["order"]
    assert len(make_survey(tmp_path / "sub", n=8, per_respondent=3).start()[0]["order"]) == 3


def test_answers_are_kept_per_respondent_and_the_report_counts_them(tmp_path):
    survey = make_survey(tmp_path, n=4)
    (r1, t1), (r2, t2) = survey.start(), survey.start()
    expected = {q: {"baseline": 0, "candidate": 0, "neither": 0} for q in ("like", "style", "prompt")}
    per_cat = {}
    for record, token in ((r1, t1), (r2, t2)):
        for pair_id in record["order"]:
            a_is_candidate = record["placement"][pair_id] == "candidate"
            answers = {"like": "A" if a_is_candidate else "B",  # always the candidate
                       "style": "A",  # whatever A is
                       "prompt": "neither"}
            survey.answer(token, pair_id, answers)
            expected["like"]["candidate"] += 1
            expected["style"]["candidate" if a_is_candidate else "baseline"] += 1
            expected["prompt"]["neither"] += 1
            cat = survey.pairs[pair_id]["category"]
            per_cat.setdefault(cat, 0)
            per_cat[cat] += 1
    stored = json.loads((survey.folder / "answers" / f"{r1['respondent']}.json").read_text())
    assert len(stored["answers"]) == 4 and survey.next_pair(stored) is None
    report = survey.report()
    assert report["respondents"] == 2 and report["pairs"] == 4
    for q, counts in expected.items():
        row = report["overall"][q]
        assert row["answers"] == 8
        assert {o: row[o] for o in sv.OUTCOMES} == counts
        assert row["candidate_pct"] == pytest.approx(100 * counts["candidate"] / 8)
    assert report["overall"]["like"]["candidate_pct"] == 100.0
    assert report["overall"]["prompt"]["neither_pct"] == 100.0
    assert {c: t["like"]["answers"] for c, t in report["per_category"].items()} == per_cat
    text = sv.report_markdown(report)
    assert "| Which picture do you like most? | 0.00 | 100.00 | 0.00 | 8 |" in text and "**long shot**" in text


def test_bad_answers_and_ids_are_refused(tmp_path):
    survey = make_survey(tmp_path, n=2)
    record, token = survey.start()
    pair = record["order"][0]
    with pytest.raises(ValueError, match="missing: prompt"):
        survey.answer(token, pair, {"like": "A", "style": "B"})
    with pytest.raises(ValueError, match="unknown respondent"):
        survey.answer("../../etc", pair, {"like": "A", "style": "B", "prompt": "A"})
    with pytest.raises(ValueError, match="not one of this respondent's pairs"):
        survey.answer(token, "p999", {"like": "A", "style": "B", "prompt": "A"})
    with pytest.raises(ValueError, match="no survey named"):
        sv.open_survey(tmp_path / "surveys", "../shots")
    with pytest.raises(ValueError, match="already exists"):
        sv.create_survey(tmp_path / "surveys", "shots", [sv.PairSource(Path("a"), Path("b"), "p", "c")])
