"""Textual Inversion training on tiny models: learning, frozen weights, files other tools load, previews,
stop/resume equal to an uninterrupted run, NaN guard, refusals, the command line and the background worker."""

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from studio.config import StudioConfig
from studio.files.networks import NetworkLibrary, load_embedding
from studio.generation.infotext import read_image_infotext
from studio.models.tiny import build_tiny_pipeline
from studio.train.job import TrainJob
from studio.train.loop import Trainer
from studio.train.run_folder import RunFolder
from studio.train.worker import TrainingWorker, view_from_folder

ROOT = Path(__file__).resolve().parent.parent
NAME = "stripe-style"


@pytest.fixture(scope="module")
def strong_model(tmp_path_factory):
    """demo-tiny with its cross-attention outputs scaled up, saved as a diffusers folder: the random tiny UNet
    barely listens to the text otherwise, so an embedding could hardly lower its loss."""
    pipe = build_tiny_pipeline("sd1")
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(300)
    folder = tmp_path_factory.mktemp("models") / "strong-tiny"
    pipe.save_pretrained(folder)
    return folder


def make_dataset(folder: Path, n: int = 4, size: int = 64) -> Path:
    """Red vertical stripes over seeded noise, with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        a[:, (i % 3)::6] = [230, 20, 20]
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"stripes number {i}", encoding="utf-8")
    return folder


def home_cfg(tmp_path: Path, name: str = "home") -> StudioConfig:
    cfg = StudioConfig().with_home(tmp_path / name)
    cfg.ensure_dirs()
    make_dataset(cfg.datasets_dir / "stripes")
    return cfg


def job(**changes) -> TrainJob:
    values = dict(name=NAME, data="stripes", resolution=64, max_steps=6, batch_size=2, save_every=3,
                  preview_every=0, preview_steps=3, image_encoder="demo-tiny", learning_rate="0.05",
                  template="style_filewords", init_word="painting")
    values.update(changes)
    return TrainJob(**values)


METHOD_LR = {"ti": "0.05", "ti-att": "0.003", "ti-moe": "0.003"}


@pytest.mark.parametrize("method", ["ti", "ti-att", "ti-moe"])
def test_loss_on_a_fixed_batch_falls(method, strong_model, tmp_path):
    cfg = home_cfg(tmp_path)
    result = Trainer(cfg).start(job(method=method, model=str(strong_model), max_steps=25, overfit_batches=1,
                                    learning_rate=METHOD_LR[method], save_every=100))
    assert result.state == "finished", result.message
    losses = result.losses
    assert len(losses) == 25
    # on one fixed batch (same images, prompts, noise, timesteps) every step lowers the loss, by > 3 % overall;
    # the random tiny UNet lets the text explain only a few percent of the noise, so that is the scale here
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.97 * losses[0], losses


def test_only_the_embedding_trains_and_the_model_stays_bit_identical(strong_model, tmp_path):
    cfg = home_cfg(tmp_path)
    trainer = Trainer(cfg)
    result = trainer.start(job(model=str(strong_model), max_steps=4))
    assert result.state == "finished"
    fresh = type(trainer.pipe).from_pretrained(strong_model, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
    for part in ("text_encoder", "unet", "vae"):
        before, after = getattr(fresh, part).state_dict(), getattr(trainer.pipe, part).state_dict()
        assert before.keys() == after.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k].cpu())]
        assert changed == [], (part, changed[:3])
    # ... while the embedding moved away from its initializer word ("painting")
    ids = trainer.pipe.tokenizer("painting", add_special_tokens=False).input_ids
    init = fresh.text_encoder.get_input_embeddings().weight[ids[0]]
    learned = load_embedding(result.embedding).vectors[0]
    assert not torch.allclose(learned, init, atol=1e-3)


def test_embedding_loads_in_diffusers_and_by_name_and_changes_the_image(strong_model, tmp_path):
    from studio.generation.conditioning import PromptEncoder, TextualInversion
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager
    from studio.train.textual_inversion import initial_vectors

    cfg = home_cfg(tmp_path)
    result = Trainer(cfg).start(job(model=str(strong_model), max_steps=8, vectors=2))
    path = cfg.embeddings_dir / f"{NAME}.safetensors"
    assert result.embedding == path and path.is_file()
    vectors = load_file(str(path))["emb_params"]
    assert vectors.shape == (2, 32)
    # diffusers' own loader takes it (A1111 format: token given, as diffusers' docs say for A1111 files)
    pipe = build_tiny_pipeline("sd1")
    pipe.load_textual_inversion(str(path), token=NAME)
    ids = pipe.tokenizer(f"{NAME} {NAME}_1", add_special_tokens=False).input_ids
    assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[ids[:2]], vectors)
    # the studio finds it by file name, with its metadata
    scan = NetworkLibrary(cfg.loras_dir, cfg.embeddings_dir).embeddings(widths=32)
    assert torch.equal(scan.found[NAME].vectors, vectors)
    assert scan.found[NAME].info["studio.method"] == "ti"
    assert scan.found[NAME].info["step"] == "8"
    # and it changes the image, while the untrained vectors (the initializer word) give the word's image
    manager = ModelManager(cfg)
    manager.load(str(strong_model))
    gen = Generator(manager)

    def image(prompt):
        out = gen.run(GenerateJob(prompt=prompt, steps=4, seed=5, width=64, height=64, sampler="Euler"))
        return np.asarray(out.images[0].image, dtype=np.int16)

    trained = image(f"a painting in the style of {NAME}")
    word = image("a painting in the style of painting painting")
    assert np.abs(trained - word).mean() > 2
    pipe = manager.current.pipe
    start = initial_vectors(pipe.tokenizer, pipe.text_encoder, "painting", 2)
    enc = PromptEncoder(pipe.tokenizer, pipe.text_encoder, {"x-tok": TextualInversion("x-tok", start)})
    plain = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    assert torch.equal(enc.encode("a painting in the style of x-tok").embeds,
                       plain.encode("a painting in the style of painting painting").embeds)


def test_run_folder_holds_config_losses_checkpoints_previews(tmp_path):
    cfg = home_cfg(tmp_path)
    events = []
    result = Trainer(cfg, on_event=lambda kind, info: events.append(kind)).start(
        job(max_steps=6, save_every=2, keep_checkpoints=2, preview_every=3))
    run = RunFolder.open(result.run_dir)
    assert run.path.parent == cfg.runs_dir and run.path.name.startswith(f"{NAME}-")
    assert run.job() == job(max_steps=6, save_every=2, keep_checkpoints=2, preview_every=3)
    assert [r["step"] for r in run.losses()] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in run.checkpoints()] == [4, 6]  # older ones pruned
    assert [p.name for p in run.previews()] == ["step-00000000.png", "step-00000003.png", "step-00000006.png"]
    info = read_image_infotext(run.previews()[1])
    assert f"in the style of {NAME}" in info and "Training step: 3" in info
    assert sorted(p.name for p in (run.path / "embeddings").iterdir()) == [f"{NAME}-2.safetensors",
                                                                          f"{NAME}-4.safetensors",
                                                                          f"{NAME}-6.safetensors"]
    assert run.status()["state"] == "finished"
    assert not list(run.path.rglob("*.tmp")), "no temporary files are left behind"
    assert {"log", "loss", "checkpoint", "preview", "done"} <= set(events)


@pytest.mark.parametrize("method", ["ti", "ti-moe"])
def test_stopped_and_resumed_run_equals_an_uninterrupted_one(method, tmp_path):
    settings = dict(method=method, max_steps=8, save_every=3, learning_rate="0.01" if method == "ti" else "0.003")
    whole = Trainer(home_cfg(tmp_path, "a")).start(job(**settings))
    cfg_b = home_cfg(tmp_path, "b")
    cancel = threading.Event()

    def stop_at_5(kind, info):
        if kind == "loss" and info["step"] == 5:
            cancel.set()

    stopped = Trainer(cfg_b, on_event=stop_at_5, cancel=cancel).start(job(**settings))
    assert stopped.state == "stopped" and stopped.step == 5
    assert "resume" in stopped.message
    run = RunFolder.open(stopped.run_dir)
    assert [s for s, _ in run.checkpoints()][-1] == 5
    resumed = Trainer(cfg_b).resume(stopped.run_dir)
    assert resumed.state == "finished" and resumed.step == 8 and len(resumed.losses) == 3
    a = load_file(str(whole.embedding))["emb_params"]
    b = load_file(str(resumed.embedding))["emb_params"]
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert [r["step"] for r in run.losses()] == list(range(1, 9))
    assert [r["loss"] for r in run.losses()] == pytest.approx(whole.losses, rel=1e-5)
    # continuing a finished run past its end trains more steps in the same folder
    longer = Trainer(cfg_b).resume(stopped.run_dir, max_steps=10)
    assert longer.step == 10 and RunFolder.open(stopped.run_dir).job().max_steps == 10


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from studio.train import textual_inversion as ti

    cfg = home_cfg(tmp_path)
    calls = {"n": 0}
    original = ti.InversionMethod.encode

    def poisoned(self, prompts, generator):
        calls["n"] += 1
        cond = original(self, prompts, generator)
        return cond * float("nan") if calls["n"] >= 5 else cond

    monkeypatch.setattr(ti.InversionMethod, "encode", poisoned)
    result = Trainer(cfg).start(job(max_steps=10, save_every=2))
    assert result.state == "failed"
    assert "step 5" in result.message and "step-00000004" in result.message and "learning rate" in result.message
    run = RunFolder.open(result.run_dir)
    assert [s for s, _ in run.checkpoints()] == [2, 4]
    assert torch.isfinite(run.load_checkpoint().trainable["vectors"]).all()
    assert not (cfg.embeddings_dir / f"{NAME}.safetensors").exists()  # nothing from the bad state
    assert run.status()["state"] == "failed"


def test_bad_names_and_existing_files_are_refused_before_training(tmp_path):
    cfg = home_cfg(tmp_path)
    with pytest.raises(ValueError, match="already a word the model knows"):
        Trainer(cfg).start(job(name="cat"))
    (cfg.embeddings_dir / f"{NAME}.pt").write_bytes(b"someone's file")
    with pytest.raises(ValueError, match="already exists"):
        Trainer(cfg).start(job())
    with pytest.raises(ValueError, match="not found"):
        Trainer(cfg).start(job(name="other-style", data="missing"))
    with pytest.raises(ValueError, match="must stay inside"):
        Trainer(cfg).start(job(name="other-style", data="../../etc"))
    assert list(cfg.runs_dir.iterdir()) == []  # nothing was started
    assert (cfg.embeddings_dir / f"{NAME}.pt").read_bytes() == b"someone's file"


def test_broken_images_in_the_dataset_are_skipped_with_the_reason(tmp_path):
    cfg = home_cfg(tmp_path)
    (cfg.datasets_dir / "stripes" / "broken.png").write_bytes(b"\x89PNG not really")
    logs = []
    result = Trainer(cfg, on_event=lambda k, i: logs.append(i.get("text", ""))).start(job(max_steps=2))
    assert result.state == "finished"
    assert any("broken.png" in line and "skipped" in line for line in logs)


def run_cli(args, home, **kw):
    """`python -m studio ARGS` as a real process (for what needs one: SIGKILL, a fresh interpreter resuming)."""
    env = {**os.environ, "STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def run_main(args, home, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`python -m studio ARGS` in this process: the same main(argv) (parser, engine, exit codes, stdout and stderr)
    that `python -m studio` calls with sys.exit, without starting an interpreter and importing torch and diffusers
    again (~10 s of CPU each on two cores)."""
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(home))
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "studio", *args], code, out, err)


