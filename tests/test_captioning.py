"""Captioning (BLIP / BLIP-2, transformers) and CLIP scoring (open_clip) with tiny seeded models, offline."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from dataset_files import photo

from studio.dataset import curate as ds
from studio.dataset.captioning import CaptionerLoadError, compose_caption, load_captioner, tiny_blip_dir
from studio.dataset.clipscore import ClipLoadError, load_clip_scorer, parse_clip_spec, tiny_clip_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def captioner(cache_dir):
    return load_captioner("demo-tiny", cache_dir, device="cpu")


@pytest.fixture(scope="module")
def scorer(cache_dir):
    return load_clip_scorer("demo-tiny", cache_dir, device="cpu")


@pytest.fixture
def curation(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        photo(i).save(folder / f"p{i}.png")
    (folder / "p0.txt").write_text("a caption that came with p0")
    return ds.import_images(ds.CurateJob(inputs=[folder], size=64, min_side=32))


# --- captions ---------------------------------------------------------------------------------------


def test_tiny_blip_is_saved_and_loaded_like_a_real_model(cache_dir, captioner):
    folder = tiny_blip_dir(cache_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in folder.iterdir()}
    from transformers import BlipForConditionalGeneration

    assert captioner.kind == "blip" and isinstance(captioner.model, BlipForConditionalGeneration)
    # the same folder given as a path goes through the same from_pretrained code
    again = load_captioner(str(folder), cache_dir, device="cpu")
    images = [photo(i, 64, 64) for i in range(3)]
    assert again.caption(images) == captioner.caption(images)


def test_one_caption_per_image_batched_with_progress(captioner):
    images = [photo(i, 64, 64) for i in range(5)]
    one_by_one = [captioner.caption([im])[0] for im in images]
    calls = []
    batched = captioner.caption_all(images, batch_size=2, on_progress=lambda d, t, m: calls.append((d, t)))
    assert batched == one_by_one and all(isinstance(c, str) and c for c in batched)
    assert len(set(batched)) > 1  # the image reaches the decoder: different pictures, different words
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_caption_items_keeps_given_captions_adds_prefix_and_stops(curation, captioner):
    curation.job.caption_prefix, curation.job.caption_suffix = "sks,", "oil on canvas"
    curation.job.caption_batch = 2
    cancel = threading.Event()

    def stop_after_first_batch(done, total, info):
        cancel.set()

    n = ds.caption_items(curation, captioner, stop_after_first_batch, cancel)
    kept = curation.kept()
    assert n == 2 and curation.interrupted
    assert kept[0].caption == "a caption that came with p0" and kept[0].caption_source == "p0.txt"
    assert all(it.caption.startswith("sks, ") and it.caption.endswith(" oil on canvas") for it in kept[1:3])
    assert all(it.caption == "" for it in kept[3:])
    assert ds.caption_items(curation, captioner) == 5  # re-run: the rest, and its own earlier ones
    assert kept[0].caption == "a caption that came with p0"
    ds.set_caption(curation, curation.items.index(kept[1]), "edited by hand")
    curation.job.keep_captions = False
    ds.caption_items(curation, captioner)
    assert kept[1].caption != "edited by hand" and kept[0].caption_source == "demo-tiny"


def test_compose_caption():
    assert compose_caption("a cat", "sks,", "") == "sks, a cat"
    assert compose_caption(" a cat ", "a painting in the style of ", " , dusk") == \
        "a painting in the style of a cat , dusk"


def test_hub_captioner_offline_names_the_local_alternatives(cache_dir):
    with pytest.raises(CaptionerLoadError) as e:
        load_captioner("Salesforce/blip-image-captioning-base", cache_dir, device="cpu")
    assert "offline" in str(e.value) and "local folder" in str(e.value) and "demo-tiny" in str(e.value)
    with pytest.raises(CaptionerLoadError, match="does not exist"):
        load_captioner("/no/such/folder", cache_dir, device="cpu")


def test_a_model_that_is_not_blip_is_refused(tmp_path, cache_dir):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                            vocab_size=50)
    CLIPTextModel(config).save_pretrained(tmp_path / "clip-text")
    with pytest.raises(CaptionerLoadError, match="captioning needs BLIP or BLIP-2"):
        load_captioner(str(tmp_path / "clip-text"), cache_dir, device="cpu")


def test_tiny_blip2_folder_captions(tmp_path, cache_dir):
    """BLIP-2 loads through the same path (Blip2ForConditionalGeneration + Blip2Processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2TokenizerFast,
        OPTConfig,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["a painting of a cat on a table", "a photo of a dog in the park"], trainer)
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=37,
                     num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=1.0),
        qformer_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=37, encoder_hidden_size=32),
        text_config=text.to_dict(), num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    model.generation_config.max_new_tokens, model.generation_config.min_new_tokens = 6, 3
    folder = tmp_path / "tiny-blip2"
    model.save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                   num_query_tokens=4).save_pretrained(folder)
    blip2 = load_captioner(str(folder), cache_dir, device="cpu")
    captions = blip2.caption([photo(0, 64, 64), photo(1, 64, 64)])
    assert blip2.kind == "blip-2" and len(captions) == 2 and all(captions)
    assert "<image>" not in " ".join(captions)


