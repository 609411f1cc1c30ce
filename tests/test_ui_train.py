"""The Train tab: its pure helpers (form -> TrainJob, method defaults, presets fitted to the model and machine,
RunView -> plot, previews, status), and the real app in headless Chromium training demo-tiny to the end,
surviving a reload, stopping a second run, and training a LoRA that shows up in the Generate tab's cards."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"


def make_dataset(folder: Path, n: int = 4, size: int = 64) -> None:
    """n small noisy pictures with .txt captions, as a folder users would train on."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.full((size, size, 3), (40 * i, 120, 200 - 30 * i), dtype=np.int16)
        pixels = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"piece{i}.png")
        (folder / f"piece{i}.txt").write_text(f"a blue painting, number {i}")


# --- the pure helpers ------------------------------------------------------------------------------------


def form_values(**changes) -> dict:
    from studio.train.job import TrainJob
    from studio.ui.train_tab import FORM

    values = {k: v for k, v in TrainJob().to_dict().items() if k in FORM}
    values.update(data="tiny-set", name="blue-style")
    return {**values, **changes}


def test_job_from_form_converts_widget_values():
    from studio.ui.train_tab import job_from_form

    # numbers arrive from gr.Number as floats, text with stray spaces, empty repeats / flip as None
    job = job_from_form(form_values(max_steps=20.0, resolution=64.0, learning_rate=" 0.005:10, 1e-3 ",
                                    name=" blue-style ", repeats=0, flip_p="dataset's", aux_weight=0),
                        "demo-tiny", {"keep_checkpoints": 1})
    job.validate()
    assert (job.max_steps, job.resolution, job.name, job.model) == (20, 64, "blue-style", "demo-tiny")
    assert isinstance(job.max_steps, int) and job.learning_rate == "0.005:10, 1e-3"
    assert job.repeats is None and job.flip_p is None and job.keep_checkpoints == 1
    assert job_from_form(form_values(repeats=3.0, flip_p="0.5"), "x").flip_p == 0.5
    assert job_from_form(form_values(repeats=3.0), "x").repeats == 3
    with pytest.raises(ValueError, match="flip probability must be a number"):
        job_from_form(form_values(flip_p="often"), "demo-tiny")
    with pytest.raises(ValueError, match="max steps must be a whole number"):
        job_from_form(form_values(max_steps=2.5), "demo-tiny")
    bad = job_from_form(form_values(learning_rate="0.005:100, fast"), "demo-tiny")
    with pytest.raises(ValueError, match="'fast'"):
        bad.validate()


def test_preset_fills_the_form_and_keeps_other_settings():
    from studio.train.job import list_train_presets
    from studio.ui.train_tab import form_from_settings, job_from_form

    current = form_values(max_steps=20)
    preset = list_train_presets()["Seed 000: TI-MoE"]
    form, extra = form_from_settings(current, preset.settings)
    assert form["method"] == "ti-moe" and form["experts"] == 4 and form["max_steps"] == 1000
    assert form["data"] == "tiny-set" and form["name"] == "blue-style"  # the preset leaves them alone
    assert (form["repeats"], form["flip_p"]) == (100, "0.5")  # as the widgets show them
    assert extra == {}
    form, extra = form_from_settings(current, {"max_steps": 5, "keep_checkpoints": 2, "model": "elsewhere"})
    assert extra == {"keep_checkpoints": 2}
    assert job_from_form(form, "demo-tiny", extra).keep_checkpoints == 2


