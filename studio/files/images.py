"""Reading user images safely: the header is checked (format, pixel count, decompression bombs) before any
decoding, then the image is made upright RGB with a note for every conversion, or refused with the reason."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# formats PIL may detect for those extensions (MPO: JPEGs from cameras with a second frame)
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
_MODE_NAMES = {"P": "palette", "L": "grayscale", "1": "black-and-white", "YCbCr": "YCbCr", "LAB": "Lab",
               "HSV": "HSV"}
DECODE_SLOTS = 2  # user images decoded at once in this process, whoever asks (parallel uploads wait their turn)
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


class SkipImage(Exception):
    """A file that cannot be used; the message is the reason users see."""


@dataclass
class Source:
    """Where one file came from. `label` is what users see: "photos/cat.png" or "pets.zip:cats/cat.png"."""

    label: str
    path: Path  # the file, or the zip holding it
    member: str | None = None  # name inside the zip
    caption: str | None = None  # from a sidecar .txt/.caption or metadata.jsonl
    caption_file: str | None = None
    repeats: int | None = None  # from a kohya "<repeats>_<name>" folder
    mask: Source | None = None  # a NAME.mask.png beside it (masked training, studio.train.masks)

    def read(self, limit: int) -> bytes:
        """The file's bytes, never more than `limit` + 1 (the caller refuses a larger file)."""
        if self.member is None:
            with open(self.path, "rb") as f:
                return read_bounded(f, limit)
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
            return read_bounded(f, limit)

    def size(self) -> int | None:
        """The file's size in bytes, read from the folder (None for a zip member: `read` is bounded anyway)."""
        return os.stat(self.path).st_size if self.member is None else None


def read_bounded(f, limit: int) -> bytes:
    """At most `limit` + 1 bytes of `f`, in 1 MB pieces (`f.read(limit + 1)` would allocate all of `limit` at once)."""
    chunks, total = [], 0
    while total <= limit:
        chunk = f.read(min(1 << 20, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


@dataclass
class Decoded:
    """An input decoded into upright RGB, with what it was and what was done to it."""

    image: Image.Image
    sha256: str  # of the file's bytes
    pixel_hash: str  # of the RGB pixels: the same picture saved in two formats has the same one
    original_mode: str
    original_size: tuple[int, int]  # after EXIF rotation
    notes: list[str] = field(default_factory=list)
    alpha: Image.Image | None = None  # the alpha channel (L, upright) of a picture that has one


@contextmanager
def decode_slot():
    """Hold one of the DECODE_SLOTS while decoding or converting a user image: bounds the memory of parallel uploads."""
    with _decoding:
        yield


def open_checked(source: Source | str | os.PathLike, max_pixels: int, max_bytes: int) -> Image.Image:
    """The image decoded (its own mode, text chunks read) once its header passed: size on disk, format, pixel count.
    Raises SkipImage with the reason; nothing refused is decoded."""
    with decode_slot():
        return _decode(source, max_pixels, max_bytes)[0]


def _decode(source: Source | str | os.PathLike, max_pixels: int,
            max_bytes: int) -> tuple[Image.Image, bytes, list[str], bool]:
    """(decoded image, the file's bytes, notes, 16-bit?); the caller holds a decode slot."""
    if not isinstance(source, Source):
        source = Source(Path(source).name, Path(source))
    try:
        size = source.size()
    except OSError as e:
        raise SkipImage(f"cannot read the file: {e.strerror or type(e).__name__}") from e
    if size is not None and size > max_bytes:
        raise SkipImage(f"file of {size / 1e6:.0f} MB, larger than the {max_bytes / 1e6:.0f} MB limit: not read")
    try:
        data = source.read(max_bytes)
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:  # RuntimeError: an encrypted zip member
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise SkipImage(f"cannot read the file: {reason}") from e
    if not data:
        raise SkipImage("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise SkipImage(f"file larger than {max_bytes / 1e6:.0f} MB: not read")
    notes: list[str] = []
    with warnings.catch_warnings():
        # PIL only warns between its own limit and twice that: `max_pixels` below decides, with the image's size
        # in the message (above twice PIL's limit, open itself refuses)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise SkipImage(f"oversized (decompression bomb), refused before decoding: {e}") from e
        except UnidentifiedImageError as e:
            raise SkipImage("not a readable image (corrupt, or not the format its name says)") from e
        except Exception as e:  # PIL raises many types for damaged headers
            raise SkipImage(f"damaged image header: {e}") from e
        if im.format not in IMAGE_FORMATS:
            raise SkipImage(f"{im.format} images are not supported; use PNG, JPEG, WebP, BMP, TIFF or GIF")
        width, height = im.size
        if width * height > max_pixels:
            raise SkipImage(f"oversized: {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
                            f"limit of {max_pixels / 1e6:.1f} (a possible decompression bomb); not decoded")
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            notes.append(f"{frames} frames: the first one used")
        deep = _is_high_bit_depth(im)
        try:
            im.load()
        except Exception as e:  # truncated data raises OSError, broken codecs other types
            raise SkipImage(f"truncated or damaged image data: {e}") from e
    return im, data, notes, deep


def load_image(source: Source, min_side: int, max_pixels: int, max_bytes: int,
               prune_gray: bool = False) -> Decoded:
    """Decode `source` into an upright RGB image. Raises SkipImage with the reason for anything unusable."""
    with decode_slot():
        im, data, notes, deep = _decode(source, max_pixels, max_bytes)
        mode = im.mode
        orientation = im.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
            notes.append(f"EXIF orientation {orientation} applied")
        if min(im.size) < min_side:
            raise SkipImage(f"too small: {im.width}x{im.height}, shorter side below the minimum of {min_side} px")
        alpha = None
        if im.mode in ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
            alpha = im.convert("RGBA").getchannel("A")
        rgb = to_rgb(im, notes, prune_gray=prune_gray, deep=deep)
        pixel_hash = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return Decoded(rgb, hashlib.sha256(data).hexdigest(), pixel_hash, mode, rgb.size, notes, alpha)


def _is_high_bit_depth(im: Image.Image) -> bool:
    """16-bit PNG/TIFF: PIL reports 48-bit RGB as plain "RGB", so look at how its data is laid out."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return True
    rawmodes = [t.args[0] if isinstance(t.args, tuple) else t.args for t in (getattr(im, "tile", None) or [])]
    return any(isinstance(r, str) and "16" in r for r in rawmodes)


ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def to_rgb(im: Image.Image, notes: list[str], prune_gray: bool = False, deep: bool = False) -> Image.Image:
    """An RGB version of `im`, with a note for every conversion (nothing changes silently)."""
    mode = im.mode
    if mode in GRAY_MODES and prune_gray:
        raise SkipImage(f"grayscale (mode {mode}): pruned, fewer than 3 colour channels (choose 'convert' to "
                        "keep such images)")
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append(f"converted from {mode} ({'16-bit ' if top > 255 else ''}grayscale) to 8-bit RGB")
        return gray.convert("RGB")
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        see_through = bool((np.asarray(rgba)[..., 3] < 255).any())
        what = "transparent pixels composited on white" if see_through else "unused alpha channel dropped"
        notes.append(f"converted from {mode} to RGB ({what})")
        return flat.convert("RGB")
    if mode == "RGB":
        if deep:
            notes.append("converted from 16-bit to 8-bit RGB")
        return im
    label = f"{mode} ({_MODE_NAMES[mode]})" if mode in _MODE_NAMES else mode
    notes.append(f"converted from {label} to RGB")
    return im.convert("RGB")
