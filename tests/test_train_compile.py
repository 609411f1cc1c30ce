"""Training with a compiled UNet (TrainJob.compile, issue #10: make training fast) gives what eager training gives:
the same losses, the same embedding and LoRA files and checkpoints (no `_orig_mod.` keys), a LoRA that diffusers
loads, and a run that resumes across the switch.

On the GPU the trainer compiles with inductor; here the same wiring runs on the CPU with the `aot_eager` backend
(Trainer's compile_backend hook, as tests/test_speed.py does for generation): dynamo captures the UNet's forward
(the frozen one for TI, the peft-wrapped one for LoRA) and AOTAutograd traces its backward, so a capture that lost
a gradient, a LoRA layer or a hook would change the losses and the files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_networks import _diffusers_image
from test_train_lora import lora_job
from test_train_ti import home_cfg
from test_train_ti import job as ti_job

from studio.generation.samplers import make_scheduler
from studio.models import speed
from studio.models.tiny import build_tiny_pipeline
from studio.train.job import TrainJob, check_train_settings, job_from_yaml, job_to_yaml
from studio.train.loop import Trainer
from studio.train.run_folder import RunFolder

BACKEND = "aot_eager"
# one fixed batch, a checkpoint at step 2 and the end at step 3
OVERFIT = dict(max_steps=3, overfit_batches=1, save_every=2)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _pair(tmp_path_factory, make_job, **extra):
    """The same job trained eagerly and compiled, each in its own studio home; the compiled one after a dynamo
    reset, with the number of graphs it captured."""
    eager_cfg = home_cfg(tmp_path_factory.mktemp("eager"))
    eager = Trainer(eager_cfg).start(make_job(**OVERFIT, **extra))
    compiled_cfg = home_cfg(tmp_path_factory.mktemp("compiled"))
    torch._dynamo.reset()
    before = _graphs()
    trainer = Trainer(compiled_cfg, compile_backend=BACKEND)
    compiled = trainer.start(make_job(**OVERFIT, compile="default", **extra))
    assert eager.state == compiled.state == "finished", (eager.message, compiled.message)
    assert speed.is_compiled(trainer.pipe.unet)
    return {"eager": eager, "compiled": compiled, "graphs": _graphs() - before, "cfgs": (eager_cfg, compiled_cfg)}


def _same_checkpoints(eager, compiled, atol):
    a, b = RunFolder.open(eager.run_dir), RunFolder.open(compiled.run_dir)
    assert [s for s, _ in a.checkpoints()] == [s for s, _ in b.checkpoints()] == [2, 3]
    ca, cb = a.load_checkpoint(), b.load_checkpoint()
    assert ca.trainable.keys() == cb.trainable.keys()
    assert not any("_orig_mod" in k for k in cb.trainable)
    for key, value in ca.trainable.items():
        assert torch.allclose(value, cb.trainable[key], atol=atol), key
    assert ca.optimizer.keys() == cb.optimizer.keys()
    assert b.job().compile == "default" and a.job().compile == "off"  # config.yaml keeps the setting


@pytest.fixture(scope="module")
def ti(tmp_path_factory):
    # previews at step 0 and 3: they run eagerly, so the compiled run captures the training graph only
    return _pair(tmp_path_factory, ti_job, learning_rate="0.05", preview_every=3)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return _pair(tmp_path_factory, lora_job, learning_rate="1e-2")


def test_compiled_ti_gives_the_eager_losses_embedding_and_checkpoints(ti):
    eager, compiled = ti["eager"], ti["compiled"]
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    assert compiled.losses[-1] < compiled.losses[0]  # it learns
    assert ti["graphs"] == 1  # the training step went through the compiler; the previews did not
    a, b = load_file(str(eager.output)), load_file(str(compiled.output))
    assert a.keys() == b.keys() == {"emb_params"}
    assert torch.allclose(a["emb_params"], b["emb_params"], atol=1e-5), (a["emb_params"] - b["emb_params"]).abs().max()
    _same_checkpoints(eager, compiled, atol=1e-5)
    assert len(RunFolder.open(compiled.run_dir).previews()) == 2


def test_compiled_lora_gives_the_eager_losses_and_file_and_loads_in_diffusers(lora):
    eager, compiled = lora["eager"], lora["compiled"]
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    assert compiled.losses[-1] < compiled.losses[0]
    assert lora["graphs"] >= 1
    with safe_open(str(eager.output), framework="pt") as fa, safe_open(str(compiled.output), framework="pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        assert all(k.startswith("lora_unet_") and "_orig_mod" not in k for k in fb.keys())
        for key in fa.keys():
            assert torch.allclose(fa.get_tensor(key).float(), fb.get_tensor(key).float(), atol=1e-5), key
    _same_checkpoints(eager, compiled, atol=1e-5)
    # diffusers' own loader takes the compiled run's file and draws what the eager run's file draws
    images = []
    for path in (eager.output, compiled.output):
        pipe = build_tiny_pipeline("sd1")
        pipe.scheduler = make_scheduler("DPM++ 2M", "Karras", dict(pipe.scheduler.config))
        pipe.load_lora_weights(str(path))
        images.append(_diffusers_image(pipe, "a harbour"))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_resume_switches_compile_and_ends_where_the_other_run_ends(lora):
    """The eager run resumed compiled and the compiled run resumed eagerly write the same LoRA."""
    eager_cfg, compiled_cfg = lora["cfgs"]
    trainer = Trainer(eager_cfg, compile_backend=BACKEND)
    to_compiled = trainer.resume(lora["eager"].run_dir, max_steps=5, compile="default")
    assert speed.is_compiled(trainer.pipe.unet)
    to_eager = Trainer(compiled_cfg).resume(lora["compiled"].run_dir, max_steps=5, compile="off")
    assert to_compiled.state == to_eager.state == "finished" and to_compiled.step == 5
    assert to_compiled.losses == pytest.approx(to_eager.losses, rel=1e-4)
    assert RunFolder.open(to_compiled.run_dir).job().compile == "default"
    assert RunFolder.open(to_eager.run_dir).job().compile == "off"
    with safe_open(str(to_compiled.output), framework="pt") as fa, safe_open(str(to_eager.output),
                                                                             framework="pt") as fb:
        for key in fa.keys():
            assert torch.allclose(fa.get_tensor(key).float(), fb.get_tensor(key).float(), atol=1e-5), key


def test_compile_setting_is_checked_round_trips_and_needs_cuda(tmp_path, monkeypatch, capsys):
    from studio.cli import build_parser, main
    from studio.cli.train import train_job_from_args
    from studio.train.worker import TrainingWorker
    from studio.ui.train_tab import FORM, fit_settings, job_from_form

    with pytest.raises(ValueError, match=r"one of off, default, max-autotune; got 'turbo'"):
        ti_job(compile="turbo").validate()
    with pytest.raises(ValueError, match="CUDA graphs"):
        ti_job(compile="reduce-overhead").validate()
    with pytest.raises(ValueError, match="setting 'compile' = 'fast' is not valid"):
        check_train_settings({"compile": "fast"}, "my-preset.yaml")
    # config.yaml, the command line and the Train tab's form carry it
    job = lora_job(compile="max-autotune")
    assert job_from_yaml(job_to_yaml(job)) == job
    args = build_parser().parse_args(["train", "lora", "--data", "stripes", "--name", "x-lora", "--compile",
                                      "default"])
    assert train_job_from_args(args).compile == "default"
    form = {k: v for k, v in TrainJob().to_dict().items() if k in FORM}
    assert job_from_form({**form, "compile": "default"}, "demo-tiny").compile == "default"
    assert job_from_form({**form, "compile": None}, "demo-tiny").compile == "off"
    fitted, notes = fit_settings({"compile": "default"}, "demo-tiny", cuda=False)
    assert fitted["compile"] == "off" and "CUDA" in notes[0]
    assert fit_settings({"compile": "default"}, "demo-tiny", cuda=True) == ({"compile": "default"}, [])
    # the real compiler (inductor) is CUDA only: refused before anything loads or a run folder is made
    if torch.cuda.is_available():
        return
    cfg = home_cfg(tmp_path)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        Trainer(cfg).start(ti_job(compile="default"))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        TrainingWorker(cfg).start(ti_job(compile="default"))
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    assert main(["train", "lora", "--data", "stripes", "--name", "x-lora", "--compile", "default"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["train", "lora", "--data", "stripes", "--name", "x-lora", "--compile", "reduce-overhead"]) == 2
    assert "CUDA graphs" in capsys.readouterr().err
    assert not list(cfg.runs_dir.iterdir())
