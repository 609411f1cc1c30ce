"""The CLIP image tower the inversion modules read (transformers' CLIPVisionModelWithProjection): by default
ViT-L/14 (`openai/clip-vit-large-patch14`, the image side of SD 1.x's text encoder), any hub id or local folder,
or `demo-tiny`, a small seeded tower saved once and loaded through the same loader."""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from studio.files.atomic import atomic_dir
from studio.files.pickles import folder_refusal

DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
TINY_NAME = "demo-tiny"


class ImageEncoderError(RuntimeError):
    """An image encoder that cannot be loaded; the message says what to do."""


@dataclass
class ImageEncoder:
    name: str
    model: torch.nn.Module  # CLIPVisionModelWithProjection
    processor: object  # CLIPImageProcessor

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], device: torch.device | str = "cpu",
              batch_size: int = 16) -> torch.Tensor:
        """[N, projection_dim] CLIP image embeddings (not normalized), float32 on the CPU."""
        self.model.to(device)
        out = []
        for start in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[start : start + batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(device, next(self.model.parameters()).dtype)
            out.append(self.model(pixel_values=pixels).image_embeds.float().cpu())
        return torch.cat(out)


def load_image_encoder(spec: str, cache_dir: Path) -> ImageEncoder:
    """From a hub id (the local Hugging Face cache when offline), a local folder, or demo-tiny."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    spec = (spec or "").strip() or DEFAULT_IMAGE_ENCODER
    source = str(tiny_image_encoder_dir(cache_dir)) if spec == TINY_NAME else spec
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            source = str(local)
        elif Path(source).is_absolute() or source.startswith("."):
            raise ImageEncoderError(f"image encoder folder {source} does not exist")
        model = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=offline)
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=offline)
    except ImageEncoderError:
        raise
    except pickle.UnpicklingError as e:  # weights that would run code: refused by weights_only=True
        raise ImageEncoderError(f"could not load the CLIP image encoder {spec!r}: {folder_refusal(source, e)}") from e
    except (OSError, ValueError) as e:
        hint = (" The hub is offline (HF_HUB_OFFLINE=1): download it once, or give a local folder holding a "
                "CLIPVisionModelWithProjection (config.json, weights, preprocessor_config.json), or use demo-tiny "
                "with demo-tiny models." if offline else "")
        raise ImageEncoderError(f"could not load the CLIP image encoder {spec!r}: {e}.{hint}") from e
    model.requires_grad_(False).eval()
    return ImageEncoder(spec, model, processor)


def build_tiny_image_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return CLIPVisionModelWithProjection(config).eval()


def tiny_image_encoder_dir(cache_dir: Path) -> Path:
    """demo-tiny's image tower saved once as a transformers folder, so it loads through from_pretrained."""
    from transformers import CLIPImageProcessor

    folder = Path(cache_dir) / "image-encoder" / "demo-tiny-v1"  # bump when build_tiny_image_encoder changes
    if not (folder / "config.json").is_file():
        with atomic_dir(folder) as tmp:
            build_tiny_image_encoder().save_pretrained(tmp)
            CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp)
    return folder
