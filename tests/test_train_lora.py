"""LoRA, DreamBooth-LoRA and full fine-tuning on the shared loop, on demo-tiny: learning, kohya files that
diffusers loads with the same image, <lora:NAME:0> = base, class images made once, fine-tuned single files."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_networks import _diffusers_image, image
from test_networks import job as gen_job
from test_train_ti import home_cfg, run_main

from studio.generation.generate import Generator
from studio.generation.samplers import make_scheduler
from studio.models.manager import ModelManager
from studio.models.tiny import build_tiny_pipeline
from studio.train.job import TrainJob
from studio.train.loop import Trainer, snr_weights
from studio.train.run_folder import RunFolder

NAME = "shot-close"


def lora_job(**changes) -> TrainJob:
    values = dict(method="lora", name=NAME, data="stripes", resolution=64, max_steps=6, batch_size=2,
                  save_every=3, preview_every=0, preview_steps=3, learning_rate="1e-2", rank=4, alpha=8)
    values.update(changes)
    return TrainJob(**values)


def falls(losses, ratio):
    return all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < ratio * losses[0]


@pytest.mark.parametrize("changes", [
    {},
    {"train_text_encoder": True, "text_encoder_lr": 5e-3},
    {"method": "finetune", "learning_rate": "1e-3", "name": "tuned"},
], ids=["lora", "lora+text-encoder", "finetune"])
def test_loss_on_a_fixed_batch_falls(changes, tmp_path):
    cfg = home_cfg(tmp_path)
    result = Trainer(cfg).start(lora_job(max_steps=15, overfit_batches=1, save_every=100, **changes))
    assert result.state == "finished", result.message
    assert falls(result.losses, 0.8), result.losses


def test_lora_file_is_kohya_loads_in_diffusers_and_matches_the_studio(tmp_path):
    cfg = home_cfg(tmp_path)
    result = Trainer(cfg).start(lora_job(train_text_encoder=True, text_encoder_lr=1e-2, max_steps=8,
                                         instance_prompt="a close shot of [filewords]", save_diffusers=True))
    path = cfg.loras_dir / f"{NAME}.safetensors"
    assert result.output == path
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)
    assert any(k.endswith("attn1_to_q.lora_down.weight") for k in keys)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else k.rsplit(".", 1)[-1] for k in keys} == \
        {"lora_down", "lora_up", "alpha"}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_output_name"] == NAME and meta["ss_steps"] == "8"
    assert meta["ss_sd_model_hash"] and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == "a close shot of"
    tags = json.loads(meta["ss_tag_frequency"])["stripes"]
    assert tags["stripes number 0"] == 1 and len(tags) == 4
    assert meta["ss_text_encoder_lr"] == "0.01"
    # the studio by name and diffusers' own loader (kohya file and the diffusers copy) agree on the image
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    gen = Generator(manager)
    with_lora = image(gen, gen_job(f"a harbour <lora:{NAME}:1>", sampler="DPM++ 2M", schedule="Karras"))
    base = image(gen, gen_job("a harbour", sampler="DPM++ 2M", schedule="Karras"))
    assert np.abs(with_lora - base).mean() > 1  # the LoRA does something
    zero = image(gen, gen_job(f"a harbour <lora:{NAME}:0>", sampler="DPM++ 2M", schedule="Karras"))
    assert np.array_equal(zero, base)  # weight 0 is the base model
    for source in (path, RunFolder.open(result.run_dir).path / "diffusers"):
        pipe = build_tiny_pipeline("sd1")
        pipe.scheduler = make_scheduler("DPM++ 2M", "Karras", dict(pipe.scheduler.config))
        pipe.load_lora_weights(str(source))
        diff = np.abs(_diffusers_image(pipe, "a harbour") - with_lora)
        assert diff.max() <= 1, (source, diff.max(), diff.mean())


def test_prior_preservation_mixes_class_examples_and_makes_class_images_once(tmp_path, monkeypatch):
    cfg = home_cfg(tmp_path)
    renders = {"n": 0}
    original = Trainer._render

    def counting(self, *args, **kw):
        renders["n"] += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(Trainer, "_render", counting)
    job = lora_job(class_prompt="a photo of a room", class_images=3, prior_loss_weight=0.5, batch_size=2,
                   max_steps=4, save_every=2)
    trainer = Trainer(cfg)
    result = trainer.start(job)
    assert result.state == "finished"
    assert renders["n"] == 3
    batch = trainer.last_batch
    assert (batch["instances"], batch["class"]) == (2, 2)
    assert batch["prompts"][2:] == ["a photo of a room", "a photo of a room"]
    assert all(p.startswith("stripes number") for p in batch["prompts"][:2])
    run = RunFolder.open(result.run_dir)
    files = sorted(p.name for p in (run.path / "class_images").glob("*.png"))
    assert files == ["00000.png", "00001.png", "00002.png"]
    stamps = [p.stat().st_mtime_ns for p in sorted((run.path / "class_images").glob("*.png"))]
    # resuming (here: training further) reuses them, renders none
    again = Trainer(cfg).resume(run.path, max_steps=6)
    assert again.state == "finished" and renders["n"] == 3
    assert [p.stat().st_mtime_ns for p in sorted((run.path / "class_images").glob("*.png"))] == stamps
    with pytest.raises(ValueError, match="both a class prompt"):
        lora_job(class_prompt="a room").validate()


def test_lora_stop_and_resume_with_dropout_equals_an_uninterrupted_run(tmp_path):
    import threading

    settings = dict(max_steps=6, save_every=2, dropout=0.3, train_text_encoder=True)
    whole = Trainer(home_cfg(tmp_path, "a")).start(lora_job(**settings))
    cfg = home_cfg(tmp_path, "b")
    cancel = threading.Event()
    stopped = Trainer(cfg, cancel=cancel, on_event=lambda k, i: cancel.set() if k == "loss" and i["step"] == 3
                      else None).start(lora_job(**settings))
    assert stopped.state == "stopped" and stopped.step == 3
    resumed = Trainer(cfg).resume(stopped.run_dir)
    assert resumed.step == 6
    assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-5)
    with safe_open(str(whole.output), framework="pt") as a, safe_open(str(resumed.output), framework="pt") as b:
        for key in a.keys():
            assert torch.allclose(a.get_tensor(key).float(), b.get_tensor(key).float(), atol=1e-3), key


def test_finetune_writes_a_single_file_that_loads_offline_and_differs_from_the_base(tmp_path):
    cfg = home_cfg(tmp_path)
    out = tmp_path / "out" / "tuned.safetensors"
    result = Trainer(cfg).start(lora_job(method="finetune", name="tuned", learning_rate="1e-3", ema=True,
                                         ema_decay=0.5, max_grad_norm=1.0, max_steps=4, output=str(out)))
    assert result.state == "finished" and result.output == out and out.is_file()
    run = RunFolder.open(result.run_dir)
    assert (run.path / "diffusers" / "model_index.json").is_file()
    assert "ema" in run.load_checkpoint().extra
    manager = ModelManager(cfg)
    tuned = manager.load(str(out))
    assert tuned.source == "single-file" and tuned.family == "sd1"
    base = build_tiny_pipeline("sd1").unet.state_dict()
    diff = max((tuned.pipe.unet.state_dict()[k].float() - v).abs().max().item() for k, v in base.items())
    assert diff > 1e-4
    # the text encoder and VAE are untouched (fp16 round trip aside)
    te = build_tiny_pipeline("sd1").text_encoder.state_dict()
    assert max((tuned.pipe.text_encoder.state_dict()[k].float() - v).abs().max().item() for k, v in te.items()) \
        < 1e-2
    with pytest.raises(ValueError, match="already exists"):
        Trainer(cfg).start(lora_job(method="finetune", name="tuned", output=str(out)))


def test_existing_lora_file_is_refused_unless_overwriting(tmp_path):
    cfg = home_cfg(tmp_path)
    theirs = cfg.loras_dir / f"{NAME}.pt"
    theirs.write_bytes(b"someone's LoRA")
    with pytest.raises(ValueError, match=f"{NAME}.pt already exists in loras/"):
        Trainer(cfg).start(lora_job())
    assert theirs.read_bytes() == b"someone's LoRA" and not list(cfg.runs_dir.iterdir())
    assert Trainer(cfg).start(lora_job(max_steps=1, overwrite=True)).state == "finished"


def test_min_snr_weights_by_hand():
    from diffusers import DDPMScheduler

    from studio.models.tiny import SD_SCHEDULER

    scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k not in ("set_alpha_to_one",
                                                                                     "skip_prk_steps")})
    t = torch.tensor([10, 500, 990])
    a = scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)
    expected = [min(s, 5.0) / s for s in snr.tolist()]
    assert snr_weights(scheduler, t, 5.0).tolist() == pytest.approx(expected, rel=1e-5)
    assert snr[0] > 5 and snr[2] < 5  # one clipped, one not
    assert math.isclose(snr_weights(scheduler, t, 5.0)[2].item(), 1.0, rel_tol=1e-6)


def test_cli_trains_lora_and_finetune(tmp_path, monkeypatch, capsys):
    cfg = home_cfg(tmp_path)
    out = run_main(["train", "lora", "--data", "stripes", "--name", NAME, "--steps", "2", "--resolution", "64",
                    "--rank", "2", "--alpha", "1", "--unet-lr", "1e-3", "--te-lr", "5e-4", "--batch-size", "1",
                    "--preview-every", "0"], tmp_path / "home", monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    with safe_open(str(cfg.loras_dir / f"{NAME}.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_text_encoder_lr"]) == ("2", "1.0", "0.0005")
    target = tmp_path / "tuned.safetensors"
    ft = run_main(["train", "finetune", "--data", "stripes", "--name", "tuned", "--steps", "2", "--resolution", "64",
                   "--ema", "--out", str(target), "--preview-every", "0"], tmp_path / "home", monkeypatch, capsys)
    assert ft.returncode == 0, ft.stderr
    assert target.is_file() and f"output: {target}" in ft.stdout
    assert not list(cfg.runs_dir.glob("*/previews/*.png"))  # `--preview-every 0`: none
    cuda_only = run_main(["train", "lora", "--data", "stripes", "--name", "x-lora", "--preset", "kohya-lora-defaults",
                          "--steps", "1", "--resolution", "64", "--mixed-precision", "no"], tmp_path / "home",
                         monkeypatch, capsys)
    assert cuda_only.returncode == 2 and "8-bit AdamW needs a CUDA GPU" in cuda_only.stderr
    assert not (cfg.loras_dir / "x-lora.safetensors").exists()


@pytest.mark.parametrize("optimizer, rate", [("prodigy", "1"), ("adafactor", "1e-2")])
def test_prodigy_and_adafactor_learn_and_are_written_as_kohya_does(optimizer, rate, tmp_path):
    """Prodigy finds its own step size (the learning rate is a multiplier: 1 learns, 1e-12 does not); Adafactor with
    kohya's fixed-rate settings learns too; ss_optimizer names the class and its arguments."""
    from safetensors import safe_open

    cfg = home_cfg(tmp_path)
    result = Trainer(cfg).start(lora_job(max_steps=40, overfit_batches=1, save_every=100, optimizer=optimizer,
                                         learning_rate=rate))
    assert result.state == "finished", result.message
    # Prodigy's own step size first grows, then overshoots on this single tiny batch (how far depends on the CPU's
    # kernels): the loss falls well below its start at some point and ends below it
    assert min(result.losses) < 0.85 * result.losses[0], result.losses
    assert sum(result.losses[-5:]) / 5 < result.losses[0], result.losses
    with safe_open(str(result.output), framework="pt") as f:
        label = f.metadata()["ss_optimizer"]
    assert label.startswith({"prodigy": "prodigyopt.prodigy.Prodigy(d_coef=1", "adafactor": "transformers"}[optimizer])
    still = Trainer(home_cfg(tmp_path / "still")).start(
        lora_job(max_steps=25, overfit_batches=1, save_every=100, optimizer=optimizer, learning_rate="1e-12"))
    assert abs(still.losses[-1] - still.losses[0]) < 1e-3 * still.losses[0], still.losses
