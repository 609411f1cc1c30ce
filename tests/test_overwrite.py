"""Issue 28, items 6 and 10: an output the user names is never replaced without being asked (engine, command line
and UI), and the UI speaks in users' words, not paper references."""

import re
from pathlib import Path

import gradio as gr
import pytest
from dataset_files import photo

from studio.cli import main


def _folder(root: Path, n: int = 2, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(seed + i, 64, 64).save(root / f"{i}.png")
    return root


# --- datasets --------------------------------------------------------------------------------------------


def test_dataset_engine_refuses_an_existing_name_unless_asked(tmp_path):
    from studio.dataset import curate as ds

    job = ds.CurateJob(inputs=[_folder(tmp_path / "src")], size=64, min_side=32, name="cats")
    out = ds.write_dataset(ds.import_images(job), tmp_path / "datasets" / "cats")  # the default: no replacing
    before = (out / "dataset.json").read_text()
    with pytest.raises(ds.DatasetExistsError, match="a dataset named 'cats' already exists"):
        ds.write_dataset(ds.import_images(job), out)
    assert (out / "dataset.json").read_text() == before
    curation = ds.import_images(job)
    ds.set_caption(curation, 0, "a new caption")
    ds.write_dataset(curation, out, replace=True)
    assert (out / "0.txt").read_text() == "a new caption"
    # the kohya export too: refused, then replaced when asked
    kohya = ds.export_kohya(out, tmp_path / "kohya")
    with pytest.raises(ds.DatasetExistsError, match="kohya export '1_cats' already exists"):
        ds.export_kohya(out, tmp_path / "kohya")
    (kohya / "0.txt").write_text("stale")
    ds.export_kohya(out, tmp_path / "kohya", replace=True)
    assert (kohya / "0.txt").read_text() == "a new caption"


def test_curate_refuses_before_any_work_and_replaces_when_asked(tmp_path):
    from studio.dataset import curate as ds

    src = _folder(tmp_path / "src")
    out = tmp_path / "datasets" / "cats"
    job = ds.CurateJob(inputs=[src], output=out, size=64, min_side=32)
    ds.curate(job, tmp_path / "cache", "cpu")
    calls = []
    with pytest.raises(ds.DatasetExistsError):
        ds.curate(job, tmp_path / "cache", "cpu", on_progress=lambda *a: calls.append(a))
    assert calls == []  # refused up front: no image was even imported
    photo(9, 64, 64).save(src / "2.png")
    result = ds.curate(job, tmp_path / "cache", "cpu", replace=True)
    assert len(result.curation.kept()) == 3 and len(ds.read_manifest(out)["images"]) == 3


def test_cli_curate_refuses_an_existing_dataset_without_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    src = _folder(tmp_path / "src")
    out = tmp_path / "out"
    args = ["curate", "--input", str(src), "--output", str(out), "--size", "64", "--min-side", "32"]
    assert main(args + ["--prefix", "first,"]) == 0
    capsys.readouterr()
    assert main(args + ["--prefix", "second,"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "0.txt").read_text().startswith("first,")
    assert main(args + ["--prefix", "second,", "--overwrite"]) == 0
    assert (out / "0.txt").read_text().startswith("second,")


def test_dataset_tab_asks_before_replacing_and_replaces_with_the_checkbox(tmp_path):
    """The Save button's function, as Gradio calls it: refused with the checkbox named, then replaced when ticked
    (and the tick is cleared afterwards)."""
    from studio.config import StudioConfig
    from studio.dataset import curate as ds
    from studio.ui import dataset_tab as tab
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path / "home"))
    state.cfg.ensure_dirs()
    with gr.Blocks() as demo:
        tab.build(state)
    save = next(fn.fn for fn in demo.fns.values() if fn.fn is not None and fn.fn.__name__ == "do_save")
    checkbox = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "ds-replace")
    assert checkbox.label == tab.REPLACE_LABEL and checkbox.value is False

    def run(caption: str, replace: bool):
        curation = ds.import_images(ds.CurateJob(inputs=[_folder(tmp_path / "my art")], size=64, min_side=32))
        grid = tab.grid_rows(curation)
        grid[0][3] = caption
        names.append(grid[0][1])  # the first row's image
        return save(curation, grid, tab.dup_rows(curation), "my-style", 0, "none", 0.5, False, 0.2, False, replace,
                    progress=lambda *a, **k: None)

    out = state.cfg.datasets_dir / "my-style"
    names = []
    first = run("first caption", False)
    assert "Saved" in first[-2] and first[-1] is False
    name = names[0]
    assert (out / f"{name}.txt").read_text() == "first caption"
    with pytest.raises(gr.Error) as e:
        run("second caption", False)
    assert "already exists" in e.value.message and tab.REPLACE_LABEL in e.value.message
    assert (out / f"{name}.txt").read_text() == "first caption"
    replaced = run("second caption", True)
    assert "Saved" in replaced[-2] and replaced[-1] is False  # the checkbox is cleared for the next save
    assert (out / f"{name}.txt").read_text() == "second caption"