def test_job_from_form_lora_and_finetune_values():
    from studio.ui.train_tab import job_from_form

    lora = job_from_form(form_values(
        method="lora", learning_rate="1e-4", rank=16.0, alpha="8", dropout=0.1, lora_targets="all",
        train_text_encoder=True, text_encoder_lr=" 5e-5 ", instance_prompt=" a shot of [filewords] ",
        save_diffusers=True, class_prompt="a photo of a room", class_images=4.0, prior_loss_weight=0.5,
        lr_scheduler="cosine", lr_warmup=0.1, optimizer="adamw", max_grad_norm=1.0, gradient_checkpointing=True,
        min_snr_gamma=5.0, noise_offset=0.05,
        # widgets of other methods (hidden) do not reach the job
        init_word="", vectors=3.0, ema=True, output="elsewhere.safetensors"), "demo-tiny")
    lora.validate()
    assert (lora.method, lora.rank, lora.alpha, lora.dropout, lora.lora_targets) == ("lora", 16, 8.0, 0.1, "all")
    assert isinstance(lora.rank, int) and isinstance(lora.class_images, int)
    assert lora.train_text_encoder and lora.text_encoder_lr == 5e-5 and lora.save_diffusers
    assert lora.instance_prompt == "a shot of [filewords]"
    assert (lora.class_prompt, lora.class_images, lora.prior_loss_weight) == ("a photo of a room", 4, 0.5)
    assert (lora.lr_scheduler, lora.lr_warmup, lora.max_grad_norm, lora.min_snr_gamma) == ("cosine", 0.1, 1.0, 5.0)
    assert lora.gradient_checkpointing and lora.noise_offset == 0.05
    assert (lora.init_word, lora.vectors, lora.ema, lora.output) == ("*", 1, False, "")
    # empty alpha and text encoder rate: the rank and the UNet's rate; warmup 100.0 is 100 steps
    plain = job_from_form(form_values(method="lora", alpha=None, text_encoder_lr="", lr_warmup=100.0), "x")
    assert plain.alpha is None and plain.text_encoder_lr is None and plain.lr_warmup == 100
    assert isinstance(plain.lr_warmup, int)
    with pytest.raises(ValueError, match="text encoder learning rate must be a number"):
        job_from_form(form_values(method="lora", text_encoder_lr="slow"), "demo-tiny")

    tune = job_from_form(form_values(method="finetune", learning_rate="1e-5", ema=True, ema_decay=0.999,
                                     output=" /tmp/out.safetensors ", rank=64.0, class_prompt=""), "demo-tiny")
    tune.validate()
    assert (tune.ema, tune.ema_decay, tune.output, tune.rank) == (True, 0.999, "/tmp/out.safetensors", 4)
    # a class prompt left in the (hidden) DreamBooth box does not break a Textual Inversion job
    ti = job_from_form(form_values(class_prompt="a dog", class_images=10), "demo-tiny")
    ti.validate()
    assert ti.class_images == 0


def test_job_from_form_caption_options_and_restart_cycles():
    from studio.ui.train_tab import FORM, SCHEDULER_CHOICES, form_from_settings, job_from_form

    job = job_from_form(form_values(method="lora", learning_rate="1e-4", shuffle_tags=True, keep_tokens=1.0,
                                    caption_dropout=0.05, tag_dropout=0.1, caption_prefix=" sks ",
                                    caption_suffix="", lr_scheduler="cosine_with_restarts", lr_cycles=4.0),
                        "demo-tiny")
    job.validate()
    assert (job.shuffle_tags, job.keep_tokens, job.caption_dropout, job.tag_dropout) == (True, 1, 0.05, 0.1)
    assert (job.caption_prefix, job.lr_scheduler, job.lr_cycles) == ("sks", "cosine_with_restarts", 4)
    assert isinstance(job.keep_tokens, int) and isinstance(job.lr_cycles, int)
    # every method shapes its captions (Textual Inversion: [filewords])
    assert job_from_form(form_values(shuffle_tags=True), "demo-tiny").shuffle_tags
    # a preset (or an earlier run) fills the caption widgets
    form, extra = form_from_settings(form_values(), {"shuffle_tags": True, "keep_tokens": 2, "lr_cycles": 3})
    assert (form["shuffle_tags"], form["keep_tokens"], form["lr_cycles"]) == (True, 2, 3) and extra == {}
    assert {"shuffle_tags", "keep_tokens", "caption_dropout", "tag_dropout", "caption_prefix", "caption_suffix",
            "lr_cycles"} <= set(FORM)
    assert ("cosine with restarts", "cosine_with_restarts") in SCHEDULER_CHOICES
    with pytest.raises(ValueError, match="keep tokens must be a whole number"):
        job_from_form(form_values(keep_tokens=1.5), "demo-tiny")


