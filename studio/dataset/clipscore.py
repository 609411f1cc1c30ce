"""CLIP image/text embeddings and image-caption cosines with open_clip, for dataset checks and evaluation.
Specs: `ViT-L-14` (openai weights), `ARCH:TAG`, `ARCH:/weights`, `local-dir:/dir`, `hf-hub:org/repo`."""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from studio.files.atomic import atomic_dir
from studio.files.pickles import folder_refusal, unpickling_refusal
from studio.models.hub import offline, offline_reason

TINY_NAME = "demo-tiny"
DEFAULT_CLIP = "ViT-L-14"
DEFAULT_TAGS = {"ViT-L-14": "openai", "ViT-B-32": "openai", "ViT-B-16": "openai", "ViT-L-14-336": "openai",
                "ViT-H-14": "laion2b_s32b_b79k"}
ProgressFn = Callable[[int, int, str], None]


class ClipLoadError(RuntimeError):
    """A CLIP model that cannot be loaded; the message says what to do instead."""


@dataclass
class CLIPScorer:
    """An open_clip model with its preprocessing and tokenizer; every embedding is L2-normalized."""

    name: str
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    batch_size: int = 16

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image], on_progress: ProgressFn | None = None,
                         cancel: threading.Event | None = None) -> torch.Tensor:
        """[N, D] unit vectors, computed in batches (rows of images not reached after `cancel` are NaN)."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            if cancel is not None and cancel.is_set():
                chunks.append(torch.full((len(batch), self.dim), float("nan")))
                continue
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in batch]).to(self.device)
            chunks.append(_unit(self.model.encode_image(pixels).float()).cpu())
            if on_progress:
                done = start + len(batch)
                on_progress(done, len(images), f"embedded {done}/{len(images)} images")
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] unit vectors; texts longer than the context are cut, as open_clip's tokenizer does."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            chunks.append(_unit(self.model.encode_text(tokens).float()).cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str],
              on_progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> list[float]:
        """Cosine similarity of image i with text i (the "CLIP score" seed 001 filters at 0.2)."""
        if len(images) != len(texts):
            raise ValueError(f"need one text per image, got {len(images)} images and {len(texts)} texts")
        image_emb = self.image_embeddings(images, on_progress, cancel)
        text_emb = self.text_embeddings(texts)
        return [float(x) for x in (image_emb * text_emb).sum(-1)]

    @property
    def dim(self) -> int:
        return int(getattr(self.model, "embed_dim", None) or self.model.text_projection.shape[-1])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


_cache: dict[tuple[str, str], CLIPScorer] = {}
_cache_lock = threading.Lock()


def load_clip_scorer(spec: str, cache_dir: Path, device: str = "auto") -> CLIPScorer:
    """Load a CLIP model (see the module docstring for specs) once per process and device."""
    from studio.models.manager import pick_device

    spec = (spec or "").strip()
    if not spec or spec == "none":
        raise ClipLoadError("no CLIP model chosen")
    dev = pick_device(device)
    key = (spec, str(dev))
    with _cache_lock:
        if key not in _cache:
            _cache.clear()  # one CLIP in memory at a time
            _cache[key] = _load(spec, Path(cache_dir), dev)
        return _cache[key]


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """'ViT-L-14' -> ('ViT-L-14', 'openai'); 'ViT-B-32:/w.bin' -> ('ViT-B-32', '/w.bin'); schemas as given."""
    if spec.startswith(("local-dir:", "hf-hub:")):
        return spec, None
    arch, _, tag = spec.partition(":")
    return arch, tag or DEFAULT_TAGS.get(arch)


def _load(spec: str, cache_dir: Path, device: torch.device) -> CLIPScorer:
    import open_clip

    if spec == TINY_NAME:
        spec = f"local-dir:{tiny_clip_dir(cache_dir)}"
    arch, tag = parse_clip_spec(spec)
    if not arch.startswith(("local-dir:", "hf-hub:")):
        if arch not in open_clip.list_models():
            raise ClipLoadError(f"unknown CLIP architecture {arch!r}; open_clip knows e.g. ViT-B-32, "
                                f"ViT-L-14, ViT-H-14 (all: open_clip.list_models()), or use {TINY_NAME}")
        if tag is None:
            raise ClipLoadError(f"say which weights to use for {arch}, e.g. {arch}:"
                                f"{(open_clip.list_pretrained_tags_by_model(arch) or ['TAG'])[0]} or "
                                f"{arch}:/path/to/weights.safetensors")
        if not os.path.isfile(tag):
            _check_tag_available(arch, tag)
    elif arch.startswith("local-dir:") and not Path(arch[len("local-dir:"):]).is_dir():
        raise ClipLoadError(f"CLIP folder {arch[len('local-dir:'):]} does not exist")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except pickle.UnpicklingError as e:  # weights that would run code: refused by open_clip's weights_only=True
        source = arch[len("local-dir:"):] if arch.startswith("local-dir:") else tag
        what = folder_refusal(source, e) if Path(source).is_dir() else unpickling_refusal(Path(source), e)
        raise ClipLoadError(f"could not load the CLIP model {spec}: {what}") from e
    except (RuntimeError, OSError, ValueError) as e:
        raise ClipLoadError(_not_found_message(spec, e)) from e
    model.eval()
    return CLIPScorer(spec, model, preprocess, tokenizer, device)


def _check_tag_available(arch: str, tag: str) -> None:
    """Offline, fail before open_clip tries the network, with an error that names local choices."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)[:6])
        raise ClipLoadError(f"{tag!r} is neither a weights file nor a known tag for {arch} (known: {tags})")
    if not offline():
        return
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # "org/repo/" names the repo's default file, as in open_clip
        names = [filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            return
    url = cfg.get("url", "")
    if url and (Path.home() / ".cache" / "clip" / os.path.basename(url)).is_file():
        return
    raise ClipLoadError(_not_found_message(f"{arch}:{tag}", None))


def _not_found_message(spec: str, error: Exception | None) -> str:
    if offline():
        return (f"CLIP weights for {spec} are not in the local cache and {offline_reason()}. "
                "Give a weights file (e.g. ViT-L-14:/models/clip/open_clip_model.bin), "
                "a folder (local-dir:/path with open_clip_config.json and weights), or "
                f"{TINY_NAME} (random weights, for trying the studio); or go online once so that {spec} is "
                "downloaded.")
    return f"could not load CLIP model {spec}: {error}"




# --- demo-tiny ----------------------------------------------------------------------------------

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # the standard CLIP vocabulary and context: open_clip's own BPE tokenizer (shipped in the package) fits it
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A tiny open_clip CLIP with random weights (seeded)."""
    import open_clip

    cfg = TINY_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=cfg["embed_dim"],
                               vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
                               text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"]))
    return model.eval()


def tiny_clip_dir(cache_dir: Path) -> Path:
    """demo-tiny CLIP saved once in open_clip's local-dir layout: it loads through open_clip's own loader."""
    from safetensors.torch import save_file

    folder = Path(cache_dir) / "clip" / "demo-tiny-v1"  # bump when TINY_CONFIG or build_tiny_clip changes
    if not (folder / "open_clip_config.json").is_file():
        model = build_tiny_clip()
        with atomic_dir(folder) as tmp:
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "open_clip_model.safetensors"))
            config = {"model_cfg": TINY_CONFIG,
                      "preprocess_cfg": {"mean": list(_OPENAI_MEAN), "std": list(_OPENAI_STD)}}
            (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
