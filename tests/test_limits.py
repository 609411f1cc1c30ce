"""Numbers are never silently changed (whole numbers, real numbers, text: refused with the field named), and what
one request may cost is bounded before any model work (Limits: prompt characters, BREAKs, nesting, 75-token chunks,
work, grid cells, storyboard candidates), each limit raised by STUDIO_LIMIT_<NAME> or app.py --limit."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest

from studio.config import (
    LimitExceeded,
    Limits,
    StudioConfig,
    number_from_text,
    parse_limit_overrides,
    real_number,
    text,
    whole_number,
)
from studio.explorer.grid import AxisSpec, GridJob, GridRunner, plan_grid
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.generation.prompt_schedule import prompt_schedule
from studio.generation.prompt_syntax import BREAK, extract_network_tags, nesting_depth, parse_attention
from studio.models.manager import ModelManager
from studio.storyboard.board import BoardSettings, Shot, Storyboard, StoryboardStore, shots_from_csv
from studio.storyboard.runner import StoryboardRunner
from studio.train.job import TrainJob

MB_PROMPT = "a red circle, " * 75000  # 1,050,000 characters: the probe that held the GPU lane for 72 s
LONG_PROMPT = "a red circle, " * 800  # 11,200 characters (under the character limit), 44 chunks


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A demo-tiny generator whose text encoder and UNet count their forward passes."""
    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    pipe = manager.current.pipe
    calls = {"text_encoder": 0, "unet": 0}

    def counter(name):
        def hook(module, args):
            calls[name] += 1
        return hook

    handles = [pipe.text_encoder.register_forward_pre_hook(counter("text_encoder")),
               pipe.unet.register_forward_pre_hook(counter("unet"))]
    yield Generator(manager), cfg, calls
    for h in handles:
        h.remove()


def job(**kw) -> GenerateJob:
    return GenerateJob(**{"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 1,
                          "sampler": "Euler", "schedule": "Automatic", **kw})


def refused_without_model_work(calls: dict, run, match: str, seconds: float = 2.0) -> LimitExceeded | ValueError:
    """Run `run`, expect a ValueError matching `match`, fast, with no text-encoder or UNet pass."""
    before = dict(calls)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as e:
        run()
    assert time.perf_counter() - start < seconds
    assert calls == before, "the text encoder or UNet ran before the refusal"
    return e.value


# --- the helpers ----------------------------------------------------------------------------------------------


def test_whole_number_takes_ints_and_whole_floats_and_refuses_the_rest():
    assert whole_number("steps", 20) == 20
    value = whole_number("steps", 20.0)  # a Gradio slider's 20.0 is 20
    assert value == 20 and isinstance(value, int)
    for bad, shown in ((2.7, "2.7"), (math.nan, "NaN"), (math.inf, "inf"), (True, "True"), ("20", "'20'"),
                       (None, "None"), ([20], r"\[20\]")):
        with pytest.raises(ValueError, match=f"^steps must be a whole number, got {shown}$"):
            whole_number("steps", bad)
    with pytest.raises(ValueError, match="steps must be between 1 and 150, got 151"):
        whole_number("steps", 151, 1, 150)
    with pytest.raises(ValueError, match="seed must be -1 or more, got -2"):
        whole_number("seed", -2, -1)


def test_real_number_and_text_refuse_what_is_not_one():
    assert real_number("CFG scale", 7) == 7.0 and real_number("CFG scale", 6.5, 0, 30) == 6.5
    for bad, shown in ((math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "-inf"), (False, "False"),
                       (None, "None"), ("7", "'7'"), (10**400, "1000")):
        with pytest.raises(ValueError, match=f"^CFG scale must be a number, got {shown}"):
            real_number("CFG scale", bad)
    with pytest.raises(ValueError, match="CFG scale must be between 0 and 30, got 31"):
        real_number("CFG scale", 31, 0, 30)
    assert text("prompt", "") == ""
    for bad in (None, 5, b"x"):
        with pytest.raises(ValueError, match="^prompt must be text, got "):
            text("prompt", bad)
    assert number_from_text("seed", " 5 ", whole=True) == 5 and number_from_text("weight", "1e-3") == 0.001
    for bad in ("nan", "inf", "1_0", "soon", ""):
        with pytest.raises(ValueError, match="seed must be a whole number, got"):
            number_from_text("seed", bad, whole=True)


