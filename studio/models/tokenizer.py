"""The CLIP tokenizer, built offline from the BPE vocabulary file that open_clip_torch ships.

SD 1.x (OpenAI CLIP) and SD 2.x (OpenCLIP) use the same byte-level BPE; they differ only in
the padding token ("<|endoftext|>" for SD 1.x, "!" for SD 2.x). SDXL has both: `tokenizer` as SD 1.x's
(CLIP ViT-L) and `tokenizer_2` as SD 2.x's (OpenCLIP ViT-bigG pads with "!", id 0).
"""

from __future__ import annotations

import copy
import functools
import gzip
from pathlib import Path

from transformers import CLIPTokenizer

# 49408 tokens = 256 bytes + 256 bytes-with-</w> + 48894 merges + 2 specials (CLIP's layout)
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_TOKEN = {"sd1": EOS, "sd2": "!"}


def bpe_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip_torch is installed but {path} is missing; reinstall it")
    return path


def bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merge list, read from open_clip's BPE file."""
    from open_clip.tokenizer import bytes_to_unicode

    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=2)
def _tokenizer(family: str) -> CLIPTokenizer:
    vocab, merges = bpe_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD_TOKEN[family],
        model_max_length=77,
        # SD 2.x pads with "!": keep a typed "!" an ordinary character, as open_clip does
        split_special_tokens=family == "sd2",
    )


def clip_tokenizer(family: str = "sd1") -> CLIPTokenizer:
    """A CLIPTokenizer equal to openai/clip-vit-large-patch14's (sd1) or SD 2.x's (sd2)."""
    if family not in PAD_TOKEN:
        raise ValueError(f"tokenizer family must be one of {sorted(PAD_TOKEN)}, got {family!r}")
    return copy.deepcopy(_tokenizer(family))


def family_tokenizers(family: str) -> dict[str, CLIPTokenizer]:
    """The tokenizers a pipeline of `family` ("sd1", "sd2", "sdxl") takes, by argument name."""
    if family == "sdxl":
        return {"tokenizer": clip_tokenizer("sd1"), "tokenizer_2": clip_tokenizer("sd2")}
    return {"tokenizer": clip_tokenizer(family)}
