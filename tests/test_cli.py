"""`python -m studio generate|info|convert`: same engine and files as the UI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


GEN = ["generate", "--model", "demo-tiny", "--prompt", "a green triangle", "--steps", "3", "--width", "64",
       "--height", "64", "--seed", "11"]


def test_generate_info_round_trip(home, tmp_path, capsys):
    code, out, err = run(capsys, *GEN, "--negative", "ugly", "--sampler", "DPM++ 2M Karras", "--cfg", "5",
                         "--batch-size", "2", "--out", str(tmp_path / "out"))
    assert code == 0, err
    paths = [Path(line) for line in out.split()]
    assert len(paths) == 2 and all(p.exists() and p.parent == tmp_path / "out" / p.parent.name for p in paths)
    code, out, err = run(capsys, "info", str(paths[1]))
    assert code == 0, err
    fields = json.loads(out)
    assert fields["prompt"] == "a green triangle" and fields["negative_prompt"] == "ugly"
    assert fields["sampler"] == "DPM++ 2M" and fields["schedule_type"] == "Karras"
    assert (fields["steps"], fields["cfg_scale"], fields["seed"]) == (3, 5.0, 12)
    assert (fields["width"], fields["height"]) == (64, 64)


def test_default_output_folder_is_outputs_date(home, capsys):
    code, out, _ = run(capsys, *GEN)
    assert code == 0
    path = Path(out.strip())
    assert path.parent.parent == home / "outputs"


@pytest.mark.parametrize("extra, message", [
    (["--width", "500"], "width must be a multiple of 8, got 500"),
    (["--steps", "0"], "steps must be between 1 and 150, got 0"),
    (["--sampler", "Eulr"], "unknown sampler 'Eulr'"),
])
def test_bad_input_exit_2_with_message(home, capsys, extra, message):
    code, out, err = run(capsys, *GEN, *extra)
    assert code == 2 and message in err and out == ""


def test_missing_and_corrupt_checkpoints(home, capsys):
    code, _, err = run(capsys, "generate", "--model", "missing.safetensors", "--prompt", "x", "--width", "64",
                       "--height", "64")
    assert code == 2 and "not found" in err and "demo-tiny" in err
    (home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models" / "broken.safetensors").write_bytes(os.urandom(300))
    code, _, err = run(capsys, "generate", "--model", "broken.safetensors", "--prompt", "x", "--width", "64",
                       "--height", "64")
    assert code == 2 and "broken.safetensors" in err


def test_convert_to_single_file_and_back(home, tmp_path, capsys):
    single = tmp_path / "tiny.safetensors"
    code, out, err = run(capsys, "convert", "--model", "demo-tiny", "--to", "single-file", "--out", str(single))
    assert code == 0 and single.exists(), err
    folder = tmp_path / "tiny-diffusers"
    code, out, err = run(capsys, "convert", "--model", str(single), "--to", "diffusers", "--out", str(folder))
    assert code == 0 and (folder / "model_index.json").exists(), err
    images = []
    for model in ("demo-tiny", str(single), str(folder)):
        code, out, err = run(capsys, *GEN[:2], model, *GEN[3:], "--out", str(tmp_path / model.replace("/", "_")))
        assert code == 0, err
        images.append(np.asarray(Image.open(out.strip())))
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


def test_help_documents_flags():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    for flag in ("--port", "--listen", "--model"):
        assert flag in out
    out = subprocess.run([sys.executable, "-m", "studio", "generate", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    for flag in ("--sampler", "--schedule", "--steps", "--cfg", "--seed", "--batch-size", "--out"):
        assert flag in out


def test_cli_uses_loras_and_embeddings_by_name(home, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    (home / "embeddings").mkdir(parents=True)
    (home / "loras").mkdir(parents=True)
    save_file({"emb_params": torch.ones(2, 32)}, str(home / "embeddings" / "glow.safetensors"))
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{layer}.lora_down.weight": torch.ones(2, 32), f"{layer}.lora_up.weight": torch.ones(32, 2),
               f"{layer}.alpha": torch.tensor(2.0)}, str(home / "loras" / "boost.safetensors"))
    code, out, err = run(capsys, "networks")
    assert code == 0, err
    listing = json.loads(out)
    assert [e["name"] for e in listing["embeddings"]] == ["glow"] and listing["loras"][0]["name"] == "boost"
    code, out, err = run(capsys, *GEN[:4], "glow <lora:boost:0.5>", *GEN[5:], "--out", str(tmp_path / "o"))
    assert code == 0, err
    code, info, err = run(capsys, "info", out.split()[0])
    extra = json.loads(info)["extra"]
    assert extra["Lora hashes"].startswith("boost: ") and extra["TI hashes"].startswith("glow: ")
    code, out, err = run(capsys, *GEN[:4], "a <lora:bost:1>", *GEN[5:])
    assert code == 2 and "close matches: boost" in err