def test_method_defaults_and_presets():
    from studio.train.job import METHODS, TrainJob
    from studio.ui.train_tab import FORM, ONLY_FOR, job_from_form, method_defaults, method_presets, shown_for

    assert method_defaults("lora") == {"learning_rate": "1e-4", "preview_prompt": ""}
    assert method_defaults("finetune")["learning_rate"] == "1e-5"
    assert method_defaults("ti") == {"learning_rate": "0.005", "preview_prompt": TrainJob().preview_prompt}
    for method in METHODS:  # switching to a method and starting gives the command line's job for it
        job = job_from_form(form_values(method=method, **method_defaults(method)), "demo-tiny")
        expected = TrainJob.for_method(method)
        assert (job.learning_rate, job.preview_prompt) == (expected.learning_rate, expected.preview_prompt)
    assert set(ONLY_FOR) <= set(FORM)
    assert shown_for("rank", "lora") and not shown_for("rank", "ti") and shown_for("lr_scheduler", "ti")
    assert shown_for("class_prompt", "finetune") and not shown_for("init_word", "ti-moe")
    assert set(method_presets(None, "lora")) == {"Seed 004: DreamShot LoRA (table 5.1)", "kohya_ss LoRA defaults",
                                                 "LoRA for 8 GB cards"}
    assert set(method_presets(None, "finetune")) == {"Seed 001: full fine-tune",
                                                     "Seed 003: fine-tune with EMA, 8-bit Adam"}
    assert list(method_presets(None, "ti-att")) == ["Seed 000: TI-Att"]


def test_presets_fitted_to_demo_tiny_and_the_cpu(monkeypatch):
    from studio.train.job import list_train_presets
    from studio.ui import train_tab
    from studio.ui.train_tab import fit_settings, form_from_settings

    presets = list_train_presets()
    att = presets["Seed 000: TI-Att"].settings
    fitted, notes = fit_settings(att, "demo-tiny", cuda=False)
    assert fitted["image_encoder"] == "demo-tiny" and att["image_encoder"] == "openai/clip-vit-large-patch14"
    assert len(notes) == 1 and "demo-tiny" in notes[0] and "openai/clip-vit-large-patch14" in notes[0]
    assert fit_settings(att, "sd15.safetensors", cuda=False) == (att, [])  # a real model keeps it
    on_micro, notes = fit_settings(att, "micro", cuda=False)  # micro ships offline: so must its encoder
    assert on_micro["image_encoder"] == "demo-tiny" and "random weights" in notes[0]
    assert fit_settings({"image_encoder": "demo-tiny"}, "demo-tiny", cuda=False)[1] == []
    ti_run = {"method": "ti", "image_encoder": "openai/clip-vit-large-patch14"}  # a TI run's settings: unused
    assert fit_settings(ti_run, "demo-tiny", cuda=False) == ({"method": "ti", "image_encoder": "demo-tiny"}, [])

    kohya = presets["kohya_ss LoRA defaults"].settings
    fitted, notes = fit_settings(kohya, "demo-tiny", cuda=False)
    assert (fitted["mixed_precision"], fitted["optimizer"]) == ("no", "adamw") and len(notes) == 2
    assert any("8-bit AdamW needs a CUDA GPU" in n for n in notes) and any("fp16" in n for n in notes)
    form, _ = form_from_settings(form_values(), fitted)
    assert (form["method"], form["rank"], form["alpha"], form["text_encoder_lr"]) == ("lora", 8, "1", "5e-05")
    monkeypatch.setattr(train_tab.importlib.util, "find_spec", lambda name: None)
    assert "bitsandbytes" in fit_settings(kohya, "demo-tiny", cuda=True)[1][0]
    monkeypatch.setattr(train_tab.importlib.util, "find_spec", lambda name: object())
    assert fit_settings(kohya, "demo-tiny", cuda=True) == (kohya, [])  # a CUDA machine runs it as it is


