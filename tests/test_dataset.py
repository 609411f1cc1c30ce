"""Dataset curation engine: good and bad files, conversions, duplicates, crops, output, command line."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dataset_files import BAD_FILES, CONVERTED, PLAIN, make_mixed_folder, photo, tree_digest
from PIL import Image, ImageDraw

from studio.dataset import curate as ds
from studio.dataset.crop import bucket_resolutions, plan_crop
from studio.dataset.sources import is_zip_slip

SMALL = dict(size=64, min_side=32, max_pixels=4_000_000)


def job(*inputs, **kw) -> ds.CurateJob:
    return ds.CurateJob(inputs=[Path(p) for p in inputs], **{**SMALL, **kw})


def by_label(curation: ds.Curation) -> dict[str, ds.Item]:
    return {Path(it.source.label).name: it for it in curation.items}


# --- the folder of every bad file, through the command line -----------------------------------


def test_cli_curates_mixed_folder_and_leaves_input_untouched(tmp_path, capsys, monkeypatch):
    from studio.cli import main

    src = make_mixed_folder(tmp_path / "art")
    before = tree_digest(src)
    out = tmp_path / "out"
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    rc = main(["curate", "--input", str(src), "--output", str(out), "--size", "64", "--min-side", "32",
               "--max-megapixels", "4", "--caption", "demo-tiny", "--prefix", "sks,", "--repeats", "100",
               "--flip"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert tree_digest(src) == before  # byte for byte, and not even touched
    report = json.loads((out / "report.json").read_text())
    skipped = {Path(e["source"]).name: e["reason"] for e in report["skipped"]}
    assert set(skipped) == set(BAD_FILES)
    for name, words in BAD_FILES.items():
        assert words in skipped[name], (name, skipped[name])
        assert f"skipped art/{name}" in printed
    converted = {Path(e["source"]).name: " ".join(e["notes"]) for e in report["converted"]}
    assert set(converted) == set(CONVERTED)
    for name, words in CONVERTED.items():
        assert words in converted[name], (name, converted[name])
    kept = {Path(e["source"]).name for e in report["kept"]}
    assert kept == set(CONVERTED) | set(PLAIN)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["training"]["repeats"] == 100 and manifest["training"]["flip"] == "random"
    assert manifest["training"]["flip_p"] == 0.5
    # every good file is an RGB PNG of exactly the training size, with a non-empty caption beside it
    for entry in manifest["images"]:
        image = Image.open(out / entry["file"])
        assert image.mode == "RGB" and image.size == (64, 64), entry
        caption = (out / entry["file"]).with_suffix(".txt").read_text()
        assert caption and caption == entry["caption"]
        if not entry["source"].endswith(("good.png", "good.jpg", "good.webp", "good.bmp", "good.tiff")):
            assert caption.startswith("sks, ") and entry["caption_source"] == "demo-tiny"
    sidecar = [e for e in manifest["images"] if e["source"].endswith("good.png")][0]
    assert sidecar["caption"] == "a caption that came with the images"
    assert sidecar["caption_source"] == "good.txt"
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in rows} == {e["file"] for e in manifest["images"]}
    assert "kept 13 of 20" in printed


def test_exif_orientation_is_applied(tmp_path):
    left_red = Image.new("RGB", (80, 80), "blue")
    left_red.paste((255, 0, 0), (0, 0, 40, 80))
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down: displays rotated by 180°
    (tmp_path / "in").mkdir()
    left_red.save(tmp_path / "in" / "flipped.jpg", exif=exif, quality=95)
    item = ds.import_images(job(tmp_path / "in")).items[0]
    assert "EXIF orientation 3 applied" in item.notes
    pixels = np.asarray(item.image)
    assert pixels[32, 5, 2] > 200 and pixels[32, 5, 0] < 60  # the left side now shows blue
    assert pixels[32, 58, 0] > 200 and pixels[32, 58, 2] < 60


def test_conversions_keep_the_picture(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    see_through = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    see_through.save(folder / "clear.png")
    Image.fromarray(np.full((64, 64), 65535, np.uint16)).save(folder / "white16.png")
    frames = [Image.new("RGB", (64, 64), c) for c in ("green", "red")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    items = by_label(ds.import_images(job(folder)))
    assert np.asarray(items["clear.png"].image).min() == 255  # composited on white, not black
    assert "transparent pixels composited on white" in " ".join(items["clear.png"].notes)
    assert np.asarray(items["white16.png"].image).min() == 255  # 65535 -> 255, not clipped garbage
    first = np.asarray(items["anim.gif"].image)[32, 32]
    assert first[1] > 100 and first[0] < 50  # the first frame (green)
    assert "2 frames: the first one used" in items["anim.gif"].notes


def test_prune_grayscale_instead_of_converting(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo(0).convert("L").save(folder / "gray.png")
    photo(1).save(folder / "color.png")
    items = by_label(ds.import_images(job(folder, non_rgb="prune")))
    assert "pruned" in items["gray.png"].skipped and items["color.png"].kept


def test_zip_import_refuses_zip_slip_and_reads_captions(tmp_path):
    archive = tmp_path / "art.zip"
    buf = {}
    for name, seed in (("pics/a.png", 0), ("../evil.png", 1), ("/abs.png", 2)):
        b = __import__("io").BytesIO()
        photo(seed).save(b, "PNG")
        buf[name] = b.getvalue()
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in buf.items():
            z.writestr(name, data)
        z.writestr("pics/a.txt", "a caption inside the zip")
        z.writestr("__MACOSX/pics/._a.png", b"resource fork")
    curation = ds.import_images(job(archive))
    items = {it.source.member: it for it in curation.items}
    assert set(items) == {"pics/a.png", "../evil.png", "/abs.png"}
    assert items["pics/a.png"].kept and items["pics/a.png"].caption == "a caption inside the zip"
    assert "zip slip" in items["../evil.png"].skipped and "zip slip" in items["/abs.png"].skipped
    assert not (tmp_path / "evil.png").exists()
    out = ds.write_dataset(curation, tmp_path / "ds")
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png"]
    assert is_zip_slip("a/../../b.png") and is_zip_slip("C:/x.png") and not is_zip_slip("a/b..c.png")


def test_existing_kohya_and_imagefolder_datasets_import_as_they_are(tmp_path):
    kohya = tmp_path / "train" / "40_sks dog"
    kohya.mkdir(parents=True)
    photo(0).save(kohya / "one.png")
    (kohya / "one.caption").write_text("sks dog on grass")
    hf = tmp_path / "hf"
    hf.mkdir()
    photo(1).save(hf / "two.jpg")
    row = json.dumps({"file_name": "two.jpg", "text": "a red barn"})
    (hf / "metadata.jsonl").write_text(row + "\n{broken\n")
    curation = ds.import_images(job(tmp_path / "train", hf))
    items = by_label(curation)
    assert items["one.png"].caption == "sks dog on grass" and items["one.png"].source.repeats == 40
    assert items["two.jpg"].caption == "a red barn" and items["two.jpg"].caption_source == "metadata.jsonl"
    assert curation.repeats == 40  # taken from the kohya folder when the job does not say
    assert "metadata.jsonl" not in items  # not an input image, not a skipped file either


def test_exact_duplicates_pair_and_the_user_keeps_either(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo(0).save(folder / "a.png")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes())  # same bytes
    photo(0).save(folder / "c.bmp")  # same pixels, other format
    photo(1).save(folder / "d.png")
    curation = ds.import_images(job(folder))
    assert [(curation.items[p.a].name, curation.items[p.b].name, p.kind) for p in curation.pairs] == [
        ("a", "b", "exact"), ("a", "c", "exact")]
    assert [it.name for it in curation.kept()] == ["a", "d"]
    assert "exact duplicate of in/a.png" in by_label(curation)["b.png"].removed
    curation.pairs[0].keep = "b"
    curation.pairs[1].keep = "both"
    ds.apply_duplicate_choices(curation)
    assert [it.name for it in curation.kept()] == ["b", "c", "d"]


def test_near_duplicates_from_embeddings_keep_the_larger_picture():
    items = [ds.Item(ds.Source(f"{n}.png", Path(f"{n}.png")), original_size=size)
             for n, size in (("small", (64, 64)), ("other", (64, 64)), ("large", (128, 128)))]
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.999, 0.0447]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pairs = ds.find_near_duplicates(items, emb, threshold=0.99)
    assert [(p.a, p.b, p.kind) for p in pairs] == [(2, 0, "near")]
    assert pairs[0].similarity == pytest.approx(0.999, abs=1e-3)
    assert ds.find_near_duplicates(items, emb, threshold=0.9995) == []


# --- crops ---------------------------------------------------------------------------------------


def salient_scene() -> Image.Image:
    """A wide, quiet background with one red disc near the left edge: center crop cuts it out."""
    rng = np.random.default_rng(0)
    background = (200 + rng.normal(0, 3, (200, 600, 3))).clip(0, 255).astype(np.uint8)
    scene = Image.fromarray(background)
    ImageDraw.Draw(scene).ellipse((30, 60, 110, 140), fill=(220, 30, 30))
    return scene


def red_fraction(image: Image.Image) -> float:
    a = np.asarray(image).astype(int)
    return float(((a[..., 0] > 180) & (a[..., 1] < 90)).mean())


@pytest.mark.parametrize("mode", ["smart", "entropy"])
def test_content_aware_crop_keeps_the_object_center_crop_cuts(tmp_path, mode):
    folder = tmp_path / "in"
    folder.mkdir()
    salient_scene().save(folder / "scene.png")
    center = ds.import_images(job(folder, crop="center")).items[0]
    smart = ds.import_images(job(folder, crop=mode)).items[0]
    assert red_fraction(center.image) == 0  # the disc is outside the center square
    assert red_fraction(smart.image) > 0.1  # the whole disc (~13% of the square) is kept
    left, _, right, _ = smart.crop_box
    assert left <= 30 and right >= 110 and right - left == 200


def test_bucket_crop_keeps_aspect_ratio():
    buckets = bucket_resolutions(512)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    box, target = plan_crop(Image.new("RGB", (1000, 500)), 512, "bucket")
    assert target in buckets and target[0] / target[1] == pytest.approx(2, rel=0.15)
    assert (box[2] - box[0]) / (box[3] - box[1]) == pytest.approx(target[0] / target[1], rel=0.01)


def test_bucket_images_are_written_at_their_bucket_size(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo(0, 1000, 500).save(folder / "wide.png")
    curation = ds.import_images(job(folder, size=512, min_side=256, crop="bucket"))
    out = ds.write_dataset(curation, tmp_path / "ds")
    image = Image.open(out / "wide.png")
    assert image.size == curation.items[0].out_size and image.size[0] > image.size[1]
    assert json.loads((out / "dataset.json").read_text())["training"]["buckets"] is True


# --- output ----------------------------------------------------------------------------------------


def test_write_refuses_overlapping_or_foreign_folders_and_replaces_its_own(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo(0).save(folder / "a.png")
    curation = ds.import_images(job(folder))
    with pytest.raises(ValueError, match="overlaps the input"):
        ds.write_dataset(curation, folder / "dataset")
    with pytest.raises(ValueError, match="overlaps the input"):
        ds.write_dataset(curation, tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(ValueError, match="not a studio dataset"):
        ds.write_dataset(curation, foreign)
    assert (foreign / "thesis.docx").read_text() == "precious"
    out = ds.write_dataset(curation, tmp_path / "ds")
    ds.set_caption(curation, 0, "second  version ")
    ds.write_dataset(curation, out, replace=True)  # our own dataset: replaced as a whole, when asked
    assert (out / "a.txt").read_text() == "second version"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def test_manifest_flip_copies_and_kohya_export(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):  # seed 000: 4 images x 100 repeats
        photo(i).save(folder / f"art{i}.png")
        (folder / f"art{i}.txt").write_text(f"painting number {i}")
    curation = ds.import_images(job(folder, flip="stored", repeats=100, name="monet style"))
    out = ds.write_dataset(curation, tmp_path / "ds")
    flipped = np.asarray(Image.open(out / "art0_flip.png"))
    assert np.array_equal(flipped, np.asarray(Image.open(out / "art0.png"))[:, ::-1])
    assert (out / "art0_flip.txt").read_text() == "painting number 0"
    manifest = ds.read_manifest(out)
    assert manifest["format"] == "studio-dataset" and manifest["name"] == "monet style"  # as typed
    assert manifest["training"]["images_per_epoch"] == 4 * 100 * 2
    assert manifest["settings"]["crop"] == "center" and manifest["sources"] == [str(folder.resolve())]
    entry = manifest["images"][0]
    assert entry["crop"]["box"] == [8, 0, 88, 80] and entry["original_size"] == [96, 80]
    kohya = ds.export_kohya(out, tmp_path / "kohya")
    assert kohya == (tmp_path / "kohya" / "100_monet style").resolve()
    assert sorted(p.name for p in kohya.glob("*.txt")) == sorted(p.name for p in out.glob("*.txt"))
    assert len(list(kohya.glob("*.png"))) == 8


def test_import_stops_when_cancelled_and_reports_progress(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        photo(i).save(folder / f"p{i}.png")
    cancel = threading.Event()
    calls = []

    def on_progress(done, total, info):
        calls.append((done, total))
        if done == 2:
            cancel.set()

    curation = ds.import_images(job(folder), on_progress, cancel)
    assert calls == [(1, 5), (2, 5)] and curation.interrupted
    assert [it.name for it in curation.kept()] == ["p0", "p1"]
    assert all(it.skipped == "not imported: stopped" for it in curation.items[2:])


@pytest.mark.parametrize("bad, message", [
    (dict(size=500), "size must be a multiple of 8"),
    (dict(crop="zoom"), "crop must be one of"),
    (dict(flip_p=2), "flip probability"),
    (dict(repeats=0), "repeats must be between"),
    (dict(clip_threshold=3), "CLIP threshold"),
])
def test_job_validation_says_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        ds.CurateJob(inputs=[Path(".")], **bad).validate()


def test_cli_errors_exit_2(tmp_path, capsys, monkeypatch):
    from studio.cli import main

    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    folder = tmp_path / "in"
    folder.mkdir()
    photo(0).save(folder / "a.png")
    assert main(["curate", "--input", str(folder), "--output", str(tmp_path / "o"), "--size", "500"]) == 2
    assert "error: size must be a multiple of 8" in capsys.readouterr().err
    assert main(["curate", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    assert main(["curate", "--input", str(tmp_path / "bad"), "--output", str(tmp_path / "o")]) == 2
    assert "no usable images" in capsys.readouterr().err and not (tmp_path / "o").exists()
    args = ["curate", "--input", str(folder), "--output", str(tmp_path / "o"), "--min-side", "32",
            "--size", "64"]
    assert main(args + ["--caption", "blip"]) == 2  # not cached, and tests are offline
    err = capsys.readouterr().err
    assert "offline" in err and "demo-tiny" in err and not (tmp_path / "o").exists()


def test_uploaded_files_pair_with_their_captions_by_name(tmp_path):
    """Browser uploads arrive as single files, each in its own temporary folder."""
    files = []
    for i, name in enumerate(["cat.png", "cat.txt", "dog.jpg"]):
        folder = tmp_path / f"upload{i}"
        folder.mkdir()
        files.append(folder / name)
    photo(0).save(files[0])
    files[1].write_text("a tabby cat")
    photo(1).save(files[2])
    curation = ds.import_images(job(*files))
    found = [(it.source.label, it.caption) for it in curation.items]
    assert found == [("cat.png", "a tabby cat"), ("dog.jpg", "")]


def test_recrop_keeps_captions_and_choices(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    salient_scene().save(folder / "scene.png")
    photo(1, 300, 200).save(folder / "other.png")
    curation = ds.import_images(job(folder, crop="center"))
    ds.set_caption(curation, 1, "a red disc on grey")
    ds.set_kept(curation, 0, False)
    curation.items[1].clip_score = 0.3
    assert red_fraction(curation.items[1].image) == 0
    cancel = threading.Event()
    cancel.set()
    assert ds.recrop(curation, 96, "smart", cancel=cancel) is False
    assert curation.items[1].image.size == (64, 64)  # all or nothing
    assert ds.recrop(curation, 96, "smart") is True
    scene = curation.items[1]
    assert scene.image.size == (96, 96) and red_fraction(scene.image) > 0.1
    assert scene.caption == "a red disc on grey"
    assert scene.clip_score is None  # a new picture needs a new score
    assert curation.items[0].removed == "left out by hand" and curation.job.crop == "smart"
