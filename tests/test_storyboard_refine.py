"""Storyboard frames made from frames, on demo-tiny at 64 px: Refine frame (image to image, inpainting with a mask,
a changed description, the shot's ControlNet) gives Generate's image of that frame as a new candidate, the others
kept, recorded in the shot's history and reloaded from the project file; Outpaint to the board's aspect gives a
frame of that aspect whose interior is the original's pixels; the board's hires fix gives frames of scale x the
size with Hires fields; old project files load with the new fields' defaults."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_storyboard import sketch, tiny_controlnet

from studio.control.controlnet import save_controlnet_file
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager
from studio.storyboard.board import (
    BoardSettings,
    Shot,
    StoryboardStore,
    new_board,
    parse_aspect,
    pick,
)
from studio.storyboard.export import export_board
from studio.storyboard.runner import StoryboardRunner


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    save_controlnet_file(tiny_controlnet(manager.current.pipe.unet), cfg.controlnet_dir / "tiny-canny.safetensors")
    store = StoryboardStore(cfg.storyboards_dir)
    runner = StoryboardRunner(manager, store, cfg.controlnet_dir)
    return cfg, manager, store, runner


def settings(**kw) -> BoardSettings:
    values = dict(width=64, height=64, steps=3, sampler="Euler a", schedule="Automatic", cfg_scale=6.0,
                  candidates=1, controlnet="tiny-canny", negative_prompt="blurry")
    values.update(kw)
    return BoardSettings(**values)


def pixels(path_or_image) -> np.ndarray:
    im = Image.open(path_or_image) if not isinstance(path_or_image, Image.Image) else path_or_image
    return np.asarray(im.convert("RGB")).astype(int)


def frame_job(board, shot, path, seed, **kw) -> GenerateJob:
    """Generate's job for an image of the frame at `path`, with the board's settings."""
    s = board.settings
    with Image.open(path) as im:
        width, height = im.size
    return GenerateJob(prompt=kw.pop("prompt", board.prompt(shot)), negative_prompt=s.negative_prompt,
                       sampler=s.sampler, schedule=s.schedule, steps=s.steps, cfg_scale=s.cfg_scale, seed=seed,
                       width=width, height=height, init_image=path, **kw)


@pytest.fixture(scope="module")
def board(studio):
    """Four shots generated once (shot 1 with two candidates); each test works on its own shot."""
    cfg, manager, store, runner = studio
    board = new_board("refine", settings())
    board.shots = [Shot("1", "close shot", "a red door", seed=11, candidates=2),
                   Shot("2", "long shot", "a street", seed=40), Shot("3", "close shot", "a face", seed=7),
                   Shot("4", "long shot", "a field", seed=60)]
    store.save(board)
    result = runner.run(board)
    assert not result.interrupted and len(result.shots) == 4
    return board


def test_refine_is_generates_image_to_image_of_the_frame_kept_beside_the_others(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path(board.name)
    shot = board.shot("1")
    pick(board, "1", 1)
    store.save(board)
    before = [(f.file, (folder / f.file).read_bytes()) for f in shot.frames]
    source = shot.frames[1]
    result = runner.refine(board, "1", strength=0.7)
    assert not result.interrupted and result.index == 2 and len(shot.frames) == 3
    # the shot's other candidates stay as they were, the picked one too; the other shot is untouched
    assert [(f.file, (folder / f.file).read_bytes()) for f in shot.frames[:2]] == before
    assert shot.picked == 1
    new = shot.frames[2]
    assert (new.action, new.source, new.seed, new.controlnet) == ("img2img", source.file, source.seed, False)
    # the new candidate is Generate's image to image of that frame with the same settings and seed
    made = Generator(manager).run(frame_job(board, shot, folder / source.file, source.seed,
                                            denoising_strength=0.7)).images[0]
    assert np.array_equal(pixels(folder / new.file), pixels(made.image))
    assert read_image_infotext(folder / new.file) == made.infotext
    assert parse_infotext(made.infotext)["Denoising strength"] == "0.7"
    assert not np.array_equal(pixels(folder / new.file), pixels(folder / source.file))
    # recorded in the shot's history and reloaded from the project file
    [entry] = shot.history
    assert (entry.action, entry.source, entry.file, entry.seed, entry.mask) == ("img2img", source.file, new.file,
                                                                                source.seed, "")
    assert entry.infotext == made.infotext
    data = json.loads((folder / "project.json").read_text())
    assert data["shots"][0]["history"][0]["source"] == source.file
    assert data["shots"][0]["frames"][2]["source"] == source.file
    loaded = store.load(board.name)
    assert loaded.to_dict() == board.to_dict()
    assert loaded.shot("1").history[0].infotext == made.infotext
    # it can be picked, and a refinement of it records where it came from
    pick(loaded, "1", 2)
    again = runner.refine(loaded, "1", strength=0.4, seed=3)
    assert again.frame.source == new.file and again.frame.seed == 3 and len(loaded.shot("1").frames) == 4
    assert [h.source for h in store.load(board.name).shot("1").history] == [source.file, new.file]


def test_refine_with_a_mask_is_generates_inpainting_and_a_description_changes_the_prompt(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path(board.name)
    shot = board.shot("2")
    source = shot.frames[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))  # the left part is redrawn
    result = runner.refine(board, "2", strength=0.75, mask=mask, description="a street in the rain", mask_blur=2)
    new = result.frame
    assert new.action == "inpaint" and new.source == source.file
    prompt = board.prompt(Shot("2", "long shot", "a street in the rain"))
    assert "a street in the rain" in prompt and prompt != board.prompt(shot)
    made = Generator(manager).run(frame_job(board, shot, folder / source.file, source.seed, prompt=prompt,
                                            denoising_strength=0.75, mask=mask, mask_blur=2)).images[0]
    assert np.array_equal(pixels(folder / new.file), pixels(made.image))
    assert read_image_infotext(folder / new.file) == made.infotext
    assert parse_infotext(made.infotext)["Mask blur"] == "2"
    # outside the mask (and its blur) the frame's own pixels; inside, redrawn
    out, original = pixels(folder / new.file), pixels(folder / source.file)
    assert np.array_equal(out[:, 40:], original[:, 40:])
    assert not np.array_equal(out[:, :20], original[:, :20])
    # the mask is kept beside the frames and named in the history
    entry = store.load(board.name).shot("2").history[-1]
    assert entry.action == "inpaint" and entry.mask and (folder / entry.mask).is_file()
    assert np.array_equal(pixels(folder / entry.mask)[..., 0], np.asarray(mask).astype(int))
    assert len(shot.frames) == 2 and board.shot("3").history == []


def test_refine_of_a_shot_with_a_reference_goes_through_its_controlnet(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path(board.name)
    shot = board.shot("3")
    store.add_reference(board, shot, sketch(folder / "drawing.png", (64, 64)))
    store.save(board)
    calls = []
    controlnet = runner.controlnets.load("tiny-canny", "cpu", torch.float32, 32)
    handle = controlnet.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        result = runner.refine(board, "3", strength=0.7)
    finally:
        handle.remove()
    assert calls and result.frame.controlnet
    info = parse_infotext(read_image_infotext(folder / result.frame.file))
    assert info["ControlNet 0"].startswith("Module: canny, Model: tiny-canny [")
    # the ControlNet changed it: not the plain image to image of the frame
    plain = Generator(manager).run(frame_job(board, shot, folder / shot.frames[0].file, shot.frames[0].seed,
                                             denoising_strength=0.7)).images[0]
    assert not np.array_equal(pixels(folder / result.frame.file), pixels(plain.image))
    # outpainting runs without it, and says so
    board.settings.aspect = "16:9"
    try:
        calls.clear()
        handle = controlnet.model.register_forward_hook(lambda *a: calls.append(1))
        try:
            wide = runner.outpaint(board, "3", index=0)
        finally:
            handle.remove()
    finally:
        board.settings.aspect = ""
    assert not wide.frame.controlnet and any("without the ControlNet" in n for n in wide.notes)


def test_outpaint_extends_a_frame_to_the_boards_aspect_keeping_its_pixels(studio, board, request):
    cfg, manager, store, runner = studio
    folder = store.path(board.name)
    shot = board.shot("4")
    with pytest.raises(ValueError, match="already has the board's aspect"):
        runner.outpaint(board, "4")  # 64x64 on a 64x64 board: nothing to add
    board.settings.aspect = "16:9"
    request.addfinalizer(lambda: setattr(board.settings, "aspect", ""))
    source = shot.frames[shot.picked]
    result = runner.outpaint(board, "4")
    new = result.frame
    assert new.action == "outpaint" and new.source == source.file and len(shot.frames) == 2
    out, original = pixels(folder / new.file), pixels(folder / source.file)
    assert out.shape == (64, 112, 3)  # 24 px each side (masking.pads_for_aspect)
    assert abs(112 / 64 - 16 / 9) < 0.05
    # away from the seam (8 px redrawn into the frame, plus the mask blur's reach) the frame's own pixels
    assert np.array_equal(out[:, 24 + 19 : 24 + 64 - 19], original[:, 19 : 64 - 19])
    assert not np.array_equal(out[:, :16], np.zeros_like(out[:, :16]))
    made = Generator(manager).run(frame_job(board, shot, folder / source.file, source.seed, denoising_strength=1.0,
                                            outpaint={"left": 24, "right": 24})).images[0]
    assert np.array_equal(out, pixels(made.image))
    info = parse_infotext(read_image_infotext(folder / new.file))
    assert info["Outpaint"] == "left 24, right 24" and info["Size"] == "112x64"
    assert store.load(board.name).shot("4").history[-1].action == "outpaint"
    # a tall board pads top and bottom
    board.settings.aspect = "9:16"
    tall = runner.outpaint(board, "4", index=0)
    assert Image.open(folder / tall.frame.file).size == (64, 112)
    assert parse_aspect("2.39:1") == pytest.approx(2.39) and parse_aspect("1.85") == 1.85
    with pytest.raises(ValueError, match="aspect"):
        parse_aspect("wide")


def test_hires_board_setting_makes_frames_of_scale_times_the_size(studio, tmp_path):
    cfg, manager, store, runner = studio
    assert BoardSettings().hires_fix is False
    board = new_board("hires board", settings(hires_fix=True, hires_scale=2.0, hires_steps=2,
                                              hires_denoising=0.5, hires_upscaler="Latent"))
    board.shots = [Shot("1", "close shot", "a lamp", seed=21)]
    steps = []
    runner.run(board, on_progress=lambda done, total, info: steps.append((done, total, info)))
    folder = store.path(board.name)
    shot = board.shot("1")
    assert steps[-1][0] == steps[-1][1] and any("hires fix" in s[2] for s in steps)
    for frame in shot.frames:
        path = folder / frame.file
        assert Image.open(path).size == (128, 128)
        info = parse_infotext(read_image_infotext(path))
        assert info["Hires upscale"] == "2" and info["Hires upscaler"] == "Latent" and info["Hires steps"] == "2"
        assert info["Denoising strength"] == "0.5" and info["Size"] == "64x64"
    # the frame is Generate's hires fix image with the same settings and seed
    s = board.settings
    job = GenerateJob(prompt=board.prompt(shot), negative_prompt=s.negative_prompt, sampler=s.sampler,
                      schedule=s.schedule, steps=s.steps, cfg_scale=s.cfg_scale, seed=shot.frames[0].seed, width=64,
                      height=64, hires_fix=True, hires_scale=2.0, hires_steps=2, hires_denoising=0.5,
                      hires_upscaler="Latent")
    made = Generator(manager).run(job).images[0]
    assert np.array_equal(pixels(folder / shot.frames[0].file), pixels(made.image))
    assert read_image_infotext(folder / shot.frames[0].file) == made.infotext
    # through a pixel upscaler too
    board.settings.hires_upscaler = "Lanczos"
    runner.run(board)
    assert Image.open(folder / shot.frames[0].file).size == (128, 128)
    assert parse_infotext(read_image_infotext(folder / shot.frames[0].file))["Hires upscaler"] == "Lanczos"
    # kept in the project file; the PDF export takes the frames as they are
    assert store.load(board.name).settings.hires_fix is True
    out = export_board(store, board, pdf_path=tmp_path / "hires.pdf")
    assert (out.frames_dir / "1.png").read_bytes() == (folder / shot.frames[0].file).read_bytes()
    # refining a hires frame works at its own size (image to image has no hires fix)
    refined = runner.refine(board, "1", strength=0.5)
    assert Image.open(folder / refined.frame.file).size == (128, 128)
    assert "Hires upscale" not in parse_infotext(refined.frame and read_image_infotext(folder / refined.frame.file))
    # a shot with a reference: the first pass through the ControlNet, the hires pass without it (said so)
    board.shots.append(Shot("2", "close shot", "a chair", seed=8))
    store.add_reference(board, board.shots[1], sketch(tmp_path / "chair.png", (64, 64)))
    result = runner.run(board, ["2"])
    frame = board.shot("2").frames[0]
    assert frame.controlnet and Image.open(folder / frame.file).size == (128, 128)
    assert any("without the ControlNet" in n for n in result.notes)
    # off: board-size frames without Hires fields
    board.settings.hires_fix = False
    runner.run(board)
    info = parse_infotext(read_image_infotext(folder / shot.frames[0].file))
    assert Image.open(folder / shot.frames[0].file).size == (64, 64) and "Hires upscale" not in info
    with pytest.raises(ValueError, match="hires scale"):
        settings(hires_scale=9).validate()


def test_old_project_files_load_with_the_new_fields_defaults(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path("old board")
    shutil.copytree(store.path(board.name), folder)
    data = json.loads((folder / "project.json").read_text())
    data["name"] = "old board"
    # a project file written before refinements, aspect and hires fix
    for key in ("aspect", "hires_fix", "hires_scale", "hires_upscaler", "hires_steps", "hires_denoising"):
        assert key in data["settings"]
        del data["settings"][key]
    for shot in data["shots"]:
        del shot["history"]
        for frame in shot["frames"]:
            del frame["action"], frame["source"]
    (folder / "project.json").write_text(json.dumps(data), encoding="utf-8")
    old = store.load("old board")
    expected = store.load(board.name)  # what the file kept, the new fields at their defaults
    expected.name = "old board"
    expected.settings = BoardSettings(**{**expected.settings.__dict__, "aspect": "", "hires_fix": False})
    for shot in expected.shots:
        shot.history = []
        for frame in shot.frames:
            frame.action, frame.source = "generate", ""
    assert old.settings.aspect == "" and old.settings.hires_fix is False and old.settings.hires_scale == 2.0
    assert old.settings.hires_upscaler == "Latent" and old.settings.hires_steps == 0
    assert old.settings.hires_denoising == 0.7
    assert all(s.history == [] for s in old.shots)
    assert all(f.action == "generate" and f.source == "" for s in old.shots for f in s.frames)
    assert old.to_dict() == expected.to_dict()
    # it can be refined and saved: the new fields are written
    runner.refine(old, "4", strength=0.7, index=0)
    saved = json.loads((folder / "project.json").read_text())
    assert saved["settings"]["hires_fix"] is False and saved["shots"][3]["history"][-1]["action"] == "img2img"
    assert not list(folder.glob("*.tmp*"))
    # unknown keys are still refused
    saved["shots"][3]["history"][-1]["colour"] = "red"
    (folder / "project.json").write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(ValueError, match="unknown history entry field"):
        store.load("old board")


def test_storyboard_command_takes_the_hires_and_aspect_settings(studio, tmp_path, monkeypatch, capsys):
    from studio.cli import main

    cfg, manager, store, runner = studio
    monkeypatch.setenv("STUDIO_HOME", str(cfg.models_dir.parent))
    (tmp_path / "hires script.csv").write_text("shot,type,description,seed\n1,close shot,a cup,5\n", encoding="utf-8")
    code = main(["storyboard", "--model", "demo-tiny", "--shots", str(tmp_path / "hires script.csv"), "--steps", "2",
                 "--sampler", "Euler", "--hires", "--hires-scale", "1.5", "--hires-steps", "1", "--hires-upscaler",
                 "Lanczos", "--aspect", "16:9", "--out", str(tmp_path / "out" / "board.pdf")])
    out, err = capsys.readouterr()
    assert code == 0, err
    board = store.load("hires script")
    s = board.settings
    assert (s.hires_fix, s.hires_scale, s.hires_steps, s.hires_upscaler, s.aspect) == (True, 1.5, 1, "Lanczos",
                                                                                        "16:9")
    frame = store.path(board.name) / board.shot("1").frames[0].file
    assert Image.open(frame).size == (96, 96)
    assert parse_infotext(read_image_infotext(frame))["Hires upscale"] == "1.5"
