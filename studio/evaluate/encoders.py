"""The networks that turn images into vectors for the metrics, loaded offline: DINO ViT-S/16 (transformers
ViTModel, CLS embedding) and the FID/KID feature networks (Inception-v3 from a local weights file, the CLIP or
DINO embeddings, or a tiny network). `demo-tiny` variants are built in code for tests. CLIP is studio.clipscore."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.files.atomic import atomic_dir, atomic_path
from studio.files.pickles import folder_refusal
from studio.models.hub import offline, offline_reason

TINY_NAME = "demo-tiny"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_FID_FEATURES = "inception"
FID_FEATURES = ("inception", "clip", "dino", TINY_NAME)  # inception also as inception:/path/to/weights.pth
# torch-fidelity's Inception-v3 port of the TensorFlow FID network (what pytorch-fid and torchmetrics use)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


class EncoderLoadError(RuntimeError):
    """A network that cannot be loaded; the message says what to do instead."""




# --- DINO --------------------------------------------------------------------------------------


@dataclass
class DinoEncoder:
    name: str
    model: torch.nn.Module  # transformers ViTModel
    processor: object  # ViTImageProcessor
    device: torch.device
    batch_size: int = 16

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[N, hidden] CLS embeddings of the last layer (not normalized), float32 on the CPU."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)


_dino_cache: dict[tuple[str, str], DinoEncoder] = {}


def load_dino(spec: str, cache_dir: Path, device: str = "auto") -> DinoEncoder:
    """DINO from a hub id (the local Hugging Face cache when offline), a local folder, or demo-tiny."""
    from transformers import AutoImageProcessor, ViTModel

    from studio.models.manager import pick_device

    spec = (spec or "").strip() or DEFAULT_DINO
    dev = pick_device(device)
    key = (spec, str(dev))
    if key in _dino_cache:
        return _dino_cache[key]
    source = str(tiny_dino_dir(cache_dir)) if spec == TINY_NAME else spec
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            source = str(local)
        elif local.is_absolute() or source.startswith("."):
            raise EncoderLoadError(f"DINO folder {source} does not exist")
        # DINO checkpoints carry no pooler: the CLS token of the last layer is the embedding
        model = ViTModel.from_pretrained(source, add_pooling_layer=False, local_files_only=offline())
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline(), trust_remote_code=False)
    except EncoderLoadError:
        raise
    except pickle.UnpicklingError as e:  # weights that would run code: refused by weights_only=True
        raise EncoderLoadError(f"could not load the DINO model {spec!r}: {folder_refusal(source, e)}") from e
    except (OSError, ValueError) as e:
        hint = (f" {offline_reason().capitalize()}: download it once, or give a local folder holding a ViTModel "
                "(config.json, weights, preprocessor_config.json), or use demo-tiny." if offline() else "")
        raise EncoderLoadError(f"could not load the DINO model {spec!r}: {e}.{hint}") from e
    model.requires_grad_(False).eval().to(dev)
    _dino_cache.clear()  # one DINO in memory at a time
    _dino_cache[key] = DinoEncoder(spec, model, processor, dev)
    return _dino_cache[key]


def build_tiny_dino(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return ViTModel(config, add_pooling_layer=False).eval()


def tiny_dino_dir(cache_dir: Path) -> Path:
    """demo-tiny DINO saved once as a transformers folder, so it loads through from_pretrained."""
    from transformers import ViTImageProcessor

    folder = Path(cache_dir) / "dino" / "demo-tiny-v1"  # bump when build_tiny_dino changes
    if not (folder / "config.json").is_file():
        with atomic_dir(folder) as tmp:
            build_tiny_dino().save_pretrained(tmp)
            ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp)
    return folder


# --- FID / KID feature networks -----------------------------------------------------------------


@dataclass
class FeatureNet:
    """Images -> [N, dim] feature vectors for FID and KID."""

    name: str
    dim: int
    module: torch.nn.Module | None = None  # takes uint8 [N, 3, H, W]
    embed: object = None  # or a callable images -> tensor (CLIP / DINO embeddings)
    device: torch.device = torch.device("cpu")
    batch_size: int = 16

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.embed is not None:
            return self.embed(images).float()
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [_uint8(im, 299 if self.name.startswith("inception") else 64)
                     for im in images[start : start + self.batch_size]]
            out.append(self.module(torch.stack(batch).to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)


def _uint8(image: Image.Image, size: int) -> torch.Tensor:
    """[3, size, size] uint8 (images of any size go in at one size so a batch stacks; Inception resizes to 299)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class TinyFeatures(torch.nn.Module):
    """demo-tiny's FID network: two seeded strided convolutions and a global average, 32 features."""

    num_features = 32

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(),
                                           torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 127.5 - 1)


