"""A1111's prompt editing and alternation: the schedules its prompt_parser gives (written from A1111's wiki and
grammar: a number with a dot is a fraction of the steps, without one a step; `[a|b]` alternates every step)."""

import pytest

from studio.generation.prompt_schedule import has_schedule, merge_schedules, prompt_schedule, text_at

WIKI = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]")

CASES = [
    ("a cat", 20, [(20, "a cat")]),
    ("a [b:c:10] d", 20, [(10, "a b d"), (20, "a c d")]),
    ("[b:c:0.25]", 20, [(5, "b"), (20, "c")]),
    ("[b:c: 0.25 ]", 20, [(5, "b"), (20, "c")]),
    ("[to:10]", 20, [(10, ""), (20, "to")]),
    ("[from::10]", 20, [(10, "from"), (20, "")]),
    ("[a:b:0]", 20, [(20, "b")]),
    ("[a:b:1.0]", 20, [(20, "a")]),
    ("[a:b:1]", 20, [(1, "a"), (20, "b")]),
    ("[a:b:25]", 20, [(20, "a")]),  # past the end: clamped to the last step
    ("[a|b]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "b")]),
    ("x [a|b|c] y", 3, [(1, "x a y"), (2, "x b y"), (3, "x c y")]),
    ("[a|]", 2, [(1, "a"), (2, "")]),
    ("[[a:b:5]:c:10]", 20, [(5, "a"), (10, "b"), (20, "c")]),
    ("[(x:1.2):y:5]", 20, [(5, "(x:1.2)"), (20, "y")]),
    ("(a [b:c:2]:1.3)", 4, [(2, "(a b:1.3)"), (4, "(a c:1.3)")]),
    ("[emphasis] and [[more]]", 20, [(20, "[emphasis] and [[more]]")]),  # emphasis is not an edit
    ("[a [b:c:2]]", 4, [(2, "[a b]"), (4, "[a c]")]),
    (r"\[a:b:5\]", 20, [(20, r"\[a:b:5\]")]),  # escaped brackets are text
    ("[a:b:x]", 20, [(20, "[a:b:x]")]),  # not a number: emphasis of "a:b:x"
    ("unclosed [a:b:5", 20, [(20, "unclosed [a:b:5")]),
    (WIKI, 100, [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]),
]


@pytest.mark.parametrize("text, steps, expected", CASES)
def test_schedule_is_a1111s(text, steps, expected):
    assert prompt_schedule(text, steps) == expected


def test_has_schedule():
    assert has_schedule("a [b:c:3]") and has_schedule("[a|b]") and has_schedule("[[a:b:1]]")
    assert not has_schedule("a [b] (c:1.2) [d:e:f]") and not has_schedule("plain")


def test_text_at_and_merge_follow_a1111s_step_counter():
    schedule = prompt_schedule("[a:b:10]", 20)
    # A1111 compares its 0-based step counter with the entries: steps 0..10 read "a", 11..19 "b"
    assert [text_at(schedule, s) for s in (0, 10, 11, 19)] == ["a", "a", "b", "b"]
    merged = merge_schedules(prompt_schedule("[a:b:5]", 20), prompt_schedule("[n:m:0.5]", 20))
    assert merged == [(5, "a", "n"), (10, "b", "n"), (20, "b", "m")]


# --- images: the schedule reaches the denoise loop in Generate, the explorer and storyboards ---------------------

import numpy as np  # noqa: E402
import torch  # noqa: E402

from studio.explorer.grid import AxisSpec, GridJob, GridRunner  # noqa: E402
from studio.generation.generate import Generator  # noqa: E402
from studio.generation.job import GenerateJob  # noqa: E402
from studio.models.manager import ModelManager  # noqa: E402


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    return Generator(manager)


def image(gen, prompt, negative="", steps=6, batch_size=1, **kw):
    job = GenerateJob(prompt=prompt, negative_prompt=negative, steps=steps, width=64, height=64, seed=11,
                      sampler="Euler", schedule="Automatic", batch_size=batch_size, **kw)
    return [np.asarray(i.image).astype(int) for i in gen.run(job).images]


def test_edit_at_0_is_the_second_prompt_and_at_1_0_the_first(gen):
    a, b = image(gen, "a red circle")[0], image(gen, "a blue square")[0]
    assert np.abs(a - b).mean() > 1
    assert np.array_equal(image(gen, "[a red circle:a blue square:0]")[0], b)
    assert np.array_equal(image(gen, "[a red circle:a blue square:1.0]")[0], a)
    middle = image(gen, "[a red circle:a blue square:0.5]")[0]
    assert not np.array_equal(middle, a) and not np.array_equal(middle, b)
    both = image(gen, "[a red circle|a blue square]")[0]
    assert not np.array_equal(both, a) and not np.array_equal(both, b)
    # the negative prompt edits too; a batch of two (CFG batching) gives each item the same schedule
    assert np.array_equal(image(gen, "a cat", "[blurry:grainy:0]")[0], image(gen, "a cat", "grainy")[0])
    pair = image(gen, "[a red circle:a blue square:0.5]", batch_size=2)
    assert np.array_equal(pair[0], middle)


def test_the_unet_sees_each_prompt_at_the_steps_a1111_gives_it(gen):
    pipe = gen.manager.current.pipe
    encoder = gen.prompt_encoder(gen.manager.current, {}, 1)
    a, b = encoder.encode("a red circle").embeds, encoder.encode("a blue square").embeds
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["encoder_hidden_states"][1:2]),
                                                 with_kwargs=True)
    try:
        image(gen, "[a red circle:a blue square:2]", steps=6)  # Euler: one UNet call per step
    finally:
        handle.remove()
    which = ["a" if torch.allclose(s, a) else "b" if torch.allclose(s, b) else "?" for s in seen]
    assert which == ["a", "a", "a", "b", "b", "b"]  # A1111: calls 0..2 read the first, the rest the second


def test_explorer_cells_follow_the_schedule(gen, tmp_path):
    runner = GridRunner(gen.manager, gen)
    base = GenerateJob(prompt="[a red circle:a blue square:0]", steps=4, width=64, height=64, seed=11,
                       sampler="Euler", schedule="Automatic")
    result = runner.run(GridJob(base, x=AxisSpec.parse("Prompt S/R: [a red circle:a blue square:0], a blue square"),
                                cells_per_pass=2))
    first, second = (np.asarray(result.images[i].image).astype(int) for i in (0, 1))
    assert np.array_equal(first, second)
