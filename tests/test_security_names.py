"""User-given names go through one check (studio.files.names.check_name) everywhere a name becomes a file or a
folder: presets, storyboards, datasets, training runs and outputs, converted models. `a/b` and `a\\b` are refused
(not both turned into `a-b`), Windows device names too, a 300-character name gets a clear message (no Errno, no
path), a newline is refused and never listed, and an existing preset is replaced only when asked."""

from __future__ import annotations

import json

import pytest

from studio.config import StudioConfig
from studio.files.names import UnsafeNameError
from studio.generation.job import GenerateJob

SEPARATORS = ["a/b", "a\\b"]
RESERVED = ["CON", "aux", "lpt1", "NUL", "con.json", "Aux "]
LONG = "x" * 300
NEWLINE = "look\nv2"
BAD = SEPARATORS + RESERVED + [LONG, NEWLINE, "trailing.", ".hidden"]


@pytest.fixture
def cfg(tmp_path):
    cfg = StudioConfig().with_home(tmp_path / "home")
    cfg.ensure_dirs()
    return cfg


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.is_dir() else []


def assert_clear(message: str):
    assert "Errno" not in message and "/" + "tmp" not in message and "home/" not in message, message
    assert "cannot be used" in message or "must be" in message, message


@pytest.mark.parametrize("name", BAD)
def test_preset_names_are_refused_and_nothing_is_written(cfg, name):
    from studio.generation.presets import save_preset

    before = files_under(cfg.presets_dir)
    with pytest.raises(UnsafeNameError) as e:
        save_preset(cfg.presets_dir, name, GenerateJob(prompt="x"))
    assert_clear(str(e.value))
    assert files_under(cfg.presets_dir) == before


def test_a_slash_and_a_backslash_no_longer_meet_in_one_file(cfg):
    from studio.generation.presets import list_presets, save_preset

    for name in SEPARATORS:
        with pytest.raises(UnsafeNameError, match=r"cannot be in a file name"):
            save_preset(cfg.presets_dir, name, GenerateJob(prompt="x", steps=10))
    assert not (cfg.presets_dir / "generation" / "a-b.json").exists()
    assert not {"a/b", "a\\b", "a-b"} & set(list_presets(cfg.presets_dir))


def test_a_300_character_name_is_refused_with_a_clear_message(cfg):
    from studio.generation.presets import save_preset

    with pytest.raises(UnsafeNameError) as e:
        save_preset(cfg.presets_dir, LONG, GenerateJob(prompt="x"))
    message = str(e.value)
    assert "it is 300 characters long" in message and "up to 100 characters" in message
    assert len(message) < 300 and str(cfg.presets_dir) not in message and "Errno" not in message


def test_an_existing_preset_is_replaced_only_when_asked(cfg):
    from studio.generation.presets import PresetExistsError, list_presets, save_preset

    path = save_preset(cfg.presets_dir, "My look", GenerateJob(prompt="x", steps=11))
    for name in ("My look", "my LOOK"):  # one file on case-insensitive disks (Windows, macOS): the same preset
        with pytest.raises(PresetExistsError, match="a preset named .* already exists .*replace it"):
            save_preset(cfg.presets_dir, name, GenerateJob(prompt="x", steps=22))
    assert list_presets(cfg.presets_dir)["My look"].settings["steps"] == 11
    with pytest.raises(PresetExistsError):  # a shipped preset's name too
        save_preset(cfg.presets_dir, "A1111 defaults", GenerateJob(prompt="x"))
    again = save_preset(cfg.presets_dir, "my LOOK", GenerateJob(prompt="x", steps=33), overwrite=True)
    assert again == path and files_under(cfg.presets_dir / "generation") == ["My look.json"]
    found = list_presets(cfg.presets_dir)
    assert found["my LOOK"].settings["steps"] == 33 and "My look" not in found


def test_listing_skips_preset_names_check_name_refuses(cfg):
    from studio.generation.presets import list_presets

    folder = cfg.presets_dir / "generation"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"steps": 12}
    (folder / "look\nv2.json").write_text(json.dumps({"settings": settings}))  # the file's own name has a newline
    (folder / "odd.json").write_text(json.dumps({"name": "odd\nname", "settings": settings}))
    (folder / "My-look-v2.json").write_text(json.dumps({"name": "My look / v2", "settings": settings}))  # old slug
    skipped = {}
    found = list_presets(cfg.presets_dir, skipped)
    assert not [n for n in found if "\n" in n or "/" in n]
    assert "odd" in found and "My-look-v2" in found  # named after their files, which are usable names
    assert list(skipped) == ["look\nv2.json"] and "control characters" in skipped["look\nv2.json"]