# --- Task A: nothing is corrected, through the engine ---------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    (dict(steps=2.7), "steps must be a whole number, got 2.7"),
    (dict(steps=math.nan), "steps must be a whole number, got NaN"),
    (dict(steps=True), "steps must be a whole number, got True"),
    (dict(steps="20"), "steps must be a whole number, got '20'"),
    (dict(steps=None), "steps must be a whole number, got None"),
    (dict(width=71.9), "width must be a whole number, got 71.9"),
    (dict(height=math.inf), "height must be a whole number, got inf"),
    (dict(batch_size=1.5), "batch size must be a whole number, got 1.5"),
    (dict(batch_count=False), "batch count must be a whole number, got False"),
    (dict(seed=2.5), "seed must be a whole number, got 2.5"),
    (dict(clip_skip=1.5), "clip skip must be a whole number, got 1.5"),
    (dict(cfg_scale=math.nan), "CFG scale must be a number, got NaN"),
    (dict(cfg_scale=True), "CFG scale must be a number, got True"),
    (dict(cfg_scale=None), "CFG scale must be a number, got None"),
    (dict(schedule=None), "schedule type must be text, got None"),
    (dict(sampler=None), "sampler must be text, got None"),
    (dict(prompt=None), "prompt must be text, got None"),
    (dict(negative_prompt=3), "negative prompt must be text, got 3"),
])
def test_generate_refuses_values_it_would_have_to_change(studio, changes, message):
    gen, _, calls = studio
    refused_without_model_work(calls, lambda: gen.run(job(**changes)), f"^{message}$")


def test_whole_floats_from_sliders_run_as_the_same_numbers(studio):
    gen, _, _ = studio
    result = gen.run(job(steps=2.0, width=64.0, height=64.0, batch_size=1.0, seed=3.0))
    assert "Steps: 2," in result.images[0].infotext and "Seed: 3," in result.images[0].infotext
    assert "Size: 64x64" in result.images[0].infotext


def test_the_generate_tab_passes_values_on_untouched():
    from studio.ui.generate_tab import job_from_inputs

    values = ["a red circle", "", "Euler", "Automatic", 2.7, 7, 1, 64, 64, 1, 1, 1]
    with pytest.raises(ValueError, match="steps must be a whole number, got 2.7"):
        job_from_inputs(*values).validate()
    values[4], values[7], values[9] = 2, 71.9, 1
    with pytest.raises(ValueError, match="width must be a whole number, got 71.9"):
        job_from_inputs(*values).validate()
    values[7], values[9] = 64, 1.5
    with pytest.raises(ValueError, match="batch size must be a whole number, got 1.5"):
        job_from_inputs(*values).validate()


def test_explorer_storyboard_and_training_refuse_them_too():
    from studio.ui.explorer_tab import grid_job_from_inputs

    values = ["a red circle", "", "Euler", "Automatic", 2.7, 7, 1, 64, 64, 1,
              "Seed", "1-3", None, "Nothing", "", None, "Nothing", "", None, False, 8]
    with pytest.raises(ValueError, match="steps must be a whole number, got 2.7"):
        plan_grid(grid_job_from_inputs(*values))
    values[4], values[-1] = 2, 2.5
    with pytest.raises(ValueError, match="cells per pass must be a whole number, got 2.5"):
        plan_grid(grid_job_from_inputs(*values))
    with pytest.raises(ValueError, match="steps must be a whole number, got 2.7"):
        BoardSettings(steps=2.7).validate()
    with pytest.raises(ValueError, match="candidates per shot must be a whole number, got 1.5"):
        BoardSettings(candidates=1.5).validate()
    with pytest.raises(ValueError, match="schedule type must be text, got None"):
        BoardSettings(schedule=None).validate()
    with pytest.raises(ValueError, match="shot 1: candidates must be a whole number, got 2.5"):
        Shot("1", "close shot", "a face", candidates=2.5).validate()
    with pytest.raises(ValueError, match="shot 1: ControlNet conditioning scale must be a number, got NaN"):
        Shot("1", "close shot", "a face", control_scale=math.nan).validate()
    with pytest.raises(ValueError, match="shot 1: canny low threshold must be a whole number, got 99.5"):
        Shot("1", "close shot", "a face", canny_low=99.5).validate()
    with pytest.raises(ValueError, match="line 2: shot 1: seed must be a whole number, got 2.5"):
        shots_from_csv("shot,type,description,seed\n1,close shot,a face,2.5\n")
    train = {"name": "my-style", "data": "ds"}
    for changes, message in ((dict(max_steps=2.5), "max steps must be a whole number, got 2.5"),
                             (dict(max_steps=True), "max steps must be a whole number, got True"),
                             (dict(preview_steps=math.nan), "preview steps must be a whole number, got NaN"),
                             (dict(repeats=1.5), r"repeats \(or empty for the dataset's\) must be a whole number"),
                             (dict(flip_p=math.nan), "flip probability must be a number, got NaN"),
                             (dict(noise_offset=True), "noise offset must be a number, got True"),
                             (dict(class_prompt=None), "class prompt must be text, got None")):
        with pytest.raises(ValueError, match=message):
            TrainJob(**train, **changes).validate()
    steady = TrainJob(**train, max_steps=20.0)
    steady.validate()
    assert steady.max_steps == 20 and isinstance(steady.max_steps, int)


