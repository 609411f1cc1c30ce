"""Storyboards on demo-tiny with a tiny ControlNet made in code: CSV shot lists, canny maps equal to cv2.Canny,
shots with a reference through the ControlNet and the others not, frames equal to Generate's images, candidates,
pick / lock / regenerate one shot (the others byte-identical), Stop, PDF and contact sheet export, ControlNet
sources, and the `storyboard` command."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from studio.control.controlnet import (
    DEFAULT_CONTROLNET,
    ControlNetLoader,
    resolve_controlnet,
    save_controlnet_file,
)
from studio.control.preprocess import canny_map, fit_to_frame, read_reference
from studio.files.names import UnsafeNameError
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext
from studio.generation.job import GenerateJob
from studio.models.checkpoints import ModelLoadError
from studio.models.manager import ModelManager
from studio.storyboard.board import (
    BoardSettings,
    Shot,
    ShotType,
    Storyboard,
    StoryboardStore,
    Style,
    lock_seed,
    new_board,
    pick,
    shots_from_csv,
    shots_to_csv,
)
from studio.storyboard.export import export_board
from studio.storyboard.runner import StoryboardRunner

SIX_SHOTS = """shot,type,description,reference,seed
1,long shot,"Sarah and Callum talking to each other in the middle of a room",sketch.png,
2,close shot,Sarah speaking directly to the camera,,5
3,medium shot,A front view of Callum with a mustache holding a paintbrush,,
4,close shot,two hands holding a photograph of something over a floor background,photo.jpg,
5,long shot,a street at night,,
6,medium shot,a door opens slowly,,
"""


def tiny_controlnet(unet, seed: int = 3):
    """A ControlNet with the tiny UNet's shape and weights (as ControlNetModel.from_unet makes them), its zero
    convolutions given small random weights so that it changes the image (a fresh one adds exactly zero)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 16))
        with torch.no_grad():
            for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
                block.weight.normal_(0, 0.3)
    return cn


def sketch(path: Path, size=(96, 80), mode="RGB") -> Path:
    """A drawn rectangle and a line: a sketch with clear edges."""
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle((20, 15, 70, 60), outline="black", width=3)
    draw.line((5, 70, 90, 10), fill=(200, 30, 30), width=2)
    if mode == "CMYK":
        im.convert("CMYK").save(path, format="JPEG", quality=95)
    elif mode == "P":
        im.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(path)
    else:
        im.save(path)
    return path


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
                  candidates=2, controlnet="tiny-canny", negative_prompt="blurry")
    values.update(kw)
    return BoardSettings(**values)


@pytest.fixture(scope="module")
def board(studio, tmp_path_factory):
    """The six-shot CSV (two references) imported and generated once."""
    cfg, manager, store, runner = studio
    src = tmp_path_factory.mktemp("script")
    sketch(src / "sketch.png")
    Image.open(sketch(src / "photo-src.png", (80, 96))).convert("RGB").save(src / "photo.jpg", quality=95)
    (src / "shots.csv").write_text(SIX_SHOTS, encoding="utf-8")
    board = new_board("six shots", settings())
    store.import_csv(board, src / "shots.csv")
    store.save(board)
    result = runner.run(board)
    assert not result.interrupted and len(result.shots) == 6
    return board


def pixels(path_or_image) -> np.ndarray:
    im = Image.open(path_or_image) if isinstance(path_or_image, (str, Path)) else path_or_image
    return np.asarray(im.convert("RGB"))


# --- shot lists ------------------------------------------------------------------------------------------------


def test_csv_reads_shots_and_round_trips():
    shots = shots_from_csv(SIX_SHOTS, "shots.csv")
    assert [s.shot for s in shots] == ["1", "2", "3", "4", "5", "6"]
    assert shots[0].description == "Sarah and Callum talking to each other in the middle of a room"
    assert (shots[0].reference, shots[0].seed, shots[1].seed) == ("sketch.png", -1, 5)
    again = shots_from_csv(shots_to_csv(shots))
    assert [(s.shot, s.type, s.description, s.reference, s.seed) for s in again] == \
        [(s.shot, s.type, s.description, s.reference, s.seed) for s in shots]
    extra = shots_from_csv("Shot,Type,Description,Notes,candidates,canny_low,canny_high\n"
                           "12A,close shot,a face,Sarah,3,50,150\n")
    assert (extra[0].shot, extra[0].notes, extra[0].candidates, extra[0].canny_low) == ("12A", "Sarah", 3, 50)


