"""Image files for the dataset tests: good pictures in every format, and every kind of bad file."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> words the report's reason must contain
BAD_FILES = {
    "empty.png": "empty file",
    "corrupt.jpg": "not a readable image",
    "truncated.jpg": "truncated",
    "tiny.png": "too small",
    "bomb.png": "decompression bomb",
    "huge.png": "oversized",
    "notes.md": "not a supported image type",
}
# name -> words the conversion note must contain
CONVERTED = {
    "rgba.png": "RGBA",
    "palette.png": "palette",
    "gray.png": "grayscale",
    "cmyk.jpg": "CMYK",
    "gray16.png": "16-bit",
    "rgb16.png": "16-bit",
    "anim.gif": "palette",
}
PLAIN = ["good.png", "good.jpg", "good.webp", "good.bmp", "good.tiff", "rotated.jpg"]


def photo(seed: int, width: int = 96, height: int = 80) -> Image.Image:
    """A smooth random picture (blurred noise): every seed looks different, resizing keeps it alike."""
    rng = np.random.default_rng(seed)
    cells = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BICUBIC)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height: a decompression bomb, never to be decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    signature = b"\x89PNG\r\n\x1a\n"
    Path(path).write_bytes(signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_mixed_folder(folder: Path) -> Path:
    """Good images in every supported format and mode, plus every kind of bad file (see BAD_FILES)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    photo(0).save(folder / "good.png")
    photo(1).save(folder / "good.jpg", quality=92)
    photo(2).save(folder / "good.webp")
    photo(3).save(folder / "good.bmp")
    photo(4).save(folder / "good.tiff")
    frames = [photo(5 + i) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    rgba = photo(8).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 128))
    rgba.save(folder / "rgba.png")
    photo(9).convert("P").save(folder / "palette.png")
    photo(10).convert("L").save(folder / "gray.png")
    photo(11).convert("CMYK").save(folder / "cmyk.jpg")
    deep = np.random.default_rng(12).integers(0, 65535, (80, 96), dtype=np.uint16)
    Image.fromarray(deep).save(folder / "gray16.png")
    deep_rgb = np.random.default_rng(13).integers(0, 65535, (80, 96, 3), dtype=np.uint16)
    cv2.imwrite(str(folder / "rgb16.png"), deep_rgb)  # PIL cannot write 48-bit PNGs
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    photo(14, 96, 80).save(folder / "rotated.jpg", exif=exif)
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.jpg").write_bytes(b"not an image, despite the name " * 8)
    buf = io.BytesIO()
    photo(15, 200, 200).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    photo(16, 20, 20).save(folder / "tiny.png")
    png_header_only(folder / "bomb.png", 100_000, 100_000)  # beyond PIL's own limit
    png_header_only(folder / "huge.png", 5000, 5000)  # within PIL's limit, over the job's max_pixels
    (folder / "notes.md").write_text("my notes")
    (folder / "good.txt").write_text("a caption that came with the images")
    return folder


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder` -> (sha256, mtime_ns): equal before and after means untouched."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                               p.stat().st_mtime_ns) for p in files}
