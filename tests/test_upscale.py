"""Upscalers (studio.upscale): the menu, tiny ESRGAN / Real-ESRGAN Compact / SwinIR files built in code with the
layouts spandrel recognises, tiled runs that match untiled ones, A1111's scale handling, the pixel limit, the
model cache, hostile and wrong files refused, and `python -m studio upscale`. CPU, offline, a few seconds."""

from __future__ import annotations

import argparse
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.SwinIR import SwinIR

from studio.cli import upscale as upscale_cli
from studio.files.names import UnsafeNameError
from studio.upscale import library, tiling
from studio.upscale.output import postprocess_note, read_source
from studio.upscale.run import UpscalePlan, image_to_tensor, model_passes, plan_upscale, upscale
from studio.upscale.tiling import UpscaleCancelled, blend_weights, run_tiled, tile_count, tile_starts


def tiny_esrgan(scale: int = 4) -> dict[str, torch.Tensor]:
    """An ESRGAN (RRDBNet, old-arch keys "model.0.weight", ...) with 8 filters and one block."""
    torch.manual_seed(1)
    return ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict()


def tiny_compact() -> dict[str, torch.Tensor]:
    """A Real-ESRGAN Compact (SRVGG) 2x with one body conv: it sees 3 px around each pixel."""
    torch.manual_seed(2)
    return Compact(num_feat=8, num_conv=1, upscale=2).state_dict()


def tiny_swinir() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return SwinIR(upscale=2, embed_dim=12, depths=[1], num_heads=[1], window_size=4, img_size=16, mlp_ratio=1.0,
                  upsampler="pixelshuffledirect").state_dict()


class SystemPayload:
    """Unpickling this runs a shell command that creates `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """upscalers/ with tiny models in both formats, a subfolder, a hidden file and a non-upscaler."""
    d = tmp_path_factory.mktemp("home") / "upscalers"
    (d / "sub").mkdir(parents=True)
    save_file(tiny_esrgan(), d / "tiny-esrgan-4x.safetensors")
    torch.save({"params_ema": tiny_esrgan()}, d / "tiny-esrgan-pth.pth")  # wrapped, as Real-ESRGAN ships them
    save_file(tiny_compact(), d / "Compact-2x.safetensors")
    save_file(tiny_swinir(), d / "sub" / "swinir-2x.safetensors")
    torch.save(tiny_compact(), d / "Compact-2x.pth")  # same name as a safetensors file: listed once
    save_file(tiny_compact(), d / ".hidden.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)},
              d / "a-lora.safetensors")
    (d / "notes.txt").write_text("not a model")
    return d


@pytest.fixture
def picture() -> Image.Image:
    """A 40x30 picture (not square, so width and height cannot be swapped unnoticed)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")


# --- the menu and names --------------------------------------------------------------------------------------


def test_choices_are_the_builtins_then_the_files_sorted(folder):
    assert library.upscaler_choices(folder) == ["None", "Lanczos", "Nearest", "a-lora", "Compact-2x",
                                                "sub/swinir-2x", "tiny-esrgan-4x", "tiny-esrgan-pth"]
    assert library.resolve_upscaler("Compact-2x", folder).path.name == "Compact-2x.safetensors"
    assert library.resolve_upscaler("Compact-2x.pth", folder).path.name == "Compact-2x.pth"
    assert library.resolve_upscaler("Lanczos", folder).built_in
    assert library.upscaler_choices(folder.parent / "missing") == list(library.BUILT_IN)


@pytest.mark.parametrize("name", ["../x", "../upscalers/tiny-esrgan-4x", "/etc/passwd", "..\\x", "sub/../../x"])
def test_names_leaving_the_folder_are_refused(folder, name):
    with pytest.raises(UnsafeNameError, match="upscalers"):
        library.resolve_upscaler(name, folder)


def test_a_link_out_of_the_folder_is_neither_listed_nor_loaded(folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file(tiny_compact(), outside)
    link = folder / "escape.safetensors"
    link.symlink_to(outside)
    try:
        assert "escape" not in library.upscaler_choices(folder)
        with pytest.raises(UnsafeNameError, match="outside"):
            library.resolve_upscaler("escape.safetensors", folder)
    finally:
        link.unlink()


def test_unknown_name_lists_the_choices(folder):
    with pytest.raises(ValueError, match=r"no upscaler named 'R-ESRGAN 4x\+'.*Lanczos.*tiny-esrgan-4x"):
        library.resolve_upscaler("R-ESRGAN 4x+", folder)


# --- built-in resizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, resample", [("Lanczos", Image.Resampling.LANCZOS),
                                            ("Nearest", Image.Resampling.NEAREST)])
