"""Training on SDXL (demo-tiny-xl), on the loop, job and files SD 1.x uses: LoRA on the UNet and both text encoders
written in kohya's SDXL layout and checked against diffusers' loader, clip_l/clip_g embeddings checked against
diffusers' textual-inversion loader, fine-tuned single files, aspect-ratio buckets with SDXL's size conditioning,
and resume."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_ti import home_cfg

from studio.config import StudioConfig
from studio.files.adapters import ActiveLora
from studio.generation.conditioning import TextualInversion, XLPromptEncoder
from studio.generation.generate import Generator
from studio.models.manager import ModelManager
from studio.models.tiny import build_tiny_xl_pipeline
from studio.train.data import SDXL_BUCKETS, bucket_sizes, load_train_data, square_crop
from studio.train.job import TrainJob
from studio.train.loop import Trainer
from studio.train.textual_inversion import initial_vectors

NAME = "xl-shot"
PROMPT = "a close shot of stripes"
# (width, height) of the training images: square, landscape 4:3, portrait 3:4 and a wide 2.5:1
SIZES = [(64, 64), (96, 72), (72, 96), (160, 64)]


def make_xl_dataset(folder: Path, sizes=SIZES) -> Path:
    """Red stripes over seeded noise at several aspect ratios, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate(sizes):
        a = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        a[:, (i % 3)::6] = [230, 20, 20]
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"stripes number {i}", encoding="utf-8")
    return folder


def xl_cfg(tmp_path: Path, name: str = "home") -> StudioConfig:
    cfg = home_cfg(tmp_path, name)
    make_xl_dataset(cfg.datasets_dir / "shapes")
    return cfg


def xl_job(**changes) -> TrainJob:
    values = dict(method="lora", model="demo-tiny-xl", name=NAME, data="shapes", resolution=64, max_steps=4,
                  batch_size=2, save_every=2, preview_every=0, preview_steps=2, learning_rate="1e-2", rank=4,
                  alpha=4)
    values.update(changes)
    return TrainJob.for_method(values.pop("method"), **values)


def falls(losses, ratio):
    return all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < ratio * losses[0]


def unet_inputs(pipe, seed: int = 5):
    """Fixed latents, timestep, conditioning and SDXL size conditioning for comparing UNet forwards."""
    g = torch.Generator().manual_seed(seed)
    width = pipe.unet.config.cross_attention_dim
    pooled = pipe.text_encoder_2.config.projection_dim
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([500, 20]),
                encoder_hidden_states=torch.randn(2, 77, width, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [72, 96, 0, 4, 56, 72]])})


