"""Pickled weights: the globals a pickle would import (read with pickletools, never run), and the messages
for files that torch.load(weights_only=True) refused."""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path


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
