"""The files of an upscale, as A1111's Extras makes them: the source read safely with its PNG text (the
generation parameters), and a PNG that keeps that text and adds the "Postprocess upscale by / upscaler" note."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from studio.files.atomic import atomic_path
from studio.files.images import SkipImage, Source, decode_slot, open_checked, to_rgb

MAX_SOURCE_PIXELS = 64_000_000  # sources larger than this are refused before decoding (as init images)
MAX_SOURCE_BYTES = 200_000_000
# where A1111 puts the note: image.info["postprocessing"] and the saved PNG's "extras" chunk
NOTE_KEYS = ("postprocessing", "extras")


@dataclass
class SourceImage:
    """An image to upscale: upright RGB, with the text chunks of its file ("parameters", ...)."""

    image: Image.Image
    text: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # conversions made ("converted from RGBA ...")


def read_source(path: str | Path, max_pixels: int = MAX_SOURCE_PIXELS,
                max_bytes: int = MAX_SOURCE_BYTES) -> SourceImage:
    """`path` as upright RGB with its text chunks; its header is checked (size, format, pixel count) before any
    decoding (studio.files.images). ValueError naming the file when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no image file {path.name!r}")
    try:
        image = open_checked(Source(path.name, path), max_pixels=max_pixels, max_bytes=max_bytes)
    except SkipImage as e:
        raise ValueError(f"{path.name}: {e}") from None
    with decode_slot():
        text = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
        notes: list[str] = []
        orientation = image.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            image = ImageOps.exif_transpose(image)
            notes.append(f"EXIF orientation {orientation} applied")
        rgb = to_rgb(image, notes)
    return SourceImage(rgb, text, notes)


def quote(value) -> str:
    """A value as A1111 writes it in an infotext: JSON-quoted when it holds , : or a quote or line break."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def postprocess_note(upscaler: str, scale: float | None = None, size: tuple[int, int] | None = None) -> str:
    """The note A1111's Extras writes: "Postprocess upscale by: 4, Postprocess upscaler: 4x-UltraSharp" (or
    "Postprocess upscale to: 1024x1024" for a size)."""
    how = (f"Postprocess upscale to: {size[0]}x{size[1]}" if size is not None
           else f"Postprocess upscale by: {float(scale):g}")
    return f"{how}, Postprocess upscaler: {quote(upscaler)}"


def png_text(source_text: dict[str, str], note: str) -> PngInfo:
    """PNG text chunks: the source's (its "parameters" first among them), with the note replacing any earlier one."""
    info = PngInfo()
    for key, value in source_text.items():
        if key not in NOTE_KEYS:
            info.add_text(key, value)
    for key in NOTE_KEYS:
        info.add_text(key, note)
    return info


def save_png(image: Image.Image, path: str | Path, source_text: dict[str, str] | None, note: str) -> Path:
    """Write `image` to `path` as a PNG with png_text, atomically (a crash never leaves half a file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_text(source_text or {}, note))
    return path


def output_path(folder: str | Path, source: str | Path, upscaler: str, scale: float | None = None,
                size: tuple[int, int] | None = None) -> Path:
    """A new file in `folder` for an upscale of `source`: "<name>-<upscaler>-x4.png" (or "-1024x768"), with
    "-2", "-3", ... when that exists, so nothing is overwritten (the source included)."""
    how = f"{size[0]}x{size[1]}" if size is not None else f"x{float(scale):g}"
    upscaler_part = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(upscaler).name)
    stem = f"{Path(source).stem}-{upscaler_part}-{how}"
    folder = Path(folder)
    candidate, n = folder / f"{stem}.png", 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}.png"
    return candidate
