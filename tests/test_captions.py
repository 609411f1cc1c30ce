"""kohya's caption options (studio.train.captions): tags kept, shuffled and dropped from a seed, the whole caption
dropped, prefix and suffix; the job's checks, the LoRA file's ss_* keys, resume still exact with shuffling on, the
cosine-with-restarts schedule against diffusers', the command line and the Train tab."""

import random

import pytest
import torch
from safetensors import safe_open

from studio.train.captions import CaptionOptions, frame_caption, shape_caption, split_tags
from studio.train.job import TrainJob
from studio.train.method import TrainMethod, caption_rng, rate_function
from studio.train.schedule import LR_SCHEDULERS, lr_factor

CAPTION = "sks, red dress, smiling, outdoors, blue sky, looking at viewer, short hair"
TAGS = split_tags(CAPTION)


# --- the pure function -------------------------------------------------------------------------------------


def test_all_off_returns_the_caption_unchanged():
    for caption in (CAPTION, "", "  a photo,, of a dog ", "one"):
        assert shape_caption(caption, random.Random(1)) == caption
        assert CaptionOptions().shape(caption, random.Random(1)) == caption
    assert not CaptionOptions().active and not CaptionOptions(prefix="x").random
    # keep_tokens alone changes nothing (kohya: it only matters with shuffling or tag dropout)
    assert shape_caption(CAPTION, random.Random(1), keep_tokens=3) == CAPTION


def test_keep_tokens_keep_the_first_tags_in_order_and_shuffle_permutes_the_rest():
    for seed in range(50):
        tags = split_tags(shape_caption(CAPTION, random.Random(seed), shuffle=True, keep_tokens=2))
        assert tags[:2] == TAGS[:2] and sorted(tags) == sorted(TAGS)
    # the same seed: the same order; other seeds: other orders
    again = {shape_caption(CAPTION, random.Random(7), shuffle=True, keep_tokens=1) for _ in range(5)}
    assert len(again) == 1
    orders = {shape_caption(CAPTION, random.Random(seed), shuffle=True, keep_tokens=1) for seed in range(20)}
    assert len(orders) > 15
    assert all(o.startswith("sks, ") for o in orders)
    # keep_tokens larger than the caption keeps everything
    assert shape_caption("a, b", random.Random(0), shuffle=True, keep_tokens=5) == "a, b"


def test_caption_and_tag_dropout_rates_over_a_seeded_stream():
    n = 4000
    dropped = sum(shape_caption(CAPTION, random.Random(i), caption_dropout=0.2) == "" for i in range(n))
    assert abs(dropped / n - 0.2) <= 0.03
    kept_tags = 0
    for i in range(n):
        tags = split_tags(shape_caption(CAPTION, random.Random(i), tag_dropout=0.3, keep_tokens=1))
        assert tags[0] == "sks"  # the kept tag is never dropped
        kept_tags += len(tags) - 1
    asked = n * (len(TAGS) - 1)
    assert abs(1 - kept_tags / asked - 0.3) <= 0.03
    # a dropped caption takes its prefix and suffix with it (the unconditional case)
    assert shape_caption(CAPTION, random.Random(0), caption_dropout=1.0, prefix="p", suffix="s") == ""


def test_prefix_and_suffix_are_placed_and_never_shuffled():
    assert shape_caption("a red dress", random.Random(0), prefix="sks", suffix="best quality") == \
        "sks, a red dress, best quality"
    assert frame_caption("b, c", "a,", ", d") == "a, b, c, d"
    assert frame_caption("", "sks", "") == "sks"  # an image without a caption
    for seed in range(30):
        out = shape_caption(CAPTION, random.Random(seed), shuffle=True, tag_dropout=0.5, prefix="pre", suffix="post")
        tags = split_tags(out)
        assert tags[0] == "pre" and tags[-1] == "post"
    # kohya's keep_tokens_separator: a fixed head and tail around the shuffled middle
    out = shape_caption("a, b ||| c, d, e ||| f", random.Random(3), shuffle=True, keep_separator="|||")
    assert split_tags(out)[:2] == ["a", "b"] and split_tags(out)[-1] == "f" and "|||" not in out


