"""Reading training images: folders, zips and uploads scanned (with sidecar captions and kohya repeats),
each file checked, decoded and turned into an upright RGB image, or refused with the reason."""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.library import UnsafeNameError, safe_child

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# formats PIL may detect for those extensions (MPO: JPEGs from cameras with a second frame)
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF")
CAPTION_EXTS = (".txt", ".caption")
# files a studio dataset holds besides its images and captions: not inputs when a dataset is re-imported
DATASET_FILES = ("metadata.jsonl", "dataset.json", "report.json")
KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
_MODE_NAMES = {"P": "palette", "L": "grayscale", "1": "black-and-white", "YCbCr": "YCbCr", "LAB": "Lab",
               "HSV": "HSV"}


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

    def read(self, limit: int) -> bytes:
        """The file's bytes, never more than `limit` + 1 (the caller refuses a larger file)."""
        if self.member is None:
            with open(self.path, "rb") as f:
                return f.read(limit + 1)
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
            return f.read(limit + 1)


@dataclass
class Decoded:
    """An input decoded into upright RGB, with what it was and what was done to it."""

    image: Image.Image
    sha256: str  # of the file's bytes
    pixel_hash: str  # of the RGB pixels: the same picture saved in two formats has the same one
    original_mode: str
    original_size: tuple[int, int]  # after EXIF rotation
    notes: list[str] = field(default_factory=list)


# --- scanning ------------------------------------------------------------------------------------


def scan_inputs(inputs: Iterable[Path | str], max_bytes: int) -> list[tuple[Source, str]]:
    """(source, reason) per file found: folders recursively, zips member by member, single files together.

    `reason` is empty for image files and says why anything else is not used.
    """
    found: list[tuple[Source, str]] = []
    loose: list[Path] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        if path.is_dir():
            found += _scan_folder(path)
        elif path.suffix.lower() == ".zip":
            found += _scan_zip(path, max_bytes)
        else:
            loose.append(path)
    if loose:
        # uploads arrive as single files, each in its own temporary folder: pair captions by name
        found += _group([(p.name, p, None) for p in loose], label_of=str, kohya=False)
    return found


def _scan_folder(folder: Path) -> list[tuple[Source, str]]:
    entries = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            continue  # hidden files and folders (.DS_Store, .git, our own temporary files)
        if path.is_file() or path.is_symlink():
            entries.append((rel, path, None))
    base = folder.resolve().name or str(folder)
    found = _group(entries, label_of=lambda rel: f"{base}/{rel}", kohya=True)
    checked = []
    for source, reason in found:
        if not reason and source.path.is_symlink():
            try:
                safe_child(folder, source.path.relative_to(folder).as_posix())
            except UnsafeNameError:
                reason = "symlink pointing outside the input folder: not followed"
        checked.append((source, reason))
    return checked


def _scan_zip(path: Path, max_bytes: int) -> list[tuple[Source, str]]:
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        return [(Source(path.name, path), f"damaged zip file: {e}")]
    entries, refused = [], []
    for info in infos:
        name = info.filename
        source = Source(f"{path.name}:{name}", path, name)
        if is_zip_slip(name):
            refused.append((source, "zip slip: the member's path leaves the archive (absolute or '..'); "
                                    "not extracted"))
        elif name.startswith("__MACOSX/") or PurePosixPath(name).name.startswith("._"):
            continue  # macOS resource forks, never pictures
        elif info.file_size > max_bytes:
            refused.append((source, f"too large: {info.file_size / 1e6:.0f} MB unpacked, over the "
                                    f"{max_bytes / 1e6:.0f} MB limit"))
        else:
            entries.append((name, path, name))
    texts = {}
    with zipfile.ZipFile(path) as z:
        for _, _, name in entries:
            if _is_sidecar(name):
                texts[name] = _decode_text(lambda n=name: z.read(n))
    return refused + _group(entries, label_of=lambda n: f"{path.name}:{n}", kohya=True, texts=texts)