def test_pixel_upscalers_are_pils_resize(picture, name, resample):
    result = upscale(picture, name, 2.5)
    assert result.image.size == (100, 75)
    assert result.image.tobytes() == picture.resize((100, 75), resample=resample).tobytes()
    assert upscale(picture, name, size=(64, 48)).image.tobytes() == picture.resize((64, 48), resample).tobytes()


def test_none_leaves_the_image_as_it_is(picture):
    assert upscale(picture, "None", 4).image is picture


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 0}, "scale must be a number above 0"),
    ({"scale": float("nan")}, "scale must be"),
    ({"scale": 2, "size": (0, 10)}, "size must be"),
    ({"scale": 2, "tile": 8}, "tile size must be 0"),
    ({"scale": 2, "tile": 32, "overlap": 16}, "less than half the tile size"),
])
def test_bad_arguments_are_refused(picture, folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        upscale(picture, "tiny-esrgan-4x", folder=folder, **kwargs)


# --- model files ---------------------------------------------------------------------------------------------


def test_model_upscales_by_its_factor_and_resizes_to_the_asked_one(folder, picture):
    four = upscale(picture, "tiny-esrgan-4x", 4, folder=folder)
    assert (four.image.size, four.architecture, four.model_scale, four.dtype) == ((160, 120), "ESRGAN", 4,
                                                                                  "float32")
    assert four.plan.passes == [(160, 120)] and not four.plan.resized
    pixels = np.asarray(four.image, dtype=np.float64)
    assert pixels.std() > 1  # the model ran (not a blank image)
    # A1111: a 4x model asked for 2x runs once at 4x, then Lanczos halves it
    two = upscale(picture, "tiny-esrgan-4x", 2, folder=folder)
    assert two.image.size == (80, 60) and two.plan.passes == [(160, 120)] and two.plan.resized
    assert two.image.tobytes() == four.image.resize((80, 60), Image.Resampling.LANCZOS).tobytes()
    # the same weights in a pickle (wrapped in "params_ema") make the same image
    assert upscale(picture, "tiny-esrgan-pth", 4, folder=folder).image.tobytes() == four.image.tobytes()


def test_a_2x_model_runs_twice_for_4x_and_swinir_loads(folder, picture):
    result = upscale(picture, "Compact-2x", 4, folder=folder, tile=16, overlap=4)
    assert result.image.size == (160, 120) and result.plan.passes == [(80, 60), (160, 120)]
    assert result.architecture == "RealESRGAN Compact"
    swin = upscale(picture, "sub/swinir-2x", 2, folder=folder, tile=16, overlap=4)
    assert swin.image.size == (80, 60) and swin.architecture == "SwinIR"


def test_pass_count_follows_a1111():
    assert model_passes((10, 10), (40, 40), 4) == [(40, 40)]
    assert model_passes((10, 10), (80, 80), 2) == [(20, 20), (40, 40), (80, 80)]
    assert model_passes((10, 10), (200, 200), 2) == [(20, 20), (40, 40), (80, 80)]  # at most 3, then Lanczos
    assert model_passes((10, 10), (10, 10), 4) == [(40, 40)]  # 1x: one run, then back down (sharpening)
    assert model_passes((10, 10), (10, 10), 1) == [(10, 10)]
    assert model_passes((10, 10), (5, 5), 4) == []  # smaller: Lanczos alone


# --- tiles ---------------------------------------------------------------------------------------------------


def test_tiled_equals_untiled_when_the_overlap_covers_what_the_model_sees(folder):
    loaded = library.load_upscaler(library.resolve_upscaler("Compact-2x", folder))
    rng = np.random.default_rng(1)
    image = image_to_tensor(Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)))
    whole = loaded.model(image)
    cpu = torch.device("cpu")
    # the model sees 3 px around a pixel; a quarter of a 12 px overlap is dropped, so the tiles agree exactly
    tiled = run_tiled(loaded.model, image, 2, 32, 12, cpu, torch.float32)
    assert tile_count(90, 70, 32, 12) == 12 and tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1e-5
    # without an overlap the tile edges show: the comparison above would see a broken blend
    seams = run_tiled(loaded.model, image, 2, 32, 0, cpu, torch.float32)
    assert (seams - whole).abs().max() > 1e-2


@pytest.mark.parametrize("length, tile, overlap, scale", [(90, 32, 12, 2), (200, 64, 8, 4), (33, 16, 7, 1),
                                                          (50, 16, 0, 3), (10, 32, 8, 2)])
