"""A1111's X/Y/Z plot value syntax: every form and every error, as tables (pure functions, no model)."""

from __future__ import annotations

import random

import pytest

from studio.explorer.syntax import (
    AxisSyntaxError,
    apply_prompt_sr,
    axis_type,
    check_prompt_sr,
    default_lora_target,
    fix_seeds,
    match_choice,
    network_in,
    parse_float_values,
    parse_int_values,
    parse_size,
    set_lora_weight,
    split_axis_spec,
    split_values,
    swap_network,
)


@pytest.mark.parametrize("text, expected", [
    ("1, 2, 3", ["1", "2", "3"]),
    ("  a ,b,  c  ", ["a", "b", "c"]),
    ('"a, b", c', ["a, b", "c"]),  # CSV quotes keep a comma inside a value
    ('Euler a, "DPM++ 2M, Karras"', ["Euler a", "DPM++ 2M, Karras"]),
    ("a,,b, ,", ["a", "b"]),  # empty values are dropped
    ("one", ["one"]),
    ("", []),
    ("a\nb", ["a", "b"]),  # lines are rows of the same list
])
def test_split_values(text, expected):
    assert split_values(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("7", [7]),
    ("1, 2, 3", [1, 2, 3]),
    ("-1, 5", [-1, 5]),
    ("1-5", [1, 2, 3, 4, 5]),
    ("1 - 5", [1, 2, 3, 4, 5]),
    ("1-5 (+2)", [1, 3, 5]),
    ("1-6 (+2)", [1, 3, 5]),
    ("1-5 (2)", [1, 3, 5]),  # the sign of the step may be left out
    ("5-1 (-2)", [5, 3, 1]),
    ("10-30 [5]", [10, 15, 20, 25, 30]),
    ("1-10 [4]", [1, 4, 7, 10]),
    ("0-10 [3]", [0, 5, 10]),
    ("1-2 [4]", [1, 1, 1, 2]),  # truncated like A1111's int(linspace)
    ("7-9 [1]", [7]),
    ("-5--3", [-5, -4, -3]),
    ("1-3, 10, 20-22", [1, 2, 3, 10, 20, 21, 22]),
])
def test_int_values(text, expected):
    assert parse_int_values(text) == expected


@pytest.mark.parametrize("text, message", [
    ("abc", "'abc' is not a whole number"),
    ("1.5", "'1.5' is not a whole number"),
    ("1-5 (+0)", "the step of '1-5 (+0)' is 0"),
    ("5-1", "the range '5-1' gives no values (counting down needs a negative step"),
    ("1-5 (-1)", "the range '1-5 (-1)' gives no values"),
    ("1-5 [0]", "asks for 0 values"),
    ("1-5 (+2", "'1-5 (+2' is not a whole number"),
    ("1-5 [x]", "'1-5 [x]' is not a whole number"),
])
def test_int_value_errors_quote_the_value(text, message):
    with pytest.raises(AxisSyntaxError) as e:
        parse_int_values(text)
    assert message in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("7", [7.0]),
    ("3, 7.5, 11", [3.0, 7.5, 11.0]),
    (".5, -1.25", [0.5, -1.25]),
    ("1e-1", [0.1]),
    ("0.5-1.5 (+0.25)", [0.5, 0.75, 1.0, 1.25, 1.5]),
    ("0-0.3 (+0.1)", [0.0, 0.1, 0.2, 0.3]),  # no 0.30000000000000004, and the end is kept
    ("1-2", [1.0, 2.0]),
    ("1.5-3.5", [1.5, 2.5, 3.5]),
    ("3-11 [5]", [3.0, 5.0, 7.0, 9.0, 11.0]),
    ("0-1 [3]", [0.0, 0.5, 1.0]),
    ("1-0 (-0.5)", [1.0, 0.5, 0.0]),
    ("2, 3-4 [2]", [2.0, 3.0, 4.0]),
])
def test_float_values(text, expected):
    assert parse_float_values(text) == expected  # exactly: no float drift from the steps