def test_status_tells_how_to_use_the_result(tmp_path):
    from studio.train.job import TrainJob
    from studio.train.run_folder import RunFolder
    from studio.train.worker import RunView
    from studio.ui.train_tab import status_text

    def done(method, output, run_dir="/r"):
        return RunView(state="finished", name="blue", method=method, step=10, max_steps=10, run_dir=run_dir,
                       message="finished 10 steps", embedding=output)

    assert "`blue`" in status_text(done("ti", "/e/blue.safetensors"))
    assert "`<lora:blue:0.8>`" in status_text(done("lora", "/l/blue.safetensors"))
    models = tmp_path / "models"
    text = status_text(done("finetune", str(models / "blue.safetensors")), models)
    assert "Pick `blue.safetensors` in the model list" in text
    assert "move it there" in status_text(done("finetune", str(tmp_path / "blue.safetensors")), models)
    # a run read back from its folder (after a reload) finds its file in status.json
    run = RunFolder.create(tmp_path / "runs", TrainJob(data="d", name="blue", method="lora"))
    run.write_status(state="finished", step=10, max_steps=10, output="/l/blue.safetensors")
    assert "<lora:blue:0.8>" in status_text(done("lora", None, str(run.path)))
    assert "lora:" not in status_text(done("lora", None, None))


def test_run_view_to_plot_previews_status():
    from studio.train.worker import RunView
    from studio.ui.train_tab import loss_frame, preview_items, progress_html, status_text

    frame = loss_frame([(1, 1.0), (2, 0.0), (3, 0.5)])
    assert list(frame.columns) == ["step", "loss", "series"]
    raw = frame[frame.series == "loss"]
    smooth = frame[frame.series == "smoothed"]
    assert raw.step.tolist() == [1, 2, 3] and raw.loss.tolist() == [1.0, 0.0, 0.5]
    assert smooth.loss.iloc[0] == pytest.approx(1.0)  # debiased: starts at the first loss, not at 0
    assert 0.0 < smooth.loss.iloc[1] < 1.0
    long = loss_frame([(s, 1.0 / s) for s in range(1, 10_001)], max_points=500)
    assert len(long) <= 2 * 501 and long.step.max() == 10_000  # thinned, the last step kept
    assert loss_frame([]) is None  # an empty frame would leave the plot blank for later data

    items = preview_items(["/r/previews/step-00000000.png", "/r/previews/step-00000250.png"])
    assert [caption for _, caption in items] == ["step 0", "step 250"]

    view = RunView(state="running", name="blue-style", method="ti", step=5, max_steps=20,
                   progress="step 5/20 · loss 0.1 · 2.00 steps/s · ETA 0:08", run_dir="/r")
    assert "running" in status_text(view) and "ETA 0:08" in status_text(view)
    assert "width:25.0%" in progress_html(view) and "5 / 20 steps" in progress_html(view)
    done = RunView(state="finished", name="blue-style", method="ti", step=20, max_steps=20, run_dir="/r",
                   message="finished 20 steps", embedding="/e/blue-style.safetensors")
    assert "finished 20 steps" in status_text(done) and "`blue-style`" in status_text(done)
    assert "No training run yet" in status_text(RunView())


def test_dataset_info_and_runs(tmp_path):
    from studio.train.job import TrainJob
    from studio.train.run_folder import RunFolder
    from studio.ui.train_tab import dataset_choices, dataset_info, run_choices

    make_dataset(tmp_path / "datasets" / "tiny-set")
    (tmp_path / "datasets" / "tiny-set" / "piece3.txt").unlink()
    assert dataset_choices(tmp_path / "datasets") == ["tiny-set"]
    info = dataset_info("tiny-set", tmp_path / "datasets")
    assert "**4** image(s), 3 with a caption" in info and "without a caption" in info
    assert "not found" in dataset_info("nope", tmp_path / "datasets")
    run = RunFolder.create(tmp_path / "runs", TrainJob(data="tiny-set", name="blue-style", max_steps=30))
    run.write_status(state="stopped", step=10, max_steps=30)
    [(label, path)] = run_choices([run])
    assert path == str(run.path) and label.endswith("· stopped · step 10/30")


