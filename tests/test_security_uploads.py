"""Image uploads through the UI's own handlers, Gradio's preprocessing included (Blocks.process_api, as a browser's
event runs): a 20 KB PNG of 13000x13000 1-bit pixels is refused with its size in the message and never decoded in
PNG info, storyboard references, Dataset uploads and Evaluate folders; a normal image still works in each; and
parallel decodes are bounded."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from dataset_files import photo
from PIL import Image, ImageFile

SIDE = 13_000


def one_bit_bomb(path: Path, side: int = SIDE) -> Path:
    """A real 1-bit PNG of side x side black pixels: about 20 KB on disk, side² pixels (169 MP) decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress((b"\0" * (1 + (side + 7) // 8)) * side, 9)  # a filter byte and side/8 bytes per row
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(demo, {(tab module, handler name): BlockFunction}, a folder in Gradio's upload cache, home)."""
    from gradio.state_holder import SessionState

    from studio.config import StudioConfig
    from studio.ui import build_ui
    from studio.ui.state import AppState

    home = tmp_path_factory.mktemp("home")
    state = AppState.create(StudioConfig().with_home(home))
    state.manager.load("demo-tiny")
    demo = build_ui(state)
    fns = {(d.fn.__module__.rsplit(".", 1)[-1], d.fn.__name__): d for d in demo.fns.values() if d.fn}
    uploads = Path(demo.GRADIO_CACHE) / f"test-uploads-{time.time_ns()}"
    uploads.mkdir(parents=True)
    one_bit_bomb(uploads / "bomb.png")
    assert (uploads / "bomb.png").stat().st_size < 30_000
    session = SessionState(demo)

    def call(tab: str, name: str, inputs: list):
        """The handler's outputs (postprocessed) for `inputs` (preprocessed by its components first)."""
        out = asyncio.run(demo.process_api(block_fn=fns[(tab, name)], inputs=inputs, state=session))
        return out["data"]

    yield call, fns, uploads, home
    state.trainer.stop()


@pytest.fixture
def decoded(monkeypatch):
    """Sizes of every image PIL decodes while the test runs."""
    sizes = []
    for cls in (ImageFile.ImageFile, Image.Image):
        original = cls.load

        def spy(self, _original=original):
            sizes.append(self.size)
            return _original(self)

        monkeypatch.setattr(cls, "load", spy)
    return sizes


def upload(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def value(v):
    return v.get("value") if isinstance(v, dict) and v.get("__type__") == "update" else v


def test_png_info_refuses_the_bomb_undecoded_and_reads_a_normal_image(ui, decoded):
    from studio.generation.infotext import png_info

    call, _, uploads, _ = ui
    out = call("generate_tab", "read_png", [upload(uploads / "bomb.png")])
    assert (SIDE, SIDE) not in decoded
    text, preview = out[-2], out[-1]
    assert "bomb.png: oversized: 13000x13000 = 169.0 megapixels" in text and "not decoded" in text
    assert "refused before decoding" not in text and str(uploads) not in text and preview is None
    good = uploads / "a1111.png"
    Image.new("RGB", (64, 48), "white").save(good, pnginfo=png_info(
        "a castle\nNegative prompt: lowres\nSteps: 28, Sampler: Euler, CFG scale: 6, Seed: 3344, Size: 64x48"))
    out = call("generate_tab", "read_png", [upload(good)])
    assert out[0] == "a castle" and out[1] == "lowres" and out[-1]["path"]
    assert (64, 48) in decoded


def test_storyboard_reference_refuses_the_bomb_undecoded_and_takes_a_normal_picture(ui, decoded):
    call, fns, uploads, home = ui
    nform = len(fns[("storyboard_tab", "upload_reference")].inputs) - 3
    call("storyboard_tab", "open_project", ["bombs"])
    (uploads / "shots.csv").write_text("shot,type,description\n1,long shot,a room\n")
    out = call("storyboard_tab", "import_csv", [upload(uploads / "shots.csv"), "bombs",
                                                *[value(v) for v in call("storyboard_tab", "open_project",
                                                                         ["bombs"])[2:2 + nform]]])
    form = [value(v) for v in out[2:2 + nform]]
    with pytest.raises(Exception, match="bomb.png: oversized: 13000x13000 = 169.0 megapixels") as e:
        call("storyboard_tab", "upload_reference", ["bombs", "1", upload(uploads / "bomb.png"), *form])
    assert (SIDE, SIDE) not in decoded and str(uploads) not in str(e.value)
    assert not list((home / "storyboards" / "bombs").rglob("references/*"))
    photo(1, 96, 80).save(uploads / "sketch.png")
    shots, edges, preview = call("storyboard_tab", "upload_reference", ["bombs", "1", upload(uploads / "sketch.png"),
                                                                        *form])
    assert shots["data"][0][4] == "references/1-sketch.png" and edges["path"] and preview["path"].endswith(".png")
    assert (96, 80) in decoded


def test_dataset_upload_refuses_the_bomb_undecoded_and_imports_a_normal_image(ui, decoded):
    call, _, uploads, _ = ui
    photo(2, 96, 80).save(uploads / "piece.png")
    out = call("dataset_tab", "do_import", [None, [upload(uploads / "bomb.png"), upload(uploads / "piece.png")],
                                            64, 32, "center", "convert"])
    assert (SIDE, SIDE) not in decoded and (96, 80) in decoded
    summary, problems = out[1], out[2]
    assert "**1** kept of 2 file(s)" in summary, summary
    rows = {r[0]: r for r in problems["data"]}
    assert list(rows) == ["bomb.png"] and "13000x13000 = 169.0 megapixels" in rows["bomb.png"][2]


def test_evaluate_folder_skips_the_bomb_undecoded_and_scores_a_normal_image(ui, decoded, tmp_path):
    call, _, uploads, _ = ui
    folder = tmp_path / "generated"
    folder.mkdir()
    one_bit_bomb(folder / "bomb.png")
    photo(3, 64, 64).save(folder / "good.png")
    (folder / "good.txt").write_text("a photo")
    (folder / "bomb.txt").write_text("a photo")
    out = call("evaluate_tab", "do_evaluate", [str(folder), "", "", ["clip-t"], "demo-tiny", "demo-tiny", "demo-tiny",
                                               "demo-tiny", ""])
    assert (SIDE, SIDE) not in decoded and (64, 64) in decoded
    summary = out[0]
    assert "CLIP-T" in summary and "1 generated" in summary
    assert "skipped bomb.png: oversized: 13000x13000 = 169.0 megapixels" in summary


def test_the_bomb_costs_little_memory_in_the_engine(tmp_path):
    import tracemalloc

    from studio.files.images import SkipImage, open_checked

    bomb = one_bit_bomb(tmp_path / "bomb.png")
    tracemalloc.start()
    try:
        with pytest.raises(SkipImage, match="13000x13000"):
            open_checked(bomb, 64_000_000, 100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # the decoded image would be 21 MB as 1-bit, 169 MB as RGB's first step


def test_parallel_decodes_wait_for_a_slot(tmp_path, monkeypatch):
    from studio.files import images

    photo(4, 64, 64).save(tmp_path / "a.png")
    now, peak, lock = [0], [0], threading.Lock()
    original = ImageFile.ImageFile.load

    def slow_load(self):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    threads = [threading.Thread(target=images.open_checked, args=(tmp_path / "a.png", 10**6, 10**6))
               for _ in range(8)]
    threads += [threading.Thread(target=images.load_image, args=(images.Source("a", tmp_path / "a.png"), 8, 10**6,
                                                                 10**6)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == images.DECODE_SLOTS


def test_oversized_file_is_not_read(tmp_path):
    from studio.files.images import SkipImage, open_checked

    path = tmp_path / "big.png"
    photo(5, 64, 64).save(path)
    with pytest.raises(SkipImage, match="larger than the 0 MB limit: not read"):
        open_checked(path, 10**6, 100)