@pytest.mark.parametrize("text, message", [
    ("seven", "'seven' is not a number or a range"),
    ("nan", "'nan' is not a number"),
    ("inf", "'inf' is not a number"),
    ("1-2 (+0)", "the step of '1-2 (+0)' is 0"),
    ("2-1", "the range '2-1' gives no values"),
    ("1-3 [0]", "asks for 0 values"),
])
def test_float_value_errors_quote_the_value(text, message):
    with pytest.raises(AxisSyntaxError) as e:
        parse_float_values(text)
    assert message in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("CFG Scale: 3,7,11", ("CFG Scale", "", "3,7,11")),
    ("cfg scale:3", ("CFG Scale", "", "3")),
    ("CFG: 3", ("CFG Scale", "", "3")),
    ("Sampler: Euler a, DPM++ 2M", ("Sampler", "", "Euler a, DPM++ 2M")),
    ("Prompt S/R: red, blue: dark", ("Prompt S/R", "", "red, blue: dark")),  # only the first colon splits
    ("LoRA weight (inkwash): 0, 0.5", ("LoRA weight", "inkwash", "0, 0.5")),
    ("LoRA weight: 0, 1", ("LoRA weight", "", "0, 1")),
    ("Checkpoint: a.safetensors", ("Checkpoint name", "", "a.safetensors")),
    ("Schedule type: Karras", ("Schedule type", "", "Karras")),
    ("Negative prompt S/R: blurry, sharp", ("Negative prompt S/R", "", "blurry, sharp")),
    ("LoRA / embedding: a, b", ("LoRA / embedding", "", "a, b")),
])
def test_axis_spec(text, expected):
    assert split_axis_spec(text) == expected


@pytest.mark.parametrize("text, message", [
    ("CFG Scal: 3", "unknown axis 'CFG Scal'"),
    ("CFG Scal: 3", "did you mean 'CFG Scale'"),
    ("Steps 10,20", "could not read the axis 'Steps 10,20'"),
    ("Refiner switch at: 0.8", "choose one of: Nothing, Seed, Steps"),  # not an axis here (no refiner)
])
def test_axis_spec_errors(text, message):
    with pytest.raises(AxisSyntaxError) as e:
        split_axis_spec(text)
    assert message in str(e.value)


def test_axis_names_are_case_insensitive():
    assert axis_type("checkpoint name").name == "Checkpoint name"
    assert axis_type("  Prompt   S/R ").name == "Prompt S/R"


@pytest.mark.parametrize("keep, seeds, expected", [
    (True, [-1, 5], [-1, 5]),  # keep -1: every cell draws its own
    (False, [5, 6], [5, 6]),
])
def test_fix_seeds_keeps_fixed_values(keep, seeds, expected):
    assert fix_seeds(seeds, keep) == expected


def test_fix_seeds_replaces_minus_one_once():
    rng = random.Random(3)
    fixed = fix_seeds([-1, 7, -1], keep_random=False, rng=rng)
    assert fixed[1] == 7 and fixed[0] != -1 and fixed[2] != -1 and fixed[0] != fixed[2]
    assert fix_seeds([-1, 7, -1], False, random.Random(3)) == fixed  # drawn from the rng given
    with pytest.raises(AxisSyntaxError, match="seed -2 is out of range"):
        fix_seeds([-2], False)
    with pytest.raises(AxisSyntaxError, match="seed 4294967296"):
        fix_seeds([2**32], False)


@pytest.mark.parametrize("text, expected", [
    ("512x768", (512, 768)), ("512 x 768", (512, 768)), ("512X512", (512, 512)), ("640", (640, 640)),
    ("512×768", (512, 768)),
])
def test_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["512x", "big", "512x768x2", "-512"])
def test_size_errors_quote_the_value(text):
    with pytest.raises(AxisSyntaxError, match=f"size '{text}' is not WIDTHxHEIGHT"):
        parse_size(text)


def test_match_choice():
    assert match_choice("karras", ["Automatic", "Karras"], "schedule type") == "Karras"
    with pytest.raises(AxisSyntaxError, match=r"unknown schedule type 'Karas'.*did you mean 'Karras'"):
        match_choice("Karas", ["Automatic", "Karras"], "schedule type")