def test_blend_weights_sum_to_one_and_drop_the_outer_quarter(length, tile, overlap, scale):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == max(length - tile, 0)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    weights = blend_weights(starts, tile, length, scale)
    total = torch.zeros(length * scale)
    for start, w in zip(starts, weights, strict=True):
        total[start * scale:start * scale + len(w)] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    quarter = (overlap * scale) // 4
    for i in range(1, len(starts)):  # a tile's first quarter-overlap pixels (beside its inner edge) count for 0
        assert weights[i][:quarter].abs().max() == 0 if quarter else True
        assert weights[i - 1][len(weights[i - 1]) - quarter:].abs().max() == 0 if quarter else True


def test_progress_counts_tiles_and_stop_ends_between_tiles(folder, picture):
    seen = []
    result = upscale(picture, "Compact-2x", 2, folder=folder, tile=16, overlap=4,
                     on_progress=lambda done, total, info: seen.append((done, total)))
    total = tile_count(40, 30, 16, 4)
    assert result.plan.tiles == total == 9 and seen == [(i, total) for i in range(1, total + 1)]
    cancel = threading.Event()
    calls = []

    def stop_after_two(done, total, info):
        calls.append(done)
        if done == 2:
            cancel.set()

    with pytest.raises(UpscaleCancelled):
        upscale(picture, "Compact-2x", 2, folder=folder, tile=16, overlap=4, on_progress=stop_after_two,
                cancel=cancel)
    assert calls == [1, 2]


# --- limits, precision, cache --------------------------------------------------------------------------------


def test_output_over_the_pixel_limit_is_refused_before_any_tile(folder, picture):
    ran = []
    with pytest.raises(ValueError, match=r"the result is 160x120 = 0\.0 megapixels, over the limit"):
        upscale(picture, "tiny-esrgan-4x", 4, folder=folder, max_pixels=10_000, on_progress=lambda *a: ran.append(a))
    # a 4x model asked for 2x makes 4x on the way: that counts too
    with pytest.raises(ValueError, match="4x model makes 160x120 on the way"):
        upscale(picture, "tiny-esrgan-4x", 2, folder=folder, max_pixels=10_000, on_progress=lambda *a: ran.append(a))
    with pytest.raises(ValueError, match="over the limit"):
        upscale(picture, "Lanczos", 4, max_pixels=10_000)
    assert ran == []
    assert plan_upscale((40, 30), (80, 60), 4, max_pixels=20_000) == UpscalePlan((40, 30), (80, 60), [(160, 120)], 1)


def test_a_source_over_the_limit_is_refused_before_decoding(tmp_path, picture):
    picture.save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"big\.png: oversized: 40x30 .* not decoded"):
        read_source(tmp_path / "big.png", max_pixels=1000)


def test_precision_follows_the_device_and_the_model(folder):
    esrgan = library.describe_state_dict(tiny_esrgan(), "e.safetensors")
    swinir = library.describe_state_dict(tiny_swinir(), "s.safetensors")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert library.pick_dtype(esrgan, cpu) == torch.float32
    assert library.pick_dtype(esrgan, cuda) == torch.float16
    assert library.pick_dtype(swinir, cuda) == torch.float32  # spandrel: SwinIR does not run in fp16
    with pytest.raises(ValueError, match="SwinIR models do not run in fp16"):
        library.pick_dtype(swinir, cuda, "fp16")
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        library.pick_dtype(esrgan, cpu, "fp16")


def test_the_last_model_is_kept_until_its_file_changes(folder):
    entry = library.resolve_upscaler("tiny-esrgan-4x", folder)
    first = library.load_upscaler(entry)
    assert library.load_upscaler(entry) is first
    stat = entry.path.stat()
    os.utime(entry.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = library.load_upscaler(entry)
    assert second is not first and library.load_upscaler(entry) is second
    library.load_upscaler(library.resolve_upscaler("Compact-2x", folder))  # one at a time: this one replaces it
    assert library.load_upscaler(entry) is not second
    library.clear_upscaler_cache()
    assert library._cache == {}


# --- files refused -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_with_a_payload_is_refused_and_never_runs(folder, tmp_path, picture, legacy):
    marker = tmp_path / "ran"
    data = {"params_ema": {**tiny_esrgan(), "x": SystemPayload(marker)}}
    path = folder / f"evil-{legacy}.pth"
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)
    try:
        refused = rf"refused evil-{legacy}\.pth: it asks to run Python code.*(os|posix)\.system"
        with pytest.raises(ValueError, match=refused):
            upscale(picture, f"evil-{legacy}", 4, folder=folder)
        assert not marker.exists()
    finally:
        path.unlink()


