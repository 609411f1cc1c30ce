"""A corpus of bad and odd images made in code, through every reader of user pictures: dataset import, captioning,
PNG-info reading and the storyboard's ControlNet reference loader. Bad files get a clear reason, nothing crashes,
nothing oversized is decoded, and the good ones among them still import. (test_dataset covers the common kinds
through the command line; this adds APNG, palette transparency, wrong extensions, real zlib bombs, and the other
readers.)"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from dataset_files import photo, png_header_only
from PIL import Image, ImageFile

from studio.dataset import curate as ds

# name -> words the reason must contain (dataset import and ControlNet references)
BAD = {
    "zero.png": "empty file",
    "garbage.png": "not a readable image",
    "text-named.jpg": "not a readable image",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "cut-header.png": "not a readable image|damaged",
    "bomb-header.png": "decompression bomb",
    "zlib-bomb.png": "decompression bomb|oversized",
    "wide.png": "oversized",
}
# name -> words of the note when converted; these must import
GOOD = {
    "anim.gif": "3 frames: the first one used",
    "anim.png": "2 frames: the first one used",  # APNG
    "cmyk.jpg": "CMYK",
    "gray16.png": "16-bit",
    "rgb48.png": "16-bit",
    "palette-alpha.png": "transparent pixels composited on white",
    "gray-alpha.png": "LA",
    "png-named.jpg": "",  # wrong extension: read by its content
    "jpeg-named.png": "",
    "webp-named.gif": "",
}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zlib_bomb(path: Path, side: int) -> None:
    """A real grayscale PNG of side x side black pixels: a few hundred kB that decode to side² bytes."""
    raw = zlib.compress(b"\0" * (side + 1) * side, 9)  # one filter byte per row
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b""))


def make_corpus(folder: Path) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    (folder / "garbage.png").write_bytes(bytes(range(256)) * 4)
    (folder / "text-named.jpg").write_text("I am a shopping list, not a photo\n" * 20)
    png, jpg = io.BytesIO(), io.BytesIO()
    photo(1, 128, 128).save(png, "PNG")
    photo(2, 128, 128).save(jpg, "JPEG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (folder / "cut-header.png").write_bytes(png.getvalue()[:20])
    png_header_only(folder / "bomb-header.png", 100_000, 100_000)
    zlib_bomb(folder / "zlib-bomb.png", 10_000)  # 100 MP: inside PIL's warning band, over every studio limit
    png_header_only(folder / "wide.png", 100_000, 64)  # not a bomb to PIL, over the import's pixel limit
    frames = [photo(10 + i) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "anim.png", save_all=True, append_images=frames[1:2])  # APNG
    photo(3).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.random.default_rng(4).integers(0, 65535, (80, 96), dtype=np.uint16)).save(
        folder / "gray16.png")
    cv2.imwrite(str(folder / "rgb48.png"), np.random.default_rng(5).integers(0, 65535, (80, 96, 3), dtype=np.uint16))
    pal = photo(6).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette-alpha.png", transparency=0)
    photo(7).convert("LA").save(folder / "gray-alpha.png")
    photo(8).save(folder / "png-named.jpg", format="PNG")
    photo(9).save(folder / "jpeg-named.png", format="JPEG")
    photo(10).save(folder / "webp-named.gif", format="WEBP")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "in")


@pytest.fixture(scope="module")
def imported(corpus):
    job = ds.CurateJob(inputs=[corpus], size=64, min_side=32, max_pixels=4_000_000)
    return {Path(it.source.label).name: it for it in ds.import_images(job).items}


def test_corpus_is_what_it_claims(corpus):
    assert Image.open(corpus / "anim.png").n_frames == 2 and Image.open(corpus / "anim.png").format == "PNG"
    assert Image.open(corpus / "png-named.jpg").format == "PNG"
    assert Image.open(corpus / "palette-alpha.png").mode == "P"
    with Image.open(corpus / "zlib-bomb.png") as im:  # PIL's own warning band, so only our limit stops it
        assert im.size == (10_000, 10_000) and (corpus / "zlib-bomb.png").stat().st_size < 200_000


def test_dataset_import_gives_reasons_and_keeps_the_good_ones(imported):
    assert set(imported) == set(BAD) | set(GOOD)
    for name, words in BAD.items():
        item = imported[name]
        assert item.image is None and item.skipped, name
        assert any(w in item.skipped for w in words.split("|")), (name, item.skipped)
    for name, note in GOOD.items():
        item = imported[name]
        assert not item.skipped and item.image is not None and item.image.mode == "RGB", (name, item.skipped)
        assert note in " ".join(item.notes), (name, item.notes)


def test_captioning_the_imported_corpus(imported, tmp_path):
    from studio.dataset.captioning import load_captioner

    captioner = load_captioner("demo-tiny", tmp_path / "cache", device="cpu")
    good = [imported[name].image for name in GOOD]
    captions = captioner.caption(good)
    assert len(captions) == len(good) and all(isinstance(c, str) for c in captions)


def test_png_info_reader_answers_every_file_with_text_none_or_a_clear_error(corpus):
    from studio.generation.infotext import read_image_infotext

    for path in sorted(corpus.iterdir()):
        try:
            assert read_image_infotext(path) is None, path.name  # none of them carries parameters
        except ValueError as e:
            assert path.name in str(e) and path.name in BAD, (path.name, e)
            if "bomb" in path.name:
                assert "oversized" in str(e)


def test_png_info_refuses_a_big_image_before_decoding_it(tmp_path, monkeypatch):
    from studio.generation import infotext

    zlib_bomb(tmp_path / "big.png", 9_000)  # 81 MP: below PIL's warning, over the PNG-info limit
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ValueError, match="big.png: oversized: 9000x9000 = 81.0 megapixels.*not decoded"):
        infotext.read_image_infotext(tmp_path / "big.png")
    assert decoded == []


def test_controlnet_reference_loader(corpus):
    from studio.control.preprocess import read_reference

    for name, words in BAD.items():
        if name == "wide.png":
            words = "truncated"  # references may be up to 64 MP: this one is decoded, and its data is missing
        with pytest.raises(ValueError) as e:
            read_reference(corpus / name)
        assert name in str(e.value) and any(w in str(e.value) for w in words.split("|")), (name, e.value)
    for name in GOOD:
        ref = read_reference(corpus / name)
        assert ref.image.mode == "RGB" and min(ref.image.size) >= 8