# --- the real app ----------------------------------------------------------------------------------------


def prepare_shared_home(home: Path) -> None:
    """The dataset this module trains on, in the shared app's home before it starts (see conftest's shared_app)."""
    make_dataset(home / "datasets" / "tiny-set")


@pytest.fixture(scope="module")
def app(shared_app):
    """`python app.py` on a free port with a throwaway home holding the dataset 'tiny-set' (conftest's shared_app;
    this module's runs are 'blue-*'); (url, home)."""
    return shared_app


def fill(page, elem_id: str, value, key: str = "Tab") -> None:
    """Type into a textbox, number or dropdown (Enter picks the dropdown's first match)."""
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press(key)


def fill_settled(page, elem_id: str, value) -> None:
    """Fill a number box inside a just-opened accordion and check the value stuck: while the accordion mounts, a
    box filled too early is re-rendered with its old value (seen on a loaded machine)."""
    from playwright.sync_api import expect

    box = page.locator(f"#{elem_id} input").first
    box.wait_for(state="visible", timeout=30_000)
    for attempt in range(3):
        fill(page, elem_id, value)
        try:
            expect(box).to_have_value(str(value), timeout=3_000)
            page.wait_for_timeout(300)
            expect(box).to_have_value(str(value), timeout=1_000)
            return
        except AssertionError:
            if attempt == 2:
                raise


def status(page) -> str:
    return page.locator("#tr-status").inner_text()


def wait_status(page, word: str, timeout: float) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => document.querySelector('#tr-status').innerText.includes({word!r})",
                               timeout=timeout)
    except PlaywrightTimeout:
        page.screenshot(path=str(ARTIFACTS / "train_tab_failure.png"), full_page=True)
        raise AssertionError(f"status never said {word!r}; it says: {status(page)!r}") from None