@torch.no_grad()
def unet_out(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


# --- LoRA ---------------------------------------------------------------------------------------------------


def test_sdxl_lora_is_kohya_sdxl_and_diffusers_loads_it_as_the_studio_merges_it(tmp_path):
    cfg = xl_cfg(tmp_path)
    trainer = Trainer(cfg)
    result = trainer.start(xl_job(train_text_encoder=True, text_encoder_lr=1e-2, save_diffusers=True))
    assert result.state == "finished", result.message
    path = cfg.loras_dir / f"{NAME}.safetensors"
    assert result.output == path
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    for prefix in ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_", "lora_te1_",
                   "lora_te2_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any(k.startswith(("lora_te_", "lora_unet_down_blocks", "lora_unet_up_blocks")) for k in keys)
    # the first encoder's last layer is left out (SDXL reads its penultimate layer); the second's is trained
    te1_layers = {k.split("_layers_")[1].split("_")[0] for k in keys if k.startswith("lora_te1_")}
    te2_layers = {k.split("_layers_")[1].split("_")[0] for k in keys if k.startswith("lora_te2_")}
    assert te1_layers == {"0", "1"} and te2_layers == {"0", "1", "2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_enable_bucket"] == "True" and meta["ss_text_encoder_lr"] == "0.01"

    # diffusers' own loader on a fresh demo-tiny-xl, against the studio's merge of the same file
    manager = ModelManager(cfg)
    model = manager.load("demo-tiny-xl")
    gen = Generator(manager)
    lora = gen.networks.find_lora(NAME)
    assert lora.family == "sdxl"
    inputs = unet_inputs(model.pipe)
    with manager.lock:
        base_unet = unet_out(model.pipe.unet, inputs)
        base_text = XLPromptEncoder(model.pipe).encode(PROMPT)
        model.loras().apply([ActiveLora(lora, te=1.0, unet=1.0)])
        ours_unet = unet_out(model.pipe.unet, inputs)
        ours_text = XLPromptEncoder(model.pipe).encode(PROMPT)
        model.loras().apply([])
    for source in (path, result.run_dir / "diffusers"):
        ref = build_tiny_xl_pipeline()
        ref.load_lora_weights(str(source))
        theirs_unet = unet_out(ref.unet, inputs)
        with torch.no_grad():
            embeds, _, pooled, _ = ref.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        # the kohya file holds fp16 weights, as the studio merged them: float rounding apart, the same outputs; the
        # diffusers copy holds them in fp32, so it differs from the fp16 file by fp16's rounding
        tol = 1e-5 if source == path else 1e-3
        assert torch.allclose(ours_unet, theirs_unet, atol=tol), (ours_unet - theirs_unet).abs().max()
        assert torch.allclose(ours_text.embeds, embeds, atol=tol), (ours_text.embeds - embeds).abs().max()
        assert torch.allclose(ours_text.pooled, pooled, atol=tol)
    # and the LoRA does something, to the UNet and to both encoders' conditioning and the pooled embedding
    width_l = model.pipe.text_encoder.config.hidden_size
    assert (ours_unet - base_unet).abs().max() > 0.05
    assert (ours_text.embeds - base_text.embeds)[..., :width_l].abs().max() > 0.05
    assert (ours_text.embeds - base_text.embeds)[..., width_l:].abs().max() > 0.05
    assert (ours_text.pooled - base_text.pooled).abs().max() > 0.05


def test_sdxl_lora_loss_falls_and_does_not_move_at_a_tiny_rate(tmp_path):
    cfg = xl_cfg(tmp_path)
    learns = Trainer(cfg).start(xl_job(max_steps=12, overfit_batches=1, save_every=100, learning_rate="3e-3",
                                       train_text_encoder=True))
    assert learns.state == "finished" and falls(learns.losses, 0.9), learns.losses
    frozen = Trainer(cfg).start(xl_job(max_steps=4, overfit_batches=1, save_every=100, learning_rate="1e-12",
                                       train_text_encoder=True, overwrite=True))
    assert frozen.losses == pytest.approx([frozen.losses[0]] * 4, rel=1e-5), frozen.losses
    assert frozen.losses[0] == pytest.approx(learns.losses[0], rel=1e-5)  # the same first batch


def test_sdxl_lora_with_class_images_and_buckets_resumes_exactly(tmp_path):
    # DreamBooth: the square class images take a UNet pass of their own when the batch's bucket is not square
    settings = dict(max_steps=4, save_every=2, dropout=0.2, class_prompt="a photo of a room", class_images=2,
                    preview_every=2)
    whole = Trainer(xl_cfg(tmp_path, "a")).start(xl_job(**settings))
    assert whole.state == "finished", whole.message
    cfg = xl_cfg(tmp_path, "b")
    cancel = threading.Event()
    trainer = Trainer(cfg, cancel=cancel, on_event=lambda k, i: cancel.set() if k == "loss" and i["step"] == 2
                      else None)
    stopped = trainer.start(xl_job(**settings))
    assert stopped.state == "stopped" and stopped.step == 2
    assert trainer.last_batch["class"] == trainer.last_batch["instances"]
    assert sorted(p.name for p in (stopped.run_dir / "class_images").glob("*.png")) == ["00000.png", "00001.png"]
    assert (stopped.run_dir / "previews" / "step-00000002.png").is_file()
    resumed = Trainer(cfg).resume(stopped.run_dir)
    assert resumed.step == 4
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-5)
    a, b = load_file(str(whole.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


# --- Textual Inversion --------------------------------------------------------------------------------------


def test_sdxl_embedding_loads_in_diffusers_with_the_studios_conditioning(tmp_path):
    cfg = xl_cfg(tmp_path)
    name = "stripe-style"
    job = xl_job(method="ti", name=name, init_word="painting", vectors=2, learning_rate="0.05",
                 template="style_filewords", preview_every=4)
    result = Trainer(cfg).start(job)
    assert result.state == "finished", result.message
    state = load_file(str(result.output))
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (2, 32) and state["clip_g"].shape == (2, 64)  # demo-tiny-xl's two widths
    prompt = f"a painting in the style of {name}"
    ours = XLPromptEncoder(build_tiny_xl_pipeline(), 1, {name: TextualInversion(name, state["clip_l"])},
                           {name: TextualInversion(name, state["clip_g"])}).encode(prompt)
    ref = build_tiny_xl_pipeline()
    ref.load_textual_inversion(state["clip_l"], token=name, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token=name, text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    with torch.no_grad():
        embeds, _, pooled, _ = ref.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(ours.embeds, embeds, atol=1e-5), (ours.embeds - embeds).abs().max()
    assert torch.allclose(ours.pooled, pooled, atol=1e-5)
    plain = XLPromptEncoder(build_tiny_xl_pipeline()).encode(prompt)
    assert (plain.embeds - ours.embeds).abs().max() > 1e-2  # the embedding is in there


def test_sdxl_ti_trains_the_vectors_of_both_encoders_and_not_at_a_tiny_rate(tmp_path):
    cfg = xl_cfg(tmp_path)
    pipe = build_tiny_xl_pipeline()
    init_l = initial_vectors(pipe.tokenizer, pipe.text_encoder, "painting", 1)
    init_g = initial_vectors(pipe.tokenizer_2, pipe.text_encoder_2, "painting", 1)
    runs = {}
    for rate in ("0.05", "1e-12"):
        result = Trainer(cfg).start(xl_job(method="ti", name="stripe-style", init_word="painting",
                                           learning_rate=rate, overwrite=True, max_steps=3))
        assert result.state == "finished", result.message
        runs[rate] = load_file(str(result.output))
    for key, init in (("clip_l", init_l), ("clip_g", init_g)):
        assert (runs["0.05"][key] - init).abs().max() > 1e-2, key
        assert torch.allclose(runs["1e-12"][key], init, atol=1e-6), key


@pytest.mark.parametrize("method", ["ti-att", "ti-moe"])
def test_sdxl_inversion_modules_write_both_widths(method, tmp_path):
    cfg = xl_cfg(tmp_path)
    result = Trainer(cfg).start(xl_job(method=method, name="stripe-style", image_encoder="demo-tiny",
                                       learning_rate="0.003", max_steps=2, vectors=2))
    assert result.state == "finished", result.message
    state = load_file(str(result.output))
    assert state["clip_l"].shape == (2, 32) and state["clip_g"].shape == (2, 64)


def test_sdxl_embedding_refuses_the_pt_format(tmp_path):
    cfg = xl_cfg(tmp_path)
    with pytest.raises(ValueError, match="SDXL embeddings have no .pt form"):
        Trainer(cfg).start(xl_job(method="ti", name="stripe-style", embedding_format="a1111-pt"))


# --- full fine-tune -----------------------------------------------------------------------------------------


def test_sdxl_finetune_writes_a_single_file_that_loads_back(tmp_path):
    cfg = xl_cfg(tmp_path)
    out = tmp_path / "out" / "tuned-xl.safetensors"
    trainer = Trainer(cfg)
    result = trainer.start(xl_job(method="finetune", name="tuned-xl", learning_rate="1e-3", max_steps=3,
                                  output=str(out)))
    assert result.state == "finished" and result.output == out and out.is_file(), result.message
    # the frozen text encoders ran once per caption (kept in the cache), not every step
    cache = trainer.method.cached.cache
    assert cache and set(cache) <= {f"stripes number {i}" for i in range(len(SIZES))}
    fresh = XLPromptEncoder(build_tiny_xl_pipeline())
    for prompt, (embeds, pooled) in cache.items():
        expected = fresh.encode_batch([prompt])
        assert torch.allclose(embeds, expected[0], atol=1e-6) and torch.allclose(pooled, expected[1], atol=1e-6)
    tuned = ModelManager(cfg).load(str(out))
    assert tuned.source == "single-file" and tuned.family == "sdxl"
    base = build_tiny_xl_pipeline()
    inputs = unet_inputs(base)
    assert (unet_out(tuned.pipe.unet.float(), inputs) - unet_out(base.unet, inputs)).abs().max() > 1e-3
    te = base.text_encoder_2.state_dict()
    assert max((tuned.pipe.text_encoder_2.state_dict()[k].float() - v).abs().max().item()
               for k, v in te.items()) < 1e-2  # untouched, fp16 round trip aside


# --- aspect-ratio buckets -----------------------------------------------------------------------------------


def cover_crop_rule(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int]:
    """The rules, written out: scale to cover the bucket, centre-crop; (top, left, scaled width)."""
    w, h = bucket
    scale = max(w / width, h / height)
    scaled_w, scaled_h = round(width * scale), round(height * scale)
    return (scaled_h - h) // 2, (scaled_w - w) // 2, scaled_w


def test_buckets_are_sdxls_resolutions_scaled_to_the_job():
    assert bucket_sizes(1024) == list(SDXL_BUCKETS)
    assert bucket_sizes(512) == [(512, 512), (576, 448), (448, 576), (640, 448), (448, 640), (704, 384),
                                 (384, 704), (768, 320), (320, 768)]
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in bucket_sizes(768))
    tiny = bucket_sizes(64)
    assert len(tiny) == 9 and all(w % 8 == 0 and h % 8 == 0 for w, h in tiny)
    for size in (64, 512, 768, 1024):  # about the job's area, both orientations
        assert all(0.8 < w * h / size**2 < 1.1 for w, h in bucket_sizes(size))
        assert {(h, w) for w, h in bucket_sizes(size)} == set(bucket_sizes(size))


def test_images_land_in_the_bucket_of_their_aspect_ratio_with_their_crop_in_the_time_ids(tmp_path):
    sizes = {(1000, 1000): (1024, 1024), (1200, 900): (1152, 896), (900, 1200): (896, 1152),
             (1300, 1000): (1152, 896), (2000, 800): (1536, 640), (800, 1400): (768, 1344)}
    folder = make_xl_dataset(tmp_path / "photos", list(sizes))
    data = load_train_data(folder, 1024, buckets=True)
    assert data.bucketed
    by_source = {item.name: item for item in data.images}
    for i, ((width, height), bucket) in enumerate(sizes.items()):
        item = next(v for k, v in by_source.items() if k.endswith(f"img{i}.png"))
        assert item.image.size == bucket, (width, height)
        top, left, scaled_w = cover_crop_rule(width, height, bucket)
        assert item.time_ids() == [height, width, top, left, bucket[1], bucket[0]]
        # mirrored, the crop's left edge is measured from the other side
        assert item.time_ids(flipped=True) == [height, width, top, scaled_w - bucket[0] - left, bucket[1],
                                               bucket[0]]
    assert by_source[next(k for k in by_source if k.endswith("img1.png"))].time_ids()[3] == 21  # (1195 - 1152) // 2


def test_bucket_batches_never_mix_buckets_cover_every_image_and_follow_the_seed(tmp_path):
    sizes = [(64, 64), (64, 64), (64, 64), (96, 72), (96, 72), (72, 96), (160, 64)]
    data = load_train_data(make_xl_dataset(tmp_path / "mixed", sizes), 64, repeats=3, buckets=True)
    groups = data.buckets()
    assert sorted(len(m) for m in groups.values()) == [1, 1, 2, 3]
    per_epoch = sum(-(-len(m) * 3 // 2) for m in groups.values())  # each bucket's last batch may be short
    batches = [data.batch(seed=7, micro_batch=k, batch_size=2) for k in range(3 * per_epoch)]
    for batch in batches:
        assert len({data.images[i].bucket for i in batch}) == 1, batch
        assert 1 <= len(batch) <= 2
    for epoch in range(3):  # every image `repeats` times per epoch
        seen = [i for batch in batches[epoch * per_epoch:(epoch + 1) * per_epoch] for i in batch]
        assert sorted(seen) == sorted(list(range(len(sizes))) * 3)
    assert batches == [data.batch(seed=7, micro_batch=k, batch_size=2) for k in range(3 * per_epoch)]
    assert batches != [data.batch(seed=8, micro_batch=k, batch_size=2) for k in range(3 * per_epoch)]
    assert batches[:per_epoch] != batches[per_epoch:2 * per_epoch]  # each epoch shuffled anew


def test_the_loop_feeds_each_images_size_and_crop_to_the_unet(tmp_path):
    cfg = xl_cfg(tmp_path)
    trainer = Trainer(cfg)
    result = trainer.start(xl_job(max_steps=3, batch_size=1, flip_p=0.0))
    assert result.state == "finished"
    data = load_train_data(cfg.datasets_dir / "shapes", 64, buckets=True)
    batch = trainer.last_batch
    assert batch["time_ids"] == [data.images[i].time_ids() for i in batch["indices"]]
    assert TrainJob().uses_buckets("sdxl") and not TrainJob().uses_buckets("sd1")
    assert TrainJob(buckets=False).uses_buckets("sdxl") is False and TrainJob(buckets=True).uses_buckets("sd1")


def test_sd1_keeps_square_crops_by_default_and_can_use_buckets(tmp_path):
    folder = make_xl_dataset(tmp_path / "mixed")
    squares = load_train_data(folder, 64)
    assert not squares.bucketed and {item.image.size for item in squares.images} == {(64, 64)}
    for item in squares.images:  # the very pixels of the center crop SD 1.x training has always used
        with Image.open(folder / Path(item.name).name) as source:
            assert np.array_equal(np.asarray(item.image), np.asarray(square_crop(source.convert("RGB"), 64)))
    cfg = xl_cfg(tmp_path)
    logs = []
    result = Trainer(cfg, on_event=lambda k, i: logs.append(i.get("text", ""))).start(
        xl_job(model="demo-tiny", name="sd1-buckets", buckets=True, max_steps=2))
    assert result.state == "finished", result.message
    assert "aspect-ratio buckets: 56x72: 1, 64x64: 1, 72x56: 1, 96x40: 1" in logs
    with pytest.raises(ValueError, match="buckets must be true, false or empty"):
        xl_job(buckets="yes").validate()


def test_a_dataset_made_with_buckets_trains_on_buckets_unless_told_otherwise(tmp_path):
    """The Dataset tab's bucket crops (dataset.json `training.buckets: true`) keep their aspect ratio in training on
    any family; `buckets: false` still square-crops them."""
    import json

    folder = make_xl_dataset(tmp_path / "bucketed")
    (folder / "dataset.json").write_text(json.dumps({"studio_dataset": 1, "training": {"buckets": True}}))
    assert load_train_data(folder, 64).dataset_buckets
    cfg = xl_cfg(tmp_path)
    for buckets, expected in ((None, "aspect-ratio buckets: 56x72: 1"), (False, None)):
        logs = []
        result = Trainer(cfg, on_event=lambda k, i, logs=logs: logs.append(i.get("text", ""))).start(
            xl_job(model="demo-tiny", name=f"sd1-ds-{buckets}", data=str(folder), buckets=buckets, max_steps=1))
        assert result.state == "finished", result.message
        found = [line for line in logs if line.startswith("aspect-ratio buckets")]
        assert (found[0].startswith(expected) if expected else not found), found


# --- presets, the Train tab and the command line ------------------------------------------------------------


def test_sdxl_presets_are_valid_and_offered_for_sdxl_models_only():
    from studio.train.job import list_train_presets
    from studio.ui.train_tab import fit_settings, method_presets

    presets = list_train_presets()
    kohya, small = presets["SDXL LoRA (kohya-like)"], presets["SDXL LoRA for 12 GB cards"]
    for preset in (kohya, small):
        assert preset.family == "sdxl"
        TrainJob.for_method(**{"name": "x", "data": "d", **preset.settings}).validate()
        settings = preset.settings
        assert (settings["learning_rate"], settings["resolution"], settings["buckets"]) == ("1e-4", 1024, True)
        assert settings["alpha"] in (settings["rank"], settings["rank"] / 2) and settings["rank"] in (16, 32)
        assert settings["lr_scheduler"] == "cosine" and not settings["train_text_encoder"]
    assert (small.settings["batch_size"], small.settings["optimizer"], small.settings["mixed_precision"],
            small.settings["gradient_checkpointing"]) == (1, "adamw8bit", "bf16", True)
    assert kohya.settings["optimizer"] == "adamw"
    assert {kohya.name, small.name} <= set(method_presets(None, "lora", "sdxl"))
    assert "kohya_ss LoRA defaults" in method_presets(None, "lora", "sdxl")  # presets for any family stay
    assert not {kohya.name, small.name} & set(method_presets(None, "lora", "sd1"))
    assert not {kohya.name, small.name} & set(method_presets(None, "lora"))
    fitted, notes = fit_settings(small.settings, "demo-tiny-xl", cuda=False)
    assert fitted["optimizer"] == "adamw" and fitted["mixed_precision"] == "bf16" and len(notes) == 1


def test_train_tab_and_command_line_set_buckets(tmp_path, monkeypatch, capsys):
    from test_train_ti import run_main

    from studio.train.run_folder import RunFolder
    from studio.ui.train_tab import FORM, form_from_settings, job_from_form

    values = {k: v for k, v in TrainJob().to_dict().items() if k in FORM}
    values.update(data="shapes", name="xl-style")
    assert job_from_form({**values, "buckets": "auto"}, "demo-tiny-xl").buckets is None
    assert job_from_form({**values, "buckets": "on"}, "demo-tiny-xl").buckets is True
    assert job_from_form({**values, "buckets": "off"}, "demo-tiny-xl").buckets is False
    assert form_from_settings(values, {"buckets": False})[0]["buckets"] == "off"
    assert form_from_settings(values, {"buckets": None})[0]["buckets"] == "auto"
    cfg = xl_cfg(tmp_path)
    out = run_main(["train", "lora", "--model", "demo-tiny-xl", "--data", "shapes", "--name", NAME, "--steps", "1",
                    "--resolution", "64", "--no-buckets", "--preview-every", "0"], tmp_path / "home", monkeypatch,
                   capsys)
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.split("run: ")[1].split()[0])
    assert RunFolder.open(run_dir).job().buckets is False
    assert "aspect-ratio buckets" not in (run_dir / "train.log").read_text(encoding="utf-8")
    assert (cfg.loras_dir / f"{NAME}.safetensors").is_file()


def test_sdxl_lora_on_two_processes_trains_what_one_process_with_two_accumulation_steps_trains(
        tmp_path, monkeypatch, capsys):
    # both text encoders train through their DDP wrappers; batches come from the buckets
    from test_train_multiprocess import run_two_processes
    from test_train_ti import run_main

    args = ["train", "lora", "--model", "demo-tiny-xl", "--data", "shapes", "--name", NAME, "--steps", "3",
            "--resolution", "64", "--preview-every", "0", "--batch-size", "1", "--seed", "3", "--rank", "2",
            "--unet-lr", "1e-2", "--te-lr", "1e-2"]
    xl_cfg(tmp_path, "two"), xl_cfg(tmp_path, "one")
    two = run_two_processes([*args, "--grad-accum", "1"], tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_main([*args, "--grad-accum", "2"], tmp_path / "one", monkeypatch, capsys)
    assert one.returncode == 0, one.stderr
    a = load_file(str(tmp_path / "two" / "loras" / f"{NAME}.safetensors"))
    b = load_file(str(tmp_path / "one" / "loras" / f"{NAME}.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("lora_te2_") for k in a)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4, rtol=2e-3), key
