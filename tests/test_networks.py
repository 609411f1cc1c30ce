"""LoRAs and embeddings from shared files: found by name in prompts, formats of A1111/kohya/diffusers, safe loading,
A1111 hashes in the infotext, and files the studio writes loading in diffusers' own loaders."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.files.networks import (
    LoraLayer,
    NetworkFileError,
    NetworkLibrary,
    UnknownNetworkError,
    kohya_metadata,
    load_embedding,
    lora_card,
    lora_hash,
    peft_to_layers,
    save_embedding,
    save_kohya_lora,
)
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager
from studio.models.tiny import build_tiny_pipeline

# --- files made by test code with plain torch / safetensors, the way kohya and A1111 write them ---


def _kohya_layer_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def make_kohya_lora(pipe, seed: int, rank: int = 4, alpha: float = 2.0, te: bool = True, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    out = {}

    def add(name, module):
        out[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * scale
        out[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
        out[f"{name}.alpha"] = torch.tensor(alpha)

    for path, module in pipe.unet.named_modules():
        if path.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                          "attn2.to_v", "attn2.to_out.0")):
            add(_kohya_layer_name("lora_unet_", path), module)
    if te:
        for path, module in pipe.text_encoder.named_modules():
            if path.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                # kohya names the text encoder layers after the classic text_model.* layout
                add(_kohya_layer_name("lora_te_text_model_", path), module)
    return {k: v.to(torch.float16) for k, v in out.items()}


def make_a1111_pt_embedding(path: Path, vectors: torch.Tensor):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem,
                "step": 500, "sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "demo"}, path)


class Payload:
    """Unpickling this would create a file: the marker of code having run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    pipe = manager.current.pipe
    save_file(make_kohya_lora(pipe, 1), str(cfg.loras_dir / "inkwash.safetensors"),
              metadata={"ss_output_name": "ink_wash_style", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                        "ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": "ink wash"})
    (cfg.loras_dir / "styles").mkdir()
    save_file(make_kohya_lora(pipe, 2, te=False), str(cfg.loras_dir / "styles" / "paperfold.safetensors"))
    width = pipe.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(3)
    make_a1111_pt_embedding(cfg.embeddings_dir / "monet-style.pt", torch.randn(2, width, generator=g))
    save_file({"emb_params": torch.randn(1, width, generator=g)}, str(cfg.embeddings_dir / "kohya-emb.safetensors"))
    save_file({"<diff>": torch.randn(width, generator=g)}, str(cfg.embeddings_dir / "diff-emb.safetensors"))
    save_file({"emb_params": torch.randn(1, 768, generator=g)}, str(cfg.embeddings_dir / "sd15-only.safetensors"))
    return Generator(manager), cfg


def job(prompt="a lighthouse", **kw):
    base = dict(prompt=prompt, negative_prompt="", steps=3, width=64, height=64, seed=7, sampler="Euler",
                schedule="Automatic")
    base.update(kw)
    return GenerateJob(**base)


def image(gen, j) -> np.ndarray:
    return np.asarray(gen.run(j).images[0].image).astype(np.int16)


def test_kohya_lora_by_name_changes_image_and_weight_zero_is_base(studio):
    gen, _ = studio
    base = image(gen, job())
    with_lora = image(gen, job("a lighthouse <lora:inkwash:1>"))
    assert np.abs(with_lora - base).max() > 10
    assert np.array_equal(image(gen, job("a lighthouse <lora:inkwash:0>")), base)
    # removing the tag leaves no trace on the model
    assert np.array_equal(image(gen, job()), base)
    # the tag never reaches the text encoder: weight 0 on everything equals the prompt without the tag
    assert np.array_equal(image(gen, job("a lighthouse<lora:inkwash:0:0>")), base)


def test_lora_alias_subfolder_and_negative_weight(studio):
    gen, _ = studio
    base = image(gen, job())
    by_alias = image(gen, job("a lighthouse <lora:ink_wash_style:0.8>"))
    by_stem = image(gen, job("a lighthouse <lora:inkwash:0.8>"))
    assert np.array_equal(by_alias, by_stem)
    negative = image(gen, job("a lighthouse <lora:paperfold:-1>"))  # found in loras/styles/
    positive = image(gen, job("a lighthouse <lora:paperfold:1>"))
    assert np.abs(negative - base).max() > 0 and np.abs(negative - positive).max() > 0  # the sign is kept


