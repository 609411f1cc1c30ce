"""Names resolve inside their folder and nowhere else; models/ is listed as the dropdown shows it."""

import os

import pytest

from studio.files.hashes import sha256_file
from studio.files.names import UnsafeNameError, safe_child
from studio.models.listing import list_models


@pytest.mark.parametrize("name", [
    "../secret", "a/../../secret", "..\\..\\secret", "/etc/passwd", "\\\\server\\share", "C:\\x.safetensors",
    "c:x", "x\x00.safetensors", "", "   ",
])
def test_safe_child_refuses_escapes(tmp_path, name):
    with pytest.raises(UnsafeNameError):
        safe_child(tmp_path, name)


def test_safe_child_refuses_symlink_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    base = tmp_path / "models"
    base.mkdir()
    os.symlink(outside, base / "link")
    with pytest.raises(UnsafeNameError, match="outside"):
        safe_child(base, "link/file.safetensors")


def test_safe_child_accepts_nested_names(tmp_path):
    assert safe_child(tmp_path, "sub/model.safetensors") == (tmp_path / "sub" / "model.safetensors").resolve()
    assert safe_child(tmp_path, "sub\\model.ckpt") == (tmp_path / "sub" / "model.ckpt").resolve()


def test_list_models(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    pipe = tmp_path / "my-diffusers"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (tmp_path / ".hidden.safetensors").write_bytes(b"x")
    entries = {e.name: e.kind for e in list_models(tmp_path)}
    assert entries == {"a.safetensors": "single-file", "sub/b.ckpt": "single-file", "my-diffusers": "diffusers"}


def test_sha256_cached_and_invalidated(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"abc")
    cache = tmp_path / "hashes.json"
    h = sha256_file(f, cache)
    assert h == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert cache.exists()
    f.write_bytes(b"abcd")  # size changes: the cache must not answer with the old hash
    assert sha256_file(f, cache) != h