def load_fid_features(spec: str, cache_dir: Path, device: str = "auto", clip=None, dino=None) -> FeatureNet:
    """`inception` (weights from a local file: inception:/path, else the cache), `clip` / `dino` (the embeddings
    of the CLIP / DINO model chosen for the other metrics, passed in), or demo-tiny."""
    from studio.models.manager import pick_device

    spec = (spec or "").strip() or DEFAULT_FID_FEATURES
    dev = pick_device(device)
    if spec == TINY_NAME:
        return FeatureNet(TINY_NAME, TinyFeatures.num_features, module=TinyFeatures().to(dev), device=dev)
    if spec == "clip":
        if clip is None:
            raise EncoderLoadError("FID on CLIP features needs a CLIP model (choose one)")
        return FeatureNet(f"clip:{clip.name}", clip.dim, embed=clip.image_embeddings, device=dev)
    if spec == "dino":
        if dino is None:
            raise EncoderLoadError("FID on DINO features needs a DINO model (choose one)")
        return FeatureNet(f"dino:{dino.name}", dino.dim, embed=dino.image_embeddings, device=dev)
    if spec == "inception" or spec.startswith("inception:"):
        from torchmetrics.image.fid import NoTrainInceptionV3

        weights = inception_weights(spec.partition(":")[2], cache_dir)
        module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                    feature_extractor_weights_path=str(weights)).to(dev)
        return FeatureNet("inception", 2048, module=module, device=dev)
    raise EncoderLoadError(f"unknown FID feature network {spec!r}; use one of {', '.join(FID_FEATURES)} "
                           "or inception:/path/to/weights.pth")


def inception_weights(given: str, cache_dir: Path) -> Path:
    """The FID Inception weights as a plain state-dict file in the cache (made once from the given file, the
    cache, torch hub's folder or, when online, a download). The source is read with weights_only=True, so a file
    that would run code is refused."""
    safe = Path(cache_dir) / "fid" / "inception-v3-compat.pt"
    if safe.is_file() and not given:
        return safe
    candidates = [Path(given).expanduser()] if given else [
        Path(cache_dir) / "fid" / INCEPTION_FILE, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]
    source = next((p for p in candidates if p.is_file()), None)
    try:
        if source is not None:
            if source.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(source))
            else:
                state = torch.load(source, map_location="cpu", weights_only=True)
        elif given:
            raise EncoderLoadError(f"Inception weights file {given} does not exist")
        elif offline():
            raise EncoderLoadError(
                f"FID's Inception weights are not here and the hub is offline: put {INCEPTION_FILE} (from "
                f"torch-fidelity's releases) in {Path(cache_dir) / 'fid'}, give inception:/path/to/it, or use the "
                "clip, dino or demo-tiny feature network")
        else:
            state = torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location="cpu", weights_only=True)
    except EncoderLoadError:
        raise
    except Exception as e:  # a pickle with code, a corrupt file, no network
        what = f"read Inception weights {source}" if source else f"download Inception weights ({INCEPTION_URL})"
        raise EncoderLoadError(f"could not {what}: {e}") from e
    if given:
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = safe.with_name(f"inception-{key}.pt")
        if target.is_file():
            return target
    else:
        target = safe
    with atomic_path(target) as tmp:
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    return target