# --- Task B: limits, from the config ---------------------------------------------------------------------------


def test_limits_come_from_env_and_flags_and_bad_values_are_errors(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("STUDIO_LIMIT_"):
            monkeypatch.delenv(name)
    assert StudioConfig.from_env().limits == Limits()
    monkeypatch.setenv("STUDIO_LIMIT_MAX_PROMPT_CHARS", "50_000")
    cfg = StudioConfig.from_env()
    assert cfg.limits.max_prompt_chars == 50_000 and cfg.with_home("/tmp/x").limits.max_prompt_chars == 50_000
    # app.py --limit NAME=VALUE goes over the environment
    flags = parse_limit_overrides(["max_prompt_chars=60000", "MAX_GRID_CELLS = 2000"])
    assert flags == {"max_prompt_chars": 60_000, "max_grid_cells": 2000}
    cfg = StudioConfig.from_env(limits=flags)
    assert (cfg.limits.max_prompt_chars, cfg.limits.max_grid_cells, cfg.limits.max_work) == (60_000, 2000, 100_000)
    assert StudioConfig.from_env(limits=None).limits.max_prompt_chars == 50_000
    for item, message in (("max_prompt_chars", "write NAME=VALUE"), ("max_prompt_char=5", "there is no limit"),
                          ("max_work=lots", "must be a whole number of 1 or more, got 'lots'"),
                          ("max_work=0", "must be a whole number of 1 or more, got '0'"),
                          ("max_work=2.5", "got '2.5'")):
        with pytest.raises(ValueError, match=message):
            parse_limit_overrides([item])
    monkeypatch.setenv("STUDIO_LIMIT_MAX_PROMPT_CHARS", "many")
    with pytest.raises(ValueError, match="STUDIO_LIMIT_MAX_PROMPT_CHARS must be a whole number of 1 or more, "
                                         "got 'many'"):
        StudioConfig.from_env()
    monkeypatch.delenv("STUDIO_LIMIT_MAX_PROMPT_CHARS")
    monkeypatch.setenv("STUDIO_LIMIT_MAX_PROMT_CHARS", "5")
    with pytest.raises(ValueError, match="STUDIO_LIMIT_MAX_PROMT_CHARS: there is no limit 'max_promt_chars'; the "
                                         "limits are max_prompt_chars, "):
        StudioConfig.from_env()


def test_a_one_megabyte_prompt_is_refused_at_once_naming_the_limit(studio):
    gen, _, calls = studio
    e = refused_without_model_work(calls, lambda: gen.run(job(prompt=MB_PROMPT)), "max_prompt_chars")
    assert str(e) == ("prompt is 1,050,000 characters; the limit is 20,000 (max_prompt_chars). For a local run, "
                      "raise it with STUDIO_LIMIT_MAX_PROMPT_CHARS=... or app.py --limit max_prompt_chars=...")
    assert isinstance(e, LimitExceeded) and e.name == "max_prompt_chars"
    refused_without_model_work(calls, lambda: gen.run(job(negative_prompt=MB_PROMPT)),
                               "^negative prompt is 1,050,000 characters; the limit is 20,000 .max_prompt_chars.")
    refused_without_model_work(calls, lambda: gen.run(job(prompt="a BREAK " * 3000)), "max_prompt_chars")


def test_breaks_and_nesting_are_bounded(studio):
    gen, _, calls = studio
    refused_without_model_work(calls, lambda: gen.run(job(prompt="a BREAK " * 40)),
                               r"^prompt has 40 BREAKs; the limit is 31 \(max_breaks\)")
    refused_without_model_work(calls, lambda: gen.run(job(prompt="(" * 17 + "red" + ")" * 17)),
                               r"^prompt nests brackets 17 deep; the limit is 16 \(max_nesting\)")
    refused_without_model_work(calls, lambda: gen.run(job(prompt="[" * 5000)), "5,000 deep")
    assert nesting_depth("((a)) [b] \\( \\[") == 2 and nesting_depth("([)]") == 2 and nesting_depth("a)]") == 0
    job(prompt="a BREAK " * 31 + "(" * 16 + "red" + ")" * 16).validate(Limits())  # at the limits: fine


def test_chunks_are_counted_with_the_tokenizer_before_the_text_encoder_runs(studio, monkeypatch):
    gen, cfg, calls = studio
    e = refused_without_model_work(calls, lambda: gen.run(job(prompt=LONG_PROMPT)), "max_prompt_chunks")
    assert str(e).startswith("prompt is 44 chunks of 75 tokens (after BREAKs); the limit is 32 (max_prompt_chunks)")
    refused_without_model_work(calls, lambda: gen.run(job(negative_prompt=LONG_PROMPT)),
                               "^negative prompt is 44 chunks")
    # each text of a prompt-editing schedule counts (the long one only after step 1)
    refused_without_model_work(calls, lambda: gen.run(job(prompt=f"[a red circle:{LONG_PROMPT}:1]")),
                               "^prompt is 44 chunks")
    # raised, the same prompt runs
    monkeypatch.setattr(gen.manager, "cfg", replace(cfg, limits=Limits(max_prompt_chunks=64)))
    result = gen.run(job(prompt=LONG_PROMPT, steps=1))
    assert len(result.images) == 1 and calls["unet"] > 0


def test_work_is_bounded_and_the_limit_documents_what_it_allows():
    huge = job(batch_size=16, batch_count=100, steps=150, width=2048, height=2048)
    with pytest.raises(LimitExceeded, match=r"^1,600 images x 150 steps x 2048x2048 px is 1,006,633 step-megapixels "
                                            r"of work; the limit is 100,000 \(max_work\)"):
        huge.validate(Limits())
    huge.validate(Limits(max_work=2_000_000))
    # every ordinary A1111 request fits: 16 x 100 images of 150 steps at 512x768, A1111's 8 x 100 at 768x768
    job(batch_size=16, batch_count=100, steps=150, width=512, height=768).validate(Limits())
    job(batch_size=8, batch_count=100, steps=150, width=768, height=768).validate(Limits())


def test_grid_cells_values_prompts_and_work_are_bounded():
    base = job(steps=2)
    started = time.perf_counter()
    with pytest.raises(LimitExceeded, match=r"^X axis \(Seed\): the values up to '1-1000000000' are 1,000,000,000 "
                                            r"values .*the limit is 1,000 \(max_grid_cells\)"):
        plan_grid(GridJob(base, x=AxisSpec.parse("Seed: 1-1000000000")))
    with pytest.raises(LimitExceeded, match="max_grid_cells"):
        plan_grid(GridJob(base, x=AxisSpec.parse("CFG Scale: 1-30 [100000000]")))
    assert time.perf_counter() - started < 1  # refused before the range is listed
    with pytest.raises(LimitExceeded, match=r"^the grid has 1,200 cells \(40 × 30; use fewer values\); the limit "
                                            r"is 1,000 \(max_grid_cells\)"):
        plan_grid(GridJob(base, x=AxisSpec.parse("Seed: 1-40"), y=AxisSpec.parse("Steps: 1-30")))
    assert len(plan_grid(GridJob(base, x=AxisSpec.parse("Seed: 1-40"), y=AxisSpec.parse("Steps: 1-30")),
                         limits=Limits(max_grid_cells=1200)).cells) == 1200
    # a Prompt S/R value that would make a huge prompt is refused before it is made, naming the cell
    sr = GridJob(job(prompt="a red circle"), x=AxisSpec("Prompt S/R", f'red, "{"blue " * 5000}"'))
    with pytest.raises(LimitExceeded, match=r"^cell X '.*': Prompt S/R value 'blue blue .*' makes the prompt "
                                            r"25,008 characters; the limit is 20,000 \(max_prompt_chars\)"):
        plan_grid(sr)
    nested = GridJob(job(prompt="a red circle"), x=AxisSpec("Prompt S/R", f"red, {'(' * 20}red"))
    with pytest.raises(LimitExceeded, match="cell X .*prompt nests brackets 20 deep.*max_nesting"):
        plan_grid(nested)
    heavy = GridJob(job(steps=150, width=2048, height=2048), x=AxisSpec.parse("Seed: 1-200"))
    with pytest.raises(LimitExceeded, match=r"^the grid's 200 cells are 125,829 step-megapixels of work"):
        plan_grid(heavy, limits=Limits(max_grid_megapixels=10_000))


def test_a_grid_with_one_long_cell_prompt_runs_nothing(studio):
    gen, cfg, calls = studio
    runner = GridRunner(gen.manager, gen)
    grid = GridJob(job(prompt="a red circle"), x=AxisSpec("Prompt S/R", f'red, "{LONG_PROMPT}"'))
    e = refused_without_model_work(calls, lambda: runner.run(grid, cfg.outputs_dir), "max_prompt_chunks")
    assert str(e).startswith("cell X '")
    assert not list(cfg.outputs_dir.rglob("*.png"))


def test_storyboards_bound_candidates_shots_and_prompts(studio, tmp_path, monkeypatch):
    gen, cfg, calls = studio
    with pytest.raises(LimitExceeded, match=r"^65 candidates per shot were asked for; the limit is 64 "
                                            r"\(max_storyboard_candidates\)"):
        BoardSettings(candidates=65).validate(Limits())
    BoardSettings(candidates=65).validate(Limits(max_storyboard_candidates=100))
    with pytest.raises(LimitExceeded, match="shot 1 asks for 65 candidates.*max_storyboard_candidates"):
        Shot("1", "close shot", "a face", candidates=65).validate(Limits())
    board = Storyboard("film", shots=[Shot("1", "close shot", "a face " * 4000)])
    with pytest.raises(LimitExceeded, match=r"^shot 1: the description is 28,000 characters; the limit is 20,000"):
        board.validate(Limits())
    board = Storyboard("film", shots=[Shot(str(i), "close shot", "a face") for i in range(3)])
    with pytest.raises(LimitExceeded, match=r"^the storyboard has 3 shots; the limit is 2 \(max_storyboard_shots\)"):
        board.validate(Limits(max_storyboard_shots=2))
    # a shot whose prompt is too many chunks: refused before the text encoder or the UNet runs
    store = StoryboardStore(tmp_path / "boards")
    board = Storyboard("film", shots=[Shot("1", "close shot", "a face"), Shot("2", "close shot", LONG_PROMPT)])
    board.settings.width = board.settings.height = 64
    board.settings.steps, board.settings.candidates = 2, 1
    store.save(board)
    runner = StoryboardRunner(gen.manager, store, cfg.controlnet_dir, gen)
    e = refused_without_model_work(calls, lambda: runner.run(board), "max_prompt_chunks")
    assert str(e).startswith("shot 2: prompt is 44 chunks")
    heavy = Storyboard("film", shots=[Shot(str(i), "close shot", "a face", candidates=64) for i in range(20)])
    heavy.settings.steps = 150
    monkeypatch.setattr(gen.manager, "cfg", replace(cfg, limits=Limits(max_work=10_000)))
    refused_without_model_work(calls, lambda: runner.run(heavy), r"^20 shots: 1,280 images x 150 steps x 512x512 px "
                                                                 r"is 50,332 step-megapixels of work; the limit is "
                                                                 r"10,000 \(max_work\)")


def test_training_prompts_are_bounded():
    with pytest.raises(LimitExceeded, match=r"^preview prompt is 30,000 characters; the limit is 20,000"):
        TrainJob(name="my-style", data="ds", preview_prompt="x" * 30000).validate(Limits())
    TrainJob(name="my-style", data="ds", preview_prompt="x" * 30000).validate(Limits(max_prompt_chars=40000))


# --- parsing stays linear: a prompt within the limits is cheap to read ------------------------------------------


@pytest.mark.parametrize("prompt", [
    " " * 19990 + "BREAK",  # a run of blanks beside BREAK (the old pattern was quadratic in it)
    "(a:" + "1" * 19990 + "x)",  # a long digit run after ':' (backtracking weights)
    "[a:" + "1" * 19990 + "x]",  # the same in a prompt-editing `when`
    "<lora:a:" + "1" * 19980 + "x>",  # and in a LoRA tag's weight
    "<a:b " * 4000,  # many '<name:' with no closing '>'
    "[" * 16 + "a" * 19960 + "]" * 16,  # as deep as allowed, and long
    "[a|b]" * 4000,  # alternation on every step
])
def test_prompts_within_the_limits_parse_quickly(prompt):
    job(prompt=prompt).validate(Limits())
    start = time.perf_counter()
    parse_attention(prompt)
    try:
        extract_network_tags(prompt)
    except ValueError:
        pass  # a weight that is not a number: refused, quickly
    prompt_schedule(prompt, 150)
    assert time.perf_counter() - start < 1.5


def test_break_keeps_its_meaning():
    assert parse_attention("a  BREAK \n b") == [("a", 1.0), BREAK, ("b", 1.0)]
    assert parse_attention("BREAK a BREAK BREAK b") == [BREAK, ("a", 1.0), BREAK, BREAK, ("b", 1.0)]
    assert parse_attention("aBREAK b") == [("aBREAK b", 1.0)]
    assert parse_attention("(a:1.5) b") == [("a", 1.5), (" b", 1.0)]
