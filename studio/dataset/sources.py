"""Scanning training images: folders, zips and uploads, with sidecar captions (.txt, .caption, metadata.jsonl)
and kohya `<repeats>_<name>` folders."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from studio.files.images import Source
from studio.files.names import UnsafeNameError, safe_child

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


CAPTION_EXTS = (".txt", ".caption")


# files a studio dataset holds besides its images and captions: not inputs when a dataset is re-imported
DATASET_FILES = ("metadata.jsonl", "dataset.json", "report.json")


KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


# cat.png's mask: cat.mask.png, or OneTrainer's cat-masklabel.png (any image type)
MASK_SUFFIXES = (".mask", "-masklabel")


def is_mask_name(stem: str) -> bool:
    """Whether a file stem names a mask (`cat.mask`, `cat-masklabel`), not a training image."""
    return stem.lower().endswith(MASK_SUFFIXES)


def image_stem_of_mask(stem: str) -> str:
    """The stem of the image a mask belongs to (`photos/cat.mask` -> `photos/cat`)."""
    suffix = next(x for x in MASK_SUFFIXES if stem.lower().endswith(x))
    return stem[: -len(suffix)]


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
    masks: dict[str, Source] = {}  # "folder/stem" of an image -> its NAME.mask.png (masked training)
    for rel, path, member in entries:
        p = PurePosixPath(rel)
        if p.suffix.lower() in IMAGE_EXTS and is_mask_name(str(p.with_suffix(""))):
            masks[image_stem_of_mask(str(p.with_suffix("")))] = Source(label_of(rel), path, member)
    found = []
    for rel, path, member in entries:
        p = PurePosixPath(rel)
        suffix = p.suffix.lower()
        if suffix in CAPTION_EXTS or p.name in DATASET_FILES:
            continue
        if suffix in IMAGE_EXTS and is_mask_name(str(p.with_suffix(""))):
            continue  # a mask beside its image, not an image to train on
        source = Source(label_of(rel), path, member)
        if suffix not in IMAGE_EXTS:
            found.append((source, f"not a supported image type ({suffix or 'no extension'}); supported: "
                                  f"{' '.join(IMAGE_EXTS)}"))
            continue
        stem = str(p.with_suffix(""))
        source.mask = masks.get(stem)
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