def test_cli_trains_repeats_from_config_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    cfg = home_cfg(tmp_path)
    args = ["train", "ti", "--data", "stripes", "--name", NAME, "--steps", "3", "--resolution", "64",
            "--preview-every", "0", "--method", "ti-moe", "--image-encoder", "demo-tiny", "--preset",
            "seed000-ti-moe", "--batch-size", "1", "--repeats", "2"]
    out = run_main(args, tmp_path / "home", monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    assert f"embedding: {cfg.embeddings_dir / NAME}.safetensors" in out.stdout
    run_dir = Path(out.stdout.split("run: ")[1].split()[0])
    repeated = RunFolder.open(run_dir).job()
    # the preset's values, overridden by the flags given (a 0 too: `--preview-every 0` means no previews)
    assert (repeated.method, repeated.experts, repeated.top_k, repeated.learning_rate, repeated.max_steps,
            repeated.batch_size, repeated.repeats, repeated.preview_every) == ("ti-moe", 4, 2, "0.001", 3, 1, 2, 0)
    assert RunFolder.open(run_dir).previews() == []
    again = run_main(["train", "ti", "--config", str(run_dir / "config.yaml"), "--name", "again-style"],
                     tmp_path / "home", monkeypatch, capsys)
    assert again.returncode == 0, again.stderr
    assert (cfg.embeddings_dir / "again-style.safetensors").is_file()
    bad = run_main(["train", "ti", "--data", "stripes", "--name", "x-style", "--lr", "0.005:100, oops"],
                   tmp_path / "home", monkeypatch, capsys)
    assert bad.returncode == 2 and "'oops'" in bad.stderr


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """SIGKILL mid-run (no chance to clean up), then --resume: the result equals a run that was never killed.

    The killed run and the resuming one are real `python -m studio` processes; the uninterrupted run to compare
    with is the same main(argv) in this process (not at the same time as them: two torch processes on two cores
    slow each other down many times over)."""
    args = ["train", "ti", "--data", "stripes", "--name", NAME, "--steps", "40", "--resolution", "64",
            "--preview-every", "0", "--save-every", "2", "--lr", "0.01", "--batch-size", "1"]
    home_cfg(tmp_path, "a")
    whole = run_main(args, tmp_path / "a", monkeypatch, capsys)
    assert whole.returncode == 0, whole.stderr
    cfg = home_cfg(tmp_path, "b")
    env = {**os.environ, "STUDIO_HOME": str(tmp_path / "b"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "studio", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    run = None
    while time.time() < deadline:
        runs = list(cfg.runs_dir.iterdir())
        if runs and RunFolder(runs[0]).checkpoints() and RunFolder(runs[0]).checkpoints()[-1][0] >= 4:
            run = RunFolder(runs[0])
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run is not None, "no checkpoint appeared"
    killed_at = run.checkpoints()[-1][0]
    assert killed_at < 40, "the run finished before it could be killed; make it longer"
    view = view_from_folder(run)
    assert view.state in ("interrupted", "finished")
    assert not (cfg.embeddings_dir / f"{NAME}.safetensors").exists() or view.state == "finished"
    resumed = run_cli(["train", "ti", "--resume", str(run.path)], tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "a" / "embeddings" / f"{NAME}.safetensors"))["emb_params"]
    b = load_file(str(cfg.embeddings_dir / f"{NAME}.safetensors"))["emb_params"]
    assert torch.allclose(a, b, atol=1e-6)
    with open(run.path / "loss.csv", encoding="utf-8") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 41))


