"""Automatic captions with BLIP or BLIP-2 (transformers): a hub id, a local folder, or demo-tiny (a random
tiny BLIP saved once under the cache folder and loaded through the same `from_pretrained` code)."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from studio.files.atomic import atomic_dir
from studio.files.pickles import folder_refusal
from studio.models.hub import offline, offline_reason

TINY_NAME = "demo-tiny"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
KNOWN_CAPTIONERS = (DEFAULT_CAPTIONER, "Salesforce/blip-image-captioning-large", "Salesforce/blip2-opt-2.7b",
                    "Salesforce/blip2-flan-t5-xl")
ProgressFn = Callable[[int, int, str], None]

# words the tiny tokenizer learns; any text works, this just gives it caption-like pieces
_TINY_CORPUS = (
    "a painting of a cat sitting on a wooden table",
    "a photo of a dog running in the park at noon",
    "a red house near the sea at dusk, oil on canvas",
    "an old man with a hat and a long coat",
    "a pencil drawing of a tree beside a river",
    "a woman holding an umbrella in the rain",
    "a close up shot of a face, cinematic lighting",
    "a wide shot of mountains under a blue sky",
)


class CaptionerLoadError(RuntimeError):
    """A captioning model that cannot be loaded; the message says what to do instead."""




@dataclass
class Captioner:
    """A loaded BLIP / BLIP-2 model with its processor."""

    name: str
    kind: str  # "blip" or "blip-2"
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    max_new_tokens: int = 40
    min_new_tokens: int = 0

    @torch.no_grad()
    def caption(self, images: list[Image.Image], num_beams: int = 1) -> list[str]:
        """One caption per image, in order."""
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        # the limits are passed explicitly: BLIP-2 hands generation to its language model, which would not
        # see the ones saved in the model's generation_config
        out = self.model.generate(pixel_values=pixel_values, max_new_tokens=self.max_new_tokens,
                                  min_new_tokens=self.min_new_tokens, num_beams=num_beams, do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def caption_all(self, images: list[Image.Image], batch_size: int = 8,
                    on_progress: ProgressFn | None = None,
                    cancel: threading.Event | None = None) -> list[str | None]:
        """Captions in batches; None for images not reached when `cancel` was set."""
        if batch_size < 1:
            raise ValueError(f"caption batch size must be at least 1, got {batch_size}")
        result: list[str | None] = [None] * len(images)
        for start in range(0, len(images), batch_size):
            if cancel is not None and cancel.is_set():
                break
            batch = images[start : start + batch_size]
            result[start : start + len(batch)] = self.caption(batch)
            if on_progress:
                on_progress(start + len(batch), len(images), f"captioned {start + len(batch)}/{len(images)}")
        return result


_cache: dict[tuple[str, str], Captioner] = {}
_cache_lock = threading.Lock()


def load_captioner(spec: str, cache_dir: Path, device: str = "auto", precision: str = "auto") -> Captioner:
    """Load `spec` (demo-tiny, a local folder, or a hub id) once per process and device."""
    spec = (spec or "").strip()
    if not spec or spec == "none":
        raise CaptionerLoadError("no captioning model chosen")
    from studio.models.manager import pick_device, pick_dtype

    dev = pick_device(device)
    key = (spec, str(dev))
    with _cache_lock:
        if key not in _cache:
            source = str(tiny_blip_dir(cache_dir)) if spec == TINY_NAME else spec
            _cache.clear()  # one captioner in memory at a time: BLIP-2 alone is several GB
            _cache[key] = _load(spec, source, dev, pick_dtype(dev, precision))
        return _cache[key]


def _load(name: str, source: str, device: torch.device, dtype: torch.dtype) -> Captioner:
    from transformers import (
        AutoConfig,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        BlipForConditionalGeneration,
    )

    local = Path(source).is_dir()
    if not local and (Path(source).exists() or source.startswith((".", "/", "~"))):
        raise CaptionerLoadError(f"captioning model folder {source} does not exist (or is not a folder)")
    only_local = local or offline()
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=only_local, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CaptionerLoadError(_not_found_message(source, local, e)) from e
    classes = {"blip": BlipForConditionalGeneration, "blip-2": Blip2ForConditionalGeneration}
    if config.model_type not in classes:
        raise CaptionerLoadError(f"{source} is a {config.model_type!r} model; captioning needs BLIP or "
                                 f"BLIP-2 (for example {DEFAULT_CAPTIONER})")
    try:
        model = classes[config.model_type].from_pretrained(source, local_files_only=only_local, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source, local_files_only=only_local, trust_remote_code=False)
    except pickle.UnpicklingError as e:  # weights that would run code: refused by weights_only=True
        raise CaptionerLoadError(f"could not load the captioning model {source}: {folder_refusal(source, e)}") from e
    except (OSError, ValueError) as e:
        raise CaptionerLoadError(_not_found_message(source, local, e)) from e
    model.to(device).eval()
    gen = model.generation_config
    return Captioner(name, config.model_type, model, processor, device, dtype,
                     max_new_tokens=int(getattr(gen, "max_new_tokens", None) or 40),
                     min_new_tokens=int(getattr(gen, "min_new_tokens", None) or 0))


def _not_found_message(source: str, local: bool, error: Exception) -> str:
    if local:
        return (f"{source} is not a complete BLIP/BLIP-2 folder (config.json, weights, preprocessor and "
                f"tokenizer files): {error}")
    if offline():
        return (f"captioning model {source} is not in the Hugging Face cache and {offline_reason()}. "
                "Use a local folder holding a BLIP or BLIP-2 model saved with "
                f"save_pretrained, or {TINY_NAME} (random weights, for trying the studio); or go online once "
                f"so that {source} is downloaded into the cache.")
    return f"could not load captioning model {source}: {error}"


# --- demo-tiny ----------------------------------------------------------------------------------


def build_tiny_blip(seed: int = 0):
    """A tiny BLIP captioner with random weights (seeded) and its processor: the classes of the real one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=160, special_tokens=specials, show_progress=False)
    wordpiece.train_from_iterator(_TINY_CORPUS, trainer)
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    wordpiece.decoder = decoders.WordPiece()
    # like Salesforce's BLIP tokenizer: BERT WordPiece plus "[DEC]", the token captions start from
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                  bos_token="[DEC]", model_max_length=64)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, initializer_range=1.0),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=32,
                         intermediate_size=37, projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.1),
        projection_dim=32,
        # larger random weights than BLIP's defaults, so that different images get different captions
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
    model.generation_config.max_new_tokens = 8
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    return model, processor


def tiny_blip_dir(cache_dir: Path) -> Path:
    """demo-tiny's folder under the cache (written once, atomically), in save_pretrained layout."""
    folder = Path(cache_dir) / "captioners" / "demo-tiny-blip-v1"  # bump when build_tiny_blip changes
    if not (folder / "config.json").is_file():
        model, processor = build_tiny_blip()
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return folder


def compose_caption(text: str, prefix: str = "", suffix: str = "") -> str:
    """prefix + caption + suffix, single-spaced: "sks, " + "a cat" -> "sks, a cat"."""
    return " ".join(part.strip() for part in (prefix, text, suffix) if part and part.strip())