# --- training outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ti", "lora", "finetune"])
def test_training_refuses_an_existing_output_unless_overwrite(studio_cfg, method):
    from studio.train.finetune import finetune_output
    from studio.train.job import OutputExistsError, TrainJob
    from studio.train.loop import method_class

    job = TrainJob.for_method(method).replace(name="mine", data="d")
    target = {"ti": studio_cfg.embeddings_dir / "mine.safetensors",
              "lora": studio_cfg.loras_dir / "mine.safetensors",
              "finetune": finetune_output(studio_cfg, job)}[method]
    method_class(job).check_output(studio_cfg, job)  # nothing there yet
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"someone's file")
    with pytest.raises(OutputExistsError, match="mine.safetensors already exists"):
        method_class(job).check_output(studio_cfg, job)
    method_class(job).check_output(studio_cfg, job.replace(overwrite=True))


def test_cli_train_refuses_an_existing_output_without_overwrite(tmp_path, capsys, monkeypatch):
    from studio.cli import build_parser
    from studio.cli.train import train_job_from_args
    from studio.config import StudioConfig
    from studio.train.loop import method_class

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    cfg = StudioConfig.from_env()
    cfg.ensure_dirs()
    (cfg.embeddings_dir / "mine.safetensors").write_bytes(b"someone's file")
    argv = ["train", "ti", "--data", str(_folder(tmp_path / "data")), "--name", "mine", "--steps", "1"]
    assert main(argv) == 2
    assert "mine.safetensors already exists in embeddings/" in capsys.readouterr().err
    assert (cfg.embeddings_dir / "mine.safetensors").read_bytes() == b"someone's file"
    job = train_job_from_args(build_parser().parse_args(argv + ["--overwrite"]))
    assert job.overwrite
    method_class(job).check_output(cfg, job)  # allowed to replace it


# --- storyboards -----------------------------------------------------------------------------------------


def test_storyboard_store_refuses_an_existing_board_unless_replace(tmp_path):
    from studio.storyboard.board import Shot, StoryboardExistsError, StoryboardStore, new_board

    store = StoryboardStore(tmp_path / "storyboards")
    board = new_board("film")
    board.shots = [Shot("1", "close shot", "a face")]
    store.create(board)
    for name in ("film", "FILM"):
        with pytest.raises(StoryboardExistsError, match="a storyboard named 'film' already exists"):
            store.create(new_board(name))
    assert [s.description for s in store.load("film").shots] == ["a face"]
    store.create(new_board("film"), replace=True)
    assert store.load("film").shots == []
    store.save(store.load("film"))  # saving the open board is not creating one


CSV = "shot,type,description\n1,close shot,a face\n"


