"""Files shared with A1111, kohya and ComfyUI carry the hashes those tools expect: a LoRA's `sshs_model_hash` is
its own hash (kohya's definition), which A1111 writes in `Lora hashes`; the base model stays in `ss_*_model_hash`."""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from test_train_lora import NAME, lora_job
from test_train_ti import home_cfg

from studio.files.networks import LoraFile, LoraLayer, NetworkLibrary, save_kohya_lora
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager
from studio.train.loop import Trainer


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _tensor_bytes_sha256(path) -> str:
    """SHA-256 of a safetensors file's bytes after its header (A1111's and sd-webui-additional-networks' hash)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def _kohya_legacy_hash(path) -> str:
    """kohya's sshs_legacy_hash: the file re-serialized with its ss_* metadata only, 64 KiB at 1 MiB, 8 digits."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        meta = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("ss_")}
    return hashlib.sha256(save(tensors, meta)[0x100000:0x110000]).hexdigest()[:8]


def _big_lora(path, seed: int, extra: dict | None = None):
    """A LoRA over 1 MiB (so the legacy hash reads real bytes), with kohya metadata."""
    g = torch.Generator().manual_seed(seed)
    layers = {f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{n}":
              LoraLayer(down=torch.randn(64, 1024, generator=g), up=torch.randn(1024, 64, generator=g), alpha=8.0)
              for n in ("q", "k", "v")}
    return save_kohya_lora(path, layers, metadata={"ss_output_name": path.stem, "ss_network_dim": "64",
                                                   "ss_sd_model_hash": "0123456789", **(extra or {})},
                           dtype=torch.float32)


def test_written_lora_carries_its_own_kohya_hashes(tmp_path):
    a = _big_lora(tmp_path / "a.safetensors", 0, {"modelspec.title": "A"})
    b = _big_lora(tmp_path / "b.safetensors", 1)
    assert a.stat().st_size > 0x110000
    for path in (a, b):
        meta = _metadata(path)
        assert meta["sshs_model_hash"] == _tensor_bytes_sha256(path)
        assert meta["sshs_legacy_hash"] == _kohya_legacy_hash(path)
        assert meta["ss_sd_model_hash"] == "0123456789"  # the base model's, untouched
    assert _metadata(a)["sshs_model_hash"] != _metadata(b)["sshs_model_hash"]  # same base, two LoRAs, two hashes


def test_lora_hash_is_what_a1111_writes(tmp_path):
    """A1111 takes `sshs_model_hash` when a file has it, else hashes the tensor bytes; 12 digits either way."""
    ours = _big_lora(tmp_path / "ours.safetensors", 2)
    assert LoraFile("ours", ours, _metadata(ours)).hash == _tensor_bytes_sha256(ours)[:12]
    plain = tmp_path / "plain.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              str(plain))
    assert LoraFile("plain", plain, {}).hash == _tensor_bytes_sha256(plain)[:12]
    claimed = "ABCDEF0123456789" + "0" * 48  # a file whose stored hash is not its bytes': A1111 believes the file
    assert LoraFile("plain", plain, {"sshs_model_hash": claimed}).hash == claimed[:12].lower()


def test_trained_lora_keeps_the_base_model_apart_and_infotext_names_its_own_hash(tmp_path):
    cfg = home_cfg(tmp_path)
    result = Trainer(cfg).start(lora_job(max_steps=2, save_every=100))
    assert result.state == "finished", result.message
    path = cfg.loras_dir / f"{NAME}.safetensors"
    meta = _metadata(path)
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    assert meta["sshs_model_hash"] == _tensor_bytes_sha256(path)
    assert meta["sshs_legacy_hash"] == _kohya_legacy_hash(path)
    assert meta["ss_new_sd_model_hash"] != meta["sshs_model_hash"]
    assert meta["ss_sd_model_hash"] == meta["ss_new_sd_model_hash"][:10]
    job = GenerateJob(prompt=f"a harbour <lora:{NAME}:0.7>", steps=2, width=64, height=64, seed=1)
    infotext = Generator(manager).run(job).images[0].infotext
    assert parse_infotext(infotext)["Lora hashes"] == f"{NAME}: {meta['sshs_model_hash'][:12]}"
    lib = NetworkLibrary(cfg.loras_dir, cfg.embeddings_dir)
    assert lib.find_lora_by_hash(meta["sshs_model_hash"][:12]).name == NAME
