"""Sample prompts for training previews (issue 24 item 6), in kohya's --sample_prompts line format: parsed with
their options and defaults, refused with the line named, rendered as one preview per line at each preview step with
the line's size, seed, CFG and negative prompt, shown in the Train tab's gallery by step and sample."""

from __future__ import annotations

import pytest
from PIL import Image
from test_train_lora import lora_job
from test_train_ti import home_cfg

from studio.generation.infotext import parse_infotext
from studio.train.job import TrainJob
from studio.train.loop import Trainer
from studio.train.run_folder import RunFolder
from studio.train.samples import MAX_SAMPLES, SamplePrompt, parse_sample_prompts

DEFAULTS = SamplePrompt("", "", 64, 64, 1, 7.0, 20)


def test_kohya_lines_with_options_and_defaults():
    text = """# previews of my style
    a castle at dusk --n blurry, lowres --w 96 --h 128 --d 42 --l 5.5 --s 12

    a portrait of a cat --d 7
    """
    first, second = parse_sample_prompts(text, DEFAULTS)
    assert first == SamplePrompt("a castle at dusk", "blurry, lowres", 96, 128, 42, 5.5, 12)
    assert second == SamplePrompt("a portrait of a cat", "", 64, 64, 7, 7.0, 20)
    # a kohya file naming its sampler (--ss) loads; the previews keep their own sampler
    assert parse_sample_prompts("a cat --ss euler_a --d 3", DEFAULTS) == [SamplePrompt("a cat", "", 64, 64, 3, 7.0, 20)]
    assert parse_sample_prompts("", DEFAULTS) == [] and parse_sample_prompts("# only a comment", DEFAULTS) == []
    # an option's value runs to the next option: commas and dashes inside prompts stay
    (line,) = parse_sample_prompts("well-lit, high-key photo --n semi-transparent, over-exposed", DEFAULTS)
    assert (line.prompt, line.negative) == ("well-lit, high-key photo", "semi-transparent, over-exposed")


@pytest.mark.parametrize("text,message", [
    ("a cat --q 3", "line 1: unknown option --q"),
    ("a cat\na dog --w wide", "line 2: width must be a number"),
    ("a cat --h 100", "line 1: height must be a multiple of 8"),
    ("a cat --s 0", "line 1: steps must be between 1 and 150"),
    ("--n blurry", "line 1: the prompt is empty"),
    ("\n".join(["a cat"] * (MAX_SAMPLES + 1)), f"at most {MAX_SAMPLES}"),
])
def test_bad_lines_are_refused_naming_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sample_prompts(text, DEFAULTS)
    with pytest.raises(ValueError, match=message):
        TrainJob(name="x", data="d", sample_prompts=text).validate()


def test_without_sample_lines_the_preview_prompt_is_the_one_sample():
    job = TrainJob(name="inkwash", data="d", resolution=128, preview_seed=9, preview_steps=11,
                   preview_prompt="a painting in the style of [name]")
    assert job.samples() == [SamplePrompt("a painting in the style of inkwash", "", 128, 128, 9, 7.0, 11)]
    job = job.replace(sample_prompts="[name] castle --d 3")
    assert job.samples() == [SamplePrompt("inkwash castle", "", 128, 128, 3, 7.0, 11)]


def test_each_sample_line_is_a_preview_at_every_preview_step(tmp_path):
    cfg = home_cfg(tmp_path)
    samples = "[name], red stripes --n blurry --w 64 --h 96 --d 5 --l 4 --s 3\nstripes number 1 --d 8 --s 2"
    result = Trainer(cfg).start(lora_job(max_steps=1, save_every=100, preview_every=1, sample_prompts=samples))
    assert result.state == "finished", result.message
    run = RunFolder.open(result.run_dir)
    names = [p.name for p in run.previews()]
    assert names == ["step-00000000.png", "step-00000000-2.png", "step-00000001.png", "step-00000001-2.png"]
    with Image.open(run.preview_path(1)) as first, Image.open(run.preview_path(1, 2)) as second:
        assert first.size == (64, 96) and second.size == (64, 64)
        info_first, info_second = parse_infotext(first.info["parameters"]), parse_infotext(second.info["parameters"])
    assert info_first["prompt"] == "shot-close, red stripes" and info_first["negative_prompt"] == "blurry"
    assert (info_first["Seed"], info_first["CFG scale"], info_first["Steps"]) == ("5", "4", "3")
    assert (info_second["Seed"], info_second["Steps"]) == ("8", "2")
    # the card picture of the LoRA is the first sample's last preview
    with Image.open(cfg.loras_dir / "shot-close.preview.png") as card:
        assert card.size == (64, 96)

    from studio.ui.train_tab import preview_items

    assert [label for _, label in preview_items([str(p) for p in run.previews()])] == \
        ["step 0", "step 0 · sample 2", "step 1", "step 1 · sample 2"]


def test_command_line_reads_a_sample_prompt_file(tmp_path):
    from studio.cli import build_parser
    from studio.cli.train import train_job_from_args

    path = tmp_path / "samples.txt"
    path.write_text("a castle --d 4\n# comment\na cat --w 128\n", encoding="utf-8")
    job = train_job_from_args(build_parser().parse_args(["train", "lora", "--data", "d", "--name", "n",
                                                         "--sample-prompts", str(path)]))
    job.validate()
    assert [s.prompt for s in job.samples()] == ["a castle", "a cat"]
