"""Names from prompts, UI fields, the API and the command line never reach a file outside their folder: `..`,
absolute paths, Windows separators and drive letters, NUL bytes, symlinks leading out. (safe_child itself is
table-tested in test_library; the API's model dropdown in test_security_app.)"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from studio.config import StudioConfig
from studio.files.names import UnsafeNameError
from studio.files.networks import NetworkLibrary, UnknownNetworkError
from studio.generation.generate import resolve_networks
from studio.generation.job import GenerateJob
from studio.models.listing import list_models

HOSTILE_NAMES = ["../outside", "../../outside", "..\\..\\outside", "/tmp/outside", "\\\\server\\share\\outside",
                 "C:\\outside", "C:/outside", "sub/../../outside", "out\x00side", "link"]


def lora_tensors():
    return {"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}


@pytest.fixture
def cfg(tmp_path):
    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    # a valid LoRA and embedding just outside their folders, and symlinks in the folders pointing at them
    save_file(lora_tensors(), str(tmp_path / "home" / "outside.safetensors"))
    save_file({"emb_params": torch.ones(1, 32)}, str(tmp_path / "home" / "outside-emb.safetensors"))
    os.symlink(tmp_path / "home" / "outside.safetensors", cfg.loras_dir / "link.safetensors")
    os.symlink(tmp_path / "home" / "outside-emb.safetensors", cfg.embeddings_dir / "link.safetensors")
    save_file(lora_tensors(), str(cfg.loras_dir / "inside.safetensors"))
    return cfg


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_lora_names_in_prompts_only_match_files_inside_loras(cfg, name):
    library = NetworkLibrary(cfg.loras_dir, cfg.embeddings_dir)
    job = GenerateJob(prompt=f"a lighthouse <lora:{name}:1>")
    with pytest.raises((UnknownNetworkError, ValueError)):
        resolve_networks(job, library, 32)
    # names are looked up among the scanned files; the symlinked one is not among them
    assert set(library.loras().found) == {"inside"}
    assert "link" not in library.embeddings().found
    assert resolve_networks(GenerateJob(prompt="a <lora:inside:1>"), library, 32).loras[0].file.name == "inside"


def test_models_folder_lists_no_symlink_leading_out_and_names_mean_models(cfg, tmp_path, monkeypatch, tiny_pipe):
    from studio.files.convert import save_single_file
    from studio.models.manager import ModelManager

    outside = save_single_file(tiny_pipe, tmp_path / "elsewhere" / "ext.safetensors", "sd1")
    os.symlink(outside, cfg.models_dir / "ext.safetensors")
    assert [e.name for e in list_models(cfg.models_dir)] == []
    manager = ModelManager(cfg)
    assert manager.choices() == manager.built_in()  # nothing from models/, only what ships
    for name in ("ext.safetensors", "../elsewhere/ext.safetensors", "..\\elsewhere\\ext.safetensors"):
        with pytest.raises(Exception, match="not found|outside"):
            manager.load(name)
    # a name means the file in models/, not one of the same name in the folder the studio was started from
    save_single_file(tiny_pipe, cfg.models_dir / "same.safetensors", "sd1")
    (tmp_path / "same.safetensors").write_bytes(b"a different file in the working folder")
    monkeypatch.chdir(tmp_path)
    assert manager.resolve("same.safetensors") == ("single-file", (cfg.models_dir / "same.safetensors").resolve())
    # the command line may still name any path on purpose
    assert manager.resolve(str(outside)) == ("single-file", outside)


@pytest.mark.parametrize("output", ["/tmp/x.safetensors", "../x.safetensors", "..\\..\\x.safetensors",
                                    "sub/../../x.safetensors", "x\x00.safetensors"])
def test_finetune_output_from_the_ui_stays_in_models(cfg, output):
    from studio.train.job import TrainJob
    from studio.train.worker import TrainingWorker

    (cfg.datasets_dir / "d").mkdir()
    job = TrainJob.for_method("finetune", name="tuned", data="d", output=output)
    with pytest.raises(UnsafeNameError):
        TrainingWorker(cfg).start(job)
    assert not TrainingWorker(cfg).busy and list(cfg.runs_dir.iterdir()) == []


@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n != "link"] + ["/etc/cron.d/x", "..", "."])
def test_names_typed_in_the_ui_become_files_inside_their_folder_or_are_refused(cfg, name):
    """Preset, dataset, training-output and storyboard names: refused as typed (never slugged), nothing written."""
    from studio.dataset import curate as ds
    from studio.generation.presets import save_preset
    from studio.storyboard.board import check_board_name
    from studio.train.job import TrainJob

    with pytest.raises(UnsafeNameError, match="preset name"):
        save_preset(cfg.presets_dir, name, GenerateJob(prompt="x"))
    assert not any((cfg.presets_dir / "generation").glob("*"))  # nothing written
    with pytest.raises(UnsafeNameError, match="dataset name"):
        ds.dataset_name(ds.CurateJob(name=name), None)
    with pytest.raises(ValueError, match="name must be|training output name"):
        TrainJob(name=name, data="d").validate()
    with pytest.raises(ValueError, match="storyboard name"):
        check_board_name(name)
    assert not (cfg.root.parent / "outside").exists()