def test_a_file_that_is_not_an_upscaler_is_refused_clearly(folder, picture, tmp_path):
    with pytest.raises(ValueError, match=r"a-lora\.safetensors is not an upscaler model spandrel recognises.*"
                                         r"ESRGAN.*SwinIR"):
        upscale(picture, "a-lora", 4, folder=folder)
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match=r"damaged\.safetensors is not a valid safetensors file"):
        library.read_state_dict(bad)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth holds a list, not a dict of tensors"):
        library.read_state_dict(tmp_path / "list.pth")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pt is empty"):
        library.read_state_dict(tmp_path / "empty.pt")


# --- the command ---------------------------------------------------------------------------------------------


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    upscale_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["upscale", *argv])
    return args.func(args)


def test_cli_writes_pngs_that_keep_the_parameters_and_add_the_note(folder, tmp_path, picture, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_HOME", str(folder.parent))
    info = PngInfo()
    info.add_text("parameters", "a harbour at dawn\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 40x30")
    picture.save(tmp_path / "harbour.png", pnginfo=info)
    picture.save(tmp_path / "plain.jpg", quality=95)
    out = tmp_path / "out"
    assert run_cli(str(tmp_path / "harbour.png"), str(tmp_path / "plain.jpg"), "--upscaler", "tiny-esrgan-4x",
                   "--scale", "4", "--out", str(out), "--tile", "32", "--overlap", "4", "--device", "cpu") == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert [p.name for p in written] == ["harbour-tiny-esrgan-4x-x4.png", "plain-tiny-esrgan-4x-x4.png"]
    with Image.open(written[0]) as im:
        assert im.size == (160, 120) and im.format == "PNG"
        assert im.text["parameters"].startswith("a harbour at dawn\nSteps: 20")
        assert im.text["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: tiny-esrgan-4x"
        assert im.text["extras"] == im.text["postprocessing"]
        expected = upscale(picture, "tiny-esrgan-4x", 4, folder=folder, tile=32, overlap=4).image
        assert im.convert("RGB").tobytes() == expected.tobytes()
    with Image.open(written[1]) as im:
        assert "parameters" not in im.text and im.size == (160, 120)
    # run again: a new file beside the first, nothing overwritten
    assert run_cli(str(tmp_path / "harbour.png"), "--upscaler", "Lanczos", "--size", "100x70", "--out", str(out)) == 0
    assert run_cli(str(tmp_path / "harbour.png"), "--upscaler", "Lanczos", "--size", "100x70", "--out", str(out)) == 0
    again = [Path(line).name for line in capsys.readouterr().out.split()]
    assert again == ["harbour-Lanczos-100x70.png", "harbour-Lanczos-100x70-2.png"]
    with Image.open(out / again[0]) as im:
        assert im.size == (100, 70)
        assert im.text["postprocessing"] == "Postprocess upscale to: 100x70, Postprocess upscaler: Lanczos"


def test_cli_refuses_bad_input_before_work(folder, tmp_path, picture, monkeypatch, capsys):
    monkeypatch.setenv("STUDIO_HOME", str(folder.parent))
    picture.save(tmp_path / "p.png")
    with pytest.raises(ValueError, match="no upscaler named 'nope'"):
        run_cli(str(tmp_path / "p.png"), "--upscaler", "nope")
    with pytest.raises(ValueError, match="--size must be WIDTHxHEIGHT"):
        run_cli(str(tmp_path / "p.png"), "--upscaler", "Lanczos", "--size", "big")
    # a missing file among good ones: reported, the others still written, exit status 2
    assert run_cli(str(tmp_path / "missing.png"), str(tmp_path / "p.png"), "--upscaler", "Nearest",
                   "--out", str(tmp_path / "o")) == 2
    captured = capsys.readouterr()
    assert "no image file 'missing.png'" in captured.err and captured.out.strip().endswith("p-Nearest-x4.png")


def test_note_quotes_names_as_a1111():
    assert postprocess_note("4x_foolhardy_Remacri", 2.5) == \
        "Postprocess upscale by: 2.5, Postprocess upscaler: 4x_foolhardy_Remacri"
    assert postprocess_note("a, b", 2) == 'Postprocess upscale by: 2, Postprocess upscaler: "a, b"'


def test_tiling_module_defaults_are_a1111s():
    assert (tiling.DEFAULT_TILE, tiling.DEFAULT_OVERLAP) == (192, 8)


def test_a_torchscript_file_is_not_run(tmp_path):
    scripted = torch.jit.script(torch.nn.Conv2d(3, 3, 1))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(ValueError, match=r"scripted\.pt is a TorchScript program, which is not read"):
        library.read_state_dict(tmp_path / "scripted.pt")