def test_worker_runs_in_the_background_stops_and_reports_after_a_restart(tmp_path):
    cfg = home_cfg(tmp_path)
    worker = TrainingWorker(cfg)
    with pytest.raises(ValueError, match="name must be"):
        worker.start(job(name=""))  # checked before any thread starts
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU"):
            worker.start(job(mixed_precision="fp16"))
        with pytest.raises(ValueError, match="8-bit AdamW needs a CUDA GPU"):
            worker.start(job(method="lora", name="x-lora", optimizer="adamw8bit", learning_rate="1e-4"))
    worker.start(job(max_steps=4, preview_every=2))
    with pytest.raises(RuntimeError, match="a training run is going"):
        worker.start(job(name="second-style"))
    view = worker.wait(120)
    assert view.state == "finished" and view.step == 4
    assert [s for s, _ in view.losses] == [1, 2, 3, 4] and len(view.previews) == 3
    assert view.embedding and Path(view.embedding).is_file()
    # a new worker (the studio restarted) shows the same run from its folder
    again = TrainingWorker(cfg).view()
    assert again.state == "finished" and again.run_dir == view.run_dir and len(again.losses) == 4
    # Stop ends a long run at the next step with a checkpoint and the embedding so far
    long = TrainingWorker(cfg)
    long.start(job(name="long-style", max_steps=100_000))
    deadline = time.time() + 60
    while not long.view().losses and time.time() < deadline:
        time.sleep(0.05)
    assert "stopping" in long.stop()
    stopped = long.wait(60)
    assert stopped.state == "stopped" and 0 < stopped.step < 100_000
    assert (cfg.embeddings_dir / "long-style.safetensors").is_file()
    assert RunFolder.open(stopped.run_dir).checkpoints()[-1][0] == stopped.step


