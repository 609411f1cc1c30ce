"""Reliability in the engine, without a server: network flags, out-of-memory becoming advice (CPU stand-in: the
CUDA error is injected), atomic writes (temporary name, fsync, rename), settings files validated naming the bad
key and value."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
import yaml

import app
from studio.config import StudioConfig
from studio.files import atomic
from studio.generation.generate import Generator
from studio.generation.job import GenerateJob
from studio.generation.oom import OutOfMemory
from studio.models.manager import ModelManager

# --- network exposure (pure argument handling; tests/test_security_app.py checks a launched app) ------------


def options(*argv):
    return app.network_options(app.parse_args(list(argv)))


def test_default_is_this_machine_only_no_share_no_login():
    opts, warnings = options()
    assert opts == {"server_name": "127.0.0.1", "share": False, "auth": None} and warnings == []


def test_listen_requires_auth_or_an_explicit_insecure_flag():
    with pytest.raises(ValueError, match="--listen lets other machines.*--auth user:password.*--insecure-no-auth"):
        options("--listen")
    opts, warnings = options("--listen", "--auth", "ana:s3cret:with:colons")
    assert opts["server_name"] == "0.0.0.0" and opts["auth"] == ("ana", "s3cret:with:colons") and not warnings
    opts, warnings = options("--listen", "--insecure-no-auth")
    assert opts["server_name"] == "0.0.0.0" and opts["auth"] is None
    assert len(warnings) == 1 and "anyone who can reach this server" in warnings[0]


def test_share_link_only_when_asked_and_never_without_a_login():
    with pytest.raises(ValueError, match="--share"):
        options("--share")
    assert options("--share", "--auth", "a:b")[0]["share"] is True
    assert options("--auth", "a:b")[0] == {"server_name": "127.0.0.1", "share": False, "auth": ("a", "b")}


@pytest.mark.parametrize("value", ["nopassword", ":pw", "user:", " :pw"])
def test_malformed_auth_is_refused_without_echoing_it(value):
    with pytest.raises(ValueError, match="--auth must be USER:PASSWORD") as e:
        options("--listen", "--auth", value)
    assert value.split(":")[-1] == "" or value.split(":")[-1] not in str(e.value)


def test_auth_from_a_file_keeps_the_password_out_of_the_process_list(tmp_path):
    (tmp_path / "login").write_text("ana:s3cret pass\n")
    assert options("--listen", "--auth", f"@{tmp_path / 'login'}")[0]["auth"] == ("ana", "s3cret pass")
    with pytest.raises(ValueError, match="cannot read USER:PASSWORD"):
        options("--listen", "--auth", f"@{tmp_path / 'missing'}")


def test_auth_and_insecure_flag_contradict():
    with pytest.raises(ValueError, match="contradict"):
        options("--listen", "--auth", "a:b", "--insecure-no-auth")


def test_environment_cannot_widen_the_defaults(monkeypatch):
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SHARE", "True")
    opts, _ = options()
    assert opts["server_name"] == "127.0.0.1" and opts["share"] is False  # passed explicitly to launch()


def test_main_exits_2_with_the_reason_before_loading_anything(capsys):
    assert app.main(["--listen"]) == 2
    assert "error: --listen" in capsys.readouterr().err


def test_browser_file_access_is_limited_to_outputs_and_runs(tmp_path):
    cfg = StudioConfig().with_home(tmp_path)
    access = app.file_access(cfg)
    # storyboards/: the Storyboard tab shows frames, references and exports from there
    assert access["allowed_paths"] == [str(cfg.outputs_dir), str(cfg.runs_dir), str(cfg.storyboards_dir)]
    assert str(cfg.models_dir) in access["blocked_paths"]


# --- out of GPU memory -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    return Generator(manager)


@pytest.fixture
def freed(monkeypatch):
    """Records gc.collect and torch.cuda.empty_cache calls made by studio.oom."""
    from studio.generation import oom

    calls = []
    real_collect = oom.gc.collect
    monkeypatch.setattr(oom.gc, "collect", lambda *a: calls.append("gc") or real_collect(*a))
    monkeypatch.setattr(oom.torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    return calls


def _oom_once(monkeypatch, module, name="denoise"):
    original = getattr(module, name)
    state = {"raised": False}

    def fake(*args, **kw):
        if not state["raised"]:
            state["raised"] = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (GPU 0; 7.6 GiB total)")
        return original(*args, **kw)

    monkeypatch.setattr(module, name, fake)
    return state


def test_generation_out_of_memory_is_advice_frees_memory_and_the_next_job_runs(generator, freed, monkeypatch):
    from studio.generation import generate

    _oom_once(monkeypatch, generate)
    job = GenerateJob(prompt="a lighthouse", steps=2, width=64, height=64, seed=1, batch_size=4, sampler="Euler",
                      schedule="Automatic")
    with pytest.raises(OutOfMemory) as e:
        generator.run(job)
    text = str(e.value)
    assert "generation ran out of GPU memory (CUDA out of memory. Tried to allocate 3.00 GiB" in text
    assert "smaller batch size (it was 4" in text and "VAE tiling" in text and "model CPU offload" in text
    assert isinstance(e.value, RuntimeError)  # the Generate tab shows RuntimeErrors as a message
    assert freed == ["gc", "empty_cache"]
    assert generator.manager.lock.acquire(blocking=False)  # the GPU lane was released
    generator.manager.lock.release()
    assert len(generator.run(job).images) == 4  # and the studio keeps serving


def test_advice_leaves_out_what_is_already_on(generator):
    from studio.generation.oom import generation_advice

    text = generation_advice(1, 512, 512, {"vae_tiling": True, "attention_slicing": True, "cpu_offload": False})
    assert "batch size" not in text and "VAE tiling" not in text and "model CPU offload" in text
    assert "a smaller size (it was 1024x768)" in generation_advice(1, 1024, 768, {})


def test_grid_out_of_memory_names_cells_per_pass(generator, freed, monkeypatch):
    from studio.explorer import grid
    from studio.explorer.grid import GridJob, GridRunner

    _oom_once(monkeypatch, grid)
    base = GenerateJob(prompt="a lighthouse", steps=2, width=64, height=64, seed=1, sampler="Euler",
                       schedule="Automatic")
    job = GridJob(base=base, x=grid.AxisSpec.parse("Seed: 1, 2, 3"))
    runner = GridRunner(generator.manager, generator)
    with pytest.raises(OutOfMemory, match="X/Y/Z plot ran out of GPU memory.*smaller number of cells per pass "
                                          r"\(it was 3"):
        runner.run(job)
    assert "empty_cache" in freed
    assert len(runner.run(job).images) == 3


def test_training_out_of_memory_frees_memory(tmp_path, monkeypatch):
    """The advice itself is tested in test_train_ti; here: memory is freed once the failed step is gone."""
    import numpy as np
    from PIL import Image

    from studio.train import loop
    from studio.train import textual_inversion as ti
    from studio.train.job import TrainJob

    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    (cfg.datasets_dir / "d").mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(cfg.datasets_dir / "d" / "a.png")
    calls = []
    monkeypatch.setattr(loop, "free_memory", lambda: calls.append("freed"))
    _oom_once(monkeypatch, ti.InversionMethod, "encode")
    result = loop.Trainer(cfg).start(TrainJob(name="oom-style", data="d", resolution=64, max_steps=3,
                                              preview_every=0, init_word="painting"))
    assert result.state == "failed" and "out of GPU memory at step 1" in result.message
    assert calls == ["freed"]


# --- atomic writes -----------------------------------------------------------------------------------------


def test_atomic_write_fsyncs_the_temporary_file_before_renaming_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append(("replace", str(a), str(b)))
                        or real_replace(a, b))
    target = tmp_path / "config.yaml"
    atomic.write_text(target, "a: 1\n")
    kinds = [e[0] for e in events]
    tmp_name = events[kinds.index("replace")][1]
    assert Path(tmp_name).name.startswith(".config.yaml.") and tmp_name.endswith(".tmp")
    assert ("fsync", tmp_name) in events[: kinds.index("replace")]  # the data is on disk before the rename
    assert events[-1] == ("fsync", str(tmp_path))  # and the rename itself is made durable
    assert target.read_text() == "a: 1\n"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "status.json"
    atomic.write_text(target, '{"step": 1}')
    with pytest.raises(OSError, match="No space left"):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"step": 2, "trunc')
            raise OSError(28, "No space left on device")
    assert target.read_text() == '{"step": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_no_partial_file_is_ever_visible_under_its_final_name(tmp_path):
    """A reader polling the final name while a large file is written chunk by chunk sees nothing, then the
    whole file; never a prefix."""
    target = tmp_path / "embedding.safetensors"
    payload = os.urandom(1 << 20)
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            try:
                seen.add(len(target.read_bytes()))
            except FileNotFoundError:
                seen.add(None)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with atomic.atomic_path(target) as tmp, open(tmp, "wb") as f:
            for i in range(0, len(payload), 4096):
                f.write(payload[i : i + 4096])
                f.flush()
    finally:
        done.set()
        watcher.join()
    seen.add(len(target.read_bytes()))
    assert seen <= {None, len(payload)} and None in seen and len(payload) in seen


def test_generated_png_is_written_atomically(tmp_path, monkeypatch):
    from PIL import Image

    from studio.generation.generate import save_png

    def crash_midway(self, fp, *args, **kw):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", crash_midway)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (8, 8)), "Steps: 1", tmp_path / "00000-1.png")
    assert list(tmp_path.iterdir()) == []


# --- settings files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, key, value", [
    ({"steps": 0}, "steps", "0"),
    ({"steps": "many"}, "steps", "'many'"),
    ({"width": 500}, "width", "500"),
    ({"sampler": "Euler b"}, "sampler", "'Euler b'"),
    ({"cfg_scale": 99}, "cfg_scale", "99"),
    ({"steps": 30, "batch_size": 0}, "batch_size", "0"),
])
def test_generation_preset_errors_name_the_key_and_value(tmp_path, settings, key, value):
    from studio.generation.presets import list_presets, load_preset

    folder = tmp_path / "generation"
    folder.mkdir()
    path = folder / "mine.json"
    path.write_text(json.dumps({"name": "mine", "settings": settings}))
    with pytest.raises(ValueError) as e:
        load_preset(path)
    assert f"preset mine.json: setting '{key}' = {value} is not valid" in str(e.value)
    assert "mine" not in list_presets(tmp_path)  # skipped, the shipped ones still listed
    assert list_presets(tmp_path)


@pytest.mark.parametrize("settings, key", [
    ({"batch_size": 0}, "batch_size"),
    ({"learning_rate": "0.005:100, fast"}, "learning_rate"),
    ({"method": "lora", "lora_targets": "everything"}, "lora_targets"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"resolution": 500}, "resolution"),
])
def test_training_preset_errors_name_the_key_and_value(tmp_path, settings, key):
    from studio.train.job import load_train_preset

    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "settings": settings}))
    with pytest.raises(ValueError, match=rf"training preset mine.yaml: setting '{key}' = "
                                         rf"{repr(settings[key])[:8]}.*is not valid"):
        load_train_preset(path)


def test_settings_that_only_clash_together_are_reported_together(tmp_path):
    from studio.train.job import load_train_preset

    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump({"settings": {"method": "ti-moe", "experts": 2, "top_k": 3}}))
    with pytest.raises(ValueError, match=r"do not fit together: top-k must be between 1 and the number of experts"):
        load_train_preset(path)


def test_a_hand_edited_run_config_names_the_bad_key_on_resume(tmp_path):
    from studio.train.job import TrainJob, job_to_yaml
    from studio.train.loop import Trainer
    from studio.train.run_folder import RunFolder

    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    run = RunFolder.create(cfg.runs_dir, TrainJob(name="x-style", data="d"))
    text = job_to_yaml(TrainJob(name="x-style", data="d")).replace("grad_accum: 1", "grad_accum: -3")
    (run.path / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"config.yaml: setting 'grad_accum' = -3 is not valid"):
        Trainer(cfg).resume(run.path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_out_of_memory_frees_what_the_failed_job_held(tmp_path):
    """On a GPU: a job too big for the memory it may use fails with advice, the memory it held is handed back,
    and the next job runs."""
    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    gen = Generator(manager)
    small = GenerateJob(prompt="a lighthouse", steps=2, width=64, height=64, seed=1, sampler="Euler",
                        schedule="Automatic")
    gen.run(small)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    # allow this process only ~1 GiB beyond what it holds now: a 16-image 2048 px batch cannot fit
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2**30) / total))
    try:
        big = GenerateJob(prompt="a lighthouse", steps=2, width=2048, height=2048, seed=1, batch_size=16,
                          sampler="Euler", schedule="Automatic")
        with pytest.raises(OutOfMemory, match="smaller batch size .*it was 16.*smaller size"):
            gen.run(big)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= baseline + 16 * 2**20  # the failed job's tensors are gone
        assert torch.cuda.memory_reserved() <= baseline + 256 * 2**20  # and the cache was emptied
        assert len(gen.run(small).images) == 1
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