# --- the job, and prompts per micro-batch ---------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"caption_dropout": 1.5}, "caption dropout must be between 0 and 1"),
    ({"tag_dropout": -0.1}, "tag dropout must be between 0 and 1"),
    ({"tag_dropout": float("nan")}, "tag dropout must be a number"),
    ({"keep_tokens": -1}, "keep tokens must be between 0"),
    ({"keep_tokens": 1.5}, "keep tokens must be a whole number"),
    ({"shuffle_tags": "yes"}, "shuffle tags must be true or false"),
    ({"caption_prefix": None}, "caption prefix must be text"),
    ({"caption_suffix": "x" * 30_000}, "caption suffix is 30,000 characters"),
    ({"lr_cycles": 0}, "lr cycles must be between 1"),
    ({"lr_scheduler": "cosine-restarts"}, "learning-rate scheduler must be one of"),
])
def test_job_refuses_bad_caption_options(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainJob(name="my-style", data="ds", **changes).validate()


def test_job_defaults_are_off_and_presets_may_set_the_options():
    from studio.train.job import check_train_settings

    job = TrainJob(name="my-style", data="ds")
    assert not CaptionOptions.from_job(job).active and job.lr_cycles == 1
    settings = {"method": "lora", "shuffle_tags": True, "keep_tokens": 1, "caption_dropout": 0.05,
                "tag_dropout": 0.1, "caption_prefix": "sks", "caption_suffix": "", "lr_scheduler":
                "cosine_with_restarts", "lr_cycles": 3}
    check_train_settings(settings, "training preset mine.yaml")
    with pytest.raises(ValueError, match="mine.yaml"):
        check_train_settings({**settings, "tag_dropout": 2}, "training preset mine.yaml")


class FakeMethod:
    """Just what TrainMethod.batch_prompts reads: the job, its caption options, prompts()."""

    batch_prompts = TrainMethod.batch_prompts

    def __init__(self, job: TrainJob, drops_prompt: bool, template: str = "[filewords]"):
        self.job, self.caption_options, self.drops_prompt = job, CaptionOptions.from_job(job), drops_prompt
        self.template = template

    def prompts(self, captions, rng):
        return [self.template.replace("[filewords]", caption).strip(", ") for caption in captions]


def test_prompts_per_micro_batch_are_seeded_and_dropout_respects_the_method():
    job = TrainJob(name="x-tok", data="ds", shuffle_tags=True, keep_tokens=1, tag_dropout=0.2, caption_dropout=0.3,
                   seed=5)
    lora = FakeMethod(job, drops_prompt=True, template="a shot of [filewords]")
    captions, indices = [CAPTION, CAPTION], [3, 3]  # one image twice in a batch: two different draws
    first = lora.batch_prompts(captions, random.Random(0), 11, indices)
    assert first == lora.batch_prompts(captions, random.Random(0), 11, indices)  # again from the seed
    # each item is shape_caption with its own generator (seed, micro-batch, position, image)
    expected = [shape_caption(CAPTION, caption_rng(5, 11, pos, 3), shuffle=True, keep_tokens=1, tag_dropout=0.2,
                              caption_dropout=0.3) for pos in range(2)]
    assert [p.removeprefix("a shot of ") if p else "" for p in first] == expected
    many = [lora.batch_prompts([CAPTION], random.Random(0), i, [0])[0] for i in range(400)]
    assert len(set(many)) > 100 and 0.2 < many.count("") / 400 < 0.4  # LoRA: dropped = an empty prompt
    # Textual Inversion: a dropped caption empties [filewords] only; the template keeps the name
    ti = FakeMethod(job, drops_prompt=False, template="art by x-tok, [filewords]")
    prompts = [ti.batch_prompts([CAPTION], random.Random(0), i, [0])[0] for i in range(400)]
    assert all(p.startswith("art by x-tok") for p in prompts) and prompts.count("art by x-tok") > 80
    # all off: the method's prompts() as before, whatever the micro-batch
    plain = FakeMethod(TrainJob(name="x-tok", data="ds"), drops_prompt=True)
    assert plain.batch_prompts(captions, random.Random(0), 11, indices) == captions


# --- the learning-rate schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_steps, warmup, cycles", [(100, 0, 1), (100, 10, 3), (37, 5, 2), (10, 0, 4)])
def test_cosine_with_restarts_equals_diffusers_scheduler(max_steps, warmup, cycles):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler("cosine_with_restarts", optimizer, num_warmup_steps=warmup,
                              num_training_steps=max_steps, num_cycles=cycles)
    job = TrainJob(name="x", data="d", learning_rate="1.0", lr_scheduler="cosine_with_restarts", lr_warmup=warmup,
                   lr_cycles=cycles, max_steps=max_steps)
    rate = rate_function(job, job.learning_rate)
    for step in range(1, max_steps + 1):  # optimizer step n uses diffusers' factor of its 0-based index
        expected = optimizer.param_groups[0]["lr"]
        assert lr_factor("cosine_with_restarts", step, max_steps, warmup, cycles) == pytest.approx(expected, abs=1e-12)
        assert rate(step) == pytest.approx(expected, abs=1e-12)
        optimizer.step()
        scheduler.step()
    if cycles > 1:  # it restarts: the rate jumps back up somewhere after the warmup
        rates = [rate(s) for s in range(warmup + 1, max_steps + 1)]
        assert any(b > a + 0.1 for a, b in zip(rates, rates[1:], strict=False))
    assert "cosine_with_restarts" in LR_SCHEDULERS


# --- training runs on demo-tiny ---------------------------------------------------------------------------------


def tag_cfg(tmp_path, name="home"):
    """A studio home with the LoRA tests' `stripes` dataset, its captions rewritten as several tags."""
    from test_train_ti import home_cfg

    cfg = home_cfg(tmp_path, name)
    for i, caption in enumerate(sorted((cfg.datasets_dir / "stripes").glob("*.txt"))):
        caption.write_text(f"stripes, red, number {i}, noise, vertical lines, dark", encoding="utf-8")
    return cfg


def test_lora_metadata_and_config_record_the_options(tmp_path):
    from test_train_lora import NAME, lora_job

    from studio.files.networks import kohya_metadata
    from studio.train.loop import Trainer
    from studio.train.run_folder import RunFolder

    cfg = tag_cfg(tmp_path)
    trainer = Trainer(cfg)
    result = trainer.start(lora_job(max_steps=2, save_every=100, shuffle_tags=True, keep_tokens=1,
                                    caption_dropout=0.05, tag_dropout=0.1, caption_prefix="shot-close",
                                    lr_scheduler="cosine_with_restarts", lr_cycles=2, lr_warmup=1))
    assert result.state == "finished", result.message
    with safe_open(str(cfg.loras_dir / f"{NAME}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_shuffle_caption"], meta["ss_keep_tokens"]) == ("True", "1")
    assert (meta["ss_caption_dropout_rate"], meta["ss_caption_tag_dropout_rate"]) == ("0.05", "0.1")
    assert meta["ss_caption_dropout_every_n_epochs"] == "0"
    assert (meta["ss_lr_scheduler"], meta["ss_lr_scheduler_num_cycles"]) == ("cosine_with_restarts", "2")
    assert meta["ss_lr_warmup_steps"] == "1"
    assert meta["modelspec.trigger_phrase"] == "shot-close"  # the prefix is the trigger word
    # what the UNet saw: the prefix first, then the kept tag, the others shuffled or dropped
    for prompt in trainer.last_batch["prompts"]:
        assert prompt == "" or prompt.startswith("shot-close, stripes"), prompt
    job = RunFolder.open(result.run_dir).job()
    assert (job.lr_scheduler, job.lr_cycles, job.shuffle_tags, job.caption_prefix) == \
        ("cosine_with_restarts", 2, True, "shot-close")
    text = (result.run_dir / "config.yaml").read_text(encoding="utf-8")
    assert "lr_scheduler: cosine_with_restarts" in text and "lr_cycles: 2" in text
    # kohya's strings for the options off; none written when not given
    off = kohya_metadata(output_name="x", family="sd1", rank=4, alpha=4, shuffle_caption=False, keep_tokens=0,
                         caption_dropout_rate=0, caption_tag_dropout_rate=0, caption_dropout_every_n_epochs=0)
    assert [off[k] for k in ("ss_shuffle_caption", "ss_keep_tokens", "ss_caption_dropout_rate",
                             "ss_caption_tag_dropout_rate", "ss_caption_dropout_every_n_epochs")] == \
        ["False", "0", "0.0", "0.0", "0"]
    assert "ss_shuffle_caption" not in kohya_metadata(output_name="x", family="sd1", rank=4, alpha=4)


def test_lora_resume_with_shuffled_and_dropped_tags_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import threading

    from test_train_lora import lora_job

    from studio.train.loop import Trainer

    seen: dict[str, dict[int, list[str]]] = {"whole": {}, "resumed": {}}
    original = TrainMethod.batch_prompts
    current = {"run": "whole"}

    def recording(self, captions, rng, micro_batch, indices):
        prompts = original(self, captions, rng, micro_batch, indices)
        seen[current["run"]][micro_batch] = prompts
        return prompts

    monkeypatch.setattr(TrainMethod, "batch_prompts", recording)
    settings = dict(max_steps=3, save_every=100, train_text_encoder=True, shuffle_tags=True, keep_tokens=1,
                    tag_dropout=0.3, caption_dropout=0.25)
    whole = Trainer(tag_cfg(tmp_path, "a")).start(lora_job(**settings))
    cfg = tag_cfg(tmp_path, "b")
    cancel = threading.Event()
    current["run"] = "stopped"
    seen["stopped"] = {}
    stopped = Trainer(cfg, cancel=cancel, on_event=lambda k, i: cancel.set() if k == "loss" and i["step"] == 1
                      else None).start(lora_job(**settings))
    assert stopped.state == "stopped" and stopped.step == 1
    current["run"] = "resumed"
    resumed = Trainer(cfg).resume(stopped.run_dir)
    assert resumed.step == 3
    assert sorted(seen["resumed"]) == [1, 2]
    assert {i: seen["whole"][i] for i in (1, 2)} == seen["resumed"]  # the very prompts, from the seed
    assert len({p for prompts in seen["whole"].values() for p in prompts}) > 2  # they do change
    assert resumed.losses == pytest.approx(whole.losses[1:], rel=1e-5)
    with safe_open(str(whole.output), framework="pt") as a, safe_open(str(resumed.output), framework="pt") as b:
        for key in a.keys():
            assert torch.allclose(a.get_tensor(key).float(), b.get_tensor(key).float(), atol=1e-3), key


# --- the command line and the Train tab ------------------------------------------------------------------------


def test_command_line_flags_fill_the_job():
    from studio.cli import build_parser
    from studio.cli.train import train_job_from_args

    args = build_parser().parse_args(["train", "lora", "--data", "d", "--name", "n", "--shuffle-tags",
                                      "--keep-tokens", "2", "--caption-dropout", "0.1", "--tag-dropout", "0.2",
                                      "--caption-prefix", "sks", "--caption-suffix", "best", "--lr-scheduler",
                                      "cosine_with_restarts", "--lr-cycles", "3"])
    job = train_job_from_args(args)
    job.validate()
    assert (job.shuffle_tags, job.keep_tokens, job.caption_dropout, job.tag_dropout) == (True, 2, 0.1, 0.2)
    assert (job.caption_prefix, job.caption_suffix, job.lr_scheduler, job.lr_cycles) == \
        ("sks", "best", "cosine_with_restarts", 3)
    plain = train_job_from_args(build_parser().parse_args(["train", "ti", "--data", "d", "--name", "n"]))
    assert not CaptionOptions.from_job(plain).active and plain.lr_cycles == 1
    off = train_job_from_args(build_parser().parse_args(["train", "ti", "--data", "d", "--name", "n",
                                                         "--no-shuffle-tags"]))
    assert off.shuffle_tags is False


def test_train_tab_builds_the_caption_controls_and_their_values_reach_the_job(tmp_path, monkeypatch):
    import gradio as gr

    from studio.config import StudioConfig
    from studio.ui import train_tab
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path / "home"))
    with gr.Blocks() as demo:
        model = gr.Dropdown(["demo-tiny"], value="demo-tiny", elem_id="model")
        train_tab.build(state, model)
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    labels = {key: by_id[key].label for key in ("tr-captions", "tr-shuffle-tags", "tr-keep-tokens",
                                                 "tr-caption-dropout", "tr-tag-dropout", "tr-caption-prefix",
                                                 "tr-caption-suffix", "tr-lr-cycles")}
    assert labels == {"tr-captions": "Captions", "tr-shuffle-tags": "Shuffle tags",
                      "tr-keep-tokens": "Keep first N tags in place",
                      "tr-caption-dropout": "Drop the whole caption (rate)", "tr-tag-dropout": "Drop each tag (rate)",
                      "tr-caption-prefix": "Caption prefix", "tr-caption-suffix": "Caption suffix",
                      "tr-lr-cycles": "Restart cycles"}
    assert ("cosine with restarts", "cosine_with_restarts") in by_id["tr-scheduler"].choices
    # the Start button's function, as Gradio calls it, with the widgets' values: the job carries them
    start = next(fn for fn in demo.fns.values() if fn.fn is not None and fn.fn.__name__ == "start")
    typed = {"tr-dataset": "stripes", "tr-name": "tagged", "tr-shuffle-tags": True, "tr-keep-tokens": 2.0,
             "tr-caption-dropout": 0.1, "tr-tag-dropout": 0.25, "tr-caption-prefix": " sks ",
             "tr-caption-suffix": "best quality", "tr-scheduler": "cosine_with_restarts", "tr-lr-cycles": 3.0}
    values = [typed.get(getattr(block, "elem_id", None), getattr(block, "value", None)) for block in start.inputs]
    jobs = []

    def fake_start(job):
        jobs.append(job)
        raise ValueError("not training in this test")

    monkeypatch.setattr(state.trainer, "start", fake_start)
    with pytest.raises(gr.Error, match="not training"):
        start.fn(*values)
    [job] = jobs
    job.validate()
    assert (job.shuffle_tags, job.keep_tokens, job.caption_dropout, job.tag_dropout) == (True, 2, 0.1, 0.25)
    assert isinstance(job.keep_tokens, int) and isinstance(job.lr_cycles, int)
    assert (job.caption_prefix, job.caption_suffix) == ("sks", "best quality")
    assert (job.lr_scheduler, job.lr_cycles, job.data, job.name) == ("cosine_with_restarts", 3, "stripes", "tagged")
