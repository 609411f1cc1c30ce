"""Training images: a studio dataset (dataset.json) or any folder of images with .txt captions, decoded safely,
cropped to the training size, and served as a deterministic stream (the same seed gives the same batches, also
after a resume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.dataset.crop import apply_crop, center_box
from studio.dataset.curate import MANIFEST, read_manifest
from studio.dataset.sources import scan_inputs
from studio.files.images import SkipImage, load_image
from studio.files.names import UnsafeNameError, safe_child

MAX_FILE_BYTES = 200_000_000
MAX_PIXELS = 64_000_000


@dataclass
class TrainImage:
    name: str  # file name, for logs
    image: Image.Image  # RGB at the training resolution
    caption: str


@dataclass
class TrainData:
    folder: Path
    images: list[TrainImage]
    repeats: int
    flip_p: float
    skipped: dict[str, str]  # file -> reason

    @property
    def epoch_length(self) -> int:
        return len(self.images) * self.repeats


def resolve_data_dir(spec: str, datasets_dir: Path) -> Path:
    """A dataset by name in datasets/, an absolute folder path, or a folder relative to the working folder
    (command line). A relative name may not climb out with '..'."""
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if path.is_absolute():
        if path.is_dir():
            return path
        raise ValueError(f"dataset folder {spec} does not exist")
    try:
        named = safe_child(Path(datasets_dir), spec)
    except UnsafeNameError as e:
        raise ValueError(f"dataset {spec!r}: {e}") from e
    if named.is_dir():
        return named
    if path.is_dir():
        return path
    known = sorted(p.name for p in Path(datasets_dir).iterdir() if p.is_dir()) if Path(datasets_dir).is_dir() else []
    raise ValueError(f"dataset {spec!r} not found: give a folder of images or a name in {Path(datasets_dir).name}/"
                     + (f" ({', '.join(known[:10])})" if known else " (it is empty: make one in the Dataset tab)"))


def square_crop(image: Image.Image, size: int) -> Image.Image:
    return apply_crop(image, center_box(image.width, image.height, size, size), (size, size))


def load_train_data(folder: Path, resolution: int, repeats: int | None = None,
                    flip_p: float | None = None) -> TrainData:
    """Read every image (and its caption) of a dataset folder. Unusable files are skipped with the reason; no
    usable image at all is an error that lists them."""
    folder = Path(folder)
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else {}
    training = manifest.get("training", {})
    images: list[TrainImage] = []
    skipped: dict[str, str] = {}
    for source, reason in scan_inputs([folder], MAX_FILE_BYTES):
        if reason:
            continue  # not an image (captions, manifest)
        try:
            decoded = load_image(source, min_side=8, max_pixels=MAX_PIXELS, max_bytes=MAX_FILE_BYTES)
        except SkipImage as e:
            skipped[source.label] = str(e)
            continue
        images.append(TrainImage(source.label, square_crop(decoded.image, resolution), source.caption or ""))
    if not images:
        why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
        raise ValueError(f"no usable training images in {folder}" + (f" ({why})" if why else ""))
    repeats = repeats if repeats is not None else int(training.get("repeats", 1) or 1)
    if flip_p is None:
        flip_p = float(training.get("flip_p", 0.0)) if training.get("flip") == "random" else 0.0
    return TrainData(folder, images, repeats, flip_p, skipped)


# --- deterministic randomness ------------------------------------------------------------------------


def rng_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run seed, a purpose, a step): independent streams, no shared state."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


STREAM_ORDER, STREAM_BATCH, STREAM_INIT, STREAM_CLASS, STREAM_DROPOUT = 1, 2, 3, 4, 5


def epoch_order(seed: int, epoch: int, n_images: int, repeats: int) -> np.ndarray:
    """The image indices of one epoch (each image `repeats` times), shuffled by the seed."""
    order = np.repeat(np.arange(n_images), repeats)
    return np.random.default_rng(rng_seed(seed, STREAM_ORDER, epoch)).permutation(order)


def batch_indices(seed: int, micro_batch: int, batch_size: int, n_images: int, repeats: int) -> list[int]:
    """Image indices of micro-batch `micro_batch` in the endless stream of shuffled epochs."""
    epoch_len = n_images * repeats
    out = []
    cache: dict[int, np.ndarray] = {}
    for position in range(micro_batch * batch_size, (micro_batch + 1) * batch_size):
        epoch, offset = divmod(position, epoch_len)
        if epoch not in cache:
            cache[epoch] = epoch_order(seed, epoch, n_images, repeats)
        out.append(int(cache[epoch][offset]))
    return out


def batch_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The CPU generator for everything random in one micro-batch (flips, templates, noise, timesteps)."""
    return torch.Generator("cpu").manual_seed(rng_seed(seed, STREAM_BATCH, micro_batch))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1], as the VAE expects."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