def test_text_encoder_and_unet_weights_are_separate(studio):
    gen, _ = studio
    base = image(gen, job())
    te_only = image(gen, job("a lighthouse <lora:inkwash:1:0>"))
    unet_only = image(gen, job("a lighthouse <lora:inkwash:unet=1:te=0>"))
    both = image(gen, job("a lighthouse <lora:inkwash:1>"))
    assert np.abs(te_only - base).max() > 0 and np.abs(unet_only - base).max() > 0
    assert not np.array_equal(te_only, unet_only) and not np.array_equal(both, unet_only)
    assert np.array_equal(image(gen, job("a lighthouse <lora:inkwash:te=0:unet=1>")), unet_only)


def test_two_loras_add_their_deltas_and_removal_restores_bit_for_bit(studio):
    """Active LoRAs are merged into the base weights: W = W0 + 0.7·ΔA + 0.4·ΔB; removing them gives W0 exactly."""
    from studio.files.adapters import ActiveLora

    gen, _ = studio
    model = gen.manager.current
    slot = model.loras()
    ink, paper = gen.networks.find_lora("inkwash"), gen.networks.find_lora("paperfold")
    layer = dict(model.pipe.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    te_layer = dict(model.pipe.text_encoder.named_modules())["encoder.layers.0.self_attn.q_proj"]

    def weight(active):
        slot.apply(active)
        return layer.get_base_layer().weight.detach().clone(), te_layer.get_base_layer().weight.detach().clone()

    w0, t0 = weight([])
    wa, ta = weight([ActiveLora(ink, 1.0, 1.0)])
    wb, tb = weight([ActiveLora(paper, 1.0, 1.0)])
    w, t = weight([ActiveLora(ink, 0.7, 0.7), ActiveLora(paper, 0.4, 0.4)])
    assert torch.allclose(w, w0 + 0.7 * (wa - w0) + 0.4 * (wb - w0), atol=1e-6)
    assert not torch.allclose(w, w0, atol=1e-4)
    assert torch.allclose(t, t0 + 0.7 * (ta - t0), atol=1e-6) and torch.equal(tb, t0)  # paperfold: UNet only
    w_after, t_after = weight([])
    assert torch.equal(w_after, w0) and torch.equal(t_after, t0)
    # the UNet weight alone moves with unet=, the text encoder's with te=
    w_u, t_u = weight([ActiveLora(ink, 0.0, 1.0)])
    assert torch.equal(w_u, wa) and torch.equal(t_u, t0)
    weight([])


def test_unknown_lora_lists_close_matches_and_bad_weight_is_quoted(studio):
    gen, _ = studio
    with pytest.raises(UnknownNetworkError, match="close matches: inkwash"):
        gen.run(job("a <lora:inkwsh:1>"))
    with pytest.raises(ValueError, match="'abc'"):
        gen.run(job("a <lora:inkwash:abc>"))
    with pytest.raises(UnknownNetworkError):
        gen.run(job("a <lora:../../etc/passwd:1>"))  # names are looked up, never joined onto a path


def test_embeddings_by_file_stem_in_every_format(studio):
    gen, cfg = studio
    base = image(gen, job("a painting"))
    for name in ("monet-style", "kohya-emb", "diff-emb"):
        assert np.abs(image(gen, job(f"a painting by {name}")) - base).max() > 0, name
    # the negative prompt uses embeddings too
    assert np.abs(image(gen, job("a painting", negative_prompt="monet-style")) - base).max() > 0
    scan = gen.networks.embeddings(widths=gen.manager.current.pipe.text_encoder.config.hidden_size)
    assert set(scan.found) == {"monet-style", "kohya-emb", "diff-emb"}
    assert scan.found["monet-style"].vectors.shape[0] == 2  # multi-vector
    assert "made for SD 1.x models (width 768): it does not fit" in scan.skipped["sd15-only.safetensors"]


def test_infotext_records_a1111_hashes_and_reads_back(studio):
    gen, cfg = studio
    result = gen.run(job("a lighthouse by monet-style <lora:inkwash:0.6>", negative_prompt="kohya-emb"),
                     outputs_dir=cfg.outputs_dir)
    text = read_image_infotext(result.images[0].path)
    parsed = parse_infotext(text)
    lora_file = cfg.loras_dir / "inkwash.safetensors"
    raw = lora_file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert parsed["Lora hashes"] == f"inkwash: {hashlib.sha256(raw[8 + n:]).hexdigest()[:12]}"
    emb_hashes = {name: hashlib.sha256((cfg.embeddings_dir / f).read_bytes()).hexdigest()[:12]
                  for name, f in (("monet-style", "monet-style.pt"), ("kohya-emb", "kohya-emb.safetensors"))}
    assert parsed["TI hashes"] == ", ".join(f"{k}: {v}" for k, v in emb_hashes.items())
    # the prompt keeps its tag, so pasting the PNG back restores the LoRA
    assert parsed["prompt"] == "a lighthouse by monet-style <lora:inkwash:0.6>"
    assert '"inkwash: ' in text  # the value is quoted, as A1111 writes it


def test_hostile_pickles_never_run_and_are_listed(studio, tmp_path):
    gen, cfg = studio
    marker = tmp_path / "pwned"
    for folder, name in ((cfg.embeddings_dir, "evil.pt"), (cfg.loras_dir, "evil.ckpt"), (cfg.loras_dir, "evil2.pt")):
        torch.save({"string_to_param": {"*": Payload(str(marker))}}, folder / name)
    try:
        emb_scan = gen.networks.embeddings()
        lora_scan = gen.networks.loras()
        assert "refused" in emb_scan.skipped["evil.pt"] and "safetensors" in emb_scan.skipped["evil.pt"]
        assert "refused" in lora_scan.skipped["evil.ckpt"]
        with pytest.raises(UnknownNetworkError, match="skipped: refused"):
            gen.run(job("a <lora:evil2:1>"))
        # the rest of the folders still work
        assert "inkwash" in lora_scan.found and "monet-style" in emb_scan.found
        gen.run(job("monet-style <lora:inkwash:0.5>"))
        assert not marker.exists()
    finally:
        for p in (cfg.embeddings_dir / "evil.pt", cfg.loras_dir / "evil.ckpt", cfg.loras_dir / "evil2.pt"):
            p.unlink()


def test_lora_cards_show_metadata(studio):
    gen, cfg = studio
    card = lora_card(gen.networks.find_lora("inkwash"))
    assert card["rank"] == "4" and card["alpha"] == "2.0" and card["base model"] == "sd_v1"
    assert card["trigger words"] == "ink wash"
    bare = lora_card(gen.networks.find_lora("paperfold"))
    assert bare["rank"] == "4"  # read from the tensor shapes when metadata is absent


def test_bad_files_are_skipped_with_reasons(studio):
    gen, cfg = studio
    (cfg.embeddings_dir / "empty.safetensors").write_bytes(b"")
    (cfg.embeddings_dir / "junk.pt").write_bytes(b"not a pickle at all")
    (cfg.loras_dir / "notalora.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(cfg.embeddings_dir / "xl.safetensors"))
    try:
        skipped = gen.networks.embeddings().skipped
        assert "empty" in skipped["empty.safetensors"]
        assert "not a readable" in skipped["junk.pt"]
        # an SDXL embedding is readable; against this SD 1.x-layout model it is skipped, naming its family
        assert "xl.safetensors" not in skipped
        assert "made for SDXL models" in gen.networks.embeddings(widths=(32,)).skipped["xl.safetensors"]
        assert "notalora.safetensors" in gen.networks.loras().skipped
        assert np.asarray(gen.run(job("a junk")).images[0].image).shape == (64, 64, 3)
    finally:
        for p in ("empty.safetensors", "junk.pt", "xl.safetensors"):
            (cfg.embeddings_dir / p).unlink()
        (cfg.loras_dir / "notalora.safetensors").unlink()


# --- files the studio writes, read by diffusers' own loaders ---


def _diffusers_image(pipe, prompt, **kw):
    out = pipe(prompt, negative_prompt="", num_inference_steps=3, width=64, height=64, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(7), output_type="np", **kw)
    return (out.images[0] * 255).round().astype(np.int16)


def test_written_embedding_loads_in_diffusers_and_a1111_layouts(studio, tmp_path):
    gen, cfg = studio
    model = gen.manager.current
    vectors = torch.randn(3, model.pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(9))
    paths = {fmt: save_embedding(tmp_path / f"{fmt}" / "oilpaint.safetensors" if fmt != "a1111-pt"
                                 else tmp_path / fmt / "oilpaint.pt", vectors, "oilpaint", fmt=fmt, step=100)
             for fmt in ("a1111", "diffusers", "a1111-pt")}
    for path in paths.values():
        assert torch.equal(load_embedding(path).vectors, vectors)
    # the a1111 .pt is plain data: loadable with weights_only
    assert torch.equal(torch.load(paths["a1111-pt"], weights_only=True)["string_to_param"]["*"], vectors)

    save_embedding(cfg.embeddings_dir / "oilpaint.safetensors", vectors, fmt="a1111")
    try:
        ours = np.asarray(gen.run(job("a harbour by oilpaint", sampler="DPM++ 2M", schedule="Karras"))
                          .images[0].image).astype(np.int16)
    finally:
        (cfg.embeddings_dir / "oilpaint.safetensors").unlink()
    for fmt in ("a1111", "diffusers"):
        pipe = build_tiny_pipeline("sd1")
        from studio.generation.samplers import make_scheduler

        pipe.scheduler = make_scheduler("DPM++ 2M", "Karras", dict(pipe.scheduler.config))
        kwargs = {"token": "oilpaint"} if fmt == "a1111" else {}
        pipe.load_textual_inversion(str(paths[fmt]), **kwargs)
        theirs = _diffusers_image(pipe, "a harbour by oilpaint")
        assert np.abs(theirs - ours).max() <= 1, fmt


def test_written_kohya_lora_loads_in_diffusers_with_same_image(studio, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict

    gen, cfg = studio
    # a peft LoRA as training will produce it, with random non-zero weights
    trained = build_tiny_pipeline("sd1")  # the same weights as demo-tiny, without the adapters other tests loaded
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                        init_lora_weights=False))
    trained.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "out_proj"],
                                                init_lora_weights=False))
    unet_layers = peft_to_layers(get_peft_model_state_dict(trained.unet), 8)
    te_layers = peft_to_layers(get_peft_model_state_dict(trained.text_encoder), 4)
    meta = kohya_metadata(output_name="studio_style", family="sd1", rank=4, alpha=8, steps=100)
    out = save_kohya_lora(cfg.loras_dir / "studio_style.safetensors", unet_layers, te_layers, meta,
                          dtype=torch.float32)
    try:
        ours = image(gen, job("a harbour <lora:studio_style:1>", sampler="DPM++ 2M", schedule="Karras"))
        # the peft model itself (what was trained) gives the same image
        trained.scheduler = __import__("studio.generation.samplers").generation.samplers.make_scheduler(
            "DPM++ 2M", "Karras", dict(trained.scheduler.config))
        assert np.abs(_diffusers_image(trained, "a harbour") - ours).max() <= 1
        # diffusers' own loader reads our kohya file
        pipe = build_tiny_pipeline("sd1")
        pipe.scheduler = trained.scheduler
        pipe.load_lora_weights(str(out))
        assert np.abs(_diffusers_image(pipe, "a harbour") - ours).max() <= 1
        assert json.loads(json.dumps(lora_card(gen.networks.find_lora("studio_style"))))["rank"] == "4"
    finally:
        out.unlink()


