"""The storyboard's cast on demo-tiny at 64 px with the tiny IP-Adapters and image encoder of test_ip_adapter: the
name finder (whole words in any case; "Sarah's" names Sarah, "Sarahs" does not), a shot naming one character gets
one IP-Adapter unit with their pictures (its frame is Generate's image of that job, infotext included), one naming
two gets two, one naming none is the frame made without a cast byte for byte; a changed picture changes only the
shots its character is in; the cast in the board file (round trip, old files, refusals naming the character); a
missing adapter or encoder fails before any shot; Refine keeps the characters; the tab's handlers through
Gradio's process_api; the command line's --character and --cast."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from test_ip_adapter import picture, tiny_encoder, tiny_ip_state

from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext
from studio.generation.ip_adapter import MAX_ADAPTERS, IPAdapterError, IPAdapterUnit
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager
from studio.storyboard.board import (
    BoardSettings,
    Character,
    Shot,
    Storyboard,
    StoryboardStore,
    cast_cell,
    cast_from_cell,
    find_characters,
    new_board,
    shots_from_csv,
    shots_to_csv,
)
from studio.storyboard.runner import StoryboardRunner


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """(cfg, manager, store, runner, pictures folder): demo-tiny; `tiny` (plain) and `tiny-plus` in ipadapter/ with
    one image encoder; pictures 1, 2 and 5 as files."""
    from studio.config import StudioConfig

    cfg = StudioConfig(device="cpu").with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    unet = manager.current.pipe.unet
    cfg.ipadapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(tiny_ip_state(unet, "plain"), str(cfg.ipadapter_dir / "tiny.safetensors"))
    save_file(tiny_ip_state(unet, "plus", seed=1), str(cfg.ipadapter_dir / "tiny-plus.safetensors"))
    tiny_encoder().save_pretrained(cfg.ipadapter_dir / "image_encoder")
    src = tmp_path_factory.mktemp("pictures")
    for k in (1, 2, 5):
        picture(k).save(src / f"p{k}.png")
    store = StoryboardStore(cfg.storyboards_dir)
    return cfg, manager, store, StoryboardRunner(manager, store, cfg.controlnet_dir), src


def settings(**kw) -> BoardSettings:
    values = dict(width=64, height=64, steps=3, sampler="Euler a", schedule="Automatic", cfg_scale=6.0,
                  candidates=1, negative_prompt="blurry")
    return BoardSettings(**{**values, **kw})


SHOTS = [("1", "Sarah speaking to the camera", "", 5), ("2", "two people talking in a room", "Sarah and Callum", 6),
         ("3", "a street at night", "", 7), ("4", "hands holding a photograph", "callum's hands", 8)]


def make_board(studio, name: str, cast: bool = True) -> Storyboard:
    cfg, manager, store, runner, src = studio
    board = new_board(name, settings())
    board.shots = [Shot(n, "close shot", d, notes=notes, seed=seed) for n, d, notes, seed in SHOTS]
    if cast:
        sarah = Character("Sarah", ip_adapter="tiny", prompt="red coat, short grey hair")
        callum = Character("Callum", ip_adapter="tiny-plus", scale=0.8)
        board.cast = [sarah, callum]
        store.add_character_pictures(board, sarah, [src / "p1.png"])
        store.add_character_pictures(board, callum, [src / "p2.png", src / "p5.png"])
    store.create(board, replace=True)
    return board


@pytest.fixture(scope="module")
def board(studio):
    """The four shots with a cast of two, generated once."""
    board = make_board(studio, "cast")
    result = studio[3].run(board)
    assert not result.interrupted and [r.characters for r in result.shots] == [["Sarah"], ["Sarah", "Callum"], [],
                                                                               ["Callum"]]
    return board


def info_of(store, board, number: str) -> dict:
    return parse_infotext(read_image_infotext(store.path(board.name) / board.shot(number).frames[0].file))


def frame_bytes(store, board) -> dict[str, bytes]:
    return {s.shot: (store.path(board.name) / s.frames[0].file).read_bytes() for s in board.shots if s.frames}


# --- who is in a shot ----------------------------------------------------------------------------------------------


def test_the_name_finder_takes_whole_words_in_any_case():
    names = ["Sarah", "Callum", "Old Tom", "Sarah Jane"]
    assert find_characters(names, "Sarah and Callum talking") == ["Sarah", "Callum"]
    assert find_characters(names, "callum hugs SARAH") == ["Callum", "Sarah"]  # the order they are named in
    # a possessive (straight or curly apostrophe) names them; a longer word does not
    assert find_characters(names, "Sarah's coat", "Callum\u2019s hat") == ["Sarah", "Callum"]
    assert find_characters(names, "Sarahs and Callumville, a Sarahsaurus") == []
    # notes before the description; a name of two words across any space; the longer of overlapping names wins
    assert find_characters(names, "Callum", "Sarah waves") == ["Callum", "Sarah"]
    assert find_characters(names, "old\n  Tom laughs") == ["Old Tom"]
    assert find_characters(names, "Sarah Jane waves") == ["Sarah Jane"]
    assert find_characters(names, "Sarah Jane and Sarah") == ["Sarah Jane", "Sarah"]
    assert find_characters([], "Sarah") == [] and find_characters(names) == []
    # the shot's own cast list overrides the text: "-" is nobody
    assert (cast_from_cell(""), cast_from_cell("-"), cast_from_cell(" Sarah, Old Tom ;")) == \
        (None, [], ["Sarah", "Old Tom"])
    assert [cast_cell(v) for v in (None, [], ["Sarah", "Old Tom"])] == ["", "-", "Sarah, Old Tom"]
    board = Storyboard("b", [Shot("1", "close shot", "Sarah waves at Callum")], settings=settings(),
                       cast=[Character("Sarah", prompt="red coat"), Character("Callum")])
    shot = board.shots[0]
    assert [c.name for c in board.shot_cast(shot)] == ["Sarah", "Callum"]
    assert board.prompt(shot) == "a high-quality close shot picture of Sarah waves at Callum, red coat"
    shot.cast = ["callum"]
    assert [c.name for c in board.shot_cast(shot)] == ["Callum"]
    assert board.prompt(shot) == "a high-quality close shot picture of Sarah waves at Callum"
    shot.cast = []
    assert board.shot_cast(shot) == []
    # the CSV's cast column
    shots = shots_from_csv("shot,type,description,cast\n1,close shot,a room,\"Sarah, Callum\"\n2,close shot,b,-\n"
                           "3,close shot,c,\n")
    assert [s.cast for s in shots] == [["Sarah", "Callum"], [], None]
    assert [s.cast for s in shots_from_csv(shots_to_csv(shots))] == [["Sarah", "Callum"], [], None]


# --- frames -----------------------------------------------------------------------------------------------------


def test_each_shot_gets_a_unit_per_character_and_its_infotext_names_the_adapters(studio, board):
    cfg, manager, store, runner, _ = studio
    folder = store.path(board.name)
    plan = runner.cast_plan(board, board.shot("1"))
    assert [(u.name, u.scale, [Path(i).relative_to(folder).as_posix() for i in u.images]) for u in plan.units] == \
        [("tiny", 0.6, ["references/cast/Sarah-p1.png"])]
    two = runner.cast_plan(board, board.shot("2"))
    assert [(u.name, u.scale, len(u.images)) for u in two.units] == [("tiny", 0.6, 1), ("tiny-plus", 0.8, 2)]
    assert runner.cast_plan(board, board.shot("3")).units == []
    one = info_of(store, board, "1")
    assert one["IP-Adapter"].startswith("tiny [") and one["IP-Adapter scale"] == "0.6" and "IP-Adapter 2" not in one
    assert one["prompt"] == ("a high-quality close shot picture of Sarah speaking to the camera, red coat, "
                             "short grey hair")
    both = info_of(store, board, "2")
    assert both["IP-Adapter"].startswith("tiny [") and both["IP-Adapter 2"].startswith("tiny-plus [")
    assert both["IP-Adapter 2 scale"] == "0.8" and both["IP-Adapter 2 images"] == "2"
    assert both["prompt"].endswith("two people talking in a room, red coat, short grey hair")
    assert info_of(store, board, "4")["IP-Adapter"].startswith("tiny-plus [")  # "callum's hands"
    assert not any(k.startswith("IP-Adapter") for k in info_of(store, board, "3"))
    # the frame is Generate's image (and infotext) of the shot's prompt with that IP-Adapter unit
    s = board.settings
    job = GenerateJob(prompt=board.prompt(board.shot("1")), negative_prompt=s.negative_prompt, sampler=s.sampler,
                      schedule=s.schedule, steps=s.steps, cfg_scale=s.cfg_scale, seed=5, width=64, height=64,
                      ip_adapters=[IPAdapterUnit("tiny", [str(folder / "references/cast/Sarah-p1.png")], 0.6)])
    made = Generator(manager).run(job).images[0]
    path = folder / board.shot("1").frames[0].file
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(made.image))
    assert read_image_infotext(path) == made.infotext


def test_a_shot_without_cast_members_is_the_frame_made_without_a_cast(studio, board):
    _, _, store, runner, _ = studio
    plain = make_board(studio, "no cast", cast=False)
    runner.run(plain, ["3"])
    assert frame_bytes(store, plain)["3"] == frame_bytes(store, board)["3"]
    # and a character's frame is not: the pictures steer it
    runner.run(plain, ["1"])
    a, b = (np.asarray(Image.open(store.path(x.name) / x.shot("1").frames[0].file)).astype(int)
            for x in (plain, board))
    assert np.abs(a - b).mean() > 1


def test_a_changed_picture_changes_only_the_shots_the_character_is_in(studio, board):
    _, _, store, runner, src = studio
    other = make_board(studio, "cast again")
    runner.run(other)
    before = frame_bytes(store, other)
    assert before == frame_bytes(store, board)  # locked seeds: the same frames again
    sarah = other.character("sarah")
    sarah.pictures = []
    store.add_character_pictures(other, sarah, [src / "p5.png"])
    store.save(other)
    runner.run(other)
    after = frame_bytes(store, other)
    assert after["1"] != before["1"] and after["2"] != before["2"]  # Sarah's shots
    assert after["3"] == before["3"] and after["4"] == before["4"]  # nobody's and Callum's


def test_more_characters_than_adapters_get_the_first_ones_and_a_note(studio, tmp_path):
    _, _, store, runner, src = studio
    board = new_board("crowd", settings())
    names = ["Ann", "Bob", "Cy", "Dee", "Eve"]
    board.shots = [Shot("1", "close shot", " and ".join(names) + " at a table")]
    for name in names:
        board.cast.append(Character(name, ip_adapter="tiny", prompt=f"{name.lower()} hat"))
        store.add_character_pictures(board, board.cast[-1], [src / "p1.png"])
    store.create(board, replace=True)
    notes = []
    plan = runner.cast_plan(board, board.shot("1"), notes=notes)
    assert len(plan.units) == MAX_ADAPTERS and plan.names == names[:MAX_ADAPTERS]
    assert any("at most 4 IP-Adapters" in n and "Eve only by their prompt words" in n for n in notes)
    assert board.prompt(board.shot("1")).endswith("ann hat, bob hat, cy hat, dee hat, eve hat")


def test_refine_keeps_the_shots_characters(studio, board):
    cfg, manager, store, runner, _ = studio
    folder = store.path(board.name)
    result = runner.refine(board, "1", strength=0.5, description="a woman at a window")
    info = parse_infotext(read_image_infotext(folder / result.frame.file))
    assert info["IP-Adapter"].startswith("tiny [") and info["Denoising strength"] == "0.5"
    assert info["prompt"] == "a high-quality close shot picture of a woman at a window, red coat, short grey hair"
    source = folder / board.shot("1").frames[0].file
    s = board.settings
    job = GenerateJob(prompt=info["prompt"], negative_prompt=s.negative_prompt, sampler=s.sampler,
                      schedule=s.schedule, steps=s.steps, cfg_scale=s.cfg_scale, seed=5, width=64, height=64,
                      init_image=source, denoising_strength=0.5,
                      ip_adapters=[IPAdapterUnit("tiny", [str(folder / "references/cast/Sarah-p1.png")], 0.6)])
    made = Generator(manager).run(job).images[0]
    assert np.array_equal(np.asarray(Image.open(folder / result.frame.file).convert("RGB")), np.asarray(made.image))
    assert read_image_infotext(folder / result.frame.file) == made.infotext


# --- the board file ---------------------------------------------------------------------------------------------


def test_the_cast_round_trips_old_files_load_and_bad_entries_are_refused(studio, board, tmp_path):
    _, _, store, _, src = studio
    data = json.loads((store.path(board.name) / "project.json").read_text())
    assert [c["name"] for c in data["cast"]] == ["Sarah", "Callum"]
    assert data["cast"][0] == {"name": "Sarah", "pictures": ["references/cast/Sarah-p1.png"], "ip_adapter": "tiny",
                               "scale": 0.6, "prompt": "red coat, short grey hair"}
    assert store.load(board.name).to_dict() == board.to_dict()
    # a board file from before the cast: no `cast`, and shots without their `cast`
    old = json.loads(json.dumps(data))
    del old["cast"]
    for shot in old["shots"]:
        del shot["cast"]
    loaded = Storyboard.from_dict(old)
    assert loaded.cast == [] and all(s.cast is None for s in loaded.shots)
    assert loaded.prompt(loaded.shot("1")) == "a high-quality close shot picture of Sarah speaking to the camera"

    def refused(change, message):
        bad = json.loads(json.dumps(data))
        change(bad)
        with pytest.raises(ValueError, match=message):
            store.save(Storyboard.from_dict(bad))

    refused(lambda d: d["cast"].append({"name": "sarah"}), "character 'sarah': two characters are called 'Sarah'")
    refused(lambda d: d["cast"][0].update(scale=3), "character 'Sarah': scale must be between 0 and 2")
    refused(lambda d: d["cast"][0].update(pictures=["references/cast/gone.png"]),
            "character 'Sarah': picture 'references/cast/gone.png' is not in the project folder")
    refused(lambda d: d["cast"][0].update(pictures=["../../elsewhere.png"]),
            "character 'Sarah': picture '../../elsewhere.png': name must stay inside")
    refused(lambda d: d["cast"][1].update(pictures=d["cast"][1]["pictures"] * 5),
            "character 'Callum': at most 8 reference pictures, got 10")
    refused(lambda d: d["cast"][0].update(ip_adapter="../outside"), "character 'Sarah': the IP-Adapter must be a")
    refused(lambda d: d["cast"][0].update(name="Sarah/Callum"), "a character's name must be .* got 'Sarah/Callum'")
    refused(lambda d: d["cast"].extend({"name": f"Extra {k}"} for k in range(7)), "9 characters; at most 8")
    refused(lambda d: d["shots"][0].update(cast=["Bob"]), "shot 1: character 'Bob' is not in the cast")
    with pytest.raises(ValueError, match="unknown character field"):
        Storyboard.from_dict({**data, "cast": [{"name": "Sarah", "hair": "grey"}]})
    # a picture that is not one is refused naming the character, and nothing is copied
    (tmp_path / "fake.png").write_bytes(b"not a picture")
    character = Character("Zed")
    with pytest.raises(ValueError, match="character 'Zed': reference image fake.png"):
        store.add_character_pictures(board, character, [src / "p1.png", tmp_path / "fake.png"])
    assert character.pictures == [] and not list(store.path(board.name).glob("references/cast/Zed-*"))


def test_a_missing_adapter_or_encoder_fails_before_any_shot_runs(studio, tmp_path):
    cfg, manager, store, runner, src = studio
    board = make_board(studio, "missing")
    board.shots = [Shot("1", "close shot", "a street", seed=1), Shot("2", "close shot", "Sarah waves", seed=2)]
    board.character("Sarah").ip_adapter = "gone"
    store.save(board)
    with pytest.raises(IPAdapterError, match="cast: character 'Sarah': IP-Adapter 'gone' not found") as e:
        runner.run(board)
    assert str(cfg.ipadapter_dir) in str(e.value)
    assert not (store.path("missing") / "shots").exists()  # shot 1 did not run
    # no adapter named and two in ipadapter/: which one?
    board.character("Sarah").ip_adapter = ""
    with pytest.raises(IPAdapterError, match="character 'Sarah' has reference pictures but no IP-Adapter, and .* "
                                             "has several \\(tiny-plus, tiny\\)"):
        runner.run(board)
    # an adapter without its image encoder
    alone = tmp_path / "ipadapter"
    alone.mkdir()
    shutil.copy(cfg.ipadapter_dir / "tiny.safetensors", alone / "tiny.safetensors")
    lonely = StoryboardRunner(manager, store, cfg.controlnet_dir, Generator(manager, ipadapter_dir=alone))
    board.character("Sarah").ip_adapter = ""  # the only one there
    with pytest.raises(IPAdapterError, match="character 'Sarah': IP-Adapter tiny needs its CLIP image encoder") as e:
        lonely.run(board)
    assert str(alone / "image_encoder") in str(e.value)
    assert not (store.path("missing") / "shots").exists()


# --- the tab ----------------------------------------------------------------------------------------------------


def upload(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def value(v):
    return v.get("value") if isinstance(v, dict) and v.get("__type__") == "update" else v


def test_the_tabs_handlers_add_a_character_with_a_picture_and_the_board_keeps_it(tmp_path):
    from gradio.state_holder import SessionState

    from studio.config import StudioConfig
    from studio.ui import build_ui
    from studio.ui.state import AppState

    state = AppState.create(StudioConfig(device="cpu").with_home(tmp_path / "home"))
    state.manager.load("demo-tiny")
    folder = state.cfg.ipadapter_dir
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_ip_state(state.manager.current.pipe.unet), str(folder / "tiny.safetensors"))
    tiny_encoder().save_pretrained(folder / "image_encoder")
    try:
        demo = build_ui(state)
        fns = {d.fn.__name__: d for d in demo.fns.values()
               if d.fn and d.fn.__module__.endswith("storyboard_tab")}
        uploads = Path(demo.GRADIO_CACHE) / f"test-cast-{time.time_ns()}"
        uploads.mkdir(parents=True)
        picture(1).save(uploads / "sarah.png")
        (uploads / "fake.png").write_bytes(b"not a picture at all")
        session = SessionState(demo)

        def call(name, inputs):
            return asyncio.run(demo.process_api(block_fn=fns[name], inputs=inputs, state=session))["data"]

        def by_id(name, out):
            return dict(zip([getattr(b, "elem_id", None) for b in fns[name].outputs], out, strict=True))

        opened = call("open_project", ["film"])
        nform = len(fns["save_form"].inputs) - 1
        form = [value(v) for v in opened[2:2 + nform]]
        got = by_id("open_project", opened)
        assert value(got["sb-cast-adapter"]) == "tiny" and got["sb-cast-table"]["data"] in ([], [[]], [[""] * 5])
        form[0] = {**form[0], "data": [["1", "close shot", "Sarah at a window", "", "", -1, 0, ""],
                                       ["2", "close shot", "a street", "", "", -1, 0, ""]]}
        # a bad picture is refused before decoding, naming the character; nothing is kept
        with pytest.raises(Exception, match="character 'Sarah': reference image fake.png"):
            call("add_character_pictures", ["film", "Sarah", "red coat", "tiny", 0.7, [upload(uploads / "fake.png")],
                                            *form])
        assert StoryboardStore(state.cfg.storyboards_dir).load("film").cast == []
        out = by_id("add_character_pictures", call("add_character_pictures", [
            "film", "Sarah", "red coat", "tiny", 0.7, [upload(uploads / "sarah.png")], *form]))
        assert "character Sarah: 1 picture added" in out["sb-status"]
        assert out["sb-cast-table"]["data"] == [["Sarah", "red coat", "tiny", 0.7, 1]]
        assert len(out["sb-cast-gallery"]) == 1 and value(out["sb-cast-pick"]) == "Sarah"
        saved = StoryboardStore(state.cfg.storyboards_dir).load("film")
        assert [(c.name, c.prompt, c.ip_adapter, c.scale, c.pictures) for c in saved.cast] == \
            [("Sarah", "red coat", "tiny", 0.7, ["references/cast/Sarah-sarah.png"])]
        assert [s.description for s in saved.shots] == ["Sarah at a window", "a street"]  # the form was saved too
        assert [c.name for c in saved.shot_cast(saved.shot("1"))] == ["Sarah"]
        # update the words; a second character without pictures; then remove it
        out = by_id("save_character", call("save_character", ["film", "sarah", "red coat, grey hair", "tiny", 0.6,
                                                              *form]))
        assert out["sb-cast-table"]["data"][0][:2] == ["Sarah", "red coat, grey hair"]
        call("save_character", ["film", "Callum", "", "tiny", 0.6, *form])
        assert [c.name for c in StoryboardStore(state.cfg.storyboards_dir).load("film").cast] == ["Sarah", "Callum"]
        with pytest.raises(Exception, match="a character's name must be"):
            call("save_character", ["film", "Cal/lum", "", "tiny", 0.6, *form])
        call("remove_character", ["film", "Callum", *form])
        saved = StoryboardStore(state.cfg.storyboards_dir).load("film")
        assert [c.name for c in saved.cast] == ["Sarah"] and saved.cast[0].prompt == "red coat, grey hair"
        # picking a character shows their fields and pictures
        words, adapter, scale, gallery = call("pick_character", ["film", "Sarah"])
        assert (words, adapter, scale, len(gallery)) == ("red coat, grey hair", "tiny", 0.6, 1)
    finally:
        state.trainer.stop()


# --- the command line -------------------------------------------------------------------------------------------


def test_the_command_takes_characters_and_a_cast_from_a_board_file(studio, tmp_path, monkeypatch, capsys):
    from studio.cli import main

    cfg, _, store, _, src = studio
    monkeypatch.setenv("STUDIO_HOME", str(cfg.models_dir.parent))
    (tmp_path / "script.csv").write_text("shot,type,description,seed\n1,close shot,Sarah at a window,3\n"
                                         "2,close shot,a street,4\n", encoding="utf-8")
    base = ["storyboard", "--model", "demo-tiny", "--shots", str(tmp_path / "script.csv"), "--steps", "2",
            "--width", "64", "--height", "64"]
    code = main([*base, "--name", "cli cast", "--character", f"Sarah:{src / 'p1.png'}:tiny:0.7",
                 "--character", f"Sarah:{src / 'p2.png'}", "--character-words", "Sarah=red coat"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "cast: Sarah in shot 1" in err
    board = store.load("cli cast")
    assert [(c.name, c.ip_adapter, c.scale, c.prompt, len(c.pictures)) for c in board.cast] == \
        [("Sarah", "tiny", 0.7, "red coat", 2)]
    info = info_of(store, board, "1")
    assert info["IP-Adapter"].startswith("tiny [") and info["IP-Adapter scale"] == "0.7"
    assert info["prompt"].endswith("Sarah at a window, red coat")
    assert not any(k.startswith("IP-Adapter") for k in info_of(store, board, "2"))
    # the cast of that board, read from its project.json
    code = main([*base, "--name", "cli cast 2", "--cast", str(store.path("cli cast") / "project.json")])
    assert code == 0, capsys.readouterr().err
    again = store.load("cli cast 2")
    assert [(c.name, c.scale, len(c.pictures)) for c in again.cast] == [("Sarah", 0.7, 2)]
    assert frame_bytes(store, again)["1"] == frame_bytes(store, board)["1"]
    # a missing adapter or picture is refused before the model loads, naming the character
    assert main([*base, "--name", "x", "--character", f"Sarah:{src / 'p1.png'}:gone"]) == 2
    err = capsys.readouterr().err
    assert "cast: character 'Sarah': IP-Adapter 'gone' not found" in err and "ipadapter" in err
    assert main([*base, "--name", "x", "--character", "Sarah:nowhere.png"]) == 2
    assert "character 'Sarah': picture nowhere.png does not exist" in capsys.readouterr().err
    assert main([*base, "--name", "x", "--character", "Sarah"]) == 2
    assert "--character must be NAME:PICTURE[:ADAPTER[:SCALE]]" in capsys.readouterr().err
