"""The metrics against hand-computed values on small fixed embeddings, prompt stripping, FID/KID on features,
the splitting of work over processes, folder evaluation and the `evaluate` command on tiny models."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.evaluate import metrics as M
from studio.evaluate.experiment import shard
from studio.evaluate.folders import EvaluateJob, evaluate_folders, read_prompts
from studio.generation.infotext import png_info

# two references and two generated images in 2-D; cos[r, g]:
#          g1=(1,0)  g2=(3,4)/5
#   r1=(1,0)   1.0      0.6      mean over g: 0.8   <- max over r: accuracy 0.8
#   r2=(0,2)   0.0      0.8      mean over g: 0.4
# the other order (max over r per image, then the mean) would give (1.0 + 0.8) / 2 = 0.9
REFS = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
GEN = torch.tensor([[2.0, 0.0], [3.0, 4.0]])


def test_clip_i_takes_the_mean_over_generated_then_the_max_over_references():
    assert M.cosine_matrix(REFS, GEN).flatten().tolist() == pytest.approx([1.0, 0.6, 0.0, 0.8])
    assert M.clip_i_accuracy(GEN, REFS) == pytest.approx(0.8)
    assert M.clip_i_accuracy(GEN, REFS) != pytest.approx(0.9)  # max-then-mean
    # one reference: just the mean over the generated images
    assert M.clip_i_accuracy(GEN, REFS[1:]) == pytest.approx(0.4)


def test_clip_t_is_the_mean_cosine_of_the_text_with_each_image():
    text = torch.tensor([0.0, 5.0])  # cos with g1 = 0, with g2 = 0.8
    assert M.clip_t(text, GEN) == pytest.approx(0.4)
    assert M.clip_t(torch.tensor([[1.0, 1.0]]), GEN[:1]) == pytest.approx(1 / math.sqrt(2))


def test_dino_is_the_mean_of_every_pairwise_cosine():
    assert M.dino_similarity(GEN, REFS) == pytest.approx((1.0 + 0.6 + 0.0 + 0.8) / 4)


def test_empty_sets_are_refused():
    with pytest.raises(ValueError, match="no generated"):
        M.clip_i_accuracy(torch.empty(0, 2), REFS)


@pytest.mark.parametrize("prompt,phrases,expected", [
    ("a naturalistic landscape in the style of Claude Monet", [], "a naturalistic landscape"),
    ("a city, in the style of monet-ti, at night", [], "a city, at night"),
    ("a house in the style of dots-lora <lora:dots-lora:0.8>", [], "a house"),
    ("a (red:1.3) city BREAK [dark] sky", [], "a red city dark sky"),
    ("a high-quality close shot picture of a man", ["close shot"], "a high-quality picture of a man"),
    ("a painting in the style of claude-monet-ti", [], ""),
])
def test_strip_style(prompt, phrases, expected):
    assert M.strip_style(prompt, phrases) == expected


def test_fid_matches_the_formula_on_one_feature():
    # real {0, 2}: mean 1, variance 2; fake {1, 5}: mean 3, variance 8 (unbiased, as torchmetrics computes them)
    # FID = (1 - 3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 6
    real, fake = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [5.0]])
    assert M.frechet_distance(real, fake) == pytest.approx(6.0, abs=1e-6)
    assert M.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(real[:1], fake)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g)
    same, _ = M.kernel_inception_distance(a, b, subsets=20)
    shifted, _ = M.kernel_inception_distance(a, b + 2, subsets=20)
    assert abs(same) < 0.05 < shifted


def test_fid_warning_when_there_are_few_images():
    warning = M.fid_warning(4, 8, 2048)
    assert "8 generated and 4 reference" in warning and "2048" in warning and "full rank" in warning
    assert M.fid_warning(5000, 5000, 2048) is None
    assert "full rank" not in M.fid_warning(100, 100, 32)


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (0, 2), (8, 1), (7, 7)])
def test_shard_splits_work_over_processes_like_accelerate(n, world):
    items = list(range(n))
    parts = [shard(items, r, world) for r in range(world)]
    assert [x for p in parts for x in p] == items  # every item once, in order
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        shard(items, world, world)


# --- folders --------------------------------------------------------------------------------------


def _images(folder: Path, n: int, seed: int, prompt: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        if prompt is None:
            image.save(folder / f"{i:02d}.png")
        else:  # with generation parameters, as the studio writes them
            text = f"{prompt} {i % 2}\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: {i}, Size: 64x64"
            image.save(folder / f"{i:02d}.png", pnginfo=png_info(text))
    return folder


def test_prompts_come_from_a_file_or_the_images(tmp_path):
    gen = _images(tmp_path / "gen", 4, 0, prompt="a cat in the style of x")
    paths = sorted(gen.glob("*.png"))
    assert read_prompts(paths) == ["a cat in the style of x 0", "a cat in the style of x 1"] * 2
    (tmp_path / "one.txt").write_text("a dog\n")
    assert read_prompts(paths, str(tmp_path / "one.txt")) == ["a dog"] * 4
    (tmp_path / "map.json").write_text(json.dumps({p.name: f"p{i}" for i, p in enumerate(paths)}))
    assert read_prompts(paths, str(tmp_path / "map.json")) == ["p0", "p1", "p2", "p3"]
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="3 prompts for 4 images"):
        read_prompts(paths, str(tmp_path / "three.txt"))


def test_folder_evaluation_groups_by_prompt_and_matches_the_metric_functions(tmp_path):
    from studio.dataset.clipscore import load_clip_scorer

    gen = _images(tmp_path / "gen", 4, 0, prompt="a cat in the style of x")
    ref = _images(tmp_path / "ref", 3, 1)
    cache = tmp_path / "cache"
    job = EvaluateJob(str(gen), str(ref), metrics=["clip-i", "clip-t", "dino", "fid", "kid"],
                      clip_model="demo-tiny", dino_model="demo-tiny", fid_features="demo-tiny", device="cpu")
    report = evaluate_folders(job, cache)
    assert [r["prompt"] for r in report["per_prompt"]] == ["a cat in the style of x 0", "a cat in the style of x 1"]
    assert [r["text"] for r in report["per_prompt"]] == ["a cat", "a cat"]
    assert [r["images"] for r in report["per_prompt"]] == [2, 2]
    # the same numbers straight from the metric functions
    clip = load_clip_scorer("demo-tiny", cache, "cpu")
    g = clip.image_embeddings([Image.open(p).convert("RGB") for p in sorted(gen.glob("*.png"))])
    r = clip.image_embeddings([Image.open(p).convert("RGB") for p in sorted(ref.glob("*.png"))])
    t = clip.text_embeddings(["a cat"])
    first = [0, 2]  # the images of prompt "... 0"
    assert report["per_prompt"][0]["clip_i"] == pytest.approx(M.clip_i_accuracy(g[first], r), abs=1e-5)
    assert report["per_prompt"][0]["clip_t"] == pytest.approx(M.clip_t(t[0], g[first]), abs=1e-5)
    expected_i = (M.clip_i_accuracy(g[first], r) + M.clip_i_accuracy(g[[1, 3]], r)) / 2
    assert report["metrics"]["clip_i"] == pytest.approx(expected_i, abs=1e-5)
    assert {"dino", "fid", "kid_mean", "kid_std"} <= set(report["metrics"])
    assert any("not reliable" in w for w in report["warnings"])  # 4 images are far too few for FID
    # every score from a demo-tiny encoder says its weights are random (issue 28: CLIP-I 0.96 meant nothing)
    demo = [w for w in report["warnings"] if "demo-tiny" in w]
    assert len(demo) == 3 and all("random weights" in w for w in demo)
    assert any(w.startswith("CLIP-I and CLIP-T") for w in demo) and any(w.startswith("FID and KID") for w in demo)


def test_evaluation_refuses_what_it_cannot_do(tmp_path):
    gen = _images(tmp_path / "gen", 2, 0)
    with pytest.raises(ValueError, match="clip-i.*reference"):
        EvaluateJob(str(gen), metrics=["clip-i"]).validate()
    with pytest.raises(ValueError, match="metrics must be some of"):
        EvaluateJob(str(gen), metrics=["clip-x"]).validate()
    with pytest.raises(ValueError, match="CLIP-T needs each image's prompt"):
        evaluate_folders(EvaluateJob(str(gen), metrics=["clip-t"], clip_model="demo-tiny", device="cpu"),
                         tmp_path / "cache")


def test_evaluate_command_on_tiny_models(tmp_path, monkeypatch, capsys):
    from studio.cli import main

    gen = _images(tmp_path / "gen", 3, 0)
    ref = _images(tmp_path / "ref", 3, 1)
    (tmp_path / "prompts.txt").write_text("a harbour at dawn, in the style of sks\n")
    out = tmp_path / "report.json"
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    code = main(["evaluate", "--generated", str(gen), "--references", str(ref), "--prompts",
                 str(tmp_path / "prompts.txt"), "--metrics", "clip-i,clip-t,fid", "--clip-model", "demo-tiny",
                 "--fid-features", "demo-tiny", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"clip_i", "clip_t", "fid"}
    assert report["per_prompt"][0]["text"] == "a harbour at dawn"
    assert "clip_i\t" in printed.out and "warning: FID from 3 generated" in printed.err
    assert main(["evaluate", "--generated", str(gen), "--metrics", "dino", "--out", str(out)]) == 2
    assert "error: dino compare with reference images" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_inception_weights_are_read_safely_and_never_fetched_offline(tmp_path, monkeypatch):
    import pickle

    from studio.evaluate.encoders import EncoderLoadError, inception_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(EncoderLoadError, match="offline.*weights-inception-2015-12-05"):
        inception_weights("", tmp_path / "cache")
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(EncoderLoadError, match="could not read Inception weights"):
        inception_weights(str(evil), tmp_path / "cache")
    good = tmp_path / "good.pth"
    torch.save({"fc.weight": torch.ones(2, 2)}, good)
    copy = inception_weights(str(good), tmp_path / "cache")
    assert torch.load(copy, weights_only=True)["fc.weight"].sum() == 4
    assert inception_weights(str(good), tmp_path / "cache") == copy  # converted once