def test_out_of_memory_becomes_advice_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from studio.train import textual_inversion as ti

    cfg = home_cfg(tmp_path)
    calls = {"n": 0}
    original = ti.InversionMethod.encode

    def oom_at_4(self, prompts, generator):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, prompts, generator)

    monkeypatch.setattr(ti.InversionMethod, "encode", oom_at_4)
    result = Trainer(cfg).start(job(max_steps=10, save_every=2, batch_size=2))
    assert result.state == "failed"
    assert "out of GPU memory at step 4" in result.message and "batch size" in result.message
    assert [s for s, _ in RunFolder.open(result.run_dir).checkpoints()] == [2]


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from studio.train import run_folder

    cfg = home_cfg(tmp_path)
    original = run_folder.save_file
    calls = {"n": 0}

    def disk_full_on_second(tensors, path, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            original(tensors, path, *args, **kw)  # half a file lands in the temporary folder, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, *args, **kw)

    monkeypatch.setattr(run_folder, "save_file", disk_full_on_second)
    result = Trainer(cfg).start(job(max_steps=10, save_every=2))
    assert result.state == "failed" and "No space left" in result.message
    run = RunFolder.open(result.run_dir)
    assert [s for s, _ in run.checkpoints()] == [2]
    assert run.load_checkpoint().step == 2  # the previous checkpoint is whole and loads
    leftovers = [p.name for p in (run.path / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert leftovers == []
    # and the run resumes from it once there is room again
    monkeypatch.setattr(run_folder, "save_file", original)
    assert Trainer(cfg).resume(run.path).state == "finished"



def test_gradient_checkpointing_recomputes_the_unet_and_trains_the_same_embedding(strong_model, tmp_path, monkeypatch):
    """TI with gradient checkpointing: the UNet's blocks run through torch.utils.checkpoint (their activations are
    recomputed in the backward, not kept), and the run ends with the embedding the run without it ends with."""
    import torch.utils.checkpoint as ckpt

    calls = {"n": 0}
    real = ckpt.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", counting)  # diffusers binds it when checkpointing is enabled
    results, counts = {}, {}
    for checkpointing in (False, True):
        calls["n"] = 0
        results[checkpointing] = Trainer(home_cfg(tmp_path, f"home-{checkpointing}")).start(
            job(model=str(strong_model), max_steps=3, save_every=100, gradient_checkpointing=checkpointing))
        assert results[checkpointing].state == "finished", results[checkpointing].message
        counts[checkpointing] = calls["n"]
    assert counts[False] == 0 and counts[True] > 0, counts
    a, b = (load_embedding(results[c].embedding).vectors for c in (False, True))
    assert torch.allclose(a, b, atol=1e-6)