@pytest.mark.browser
def test_browser_train_to_the_end_reload_and_stop(app, browser):
    url, home = app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    # 1. a short run on demo-tiny: dataset picked by name, 20 steps at 64 px, previews and saves every 10
    fill(page, "tr-dataset", "tiny-set", "Enter")
    page.locator("#tr-dataset-info").get_by_text("4").first.wait_for(timeout=30_000)
    fill(page, "tr-name", "blue-style")
    fill(page, "tr-steps", 20)
    fill(page, "tr-resolution", 64)
    page.get_by_text("Run settings").click()
    fill_settled(page, "tr-preview-every", 10)
    fill_settled(page, "tr-save-every", 10)
    page.locator("#tr-start").click()
    wait_status(page, "finished", 180_000)  # 20 steps and 3 previews take ~10 s on 2 idle CPU cores
    try:
        page.wait_for_function("() => document.querySelectorAll('#tr-previews img').length >= 3",
                               timeout=30_000)
    except Exception as e:
        page.screenshot(path=str(ARTIFACTS / "train_tab_failure.png"), full_page=True)
        raise AssertionError(f"previews: {page.locator('#tr-previews').inner_text()!r}; status "
                             f"{status(page)!r}; log {page.locator('#tr-log textarea').input_value()[-800:]!r}") from e
    # the plot is Vega's SVG: one line per series (loss and smoothed)
    page.wait_for_function("() => document.querySelectorAll('#tr-loss-plot .mark-line path').length >= 2",
                           timeout=30_000)
    lines = page.locator("#tr-loss-plot .mark-line path").evaluate_all("ps => ps.map(p => p.getAttribute('d'))")
    previews = page.locator("#tr-previews img").count()
    captions = page.locator("#tr-previews").inner_text()
    log = page.locator("#tr-log textarea").input_value()
    finished = status(page)
    page.screenshot(path=str(ARTIFACTS / "train_tab.png"), full_page=True)

    # 2. a reload shows the finished run again: status, plot and previews, and the form holds its settings
    page.reload()
    page.get_by_role("tab", name="Train").click()
    wait_status(page, "blue-style", 60_000)
    reloaded = status(page)
    page.wait_for_function("() => document.querySelectorAll('#tr-previews img').length >= 3", timeout=30_000)
    from playwright.sync_api import expect

    expect(page.locator("#tr-name input, #tr-name textarea").first).to_have_value("blue-style", timeout=30_000)
    expect(page.locator("#tr-steps input").first).to_have_value("20")
    expect(page.locator("#tr-resolution input").first).to_have_value("64")
    expect(page.locator("#tr-dataset input").first).to_have_value("tiny-set")
    assert "settings of the last run" in page.locator("#tr-preset-info").inner_text()

    # 3. a long run, stopped by hand: it keeps what it learned so far
    fill(page, "tr-dataset", "tiny-set", "Enter")
    fill(page, "tr-name", "blue-stop")
    fill(page, "tr-steps", 100_000)
    page.locator("#tr-start").click()
    wait_status(page, "running", 60_000)
    page.wait_for_function(
        "() => /step [1-9]/.test(document.querySelector('#tr-status').innerText)", timeout=60_000)
    page.locator("#tr-stop").click()
    wait_status(page, "stopped", 60_000)
    stopped = status(page)

    # 4. resume the stopped run for 5 more steps from its last checkpoint
    stop_step = int(re.search(r"stopped at step (\d+)", stopped).group(1))
    page.get_by_text("Resume an earlier run").click()
    page.locator("#tr-runs input").click()
    page.get_by_role("option", name=re.compile(r"^blue-stop-.* · stopped")).click()
    fill(page, "tr-resume-steps", stop_step + 5)
    page.locator("#tr-resume").click()
    wait_status(page, f"finished {stop_step + 5} steps", 120_000)
    resumed = status(page)

    # 5. the Generate tab's embedding cards show both embeddings without a restart
    page.get_by_role("tab", name="Generate").click()
    page.get_by_role("button", name="LoRAs and embeddings").click()
    page.get_by_role("tab", name="Embeddings").click()
    page.wait_for_function(
        "() => document.querySelector('#embedding-cards').innerText.includes('blue-stop')", timeout=30_000)
    cards = page.locator("#embedding-cards").inner_text()

    assert "finished 20 steps" in finished and "blue-style" in finished
    assert len(lines) >= 2 and all(d and d.count("L") >= 5 for d in lines)  # drawn through the steps
    assert previews >= 3 and "step 0" in captions and "step 20" in captions
    assert "checkpoint" in log or "run folder" in log
    assert (home / "embeddings" / "blue-style.safetensors").is_file()
    assert "finished" in reloaded and "finished 20 steps" in reloaded
    assert "stopped at step" in stopped and "/100000" in stopped
    assert (home / "embeddings" / "blue-stop.safetensors").is_file()
    assert "blue-stop" in resumed and "/100000" not in resumed  # the run now ends at the new step count
    assert "blue-style" in cards and "blue-stop" in cards
    runs = sorted(p.name for p in (home / "runs").iterdir() if p.name.startswith("blue-st"))
    assert len(runs) == 2 and runs[0].startswith("blue-stop") and runs[1].startswith("blue-style")


