"""Named files in the user folders (models/, loras/, ...): list them, resolve names safely, hash them."""

from __future__ import annotations

import hashlib
import json
import pickletools
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from studio.atomic import write_text

CHECKPOINT_EXTS = (".safetensors", ".ckpt")


class UnsafeNameError(ValueError):
    """A name that would reach outside its folder."""


def safe_child(base: Path, name: str) -> Path:
    """`base/name`, refusing anything that would leave `base`.

    Rejects NUL bytes, absolute paths, drive letters, `..` parts (with / or \\ as separator)
    and symlinks that resolve outside `base`.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafeNameError("a name is required")
    if "\x00" in name:
        raise UnsafeNameError(f"name contains a NUL byte: {name!r}")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]):
        raise UnsafeNameError(f"name must be relative to {base.name}/, got {name!r}")
    if any(p == ".." for p in parts):
        raise UnsafeNameError(f"name must stay inside {base.name}/, got {name!r}")
    base_resolved = Path(base).resolve()
    path = base_resolved.joinpath(*parts).resolve()
    if path != base_resolved and base_resolved not in path.parents:
        raise UnsafeNameError(f"{name!r} points outside {base.name}/ (symlink?)")
    return path


@dataclass(frozen=True)
class ModelEntry:
    name: str  # path relative to models/, posix separators: what the dropdown shows
    path: Path
    kind: str  # "diffusers" or "single-file"


def list_models(models_dir: Path) -> list[ModelEntry]:
    """Diffusers folders (with model_index.json) and single checkpoint files under `models_dir`."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    root = models_dir.resolve()
    entries: list[ModelEntry] = []
    for path in sorted(models_dir.rglob("*")):
        rel = path.relative_to(models_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files, our own temporary files
        if root not in path.resolve().parents:
            continue  # a symlink leading out of models/: names never reach outside the folder
        if any(parent in {e.path for e in entries if e.kind == "diffusers"} for parent in path.parents):
            continue  # files inside a diffusers folder are its components, not models
        if path.is_dir() and (path / "model_index.json").is_file():
            entries.append(ModelEntry(rel.as_posix(), path, "diffusers"))
        elif path.is_file() and path.suffix.lower() in CHECKPOINT_EXTS:
            entries.append(ModelEntry(rel.as_posix(), path, "single-file"))
    return entries


# --- hashes (A1111: "Model hash" is the first 10 hex digits of the file's SHA-256) ---

_hash_lock = threading.Lock()


def sha256_file(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) because checkpoints are gigabytes."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _read_cache(cache_file)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache_file is not None:
        with _hash_lock:
            cache = _read_cache(cache_file)
            cache[key] = value
            write_text(cache_file, json.dumps(cache, indent=0))
    return value


def sha256_folder(folder: Path, cache_file: Path | None = None) -> str:
    """A diffusers folder's hash: SHA-256 over its weight files' hashes, in name order."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin"):
            digest.update(f.relative_to(folder).as_posix().encode())
            digest.update(sha256_file(f, cache_file).encode())
    return digest.hexdigest()


def _read_cache(cache_file: Path | None) -> dict:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return json.loads(Path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a re-hash


def pickle_globals(path: Path) -> set[str] | None:
    """The Python globals a pickle (or the pickles inside a torch zip file) would import, read with pickletools,
    which never executes anything. None when the bytes are not a pickle at all."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:
            blobs = [Path(path).read_bytes()]
        found: set[str] = set()
        for blob in blobs:
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(blob):
                if op.name == "GLOBAL":
                    found.add(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        return found
    except Exception:
        return None


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "numpy.core.multiarray._reconstruct",
                         "numpy.dtype", "numpy.ndarray")


def risky_globals(path: Path) -> list[str] | None:
    """The globals a pickle would import beyond torch's tensor machinery (what a code-running payload needs);
    None when the file is not a pickle."""
    found = pickle_globals(Path(path))
    if found is None:
        return None
    return sorted(g for g in found if not g.startswith(_SAFE_GLOBAL_PREFIXES))


def hostile_pickle_in(folder: Path) -> Path | None:
    """The first pickled weight file under `folder` (.bin, .pt, .ckpt, .pth) that asks to import code, if any:
    for naming the culprit when a library refuses a folder's weights."""
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.suffix.lower() in (".bin", ".pt", ".ckpt", ".pth") and risky_globals(f):
            return f
    return None


def folder_refusal(source: str | Path, error: Exception) -> str:
    """The message for a model folder whose pickled weights torch.load(weights_only=True) refused (transformers and
    diffusers read .bin files that way): names the file that asks to run code."""
    folder = Path(source).expanduser()
    hostile = hostile_pickle_in(folder) if folder.is_dir() else None
    if hostile is None:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        return f"a pickled weight file was refused by torch.load(weights_only=True), never run ({last[:200]})"
    rel = hostile.relative_to(folder).as_posix()
    return unpickling_refusal(hostile, error).replace(hostile.name, rel, 1)


def unpickling_refusal(path: Path, error: Exception) -> str:
    """The message for a pickle that torch.load(weights_only=True) would not read: code, or just damage."""
    name = Path(path).name
    risky = risky_globals(Path(path))
    if risky is None:
        return f"{name} is not a readable file (damaged, or not a PyTorch pickle)"
    what = f" ({', '.join(risky[:3])})" if risky else ""
    return (f"refused {name}: it asks to run Python code{what} when opened, so it was not unpickled "
            "(possibly malicious). Use a .safetensors version of it.")
