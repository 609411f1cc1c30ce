"""Files shared with A1111, kohya and ComfyUI carry the hashes those tools expect: a LoRA's `sshs_model_hash` is
its own hash (kohya's definition), which A1111 writes in `Lora hashes`; the base model stays in `ss_*_model_hash`."""

from __future__ import annotations

import hashlib

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from test_train_lora import NAME, lora_job
from test_train_ti import home_cfg

from studio.files.networks import LoraFile, LoraLayer, NetworkLibrary, lora_card, save_kohya_lora
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


def _te_lora(path, te_prefix: str, extra_layers: dict | None = None):
    """A kohya LoRA on demo-tiny's first text-encoder layer's q/v projections, with `te_prefix` naming."""
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for proj in ("q_proj", "v_proj"):
        base = f"{te_prefix}encoder_layers_0_self_attn_{proj}"
        tensors[f"{base}.lora_down.weight"] = torch.randn(2, 32, generator=g) * 3
        tensors[f"{base}.lora_up.weight"] = torch.randn(32, 2, generator=g) * 3
        tensors[f"{base}.alpha"] = torch.tensor(2.0)
    tensors.update(extra_layers or {})
    save_file(tensors, str(path), metadata={"ss_output_name": path.stem})  # kohya's alias, as trainers write it


def test_text_encoder_keys_in_either_naming_apply_and_unmatched_layers_are_told(tmp_path):
    cfg = home_cfg(tmp_path)
    cfg.loras_dir.mkdir(parents=True, exist_ok=True)
    _te_lora(cfg.loras_dir / "classic.safetensors", "lora_te_text_model_")
    _te_lora(cfg.loras_dir / "tf5.safetensors", "lora_te_")  # transformers 5's names: no text_model
    stray = {"lora_unet_no_such_block.lora_down.weight": torch.ones(2, 8),
             "lora_unet_no_such_block.lora_up.weight": torch.ones(8, 2)}
    _te_lora(cfg.loras_dir / "partly.safetensors", "lora_te_text_model_", stray)
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    gen = Generator(manager)

    def run(prompt):
        result = gen.run(GenerateJob(prompt=prompt, steps=2, width=64, height=64, seed=3))
        return torch.tensor(list(result.images[0].image.getdata())).float(), result.notes

    base, _ = run("a harbour")
    classic, notes_classic = run("a harbour <lora:classic:1>")
    tf5, notes_tf5 = run("a harbour <lora:tf5:1>")
    assert (classic - base).abs().mean() > 1  # the text-encoder LoRA changes the image
    assert torch.equal(classic, tf5)  # both namings reach the same layers
    assert not notes_classic and not notes_tf5
    _, notes = run("a harbour <lora:partly:1>")
    assert any("LoRA partly: 1 of its layers match nothing" in n and "lora_unet_no_such_block" in n for n in notes)


def test_infotext_says_rng_cpu_and_a_pasted_gpu_seed_is_flagged(tmp_path):
    from studio.generation.infotext import rng_note

    cfg = home_cfg(tmp_path)
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    infotext = Generator(manager).run(GenerateJob(prompt="a cat", steps=1, width=64, height=64, seed=1)).images[0].infotext
    parsed = parse_infotext(infotext)
    assert parsed["RNG"] == "CPU" and rng_note(parsed) is None
    a1111 = parse_infotext("a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x512, Version: v1.10.1")
    assert "GPU" in rng_note(a1111) and "different image" in rng_note(a1111)
    assert "RNG: NV" in rng_note(parse_infotext("a cat\nSteps: 20, Seed: 1, RNG: NV"))
    assert rng_note(parse_infotext("a cat\nSteps: 20, Seed: 1, RNG: CPU")) is None


def test_unknown_lora_lists_each_available_name_once(tmp_path):
    from studio.files.networks import UnknownNetworkError

    cfg = home_cfg(tmp_path)
    cfg.loras_dir.mkdir(parents=True, exist_ok=True)
    for name in ("plusl", "zeta"):
        _te_lora(cfg.loras_dir / f"{name}.safetensors", "lora_te_text_model_")
    lib = NetworkLibrary(cfg.loras_dir, cfg.embeddings_dir)
    try:
        lib.find_lora("qqqqqqqq")
    except UnknownNetworkError as e:
        message = str(e)
    assert "available: plusl, zeta" in message and message.count("plusl") == 1


# --- card pictures and A1111's user metadata -------------------------------------------------------------------


def test_card_reads_a1111_user_metadata_and_pictures_in_a1111s_order(tmp_path):
    import json

    from PIL import Image

    from studio.files.networks import preview_image, user_metadata
    from studio.ui.networks_panel import card_picture, insert_tag, lora_insertion

    path = _big_lora(tmp_path / "inkwash.safetensors", 3)
    (tmp_path / "inkwash.json").write_text(json.dumps({
        "description": "ink wash style", "sd version": "SD1", "activation text": "inkwash style, monochrome",
        "preferred weight": 0.6, "notes": "works best at CFG 5"}), encoding="utf-8")
    meta = user_metadata(path)
    assert meta == {"description": "ink wash style", "sd version": "SD1",
                    "activation text": "inkwash style, monochrome", "preferred weight": 0.6,
                    "notes": "works best at CFG 5"}
    card = {**lora_card(LoraFile("inkwash", path, {})), "path": str(path)}
    assert card["activation text"] == "inkwash style, monochrome" and card["preferred weight"] == 0.6
    tag, activation = lora_insertion(card, 1.0)
    assert tag == "<lora:inkwash:0.6>"
    assert insert_tag("a harbour", tag, activation) == "a harbour <lora:inkwash:0.6> inkwash style, monochrome"
    assert insert_tag("a harbour <lora:inkwash:0.6>", tag, "") == "a harbour <lora:inkwash:0.6>"
    # A1111's order: name.png before name.preview.png, png before jpg
    assert preview_image(path) is None
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "inkwash.preview.jpg")
    assert preview_image(path).name == "inkwash.preview.jpg"
    Image.new("RGB", (8, 8), "red").save(tmp_path / "inkwash.preview.png")
    assert preview_image(path).name == "inkwash.preview.png"
    Image.new("RGB", (8, 8), "green").save(tmp_path / "inkwash.png")
    assert preview_image(path).name == "inkwash.png"
    assert card_picture(preview_image(path), "inkwash").getpixel((0, 0)) == (0, 128, 0)
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    assert user_metadata(tmp_path / "broken.safetensors") == {}


def test_last_generated_image_becomes_the_card_picture_and_training_writes_one(tmp_path):
    from PIL import Image

    from studio.files.networks import preview_image
    from studio.ui.networks_panel import use_last_image

    cfg = home_cfg(tmp_path)
    result = Trainer(cfg).start(lora_job(max_steps=2, save_every=100, preview_every=2))
    assert result.state == "finished", result.message
    lora = cfg.loras_dir / f"{NAME}.safetensors"
    written = preview_image(lora)
    assert written is not None and written.name == f"{NAME}.preview.png"  # the trainer's last preview
    last_preview = sorted((result.run_dir / "previews").glob("*.png"))[-1]
    assert Image.open(written).tobytes() == Image.open(last_preview).convert("RGB").tobytes()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    out = Generator(manager).run(GenerateJob(prompt="a red square", steps=1, width=64, height=64, seed=4),
                                 outputs_dir=cfg.outputs_dir)
    message = use_last_image({"name": NAME, "path": str(lora)}, cfg.outputs_dir)
    assert NAME in message
    assert Image.open(written).tobytes() == out.images[0].image.convert("RGB").tobytes()