def visible(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").is_visible()


@pytest.mark.browser
def test_browser_lora_and_finetune_runs(app, browser):
    url, home = app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    method = page.locator("#tr-method")
    # 1. TI-Att's preset asks for a CLIP download; on demo-tiny the image encoder is demo-tiny, with a note
    method.get_by_text("TI-Att (attention inversion module)", exact=True).click()
    page.locator("#tr-module").wait_for(state="visible", timeout=10_000)
    page.locator("#tr-preset input").click()
    page.get_by_role("option", name="Painting style: embedding with an attention module (4 paintings, 1000 steps)").click()
    page.wait_for_function(
        "() => document.querySelector('#tr-preset-info').innerText.includes('image encoder is demo-tiny')",
        timeout=10_000)
    encoder = page.locator("#tr-image-encoder input, #tr-image-encoder textarea").first.input_value()
    ti_att = {key: visible(page, key) for key in ("tr-module", "tr-heads", "tr-experts", "tr-lora")}

    # 2. LoRA: its widgets, its learning rate and presets
    method.get_by_text("LoRA (DreamBooth-LoRA)", exact=True).click()
    page.locator("#tr-lora").wait_for(state="visible", timeout=10_000)
    page.wait_for_function("() => document.querySelector('#tr-lr input, #tr-lr textarea').value === '1e-4'",
                           timeout=10_000)
    lora = {key: visible(page, key) for key in ("tr-lora", "tr-dreambooth", "tr-instance-prompt", "tr-module",
                                                 "tr-finetune", "tr-init-word", "tr-template", "tr-format")}
    page.locator("#tr-preset input").click()
    lora_presets = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")

    # 3. a short LoRA run: 10 steps at 64 px, a preview every 5 (the TI-Att preset's batch 4 set back to 1)
    fill(page, "tr-dataset", "tiny-set", "Enter")
    fill(page, "tr-name", "blue-lora")
    fill(page, "tr-steps", 10)
    fill(page, "tr-resolution", 64)
    fill(page, "tr-batch", 1)
    page.get_by_text("DreamBooth prior preservation").click()
    page.get_by_text("Optimisation", exact=True).click()
    page.get_by_text("Run settings").click()
    fill_settled(page, "tr-preview-every", 5)
    page.locator("#tr-form").screenshot(path=str(ARTIFACTS / "train_tab_lora.png"))
    page.locator("#tr-start").click()
    wait_status(page, "<lora:blue-lora:0.8>", 180_000)  # said when it ends (not "finished": an earlier run's is)
    finished = status(page)
    page.wait_for_function("() => document.querySelectorAll('#tr-previews img').length >= 3", timeout=30_000)

    # 4. the Generate tab's LoRA cards show it without a restart
    page.get_by_role("tab", name="Generate").click()
    page.get_by_role("button", name="LoRAs and embeddings").click()
    page.locator("#extra-networks").get_by_role("tab", name="LoRA").click()
    page.wait_for_function(
        "() => document.querySelector('#lora-cards').innerText.includes('blue-lora')", timeout=30_000)
    cards = page.locator("#lora-cards").inner_text()

    # 5. a 2-step fine-tune: its checkpoint appears in the model list at the top without a restart
    page.get_by_role("tab", name="Train").click()
    method.get_by_text("Full UNet fine-tune", exact=True).click()
    page.locator("#tr-finetune").wait_for(state="visible", timeout=10_000)
    finetune = {key: visible(page, key) for key in ("tr-lora", "tr-dreambooth", "tr-instance-prompt")}
    fill(page, "tr-name", "blue-tuned")
    fill(page, "tr-steps", 2)
    fill(page, "tr-preview-every", 0)
    page.locator("#tr-start").click()
    wait_status(page, "Pick blue-tuned.safetensors", 180_000)
    tuned = status(page)
    page.locator("#model input").click()
    models = page.get_by_role("option").all_inner_texts()
    page.keyboard.press("Escape")  # not picked: picking loads it

    assert encoder == "demo-tiny"
    assert ti_att == {"tr-module": True, "tr-heads": True, "tr-experts": False, "tr-lora": False}
    assert lora == {"tr-lora": True, "tr-dreambooth": True, "tr-instance-prompt": True, "tr-module": False,
                    "tr-finetune": False, "tr-init-word": False, "tr-template": False, "tr-format": False}
    assert "kohya_ss LoRA defaults" in lora_presets and not any("TI" in name for name in lora_presets)
    assert "finished 10 steps" in finished and "<lora:blue-lora:0.8>" in finished
    assert (home / "loras" / "blue-lora.safetensors").is_file()
    assert "blue-lora" in cards
    assert finetune == {"tr-lora": False, "tr-dreambooth": True, "tr-instance-prompt": True}
    assert "finished 2 steps" in tuned and "Pick blue-tuned.safetensors in the model list" in tuned
    assert (home / "models" / "blue-tuned.safetensors").is_file() and "blue-tuned.safetensors" in models


def test_image_encoder_default_works_offline_on_the_built_in_models():
    """TI-Att and TI-MoE on micro or demo-tiny start with demo-tiny's encoder (no CLIP download); a real model with
    the CLIP hub id."""
    from types import SimpleNamespace

    from studio.train.image_encoder import DEFAULT_IMAGE_ENCODER
    from studio.ui.train_tab import model_defaults

    def state(name, source):
        model = SimpleNamespace(name=name, native_size=64, is_demo=source == "demo", source=source)
        return SimpleNamespace(manager=SimpleNamespace(current=model))

    assert model_defaults(state("micro", "micro"))[2] == "demo-tiny"
    assert model_defaults(state("demo-tiny", "demo"))[2] == "demo-tiny"
    assert model_defaults(state("sd15", "single-file"))[2] == DEFAULT_IMAGE_ENCODER


def test_job_from_form_network_fields_shown_per_network():
    from studio.ui.train_tab import FORM, NETWORK_CHOICES, form_from_settings, job_from_form, shown_for

    assert {"network", "conv_rank", "conv_alpha", "lokr_factor"} <= set(FORM)
    assert ("LoCon (LoRA + convolutions)", "locon") in NETWORK_CHOICES and ("DoRA", "dora") in NETWORK_CHOICES
    loha = job_from_form(form_values(method="lora", learning_rate="1e-4", network="loha", conv_rank=" 8 ",
                                     conv_alpha="4", lokr_factor=8.0), "demo-tiny")
    loha.validate()
    assert (loha.network, loha.conv_rank, loha.conv_alpha, loha.lokr_factor) == ("loha", 8, 4.0, -1)
    assert isinstance(loha.conv_rank, int)  # the LoKr factor (hidden for LoHa) does not reach the job
    lokr = job_from_form(form_values(method="lora", network="lokr", conv_rank="", lokr_factor=4.0), "demo-tiny")
    lokr.validate()
    assert (lokr.conv_rank, lokr.conv_alpha, lokr.lokr_factor) == (None, None, 4)
    # plain LoRA shows no conv rank: one left in the (hidden) box is ignored, as is a network for Textual Inversion
    plain = job_from_form(form_values(method="lora", network="lora", conv_rank="8", conv_alpha="2"), "demo-tiny")
    assert (plain.network, plain.conv_rank, plain.conv_alpha) == ("lora", None, None)
    ti = job_from_form(form_values(network="dora", conv_rank="4"), "demo-tiny")
    ti.validate()
    assert (ti.network, ti.conv_rank) == ("lora", None)
    assert shown_for("conv_rank", "lora", "locon") and not shown_for("conv_rank", "lora", "lora")
    assert shown_for("lokr_factor", "lora", "lokr") and not shown_for("lokr_factor", "lora", "dora")
    assert not shown_for("network", "ti") and shown_for("network", "lora")
    with pytest.raises(ValueError, match="conv rank must be a whole number"):
        job_from_form(form_values(method="lora", network="locon", conv_rank="2.5"), "demo-tiny")
    with pytest.raises(ValueError, match="conv rank must be a number"):
        job_from_form(form_values(method="lora", network="locon", conv_rank="wide"), "demo-tiny")
    # a run's settings fill the widgets (conv rank and alpha as their text boxes show them)
    form, extra = form_from_settings(form_values(), {"method": "lora", "network": "dora", "conv_rank": 4,
                                                     "conv_alpha": 2.0, "lokr_factor": -1})
    assert (form["network"], form["conv_rank"], form["conv_alpha"], form["lokr_factor"]) == ("dora", "4", "2", -1)
    assert extra == {}