def test_cli_storyboard_refuses_an_existing_board_and_pdf_without_overwrite(tmp_path, capsys, monkeypatch):
    from studio.config import StudioConfig
    from studio.storyboard.board import StoryboardStore, new_board

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    cfg = StudioConfig.from_env()
    cfg.ensure_dirs()
    store = StoryboardStore(cfg.storyboards_dir)
    store.create(new_board("script"))
    (tmp_path / "script.csv").write_text(CSV)
    argv = ["storyboard", "--model", "no-such-model", "--shots", str(tmp_path / "script.csv")]
    assert main(argv) == 2  # refused before the (missing) model is looked for
    err = capsys.readouterr().err
    assert "a storyboard named 'script' already exists" in err and "--overwrite" in err
    assert store.load("script").shots == []
    (tmp_path / "board.pdf").write_bytes(b"my pdf")
    assert main(argv + ["--name", "other", "--out", str(tmp_path / "board.pdf")]) == 2
    assert "board.pdf already exists" in capsys.readouterr().err
    assert (tmp_path / "board.pdf").read_bytes() == b"my pdf" and not store.exists("other")
    argv[2] = "demo-tiny"
    assert main(argv + ["--overwrite", "--steps", "1", "--width", "64", "--height", "64"]) == 0, \
        capsys.readouterr().err
    assert [s.description for s in store.load("script").shots] == ["a face"]


# --- model conversion ------------------------------------------------------------------------------------


def test_convert_refuses_an_existing_model_unless_overwrite(tiny_pipe, tmp_path):
    from studio.files.convert import ModelExistsError, save_diffusers_folder, save_single_file

    single = tmp_path / "mine.safetensors"
    single.write_bytes(b"someone's model")
    with pytest.raises(ModelExistsError, match="a model named 'mine.safetensors' already exists"):
        save_single_file(tiny_pipe, single, "sd1", overwrite=False)
    assert single.read_bytes() == b"someone's model"
    save_single_file(tiny_pipe, single, "sd1", overwrite=True)
    assert single.read_bytes() != b"someone's model"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ModelExistsError):
        save_diffusers_folder(tiny_pipe, folder, overwrite=False)
    assert (folder / "keep.txt").read_text() == "mine"
    save_diffusers_folder(tiny_pipe, folder, overwrite=True)
    assert (folder / "model_index.json").is_file()


def test_cli_convert_refuses_an_existing_out_without_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"someone's model")
    argv = ["convert", "--model", "no-such-model", "--to", "single-file", "--out", str(out)]
    assert main(argv) == 2  # refused before the model is even looked for
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and out.read_bytes() == b"someone's model"
    argv[2] = "demo-tiny"
    assert main(argv + ["--overwrite"]) == 0, capsys.readouterr().err
    assert out.read_bytes() != b"someone's model"


# --- surveys ---------------------------------------------------------------------------------------------


def _pair(tmp_path: Path):
    from studio.evaluate import survey as sv

    a, b = _folder(tmp_path / "a", 1), _folder(tmp_path / "b", 1, seed=5)
    return [sv.PairSource(a / "0.png", b / "0.png", "a face", "close shot")]


def test_survey_refuses_an_existing_name_unless_replace(tmp_path):
    from studio.evaluate import survey as sv

    pairs = _pair(tmp_path)
    folder = sv.create_survey(tmp_path / "surveys", "shots", pairs, "First")
    with pytest.raises(sv.SurveyExistsError, match="a survey named 'shots' already exists"):
        sv.create_survey(tmp_path / "surveys", "shots", pairs, "Second")
    assert "First" in (folder / "survey.json").read_text()
    sv.create_survey(tmp_path / "surveys", "shots", pairs, "Second", replace=True)
    assert "Second" in (folder / "survey.json").read_text()


