"""ControlNet preprocessors (studio.control.preprocessors): every weight-free map on a drawn picture, checked by its
numbers; weight-needing ones refused offline with the file to fetch; parameters checked."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from studio.control import preprocessors as P

WEIGHT_FREE = {"none", "canny", "invert", "threshold", "lineart_standard", "scribble_xdog", "shuffle", "tile_resample",
               "t2ia_color_grid"}


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """320x256: a red square, a blue circle, a black line, a light grey bar (low contrast) on white."""
    img = Image.new("RGB", (320, 256), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((40, 40, 140, 140), fill=(200, 30, 30))
    d.ellipse((170, 60, 290, 180), fill=(30, 60, 200))
    d.line((20, 220, 300, 200), fill="black", width=4)
    d.rectangle((200, 232, 300, 248), fill=(235, 235, 235))
    return img


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, so no weight file on this machine is found."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def white(img: Image.Image) -> np.ndarray:
    """Where a map is bright (channel 0 above 127)."""
    return np.asarray(img)[..., 0] > 127


def test_the_weight_free_preprocessors_are_the_expected_ones_and_all_give_an_rgb_map_at_the_input_size(picture):
    assert set(P.offline_names()) == WEIGHT_FREE
    for name in WEIGHT_FREE:
        out = P.preview(name, picture)
        assert out.mode == "RGB" and out.size == picture.size, name
    odd = picture.resize((203, 131))
    for name in WEIGHT_FREE:
        assert P.preview(name, odd).size == (203, 131), name


def test_canny_draws_the_outlines_and_its_thresholds_matter(picture):
    edges = white(P.preview("canny", picture))
    # the square's and circle's outlines and the line: about 400 + 380 + 2 * 280 pixels
    assert 900 < edges.sum() < 3000
    assert edges[40, 60:120].any() or edges[39:42, 60:120].any()  # the square's top side
    assert not edges[60:120, 60:120].any()  # nothing inside the square
    assert not edges[5:30, 5:300].any()  # nothing in the empty sky
    # the grey bar's edge (contrast 20) appears with low thresholds, not with the defaults (100, 200)
    bar = (slice(228, 252), slice(195, 305))
    assert P.preview("canny", picture, {"low": 5, "high": 10}).getchannel(0).crop((195, 228, 305, 252)).getbbox()
    assert not edges[bar].any()
    fewer = white(P.preview("canny", picture, {"low": 250, "high": 255}))
    assert fewer.sum() < edges.sum()


def test_canny_map_of_preprocess_still_works(picture):
    from studio.control.preprocess import canny_map

    edges = white(canny_map(picture, 100, 200))
    assert edges.shape == (256, 320) and 700 < edges.sum() < 3000


def test_none_is_the_picture_and_invert_is_255_minus_it(picture):
    x = np.asarray(picture)
    assert np.array_equal(np.asarray(P.preview("none", picture)), x)
    assert np.array_equal(np.asarray(P.preview("invert", picture)), 255 - x)


def test_threshold_makes_dark_strokes_white_and_its_threshold_matters(picture):
    auto = white(P.preview("threshold", picture))  # Otsu
    assert auto[210, 160] and auto[90, 90] and auto[120, 230]  # the line, the square, the circle
    assert not auto[10, 10] and not auto[240, 250]  # white paper, light grey bar
    low = white(P.preview("threshold", picture, {"threshold": 20}))  # only near-black is below 20
    assert low[210, 160] and not low[90, 90]
    assert low.sum() < auto.sum()


def test_lineart_standard_outlines_dark_on_light(picture):
    lines = np.asarray(P.preview("lineart_standard", picture))[..., 0]
    assert 800 < (lines > 64).sum() < 8000
    assert lines[210, 160] > 128  # the black line
    assert lines[90, 90] < 32 and lines[10, 10] < 32  # inside the square, the paper


def test_scribble_xdog_is_binary_and_a_higher_threshold_keeps_fewer_pixels(picture):
    m = np.asarray(P.preview("scribble_xdog", picture))
    assert set(np.unique(m)) <= {0, 255}
    counts = [white(P.preview("scribble_xdog", picture, {"threshold": t})).sum() for t in (8, 32, 64)]
    assert counts[0] > counts[1] > counts[2] > 300
    assert 800 < counts[1] < 10000


def test_shuffle_is_reproducible_for_a_seed_differs_for_another_and_leaves_numpy_alone(picture):
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    a = np.asarray(P.preview("shuffle", picture, {"seed": 7}))
    assert np.random.rand() == expected_next  # numpy's global generator is as it was
    b = np.asarray(P.preview("shuffle", picture, {"seed": 7}))
    c = np.asarray(P.preview("shuffle", picture, {"seed": 8}))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5
    assert np.abs(a.astype(int) - np.asarray(picture)).mean() > 5  # it is shuffled, not the picture


def test_tile_resample_downsamples_and_keeps_the_size(picture):
    x = np.asarray(picture).astype(int)
    assert np.array_equal(np.asarray(P.preview("tile_resample", picture, {"rate": 1.0})), x)
    out = np.asarray(P.preview("tile_resample", picture, {"rate": 4.0})).astype(int)
    assert out.shape == x.shape
    assert 1 < np.abs(out - x).mean() < 20  # blurred, yet the same picture

    def sharp_steps(a):  # neighbours differing by more than 100: what downsampling smooths away
        return (np.abs(np.diff(a, axis=1)) > 100).sum()

    assert sharp_steps(out) < 0.5 * sharp_steps(x)


def test_color_grid_is_constant_within_each_64_pixel_cell():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    grid = np.asarray(P.preview("t2ia_color_grid", noise, {"resolution": 256}))
    cells = grid.reshape(4, 64, 4, 64, 3)
    assert (cells == cells[:, :1, :, :1]).all()
    assert len({tuple(c) for c in grid[::64, ::64].reshape(-1, 3)}) > 8  # the cells differ


def test_a_weight_needing_preprocessor_offline_says_which_file_to_fetch_within_5_s(picture, tmp_path,
                                                                                   empty_hub_cache):
    start = time.monotonic()
    with pytest.raises(P.MissingWeights) as e:
        P.preview("openpose_full", picture, annotators_dir=tmp_path / "annotators")
    assert time.monotonic() - start < 5
    text = str(e.value)
    for needed in ("openpose_full", "lllyasviel/Annotators", "body_pose_model.pth", "hand_pose_model.pth",
                   "facenet.pth", str(tmp_path / "annotators"), "HF_HUB_OFFLINE",
                   "hf download lllyasviel/Annotators body_pose_model.pth hand_pose_model.pth facenet.pth"):
        assert needed in text
    with pytest.raises(P.MissingWeights, match="dpt_hybrid-midas-501f0c75.pt"):
        P.preview("depth_midas", picture, annotators_dir=tmp_path)
    with pytest.raises(P.MissingWeights, match="LiheYoung/depth-anything-large-hf .*model.safetensors"):
        P.preview("depth_anything", picture, annotators_dir=tmp_path)


def test_weight_files_are_found_in_the_annotators_folder_first(tmp_path, empty_hub_cache):
    for name in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"):
        (tmp_path / name).write_bytes(b"x")
    paths = P.weight_paths("openpose", tmp_path)
    assert paths == {n: tmp_path / n for n in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")}
    (tmp_path / "facenet.pth").unlink()
    with pytest.raises(P.MissingWeights) as e:
        P.weight_paths("openpose", tmp_path)
    assert "facenet.pth" in str(e.value) and "body_pose_model.pth" not in str(e.value)


def test_a_broken_weight_file_gives_a_clear_error_not_a_traceback(picture, tmp_path, empty_hub_cache):
    from studio.models.checkpoints import ModelLoadError

    (tmp_path / "mlsd_large_512_fp32.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"mlsd could not load its weights from .*mlsd_large_512_fp32\.pth"):
        P.preview("mlsd", picture, annotators_dir=tmp_path)


def test_every_entry_has_a_label_a_type_valid_defaults_and_its_files_named():
    for name in P.names():
        pre = P.get(name)
        assert pre.label and pre.control_type
        assert P.check_params(name, {}) == P.defaults(name)
        for weight in pre.weights:
            assert "/" in weight.repo and weight.filename
    assert {"openpose", "openpose_hand", "openpose_face", "openpose_full", "depth_midas", "depth_zoe",
            "depth_anything", "lineart_realistic", "lineart_coarse", "lineart_anime", "softedge_hed",
            "softedge_pidinet", "scribble_hed", "scribble_pidinet", "mlsd", "normal_bae"} <= set(P.names())
    assert not (set(P.names()) - WEIGHT_FREE) & set(P.offline_names())


def test_unknown_names_and_bad_params_are_refused():
    with pytest.raises(ValueError, match="unknown preprocessor 'cany'.*canny.*openpose"):
        P.check_params("cany", {})
    with pytest.raises(ValueError, match="canny has no parameter 'lo'; its parameters: resolution, low, high"):
        P.check_params("canny", {"lo": 10})
    with pytest.raises(ValueError, match="between 1 and 255, got 0"):
        P.check_params("canny", {"low": 0})
    with pytest.raises(ValueError, match="low threshold must not be above the high threshold"):
        P.check_params("canny", {"low": 200, "high": 100})
    with pytest.raises(ValueError, match="whole number"):
        P.check_params("canny", {"low": 10.5})
    with pytest.raises(ValueError, match="must be a number"):
        P.check_params("canny", {"low": True})
    with pytest.raises(ValueError, match="between 1 and 8"):
        P.check_params("tile_resample", {"rate": 9})
    with pytest.raises(ValueError, match="between 0.01 and 20"):
        P.check_params("mlsd", {"distance_threshold": 25})
    with pytest.raises(ValueError, match="between 64 and 2048"):
        P.check_params("scribble_xdog", {"resolution": 32})
    assert P.check_params("mlsd", {"value_threshold": 0.5}) == {"resolution": 512, "value_threshold": 0.5,
                                                                "distance_threshold": 0.1}
    with pytest.raises(ValueError, match="between 1 and 64"):
        P.preview("scribble_xdog", Image.new("RGB", (64, 64)), {"threshold": 100})


def test_the_command_writes_the_map(picture, tmp_path):
    from studio.cli import preprocess

    parser = argparse.ArgumentParser()
    preprocess.add_parser(parser.add_subparsers())
    src, out = tmp_path / "in.png", tmp_path / "map.png"
    picture.save(src)
    args = parser.parse_args(["preprocess", str(src), "--module", "invert", "--out", str(out)])
    assert preprocess.run(args) == 0
    assert np.array_equal(np.asarray(Image.open(out)), 255 - np.asarray(picture))
    args = parser.parse_args(["preprocess", str(src), "--module", "canny", "--out", str(out), "--param", "low=300"])
    with pytest.raises(ValueError, match="between 1 and 255"):
        preprocess.run(args)


def test_a_weight_needing_detector_loads_local_files_offline_and_gives_its_map(picture, tmp_path, empty_hub_cache):
    import torch
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    torch.manual_seed(0)
    torch.save(MobileV2_MLSD_Large().state_dict(), tmp_path / "mlsd_large_512_fp32.pth")  # random weights, real layout
    out = P.preview("mlsd", picture, {"resolution": 256}, annotators_dir=tmp_path)
    assert out.size == picture.size and out.mode == "RGB"
    assert set(np.unique(np.asarray(out))) <= {0, 255}


def test_a_weight_file_that_would_run_code_is_refused_unrun(picture, tmp_path, empty_hub_cache, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    (tmp_path / "mlsd_large_512_fp32.pth").write_bytes(pickle.dumps(Payload()))
    from studio.models.checkpoints import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"mlsd_large_512_fp32\.pth: refused .*asks to run Python code .*print"):
        P.preview("mlsd", picture, annotators_dir=tmp_path)
    assert "payload ran" not in capsys.readouterr().out


def test_depth_anything_loads_a_local_transformers_folder_offline(tmp_path, empty_hub_cache):
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16, neck_hidden_sizes=[8, 16, 32, 32],
                                 reassemble_hidden_size=32, head_hidden_size=8)
    folder = tmp_path / "depth-anything-large-hf"  # a tiny random model in the real model's folder layout
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    out = np.asarray(P.preview("depth_anything", img, {"resolution": 64}, annotators_dir=tmp_path))
    assert out.shape == (80, 100, 3)
    assert out.max() > out.min()  # a depth map, not a blank (random weights: its shape means nothing)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # grey, as A1111's
