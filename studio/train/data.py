"""Training images: a studio dataset (dataset.json) or any folder of images with .txt captions, decoded safely,
cropped to the training size (or to an aspect-ratio bucket, with the crop recorded for SDXL's size conditioning),
and served as a deterministic stream (the same seed gives the same batches, also after a resume)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.dataset.crop import apply_crop, center_box, pick_bucket
from studio.dataset.curate import MANIFEST, read_manifest
from studio.dataset.sources import scan_inputs
from studio.files.images import SkipImage, load_image
from studio.files.names import UnsafeNameError, safe_child
from studio.train.masks import as_mask, useful_alpha

MAX_FILE_BYTES = 200_000_000
MAX_PIXELS = 64_000_000
# SDXL's training resolutions (width, height), about one megapixel each, as SDXL base was trained on (and kohya's
# and the diffusers examples' SDXL buckets)
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))


@dataclass
class TrainImage:
    name: str  # file name, for logs
    image: Image.Image  # RGB at the training resolution (or its bucket's size)
    caption: str
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the decoded source image
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop in the source scaled to cover the target
    scaled_size: tuple[int, int] = (0, 0)  # (height, width) of the source scaled to cover the target
    mask: Image.Image | None = None  # L, the crop of its mask (white: the loss counts; studio.train.masks)

    @property
    def bucket(self) -> tuple[int, int]:
        return self.image.size  # (width, height)

    def time_ids(self, flipped: bool = False) -> list[int]:
        """SDXL's size conditioning: original (h, w), crop top-left (top, left), target (h, w); a mirrored image
        has its crop measured from the other side."""
        width, height = self.image.size
        top, left = self.crop_top_left
        if flipped:
            left = self.scaled_size[1] - width - left
        return [*self.original_size, top, left, height, width]


@dataclass
class TrainData:
    folder: Path
    images: list[TrainImage]
    repeats: int
    flip_p: float
    skipped: dict[str, str]  # file -> reason
    bucketed: bool = False  # batches come from one aspect-ratio bucket at a time
    dataset_buckets: bool = False  # the dataset was made with buckets (dataset.json training.buckets)

    @property
    def epoch_length(self) -> int:
        return len(self.images) * self.repeats

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """(width, height) -> indices of the images in that bucket, buckets in sorted order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.images):
            groups.setdefault(item.bucket, []).append(i)
        return dict(sorted(groups.items()))

    def batch(self, seed: int, micro_batch: int, batch_size: int) -> list[int]:
        """Image indices of micro-batch `micro_batch`: from the shuffled stream, or from one bucket."""
        if not self.bucketed:
            return batch_indices(seed, micro_batch, batch_size, len(self.images), self.repeats)
        groups = tuple(tuple(members) for members in self.buckets().values())
        return bucket_batch_indices(seed, micro_batch, batch_size, groups, self.repeats)


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


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """SDXL's buckets scaled from 1024 to `resolution`, sides rounded to multiples of 64 (of 8 below 512 px or for
    resolutions that are not multiples of 64), duplicates dropped."""
    step = 64 if resolution >= 512 and resolution % 64 == 0 else 8
    out: list[tuple[int, int]] = []
    for w, h in SDXL_BUCKETS:
        size = tuple(max(step, math.floor(side * resolution / 1024 / step + 0.5) * step) for side in (w, h))
        if size not in out:
            out.append(size)
    return out


@dataclass(frozen=True)
class BucketRule:
    """How aspect-ratio buckets are made. No sides or step given: SDXL's resolutions scaled to the training
    resolution (bucket_sizes). Any of them given: kohya's rule (kohya_bucket_sizes). `no_upscale`: kohya's
    bucket_no_upscale, each image in a bucket of its own size (shrunk to the area if larger), never enlarged."""

    min_side: int | None = None
    max_side: int | None = None
    step: int | None = None
    no_upscale: bool = False

    @property
    def kohya(self) -> bool:
        return (self.min_side, self.max_side, self.step) != (None, None, None)

    def sizes(self, resolution: int) -> list[tuple[int, int]]:
        if not self.kohya:
            return bucket_sizes(resolution)
        return kohya_bucket_sizes(resolution, self.min_side or 256, self.max_side or 1024, self.step or 64)

    def bucket_for(self, width: int, height: int, resolution: int) -> tuple[int, int]:
        """The bucket an image of this size trains in."""
        if self.no_upscale:
            return own_size_bucket(width, height, resolution * resolution, self.step or 64)
        return pick_bucket(width, height, self.sizes(resolution))