@pytest.mark.parametrize("text, message", [
    ("shot,description\n1,x\n", "missing type"),
    ("shot,type,description,colour\n1,close shot,x,red\n", "unknown column(s) colour"),
    ("shot,type,description,seed\n1,close shot,x,soon\n", "line 2: seed must be a whole number, got 'soon'"),
    ("shot,type,description\n1,close shot,\n", "line 2: shot 1: the description is empty"),
    ("shot,type,description\n../1,close shot,x\n", "shot number must be"),
    ("shot,type,description,canny_low,canny_high\n1,close shot,x,200,100\n", "not be above the high threshold"),
    ("shot,type,description\n", "no shots"),
])
def test_csv_errors_name_the_line_and_value(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shots_from_csv(text)


def test_board_validation_and_prompts():
    board = Storyboard("b", [Shot("1", "Close Shot", "Sarah at a window", notes="Sarah")],
                       shot_types=[ShotType("close shot", lora="lora_cs", lora_weight=0.8),
                                   ShotType("insert", template="an insert shot of [description], [notes]")],
                       style=Style("embedding", "noir-style", 1.2), settings=settings())
    board.validate()
    # seed 004's template, the shot type's LoRA tag and the board's style embedding (weighted)
    assert board.prompt(board.shots[0]) == \
        "a high-quality close shot picture of Sarah at a window, (noir-style:1.2) <lora:lora_cs:0.8>"
    board.shots.append(Shot("2", "insert", "a letter", notes="close on the signature"))
    board.style = Style("lora", "noir", 0.5)
    assert board.prompt(board.shots[1]) == "an insert shot of a letter, close on the signature <lora:noir:0.5>"
    board.shots.append(Shot("3", "crane shot", "a city"))
    with pytest.raises(ValueError, match="shot 3: unknown shot type 'crane shot'; known: close shot, insert"):
        board.validate()
    board.shots[2] = Shot("2", "insert", "again")
    with pytest.raises(ValueError, match="shot number '2' appears twice"):
        board.validate()
    board.shots.pop()
    board.settings.width = 500
    with pytest.raises(ValueError, match="width must be a multiple of 8, got 500"):
        board.validate()
    board.settings.width = 64
    board.shot_types.append(ShotType("wide", template="a wide picture"))
    with pytest.raises(ValueError, match="must contain \\[description\\], got 'a wide picture'"):
        board.validate()
    for name in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="storyboard name must be"):
            new_board(name)


# --- canny and references --------------------------------------------------------------------------------------


def test_canny_map_equals_cv2_canny_with_the_chosen_thresholds(tmp_path):
    # faint, medium and strong edges, so that the thresholds matter
    drawing = Image.new("RGB", (80, 70), "white")
    draw = ImageDraw.Draw(drawing)
    draw.rectangle((10, 5, 35, 30), fill=(235, 235, 235))
    draw.rectangle((40, 5, 70, 30), fill=(200, 200, 200))
    draw.rectangle((10, 38, 70, 62), outline=(0, 0, 0), width=2)
    drawing.save(tmp_path / "s.png")
    image = fit_to_frame(read_reference(tmp_path / "s.png").image, 64, 64)
    assert image.size == (64, 64)
    maps = {}
    for low, high in ((100, 200), (20, 60)):
        edges = canny_map(image, low, high)
        expected = cv2.Canny(np.asarray(image), low, high)
        assert edges.mode == "RGB" and edges.size == (64, 64)
        got = np.asarray(edges)
        assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 0], got[..., 2])
        maps[(low, high)] = got
    assert expected.any() and not np.array_equal(maps[(100, 200)], maps[(20, 60)])
    # a frame size that is not a multiple of 64 keeps its size
    assert canny_map(fit_to_frame(image, 72, 40), 100, 200).size == (72, 40)
    with pytest.raises(ValueError, match="low threshold must not be above the high threshold, got 150 > 90"):
        canny_map(image, 150, 90)
    with pytest.raises(ValueError, match="between 1 and 255, got 300"):
        canny_map(image, 100, 300)