def test_save_kohya_lora_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match="rank"):
        save_kohya_lora(tmp_path / "x.safetensors", {"a.b": LoraLayer(torch.zeros(4, 8), torch.zeros(8, 2), 4)})
    with pytest.raises(ValueError, match="at least one"):
        save_kohya_lora(tmp_path / "x.safetensors")


def test_lora_hash_is_over_tensor_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 2)}
    save_file(tensors, str(a), metadata={"ss_output_name": "one"})
    save_file(tensors, str(b), metadata={"ss_output_name": "another name entirely"})
    assert lora_hash(a) == lora_hash(b)  # metadata edits do not change the hash, as in A1111


def test_library_ignores_symlinks_leaving_the_folder(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(outside))
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "sneaky.safetensors").symlink_to(outside)
    lib = NetworkLibrary(tmp_path / "loras", tmp_path / "emb")
    assert lib.embeddings().found == {}


def test_wrong_family_lora_is_a_clear_error(studio, tmp_path):
    gen, cfg = studio
    bad = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4)}
    save_file(bad, str(cfg.loras_dir / "sd15lora.safetensors"))
    try:
        with pytest.raises(NetworkFileError, match="another model family"):
            gen.run(job("a <lora:sd15lora:1>"))
        assert np.asarray(gen.run(job()).images[0].image).shape == (64, 64, 3)
    finally:
        (cfg.loras_dir / "sd15lora.safetensors").unlink()