def test_storyboard_presets_listing_skips_unusable_names(tmp_path):
    from studio.storyboard.board import list_board_presets

    folder = tmp_path / "storyboard"
    folder.mkdir()
    types = [{"name": "wide", "template": "a [shot type] picture of [description]"}]
    (folder / "CON.json").write_text(json.dumps({"shot_types": types}))
    (folder / "mine.json").write_text(json.dumps({"name": "mine", "shot_types": types}))
    found = list_board_presets(tmp_path)
    assert "mine" in found and "CON" not in found


@pytest.mark.parametrize("name", BAD)
def test_storyboard_names_are_refused(cfg, name):
    from studio.storyboard.board import StoryboardStore, check_board_name

    with pytest.raises(ValueError, match="storyboard name") as e:
        check_board_name(name)
    assert_clear(str(e.value))
    store = StoryboardStore(cfg.storyboards_dir)
    with pytest.raises(ValueError):
        store.path(name)
    assert files_under(cfg.storyboards_dir) == []


def test_storyboard_folders_with_unusable_names_are_not_listed(cfg):
    from studio.storyboard.board import StoryboardStore

    for name in ("aux", "film", "two\nlines"):
        (cfg.storyboards_dir / name).mkdir(parents=True)
        (cfg.storyboards_dir / name / "project.json").write_text("{}")
    assert StoryboardStore(cfg.storyboards_dir).names() == ["film"]


@pytest.mark.parametrize("name", BAD)
def test_dataset_names_are_refused_never_slugged(name):
    from studio.dataset import curate as ds

    with pytest.raises(UnsafeNameError, match="dataset name") as e:
        ds.CurateJob(name=name).validate()
    assert_clear(str(e.value))
    with pytest.raises(UnsafeNameError):
        ds.dataset_name(ds.CurateJob(name=name), None)


def test_dataset_of_the_same_name_is_replaced_only_when_asked(tmp_path):
    from dataset_files import photo

    from studio.dataset import curate as ds

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        photo(i, 64, 64).save(src / f"{i}.png")
    job = ds.CurateJob(inputs=[src], size=64, min_side=32, name="cats")
    out = ds.write_dataset(ds.import_images(job), tmp_path / "datasets" / "cats", replace=False)
    before = (out / "dataset.json").read_text()
    with pytest.raises(ds.DatasetExistsError, match="a dataset named 'cats' already exists in datasets/"):
        ds.write_dataset(ds.import_images(job), out, replace=False)
    assert (out / "dataset.json").read_text() == before
    ds.write_dataset(ds.import_images(job), out, replace=True)


@pytest.mark.parametrize("name", RESERVED[:4] + ["trailing.", "name\n"])
def test_training_names_are_refused(name):
    from studio.train.job import TrainJob

    with pytest.raises(ValueError, match="name must be|training output name") as e:
        TrainJob(name=name, data="d").validate()
    assert_clear(str(e.value))


def test_a_training_run_folder_gets_a_checked_name(tmp_path):
    from studio.train.job import TrainJob
    from studio.train.run_folder import RunFolder

    run = RunFolder.create(tmp_path / "runs", TrainJob(name="style", data="d"))
    assert run.path.parent == tmp_path / "runs" and run.path.name.startswith("style-")
    with pytest.raises(UnsafeNameError, match="training run name"):
        RunFolder.create(tmp_path / "runs", TrainJob(name="a/b", data="d"))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.path.name]


def test_finetune_output_names_from_the_browser_are_checked(cfg):
    from studio.train.job import TrainJob
    from studio.train.worker import TrainingWorker

    (cfg.datasets_dir / "d").mkdir()
    for output in ("CON.safetensors", "lpt1"):
        with pytest.raises(UnsafeNameError, match="fine-tuned checkpoint file name"):
            TrainingWorker(cfg).start(TrainJob.for_method("finetune", name="tuned", data="d", output=output))
    assert list(cfg.runs_dir.iterdir()) == []