# --- CLIP ----------------------------------------------------------------------------------------


def test_tiny_clip_loads_through_open_clip_local_dir(cache_dir, scorer):
    folder = tiny_clip_dir(cache_dir)
    assert (folder / "open_clip_config.json").is_file() and (folder / "open_clip_model.safetensors").is_file()
    import open_clip

    assert isinstance(scorer.model, open_clip.CLIP) and scorer.dim == 32
    assert isinstance(scorer.tokenizer, open_clip.SimpleTokenizer)  # open_clip's BPE, shipped in the package


def test_clip_scores_are_cosines_of_unit_embeddings(scorer):
    images = [photo(i, 64, 64) for i in range(3)]
    texts = ["a cat", "a dog on a table", "an old red house at dusk"]
    img, txt = scorer.image_embeddings(images), scorer.text_embeddings(texts)
    assert img.shape == (3, 32) and txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    scores = scorer.score(images, texts)
    assert scores == pytest.approx([float(img[i] @ txt[i]) for i in range(3)], abs=1e-5)
    assert len(set(round(s, 5) for s in scores)) == 3
    with pytest.raises(ValueError, match="one text per image"):
        scorer.score(images, texts[:2])


def test_threshold_filter_removes_exactly_the_pairs_below_it(curation, captioner, scorer):
    ds.caption_items(curation, captioner)
    assert ds.score_items(curation, scorer) == 6
    scores = sorted(it.clip_score for it in curation.kept())
    threshold = (scores[2] + scores[3]) / 2  # half the pairs on each side
    removed = ds.apply_clip_filter(curation, threshold)
    assert {it.name for it in removed} == {it.name for it in curation.usable() if it.clip_score < threshold}
    assert len(removed) == 3 and all(it.clip_score >= threshold for it in curation.kept())
    assert all(f"below the threshold {threshold}" in it.removed for it in removed)
    assert len(ds.apply_clip_filter(curation, scores[0])) == 0  # re-decided, not piled up
    assert len(curation.kept()) == 6


def test_near_duplicate_pass_with_tiny_clip(tmp_path, scorer):
    import io

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        photo(i, 96, 96).save(folder / f"p{i}.png")
    buf = io.BytesIO()
    photo(2, 96, 96).save(buf, "JPEG", quality=70)  # the same picture, recompressed: not byte-equal
    (folder / "p2-copy.jpg").write_bytes(buf.getvalue())
    curation = ds.import_images(ds.CurateJob(inputs=[folder], size=64, min_side=32))
    assert curation.pairs == []
    # random tiny CLIP: every picture looks alike (cosines ~0.97-0.99), so a strict threshold separates them
    pairs = ds.near_duplicate_pass(curation, scorer, threshold=0.999)
    assert [{curation.items[p.a].name, curation.items[p.b].name} for p in pairs] == [{"p2", "p2-copy"}]
    assert "near duplicate" in curation.items[pairs[0].b].removed and curation.items[pairs[0].a].kept
    assert len(curation.kept()) == 4


def test_clip_specs_and_offline_errors(cache_dir):
    assert parse_clip_spec("ViT-L-14") == ("ViT-L-14", "openai")
    assert parse_clip_spec("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert parse_clip_spec("local-dir:/x/y") == ("local-dir:/x/y", None)
    with pytest.raises(ClipLoadError) as e:
        load_clip_scorer("ViT-L-14", cache_dir, device="cpu")  # the default: not cached here, and offline
    assert "offline" in str(e.value) and "local-dir:" in str(e.value) and "demo-tiny" in str(e.value)
    with pytest.raises(ClipLoadError, match="unknown CLIP architecture"):
        load_clip_scorer("ViT-Q-99", cache_dir, device="cpu")
    with pytest.raises(ClipLoadError, match="neither a weights file nor a known tag"):
        load_clip_scorer("ViT-B-32:nonsense", cache_dir, device="cpu")


def test_clip_weights_file_path(tmp_path, cache_dir):
    """ARCH:/path/to/weights loads a local file (here: tiny weights under a registered tiny architecture)."""
    import json

    import open_clip

    folder = tiny_clip_dir(cache_dir)
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    (config_dir / "studio-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(config_dir)
    weights = Path(folder / "open_clip_model.safetensors")
    scorer = load_clip_scorer(f"studio-tiny-test:{weights}", cache_dir, device="cpu")
    ref = load_clip_scorer("demo-tiny", cache_dir, device="cpu")
    image = [photo(0, 64, 64)]
    assert torch.allclose(scorer.image_embeddings(image), ref.image_embeddings(image), atol=1e-6)