def test_pasted_prompt_finds_a_renamed_lora_by_hash(studio):
    from studio.generation.paste import restore_lora_names

    gen, cfg = studio
    h = gen.networks.find_lora("inkwash").hash
    prompt, notes = restore_lora_names("a ship <lora:old_name:0.7>", f"old_name: {h}", gen.networks)
    assert prompt == "a ship <lora:inkwash:0.7>" and "inkwash" in notes[0]
    same, _ = restore_lora_names("a ship <lora:inkwash:0.7>", f"inkwash: {h}", gen.networks)
    assert same == "a ship <lora:inkwash:0.7>"
    missing, notes = restore_lora_names("<lora:gone:1>", "gone: 000000000000", gen.networks)
    assert missing == "<lora:gone:1>" and "not in loras/" in notes[0]


def test_cards_panel_lists_files_and_inserts_tags(studio):
    from studio.ui.networks_panel import _cards, insert_tag

    gen, cfg = studio
    lora_items, lora_rows, emb_items, emb_rows, note = _cards(gen.networks, 32)
    assert [r["name"] for r in lora_rows] == ["inkwash", "paperfold"]
    assert {r["name"] for r in emb_rows} == {"monet-style", "kohya-emb", "diff-emb"}
    assert "sd15-only.safetensors" in note and "width 768" in note
    assert insert_tag("a cat", "<lora:inkwash:0.8>") == "a cat <lora:inkwash:0.8>"
    assert insert_tag("a cat <lora:inkwash:0.8>", "<lora:inkwash:0.8>") == "a cat <lora:inkwash:0.8>"
    assert insert_tag("", "monet-style") == "monet-style"