def is_zip_slip(name: str) -> bool:
    """A zip member name that would land outside the folder it is extracted into."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    absolute = name.startswith(("/", "\\")) or (bool(parts) and ":" in parts[0])
    return absolute or ".." in parts or "\x00" in name


def _is_sidecar(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in CAPTION_EXTS or PurePosixPath(name).name == "metadata.jsonl"


def _group(entries: list[tuple[str, Path, str | None]], label_of: Callable[[str], str], kohya: bool,
           texts: dict[str, str | None] | None = None) -> list[tuple[Source, str]]:
    """Images with their sidecar captions (same stem), metadata.jsonl texts and kohya repeats."""

    def text_of(path: Path, member: str | None) -> str | None:
        return (texts or {}).get(member) if member is not None else _decode_text(path.read_bytes)

    sidecars: dict[str, tuple[str, str]] = {}  # "folder/stem" -> (caption, sidecar name)
    metadata: dict[str, str] = {}  # "folder/file_name" -> text
    for rel, path, member in entries:
        p = PurePosixPath(rel)
        if p.suffix.lower() in CAPTION_EXTS:
            text = text_of(path, member)
            key = str(p.with_suffix(""))
            # kohya's default is .caption, A1111's .txt; with both present .txt wins
            if text is not None and (key not in sidecars or p.suffix.lower() == ".txt"):
                sidecars[key] = (text.strip(), p.name)
        elif p.name == "metadata.jsonl":
            metadata.update(_read_metadata(text_of(path, member) or "", p.parent))
    found = []
    for rel, path, member in entries:
        p = PurePosixPath(rel)
        suffix = p.suffix.lower()
        if suffix in CAPTION_EXTS or p.name in DATASET_FILES:
            continue
        source = Source(label_of(rel), path, member)
        if suffix not in IMAGE_EXTS:
            found.append((source, f"not a supported image type ({suffix or 'no extension'}); supported: "
                                  f"{' '.join(IMAGE_EXTS)}"))
            continue
        stem = str(p.with_suffix(""))
        if stem in sidecars:
            source.caption, source.caption_file = sidecars[stem]
        elif str(p) in metadata:
            source.caption, source.caption_file = metadata[str(p)], "metadata.jsonl"
        if kohya and len(p.parts) > 1 and (m := KOHYA_DIR.match(p.parts[-2])):
            source.repeats = int(m.group(1))
        found.append((source, ""))
    return found


def _read_metadata(text: str, folder: PurePosixPath) -> dict[str, str]:
    """Hugging Face imagefolder metadata.jsonl: {"file_name": ..., "text": ...} per line."""
    out = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a broken line costs its caption, not the import
        caption = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(caption, str):
            out[str(folder / row["file_name"])] = caption.strip()
    return out


def _decode_text(read: Callable[[], bytes]) -> str | None:
    try:
        return read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, KeyError):
        return None


# --- decoding ------------------------------------------------------------------------------------


def load_image(source: Source, min_side: int, max_pixels: int, max_bytes: int,
               prune_gray: bool = False) -> Decoded:
    """Decode `source` into an upright RGB image. Raises SkipImage with the reason for anything unusable."""
    try:
        data = source.read(max_bytes)
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:  # RuntimeError: an encrypted zip member
        raise SkipImage(f"cannot read the file: {e}") from e
    if not data:
        raise SkipImage("empty file (0 bytes)")
    if len(data) > max_bytes:
        raise SkipImage(f"file larger than {max_bytes / 1e6:.0f} MB: not read")
    notes: list[str] = []
    with warnings.catch_warnings():
        # PIL only warns between its own limit and twice that; every bomb must stop here
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
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
    mode = im.mode
    orientation = im.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"EXIF orientation {orientation} applied")
    if min(im.size) < min_side:
        raise SkipImage(f"too small: {im.width}x{im.height}, shorter side below the minimum of {min_side} px")
    rgb = to_rgb(im, notes, prune_gray=prune_gray, deep=deep)
    pixel_hash = hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()
    return Decoded(rgb, hashlib.sha256(data).hexdigest(), pixel_hash, mode, rgb.size, notes)


def _is_high_bit_depth(im: Image.Image) -> bool:
    """16-bit PNG/TIFF: PIL reports 48-bit RGB as plain "RGB", so look at how its data is laid out."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return True
    rawmodes = [t.args[0] if isinstance(t.args, tuple) else t.args for t in (getattr(im, "tile", None) or [])]
    return any(isinstance(r, str) and "16" in r for r in rawmodes)


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
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
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
