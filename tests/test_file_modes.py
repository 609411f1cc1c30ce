"""Finished files get the mode an ordinary write would give (0o666 / 0o777 less the umask), not tempfile's 0o600:
images, presets, embeddings, LoRAs and atomic folders stay readable by other accounts, file servers and backups."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from studio.files.atomic import atomic_dir, atomic_path, write_text
from studio.files.networks import LoraLayer, save_embedding, save_kohya_lora
from studio.generation.generate import save_png


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_everything(folder):
    save_png(Image.new("RGB", (8, 8), "red"), "a red square\nSteps: 2", folder / "image.png")
    write_text(folder / "preset.json", "{}")
    save_embedding(folder / "emb.safetensors", torch.zeros(1, 8), name="emb")
    layer = LoraLayer(down=torch.zeros(2, 8), up=torch.zeros(8, 2), alpha=2.0)
    save_kohya_lora(folder / "lora.safetensors", {"lora_unet_x": layer})
    with atomic_path(folder / "blob.bin") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(folder / "checkpoint") as tmp:
        (tmp / "state.txt").write_text("1")
    return ["image.png", "preset.json", "emb.safetensors", "lora.safetensors", "blob.bin", "checkpoint/state.txt"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    with umask(mask):
        files = write_everything(tmp_path)
    for name in files:
        assert mode(tmp_path / name) == 0o666 & ~mask, (name, oct(mode(tmp_path / name)))
    assert mode(tmp_path / "checkpoint") == 0o777 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