def test_diffusers_format_lora_file_is_used_by_name(studio):
    """A LoRA saved by diffusers' own `save_lora_weights` (peft layout) works from loras/ like a kohya one."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from studio.generation.samplers import make_scheduler

    gen, cfg = studio
    trained = build_tiny_pipeline("sd1")
    trained.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                        init_lora_weights=False))
    folder = cfg.loras_dir / "diffusers-run"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(trained.unet),
                                              weight_name="sketchy.safetensors")
    try:
        ours = image(gen, job("a harbour <lora:sketchy:1>", sampler="DPM++ 2M", schedule="Karras"))
        trained.scheduler = make_scheduler("DPM++ 2M", "Karras", dict(trained.scheduler.config))
        assert np.abs(_diffusers_image(trained, "a harbour") - ours).max() <= 1
        assert np.abs(ours - image(gen, job("a harbour", sampler="DPM++ 2M", schedule="Karras"))).max() > 0
    finally:
        (folder / "sketchy.safetensors").unlink()


def test_preview_image_beside_the_file_becomes_the_card(studio):
    from PIL import Image

    from studio.files.networks import preview_image
    from studio.ui.networks_panel import _cards

    gen, cfg = studio
    preview = cfg.loras_dir / "inkwash.preview.png"
    Image.new("RGB", (8, 8), "red").save(preview)
    try:
        assert preview_image(cfg.loras_dir / "inkwash.safetensors") == preview
        items = _cards(gen.networks, 32)[0]
        # the card shows the preview (decoded after its header was checked); the other card has a drawn tile
        assert items[0][0].getpixel((0, 0)) == (255, 0, 0) and items[1][0].getpixel((0, 0)) != (255, 0, 0)
    finally:
        preview.unlink()