def kohya_bucket_sizes(resolution: int, min_side: int, max_side: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket set: the largest square of the training area (resolution²) on the step, and for every
    width from `min_side` to `max_side` in steps the tallest height on the step within the area and `max_side`
    (both orientations), keeping those whose sides are at least `min_side`. Sorted, no duplicates."""
    area = resolution * resolution
    square = max(step, int(resolution // step) * step)
    sizes = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, int(area // width // step) * step)
        if height >= min_side:
            sizes.update({(width, height), (height, width)})
    return sorted(sizes)


def own_size_bucket(width: int, height: int, area: int, step: int) -> tuple[int, int]:
    """kohya's no-upscale bucket: the image's own size, scaled down (aspect kept) when above `area`, each side then
    cut down to the step (at least one step)."""
    if width * height > area:
        scale = math.sqrt(area / (width * height))
        width, height = width * scale, height * scale
    return (max(step, int(width) // step * step), max(step, int(height) // step * step))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, tuple[int, int],
                                                                         tuple[int, int]]:
    """The image scaled to cover `bucket` (width, height) and centre-cropped to it: (crop, its top-left in the
    scaled image, the scaled image's (height, width)). A square bucket gives square_crop's pixels."""
    box = center_box(image.width, image.height, *bucket)
    scale = bucket[0] / (box[2] - box[0])
    crop = apply_crop(image, box, bucket)
    top_left = (round(box[1] * scale), round(box[0] * scale))
    scaled = (max(bucket[1], round(image.height * scale)), max(bucket[0], round(image.width * scale)))
    return crop, top_left, scaled


def train_image(name: str, image: Image.Image, caption: str, buckets: list[tuple[int, int]],
                mask: Image.Image | None = None, bucket: tuple[int, int] | None = None) -> TrainImage:
    """One training image fitted to `bucket`, or to the one of `buckets` closest to its aspect ratio, with its size
    and crop recorded (and its mask, the image's size, cropped the same way)."""
    if bucket is None:
        bucket = pick_bucket(image.width, image.height, buckets) if len(buckets) > 1 else buckets[0]
    crop, top_left, scaled = fit_to_bucket(image, bucket)
    fitted_mask = None if mask is None else fit_to_bucket(mask, bucket)[0]
    return TrainImage(name, crop, caption, (image.height, image.width), top_left, scaled, fitted_mask)


def read_mask(source, decoded) -> Image.Image | None:
    """The image's mask: its NAME.mask.png (decoded as safely as images, scaled to the image's size), else its alpha
    channel when that is not fully opaque, else None. A mask file that cannot be read is an error naming it."""
    if source.mask is not None:
        try:
            picture = load_image(source.mask, min_side=1, max_pixels=MAX_PIXELS, max_bytes=MAX_FILE_BYTES).image
        except SkipImage as e:
            raise ValueError(f"mask {source.mask.label} of {source.label}: {e}") from e
        return as_mask(picture, decoded.image.size)
    return useful_alpha(decoded.alpha)


def load_train_data(folder: Path, resolution: int, repeats: int | None = None,
                    flip_p: float | None = None, buckets: bool = False, rule: BucketRule | None = None) -> TrainData:
    """Read every image (and its caption) of a dataset folder: centre-cropped squares, or with `buckets` each in
    the bucket `rule` gives it (default: the SDXL bucket nearest its aspect ratio). Unusable files are skipped with
    the reason; no usable image at all is an error that lists them."""
    rule = rule or BucketRule()
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
        image = decoded.image
        bucket = rule.bucket_for(image.width, image.height, resolution) if buckets else (resolution, resolution)
        images.append(train_image(source.label, image, source.caption or "", [bucket], read_mask(source, decoded),
                                  bucket))
    if not images:
        why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
        raise ValueError(f"no usable training images in {folder}" + (f" ({why})" if why else ""))
    repeats = repeats if repeats is not None else int(training.get("repeats", 1) or 1)
    if flip_p is None:
        flip_p = float(training.get("flip_p", 0.0)) if training.get("flip") == "random" else 0.0
    return TrainData(folder, images, repeats, flip_p, skipped, bucketed=buckets,
                     dataset_buckets=bool(training.get("buckets", False)))


def split_validation(data: TrainData, fraction: float, seed: int) -> tuple[TrainData, list[TrainImage]]:
    """Hold out round(fraction x images) of them (at least one when fraction > 0), picked from the seed, for the
    validation loss (kohya's validation_split): (the data without them, the held-out images in dataset order). At
    least one image must stay for training."""
    if fraction <= 0:
        return data, []
    n = len(data.images)
    held = max(1, round(fraction * n))
    if held >= n:
        raise ValueError(f"a validation split of {fraction:g} holds out {held} of {n} images and leaves none to train "
                         "on: use a smaller split or more images")
    picked = set(np.random.default_rng(rng_seed(seed, STREAM_VALIDATION)).permutation(n)[:held].tolist())
    kept = [item for i, item in enumerate(data.images) if i not in picked]
    return dataclasses.replace(data, images=kept), [item for i, item in enumerate(data.images) if i in picked]


# --- deterministic randomness ------------------------------------------------------------------------


def rng_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run seed, a purpose, a step): independent streams, no shared state."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


STREAM_ORDER, STREAM_BATCH, STREAM_INIT, STREAM_CLASS, STREAM_DROPOUT, STREAM_BUCKETS = 1, 2, 3, 4, 5, 6
STREAM_VALIDATION = 7


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


@lru_cache(maxsize=4)
def bucket_epoch(seed: int, epoch: int, batch_size: int, groups: tuple[tuple[int, ...], ...],
                 repeats: int) -> tuple[tuple[int, ...], ...]:
    """The batches of one bucketed epoch: each bucket's images (`repeats` times) shuffled and cut into batches
    (a bucket's last batch may be smaller), then all batches shuffled; everything drawn from the seed."""
    rng = np.random.default_rng(rng_seed(seed, STREAM_BUCKETS, epoch))
    batches = []
    for members in groups:
        order = rng.permutation(np.repeat(np.asarray(members, dtype=np.int64), repeats)).tolist()
        batches += [tuple(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    return tuple(batches[i] for i in rng.permutation(len(batches)))


def bucket_batch_indices(seed: int, micro_batch: int, batch_size: int, groups: tuple[tuple[int, ...], ...],
                         repeats: int) -> list[int]:
    """Image indices of micro-batch `micro_batch` in the endless stream of bucketed epochs: one bucket only."""
    per_epoch = sum(math.ceil(len(members) * repeats / batch_size) for members in groups)
    epoch, offset = divmod(micro_batch, per_epoch)
    return list(bucket_epoch(seed, epoch, batch_size, groups, repeats)[offset])


def batch_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The CPU generator for everything random in one micro-batch (flips, templates, noise, timesteps)."""
    return torch.Generator("cpu").manual_seed(rng_seed(seed, STREAM_BATCH, micro_batch))


def image_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1], as the VAE expects."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