def test_references_cmyk_palette_converted_corrupt_refused(tmp_path):
    rgb = read_reference(sketch(tmp_path / "rgb.png"))
    assert rgb.notes == []
    palette = read_reference(sketch(tmp_path / "pal.png", mode="P"))
    assert palette.image.mode == "RGB" and any("palette" in n for n in palette.notes)
    cmyk = read_reference(sketch(tmp_path / "cmyk.jpg", mode="CMYK"))
    assert cmyk.image.mode == "RGB" and any("CMYK" in n for n in cmyk.notes)
    # the same drawing gives (nearly) the same edges whatever its colour mode
    a, b = (np.asarray(canny_map(fit_to_frame(r.image, 64, 64), 100, 200))[..., 0] > 0 for r in (rgb, palette))
    assert (a == b).mean() > 0.97
    (tmp_path / "notes.png").write_bytes(b"this is not a picture")
    with pytest.raises(ValueError, match="reference image notes.png: not a readable image"):
        read_reference(tmp_path / "notes.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ValueError, match="reference image corrupt.png: damaged image header"):
        read_reference(tmp_path / "corrupt.png")
    data = (tmp_path / "rgb.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="reference image cut.png: truncated or damaged"):
        read_reference(tmp_path / "cut.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="reference image empty.png: empty file"):
        read_reference(tmp_path / "empty.png")


def test_references_stay_inside_their_folders(studio, tmp_path):
    cfg, manager, store, runner = studio
    board = new_board("confined", settings())
    (tmp_path / "in").mkdir()
    sketch(tmp_path / "outside.png")
    (tmp_path / "in" / "shots.csv").write_text("shot,type,description,reference\n1,close shot,x,../outside.png\n")
    with pytest.raises(UnsafeNameError, match="must stay inside"):
        store.import_csv(board, tmp_path / "in" / "shots.csv", confine=True)
    # the command line may name the user's own files anywhere
    store.import_csv(board, tmp_path / "in" / "shots.csv", confine=False)
    assert board.shots[0].reference == "references/1-outside.png"
    assert (store.path("confined") / board.shots[0].reference).is_file()
    board.shots[0].reference = "../../etc/passwd"
    with pytest.raises(UnsafeNameError):
        store.save(board)
    with pytest.raises(ValueError, match="storyboard name must be"):
        store.load("../six shots")


# --- generating ------------------------------------------------------------------------------------------------


def test_project_files_and_candidates(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path("six shots")
    data = json.loads((folder / "project.json").read_text())
    assert data["format"] == "studio-storyboard" and data["version"] == 1
    assert [s["shot"] for s in data["shots"]] == ["1", "2", "3", "4", "5", "6"]
    assert data["shots"][0]["reference"] == "references/1-sketch.png"
    assert store.load("six shots").to_dict() == board.to_dict()
    for shot in board.shots:
        assert len(shot.frames) == 2
        seeds = [f.seed for f in shot.frames]
        assert seeds[1] == seeds[0] + 1
        for frame in shot.frames:
            info = parse_infotext(read_image_infotext(folder / frame.file))
            assert info["prompt"] == board.prompt(shot) and info["Seed"] == str(frame.seed)
    assert [f.seed for f in board.shot("2").frames] == [5, 6]  # the CSV's seed is locked


def test_reference_shots_go_through_the_controlnet_and_the_others_do_not(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path("six shots")
    calls = []
    controlnet = runner.controlnets.load("tiny-canny", "cpu", torch.float32, 32)
    unet_residuals = []
    handles = [controlnet.model.register_forward_hook(lambda *a: calls.append(1)),
               manager.current.pipe.unet.register_forward_pre_hook(
                   lambda m, args, kw: unet_residuals.append("down_block_additional_residuals" in kw),
                   with_kwargs=True)]
    try:
        for number, has_reference in (("1", True), ("3", False)):
            calls.clear()
            unet_residuals.clear()
            runner.run(board, [number])
            assert bool(calls) == has_reference and len(calls) == (3 if has_reference else 0)
            assert all(unet_residuals) == has_reference and unet_residuals
    finally:
        for h in handles:
            h.remove()
    for shot in board.shots:
        info = parse_infotext(read_image_infotext(folder / shot.frames[0].file))
        assert ("ControlNet 0" in info) == bool(shot.reference)
        assert all(f.controlnet == bool(shot.reference) for f in shot.frames)
    unit = parse_infotext(read_image_infotext(folder / board.shot("1").frames[0].file))["ControlNet 0"]
    assert unit.startswith("Module: canny, Model: tiny-canny [") and "Threshold A: 100, Threshold B: 200" in unit
    # the canny map it used is kept beside the candidates and is the reference's map at the frame's size
    expected = canny_map(fit_to_frame(read_reference(folder / board.shot("1").reference).image, 64, 64), 100, 200)
    assert np.array_equal(pixels(folder / "shots" / "1" / "canny.png"), pixels(expected))
    assert not (folder / "shots" / "3" / "canny.png").exists()


def test_controlnet_changes_the_frame_and_scale_zero_is_generate(studio):
    cfg, manager, store, runner = studio
    board = new_board("control", settings(candidates=1))
    store.path("control").mkdir(parents=True, exist_ok=True)
    src = sketch(store.path("control") / "drawing.png")
    board.shots = [Shot("1", "close shot", "a face", seed=9), Shot("2", "close shot", "a face", seed=9),
                   Shot("3", "close shot", "a face", seed=9, control_scale=0.0)]
    for shot in board.shots[1:]:
        store.add_reference(board, shot, src)
    runner.run(board)
    folder = store.path("control")
    plain, steered, zero = (pixels(folder / s.frames[0].file) for s in board.shots)
    assert not np.array_equal(plain, steered)
    # with its scale at 0 the ControlNet adds nothing: the frame is the one without a reference
    assert np.array_equal(plain, zero)


def test_a_frame_without_reference_is_what_generate_makes(studio, board):
    cfg, manager, store, runner = studio
    shot = board.shot("2")  # seed 5, candidates 5 and 6
    frame = shot.frames[1]
    s = board.settings
    job = GenerateJob(prompt=board.prompt(shot), negative_prompt=s.negative_prompt, sampler=s.sampler,
                      schedule=s.schedule, steps=s.steps, cfg_scale=s.cfg_scale, seed=frame.seed, width=s.width,
                      height=s.height)
    made = Generator(manager).run(job).images[0]
    path = store.path("six shots") / frame.file
    assert np.array_equal(pixels(path), pixels(made.image))
    assert read_image_infotext(path) == made.infotext


def test_regenerating_one_shot_leaves_the_others_byte_identical(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path("six shots")
    before = {p: p.read_bytes() for p in (folder / "shots").rglob("*") if p.is_file()}
    old_seeds = [f.seed for f in board.shot("3").frames]
    old_entries = {s.shot: json.dumps(d) for s, d in zip(board.shots, board.to_dict()["shots"], strict=True)}
    result = runner.run(board, ["3"])
    assert [r.shot for r in result.shots] == ["3"]
    after = {p: p.read_bytes() for p in (folder / "shots").rglob("*") if p.is_file()}
    others = {p for p in before if p.parent.name != "3"}
    assert others and all(after[p] == before[p] for p in others)
    assert {p for p in after if p.parent.name != "3"} == others
    assert [f.seed for f in board.shot("3").frames] != old_seeds  # unlocked: new random seeds
    new_entries = {s.shot: json.dumps(d) for s, d in zip(board.shots, board.to_dict()["shots"], strict=True)}
    assert all(new_entries[k] == old_entries[k] for k in old_entries if k != "3")


def test_pick_lock_and_regenerate_gives_the_picked_image_again(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path("six shots")
    frame = pick(board, "5", 1)
    picked = (folder / frame.file).read_bytes()
    assert lock_seed(board, "5") == frame.seed and board.shot("5").seed == frame.seed
    runner.run(board, ["5"])
    shot = board.shot("5")
    assert [f.seed for f in shot.frames] == [frame.seed, frame.seed + 1] and shot.picked == 0
    assert (folder / shot.frames[0].file).read_bytes() == picked
    with pytest.raises(ValueError, match="candidate must be between 0 and 1, got 7"):
        pick(board, "5", 7)
    with pytest.raises(ValueError, match="no shot '9'"):
        pick(board, "9", 0)


def test_stop_keeps_finished_shots_and_the_running_shots_old_candidates(studio, board):
    cfg, manager, store, runner = studio
    folder = store.path("six shots")
    old = {s.shot: [f.file for f in s.frames] for s in board.shots}
    old_bytes = {p: p.read_bytes() for p in (folder / "shots" / "6").iterdir()}
    cancel = threading.Event()

    def on_progress(done, total, info):
        if info.startswith("shot 6"):
            cancel.set()

    result = runner.run(board, ["5", "6"], on_progress=on_progress, cancel=cancel)
    assert result.interrupted and [r.shot for r in result.shots] == ["5"] and "stopped" in result.message
    assert [f.file for f in board.shot("6").frames] == old["6"]
    assert {p: p.read_bytes() for p in (folder / "shots" / "6").iterdir()} == old_bytes
    assert not [p for p in (folder / "shots").iterdir() if p.name.startswith(".")]  # no temporary folder left


# --- export ----------------------------------------------------------------------------------------------------


def test_six_shot_csv_exports_a_captioned_pdf_and_a_contact_sheet(studio, board, tmp_path):
    from pypdf import PdfReader

    cfg, manager, store, runner = studio
    out = export_board(store, board, pdf_path=tmp_path / "board.pdf")
    assert out.notes == [] and out.pages == 1
    reader = PdfReader(out.pdf)
    assert len(reader.pages) == 1
    text = reader.pages[0].extract_text()
    for shot in board.shots:
        assert f"Shot {shot.shot} · {shot.type}" in text
        assert " ".join(shot.description.split()[:4]) in " ".join(text.split())
    assert "Page 1 of 1" in text and "six shots" in text
    assert len(reader.pages[0].images) == 6
    sheet = Image.open(out.sheet)
    assert sheet.format == "PNG" and sheet.width > 4 * 64
    meta = json.loads(sheet.text["storyboard"])
    assert [s["shot"] for s in meta["shots"]] == ["1", "2", "3", "4", "5", "6"]
    assert all(s["infotext"].startswith(board.prompt(board.shot(s["shot"]))) for s in meta["shots"])
    # every picked frame is copied with its infotext
    for shot in board.shots:
        copy = out.frames_dir / f"{shot.shot}.png"
        assert copy.read_bytes() == (store.path("six shots") / shot.picked_frame.file).read_bytes()


def test_export_pages_and_missing_frames(studio, tmp_path):
    from pypdf import PdfReader

    cfg, manager, store, runner = studio
    board = new_board("long board", settings(candidates=1))
    board.shots = [Shot(str(i), "long shot", f"scene number {i} où l'on voit la mer") for i in range(1, 9)]
    store.save(board)
    runner.run(board, [str(i) for i in range(1, 8)])
    board.settings.width = 128  # frames made at 64x64 keep their aspect ratio in a wider layout
    out = export_board(store, board)
    assert out.pdf == store.path("long board") / "export" / "long board.pdf"
    assert out.notes == ["shot 8 has no frame yet: an empty box stands in for it"]
    reader = PdfReader(out.pdf)
    assert len(reader.pages) == 2 and out.pages == 2
    first, second = (p.extract_text() for p in reader.pages)
    assert "Shot 6 · long shot" in first and "Shot 7 · long shot" in second and "Shot 8" in second
    assert "Page 1 of 2" in first and "Page 2 of 2" in second
    sheet = np.asarray(Image.open(out.sheet).convert("RGB"))
    assert sheet.shape[1] > 4 * 256  # 4 columns of 256 px wide boxes, square frames centred in them
    with pytest.raises(ValueError, match="must end in .pdf, got x.png"):
        export_board(store, board, pdf_path=tmp_path / "x.png")


# --- ControlNet sources ----------------------------------------------------------------------------------------


def test_controlnet_from_folder_file_and_hub_id(studio, tmp_path):
    cfg, manager, store, runner = studio
    cn = tiny_controlnet(manager.current.pipe.unet, seed=4)
    cn.save_pretrained(cfg.controlnet_dir / "folder-canny")
    loader = ControlNetLoader(cfg.controlnet_dir)
    assert resolve_controlnet("folder-canny", cfg.controlnet_dir)[0] == "diffusers"
    assert resolve_controlnet("tiny-canny", cfg.controlnet_dir)[0] == "single-file"
    assert resolve_controlnet(DEFAULT_CONTROLNET, cfg.controlnet_dir) == ("hub", None)
    folder = loader.load("folder-canny", "cpu", torch.float32, 32)
    reference = cn.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in folder.model.state_dict().items())
    save_controlnet_file(cn, tmp_path / "elsewhere.safetensors")
    single = ControlNetLoader(cfg.controlnet_dir).load(str(tmp_path / "elsewhere.safetensors"), "cpu",
                                                        torch.float32, 32, allow_paths=True)
    assert all(torch.equal(v, reference[k]) for k, v in single.model.state_dict().items())
    # names never leave controlnet/, and paths are only for the command line
    for bad in ("../models/x", "/etc"):
        with pytest.raises((UnsafeNameError, ModelLoadError)):
            resolve_controlnet(bad, cfg.controlnet_dir)
    # offline, a hub id that is not cached says so and names the local ones
    with pytest.raises(ModelLoadError, match="offline.*Local ControlNets in .*folder-canny, tiny-canny.safetensors"):
        loader.load(DEFAULT_CONTROLNET, "cpu", torch.float32, 32)
    with pytest.raises(ModelLoadError, match="text width 32 .*the loaded model has 768"):
        loader.load("folder-canny", "cpu", torch.float32, 768)
    (cfg.controlnet_dir / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="broken.safetensors is not a valid safetensors file"):
        loader.load("broken", "cpu", torch.float32, 32)


# --- the command line ------------------------------------------------------------------------------------------


def test_storyboard_command(studio, tmp_path, monkeypatch, capsys):
    from pypdf import PdfReader

    from studio.cli import main

    cfg, manager, store, runner = studio
    monkeypatch.setenv("STUDIO_HOME", str(cfg.models_dir.parent))
    sketch(tmp_path / "sketch.png")
    Image.open(tmp_path / "sketch.png").save(tmp_path / "photo.jpg")
    (tmp_path / "script.csv").write_text(SIX_SHOTS, encoding="utf-8")
    code = main(["storyboard", "--model", "demo-tiny", "--shots", str(tmp_path / "script.csv"), "--controlnet",
                 "tiny-canny", "--candidates", "1", "--steps", "2", "--out", str(tmp_path / "out" / "board.pdf")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"pdf: {tmp_path / 'out' / 'board.pdf'}" in out and "contact sheet:" in out
    text = PdfReader(tmp_path / "out" / "board.pdf").pages[0].extract_text()
    assert all(f"Shot {i} ·" in text for i in range(1, 7))
    assert (tmp_path / "out" / "board-contact.png").is_file()
    board = store.load("script")
    assert [len(s.frames) for s in board.shots] == [1] * 6 and board.settings.width == 64
    code = main(["storyboard", "--model", "demo-tiny", "--shots", str(tmp_path / "script.csv"), "--steps", "2",
                 "--name", "offline"])
    out, err = capsys.readouterr()
    assert code == 2 and "error: ControlNet lllyasviel/control_v11p_sd15_canny is not in the Hugging Face cache" in err
    (tmp_path / "bad.csv").write_text("shot,type,description\n1,close shot,\n")
    assert main(["storyboard", "--shots", str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv line 2: shot 1: the description is empty" in capsys.readouterr().err


def test_shot_type_lora_and_presets(studio, tmp_path, monkeypatch, capsys):
    """A shot type's LoRA is applied as in Generate (the frame equals Generate's image for the same prompt with
    its <lora:...> tag, and differs from the frame without it); the seed 004 presets fill shot types and settings."""
    from safetensors.torch import save_file
    from test_grid import kohya_lora

    from studio.cli import main
    from studio.storyboard.board import apply_board_preset, list_board_presets

    cfg, manager, store, runner = studio
    save_file(kohya_lora(manager.current.pipe, 1, scale=0.5), str(cfg.loras_dir / "lora_cs.safetensors"))
    board = new_board("loras", settings(candidates=1))
    presets = list_board_presets(cfg.presets_dir)
    assert {"DreamShot shot types (seed 004)", "DreamShot shot-type LoRAs (seed 004)"} <= set(presets)
    apply_board_preset(board, presets["DreamShot shot-type LoRAs (seed 004)"])
    assert (board.settings.sampler, board.settings.schedule, board.settings.steps, board.settings.cfg_scale) == \
        ("DPM++ SDE", "Karras", 16, 6.0)
    board.settings.width = board.settings.height = 64
    board.settings.steps, board.settings.sampler, board.settings.schedule = 3, "Euler a", "Automatic"
    board.shot_types[0].lora_weight = 0.8
    board.shots = [Shot("1", "close shot", "Sarah speaking", seed=3)]
    runner.run(board)
    with_lora = store.path("loras") / board.shots[0].frames[0].file
    prompt = board.prompt(board.shots[0])
    assert prompt == "a high-quality close shot picture of Sarah speaking <lora:lora_cs:0.8>"
    s = board.settings
    made = Generator(manager).run(GenerateJob(prompt=prompt, negative_prompt=s.negative_prompt, sampler=s.sampler,
                                              schedule=s.schedule, steps=s.steps, cfg_scale=s.cfg_scale, seed=3,
                                              width=64, height=64)).images[0]
    assert np.array_equal(pixels(with_lora), pixels(made.image))
    assert "Lora hashes" in read_image_infotext(with_lora)
    board.shot_types[0].lora = ""
    runner.run(board)
    assert not np.array_equal(pixels(store.path("loras") / board.shots[0].frames[0].file), pixels(made.image))
    manager.current.loras().clear()  # the module's model without peft wrappers again
    # the command line: a preset's settings, with the flags given winning
    monkeypatch.setenv("STUDIO_HOME", str(cfg.models_dir.parent))
    (tmp_path / "two.csv").write_text("shot,type,description\n1,close shot,a face\n2,long shot,a field\n")
    code = main(["storyboard", "--shots", str(tmp_path / "two.csv"), "--preset", "dreamshot", "--sampler", "Euler a",
                 "--steps", "2", "--width", "64", "--height", "64"])
    assert code == 0, capsys.readouterr().err
    made = store.load("two")
    assert (made.settings.cfg_scale, made.settings.steps, made.settings.sampler) == (6.0, 2, "Euler a")
    assert main(["storyboard", "--shots", str(tmp_path / "two.csv"), "--preset", "nope"]) == 2
    assert "no storyboard preset 'nope'; presets: dreamshot, dreamshot-loras" in capsys.readouterr().err


def original_layout(controlnet, unet_config: dict) -> dict:
    """A diffusers ControlNet's weights in the original layout (`control_model.input_blocks...`, `zero_convs`,
    `input_hint_block`, `middle_block_out`), as lllyasviel's ControlNet files hold them."""
    from studio.files.convert import _map_key, _unet_prefix_map

    state = controlnet.state_dict()
    prefix_map = _unet_prefix_map(list(state), unet_config)
    out = {}
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for key, tensor in state.items():
        name, kind = key.rsplit(".", 1)
        if name.startswith("controlnet_cond_embedding."):
            part = name.split(".", 1)[1]
            index = 0 if part == "conv_in" else 2 * (blocks + 1) if part == "conv_out" else 2 * (int(part[7:]) + 1)
            new = f"input_hint_block.{index}.{kind}"
        elif name.startswith("controlnet_down_blocks."):
            new = f"zero_convs.{name.split('.')[1]}.0.{kind}"
        elif name == "controlnet_mid_block":
            new = f"middle_block_out.0.{kind}"
        else:
            new = _map_key(key, prefix_map)
        assert new is not None, key
        out[f"control_model.{new}"] = tensor.contiguous()
    return out


def test_controlnet_file_in_the_original_layout_loads(tmp_path):
    from safetensors.torch import save_file

    from studio.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline("sd1").unet  # the demo-tiny UNet, untouched by other tests' LoRAs
    cn = tiny_controlnet(unet, seed=6)
    state = original_layout(cn, dict(unet.config))
    assert any(k.startswith("control_model.input_hint_block.14.") for k in state)
    config = {k: v for k, v in dict(cn.config).items() if not k.startswith("_")}
    save_file(state, str(tmp_path / "original.safetensors"), metadata={"studio.controlnet_config": json.dumps(config)})
    loaded = ControlNetLoader(tmp_path).load("original", "cpu", torch.float32, 32).model
    reference = cn.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


def test_out_of_gpu_memory_says_what_to_change_and_keeps_the_shot(studio, board, monkeypatch):
    import studio.storyboard.runner as engine
    from studio.generation.oom import OutOfMemory

    cfg, manager, store, runner = studio
    old = [f.file for f in board.shot("4").frames]

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "denoise", no_memory)
    with pytest.raises(OutOfMemory, match="shot 4 ran out of GPU memory .*Try a smaller number of candidates"):
        runner.run(board, ["4"])
    assert [f.file for f in board.shot("4").frames] == old
    assert all((store.path("six shots") / f).is_file() for f in old)


# --- the built-in micro ControlNet, caches, model switches ------------------------------------------------------


def test_micro_canny_is_built_in_like_micro(studio, tmp_path):
    from studio.control.controlnet import (
        built_in_controlnets,
        controlnet_choices,
        default_controlnet,
        list_controlnets,
    )
    from studio.models.builtin import MICRO_CONTROLNET_NAME, micro_controlnet_available, micro_controlnet_dir

    cfg, manager, store, runner = studio
    if not micro_controlnet_available(cfg.assets_dir):
        pytest.skip("assets/micro-controlnet-canny is missing")
    folder = micro_controlnet_dir(cfg.assets_dir)
    # resolved from assets/, offline, whatever controlnet/ holds; listed after the local ones, before the hub id
    assert resolve_controlnet(MICRO_CONTROLNET_NAME, cfg.controlnet_dir, assets_dir=cfg.assets_dir) == \
        ("micro", folder)
    entries = list_controlnets(cfg.controlnet_dir, cfg.assets_dir)
    assert entries[-1].name == MICRO_CONTROLNET_NAME and entries[-1].built_in
    choices = controlnet_choices(cfg.controlnet_dir, cfg.assets_dir)
    assert choices[-2:] == [MICRO_CONTROLNET_NAME, DEFAULT_CONTROLNET] and "tiny-canny.safetensors" in choices
    # the default follows the model: micro-canny for the micro family (text width 128), the hub id otherwise
    assert default_controlnet(None, cfg.assets_dir) == DEFAULT_CONTROLNET
    assert default_controlnet(manager.current, cfg.assets_dir) == DEFAULT_CONTROLNET  # demo-tiny
    micro_like = type("Model", (), {"pipe": type("Pipe", (), {"unet": type("UNet", (), {
        "config": type("Config", (), {"cross_attention_dim": 128})()})()})()})()
    assert default_controlnet(micro_like, cfg.assets_dir) == MICRO_CONTROLNET_NAME
    # without it in assets/ it is neither listed nor found
    assert built_in_controlnets(tmp_path) == [] and MICRO_CONTROLNET_NAME not in controlnet_choices(
        cfg.controlnet_dir, tmp_path)
    with pytest.raises(ModelLoadError, match="ControlNet 'micro-canny' not found"):
        resolve_controlnet(MICRO_CONTROLNET_NAME, cfg.controlnet_dir, assets_dir=tmp_path)
    # loaded under its own name, refused for another family with the widths named
    loader = ControlNetLoader(cfg.controlnet_dir, cfg.cache_dir, cfg.assets_dir)
    loaded = loader.load(MICRO_CONTROLNET_NAME, "cpu", torch.float32, 128)
    assert loaded.name == MICRO_CONTROLNET_NAME and len(loaded.hash) == 8
    assert loaded.model.config.cross_attention_dim == 128
    with pytest.raises(ModelLoadError, match="text width 128 .*the loaded model has 32"):
        loader.load(MICRO_CONTROLNET_NAME, "cpu", torch.float32, 32)
    with pytest.raises(ModelLoadError, match=r"offline.*built in: micro-canny \(for the micro model\)"):
        loader.load(DEFAULT_CONTROLNET, "cpu", torch.float32, 128)


def test_controlnet_hash_is_cached_by_path_size_and_mtime(studio, tmp_path):
    """Hashing a real ControlNet reads 0.7 GB: like the model hash it is cached in .cache/hashes.json by (path, size,
    mtime), so a new loader (a restart, another storyboard) reads it from there."""
    cfg, manager, store, runner = studio
    folder = tmp_path / "controlnet"
    cn = tiny_controlnet(manager.current.pipe.unet, seed=7)
    save_controlnet_file(cn, folder / "hashed.safetensors")
    cn.save_pretrained(folder / "hashed-folder")
    cache_dir = tmp_path / "cache"
    first_file = ControlNetLoader(folder, cache_dir).load("hashed", "cpu", torch.float32, 32).hash
    first_folder = ControlNetLoader(folder, cache_dir).load("hashed-folder", "cpu", torch.float32, 32).hash
    cache = json.loads((cache_dir / "hashes.json").read_text())
    assert {Path(k.split("|")[0]).name for k in cache} == {"hashed.safetensors", "diffusion_pytorch_model.safetensors"}
    # the cached value is what a new loader uses: change it and the loader reports the change
    for key in cache:
        cache[key] = "f" * 64 if key.split("|")[0].endswith("hashed.safetensors") else "e" * 64
    (cache_dir / "hashes.json").write_text(json.dumps(cache))
    assert ControlNetLoader(folder, cache_dir).load("hashed", "cpu", torch.float32, 32).hash == "ffffffff" != first_file
    assert ControlNetLoader(folder, cache_dir).load("hashed-folder", "cpu", torch.float32, 32).hash != first_folder


def test_a_folder_controlnet_reloads_when_a_weights_file_inside_changes(studio, tmp_path):
    """Overwriting the weights inside a diffusers folder leaves the folder's mtime as it was: the loader looks at
    the files inside."""
    import os

    cfg, manager, store, runner = studio
    folder = tmp_path / "controlnet"
    unet = manager.current.pipe.unet
    tiny_controlnet(unet, seed=8).save_pretrained(folder / "changing")
    loader = ControlNetLoader(folder)
    first = loader.load("changing", "cpu", torch.float32, 32)
    assert loader.load("changing", "cpu", torch.float32, 32) is first  # unchanged: the loaded one is kept
    folder_stat = (folder / "changing").stat()
    weights = folder / "changing" / "diffusion_pytorch_model.safetensors"
    old = weights.stat()
    newer = tiny_controlnet(unet, seed=9)
    newer.save_pretrained(folder / "changing")  # the same size, other values
    assert weights.stat().st_size == old.st_size
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    os.utime(folder / "changing", ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    second = loader.load("changing", "cpu", torch.float32, 32)
    assert second is not first
    reference = newer.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in second.model.state_dict().items())


def test_a_model_switch_before_the_lock_is_taken_runs_the_board_on_the_new_model(studio):
    """run() takes the model under the manager's lock: a load that finishes while the run waits for the lock is the
    model every shot (and the ControlNet check) uses, never the one that was current before."""
    from studio.models.manager import LoadedModel
    from studio.models.tiny import build_tiny_pipeline

    cfg, manager, store, runner = studio
    board = new_board("switch", settings(candidates=1))
    store.path("switch").mkdir(parents=True, exist_ok=True)
    board.shots = [Shot("1", "close shot", "a face", seed=3)]
    store.add_reference(board, board.shots[0], sketch(store.path("switch") / "drawing.png"))
    old = manager.current
    other = LoadedModel("other-tiny", "demo", "sd1", "epsilon", build_tiny_pipeline("sd1"))
    real_lock = manager.lock

    class SwitchingLock:
        """The manager's lock, with another model loaded just before run() gets it (as a load from another tab)."""

        switched = False

        def __enter__(self):
            if not SwitchingLock.switched:
                SwitchingLock.switched = True
                with real_lock:
                    manager.current = other
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

    manager.lock = SwitchingLock()
    try:
        runner.run(board)
    finally:
        manager.lock = real_lock
        manager.current = old
    assert board.model == "other-tiny"
    info = parse_infotext(read_image_infotext(store.path("switch") / board.shots[0].frames[0].file))
    assert info["Model"] == "other-tiny"