@pytest.mark.parametrize("values, prompt, negative, value, expected", [
    (["red", "blue"], "a red circle", "", "blue", ("a blue circle", "")),
    (["red", "blue"], "a red circle", "red ink", "blue", ("a blue circle", "blue ink")),  # both prompts
    (["red", "red"], "a red circle", "", "red", ("a red circle", "")),  # the first value is itself a cell
    (["red", ""], "a red circle", "", "", ("a  circle", "")),
    (["circle", "square"], "circle, circle", "", "square", ("square, square", "")),  # every occurrence
])
def test_prompt_sr(values, prompt, negative, value, expected):
    check_prompt_sr(values, prompt, negative)
    assert apply_prompt_sr(values[0], value, prompt, negative) == expected


def test_prompt_sr_search_must_be_found():
    with pytest.raises(AxisSyntaxError, match="Prompt S/R did not find 'green' in the prompt or negative prompt"):
        check_prompt_sr(["green", "blue"], "a red circle", "blurry")
    check_prompt_sr(["blurry", "noisy"], "a red circle", "blurry")  # the negative prompt counts
    with pytest.raises(AxisSyntaxError, match="did not find 'red' in the negative prompt"):
        check_prompt_sr(["red", "blue"], "a red circle", "blurry", negative_only=True)
    assert apply_prompt_sr("blurry", "noisy", "blurry red", "blurry", negative_only=True) == ("blurry red", "noisy")


@pytest.mark.parametrize("prompt, name, weight, expected", [
    ("a cat <lora:ink:0.8>", "ink", 0.5, "a cat <lora:ink:0.5>"),
    ("a cat <lora:ink>", "ink", 0, "a cat <lora:ink:0>"),
    ("a cat <lora:ink:0.8:0.2>", "ink", 1, "a cat <lora:ink:1>"),  # one weight for text encoder and UNet
    ("<lora:ink:1> and <lora:paper:1>", "paper", 0.25, "<lora:ink:1> and <lora:paper:0.25>"),
    ("<lyco:ink:1>", "ink", 0.5, "<lora:ink:0.5>"),
])
def test_set_lora_weight(prompt, name, weight, expected):
    assert set_lora_weight(prompt, name, weight) == expected


def test_lora_weight_errors():
    with pytest.raises(AxisSyntaxError, match="no <lora:ink:...> tag"):
        set_lora_weight("a cat", "ink", 1)
    with pytest.raises(AxisSyntaxError, match="needs a <lora:name:weight> tag"):
        default_lora_target("a cat")
    with pytest.raises(AxisSyntaxError, match=r"several LoRAs \(ink, paper\)"):
        default_lora_target("<lora:ink:1> <lora:paper:1>")
    assert default_lora_target("<lora:ink:1> x <lora:ink:0.5>") == "ink"


@pytest.mark.parametrize("prompt, negative, old, new, expected", [
    ("a cat <lora:ink:0.8>", "", "ink", "paper", ("a cat <lora:paper:0.8>", "")),
    ("a cat <lora:ink:0.8:0.3>", "", "ink", "paper", ("a cat <lora:paper:0.8:0.3>", "")),
    ("a cat <lora:ink>", "", "ink", "paper", ("a cat <lora:paper>", "")),
    ("a cat <lora:ink:0.8>", "", "ink", "None", ("a cat ", "")),
    ("a cat by monet-style", "", "monet-style", "kohya-emb", ("a cat by kohya-emb", "")),
    ("a cat by monet-style", "bad-emb", "bad-emb", "other", ("a cat by monet-style", "other")),
    ("monet-style, monet-style-2", "", "monet-style", "x", ("x, monet-style-2", "")),  # whole names only
    ("a cat by monet-style", "", "monet-style", "none", ("a cat by ", "")),
])
def test_swap_network(prompt, negative, old, new, expected):
    assert swap_network(prompt, negative, old, new) == expected


def test_network_choice_needs_the_first_value_in_the_prompt():
    assert network_in("a <lora:ink:1>", "", "ink") == "lora"
    assert network_in("a monet-style cat", "", "monet-style") == "embedding"
    assert network_in("a <lora:ink:1>", "", "in") is None
    with pytest.raises(AxisSyntaxError, match="'paper' is neither a <lora:paper:...> tag nor a word of the prompt"):
        swap_network("a <lora:ink:1>", "", "paper", "ink")
