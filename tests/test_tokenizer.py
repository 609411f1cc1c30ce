"""The CLIP tokenizer built offline from open_clip's BPE file must tokenize exactly like open_clip."""

import open_clip
import pytest
import torch

from studio.models.tokenizer import clip_tokenizer

TEXTS = [
    "a painting in the style of monet",
    "Long Shot, Sarah and Callum talking to each other in the middle of a room",
    "(masterpiece:1.2), 8k!!, café au lait — über-detailed",
    "",
    "emoji 🎨 and digits 12345",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_ids_match_open_clip(text, family):
    ours = clip_tokenizer(family)(text, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids[0]
    reference = open_clip.get_tokenizer("ViT-L-14")(text)[0]
    n = int((reference != 0).sum())  # open_clip pads with 0
    assert torch.equal(ours[:n], reference[:n])
    pad = {"sd1": 49407, "sd2": 0}[family]  # SD 2.x pads with "!" (id 0), SD 1.x with <|endoftext|>
    assert bool((ours[n:] == pad).all())


def test_vocabulary_size_and_specials():
    tok = clip_tokenizer("sd1")
    assert len(tok) == 49408
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.model_max_length == 77


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="sdxl"):
        clip_tokenizer("sdxl")