def test_cli_survey_build_refuses_an_existing_survey_without_overwrite(tmp_path, capsys, monkeypatch):
    from studio.config import StudioConfig

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    a, b = _folder(tmp_path / "a", 1), _folder(tmp_path / "b", 1, seed=5)
    argv = ["survey", "build", "shots", "--baseline", str(a), "--candidate", str(b)]
    assert main(argv + ["--title", "First"]) == 0
    capsys.readouterr()
    folder = Path(StudioConfig.from_env().outputs_dir) / "surveys" / "shots"
    assert main(argv + ["--title", "Second"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "First" in (folder / "survey.json").read_text()
    assert main(argv + ["--title", "Second", "--overwrite"]) == 0
    assert "Second" in (folder / "survey.json").read_text()


# --- experiments -----------------------------------------------------------------------------------------


def test_cli_experiment_refuses_to_replace_changed_cells_without_overwrite(tmp_path, capsys, monkeypatch):
    """A finished cell of another version of the experiment (same name, other settings) is not redone silently."""
    import json

    import yaml

    from studio.config import StudioConfig

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    _folder(tmp_path / "refs", 2)
    spec = {"name": "tiny", "model": "demo-tiny", "styles": [{"name": "Dots", "references": str(tmp_path / "refs")}],
            "methods": ["pe"], "prompts": ["a house"], "images_per_prompt": 1, "seed": 5,
            "generation": {"steps": 1, "width": 64, "height": 64}, "metrics": ["clip-i"], "clip_model": "demo-tiny"}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    cell = Path(StudioConfig.from_env().outputs_dir) / "experiments" / "tiny" / "cells" / "dots" / "pe"
    cell.mkdir(parents=True)
    old = {"key": "settings of an earlier version", "accuracy": 0.5, "editability": 0.25}
    (cell / "result.json").write_text(json.dumps(old))
    assert main(["experiment", str(tmp_path / "exp.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds results of this experiment with other settings (Dots · pe)" in err and "--overwrite" in err
    assert json.loads((cell / "result.json").read_text()) == old
    assert main(["experiment", str(tmp_path / "exp.yaml"), "--overwrite"]) == 0, capsys.readouterr().err
    assert json.loads((cell / "result.json").read_text())["key"] != old["key"]


# --- item 10: words --------------------------------------------------------------------------------------

PAPER = re.compile(r"seed ?0\d\d|seed_?0\d\d|§", re.IGNORECASE)


def shown_texts(block) -> list[str]:
    """What a component shows as its name or its options (not its `info` tooltip, nor its choices' values)."""
    texts = [block.label] if isinstance(getattr(block, "label", None), str) else []
    if isinstance(block, (gr.Markdown, gr.Button, gr.HTML)) and isinstance(block.value, str):
        texts.append(block.value)
    for choice in getattr(block, "choices", None) or []:
        texts.append(str(choice[0] if isinstance(choice, (tuple, list)) else choice))
    return texts


def test_the_built_ui_names_things_without_paper_references(tmp_path):
    from studio.config import StudioConfig
    from studio.ui import build_ui
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig().with_home(tmp_path / "home"))
    state.manager.load("demo-tiny")
    demo = build_ui(state)
    blocks = list(demo.blocks.values())
    found = [f"{type(b).__name__} {getattr(b, 'elem_id', None)}: {t[:80]!r}" for b in blocks
             for t in shown_texts(b) if PAPER.search(t)]
    assert not found, found
    # the scan sees what it must: accordions, radio and dropdown labels (the shipped presets are offered)
    by_id = {b.elem_id: b for b in blocks if getattr(b, "elem_id", None)}
    assert "Caption check: drop pairs whose caption does not match the image" in shown_texts(by_id["ds-clip-check"])
    template_values = [value for _, value in by_id["tr-template"].choices]
    assert "painting_style_seed000" in template_values  # the values (file names) stay
    assert any("seed" in (b.info or "").lower() for b in blocks if isinstance(getattr(b, "info", None), str))


def test_preset_and_template_labels_keep_their_values():
    from studio.train.job import list_train_presets
    from studio.ui.storyboard_tab import board_preset_choices
    from studio.ui.train_tab import PRESET_LABELS, preset_choices, template_choices

    assert set(PRESET_LABELS) <= set(list_train_presets())  # every label names a shipped preset
    assert ("Painting style: embedding with an attention module (4 paintings, 1000 steps)", "Seed 000: TI-Att") in \
        preset_choices(None, "ti-att")
    assert template_choices(["object_seed002", "mine"]) == [("object, short list (7 phrasings)", "object_seed002"),
                                                            ("mine", "mine")]
    assert board_preset_choices({"DreamShot shot-type LoRAs (seed 004)": None, "my own": None}) == \
        [("Film shot types, each with its shot-type LoRA", "DreamShot shot-type LoRAs (seed 004)"),
         ("my own", "my own")]
