"""Names of user files: one check for every name a user gives (presets, datasets, runs, storyboards, surveys,
embeddings, LoRAs), and names resolved inside their folder, refusing anything that would leave it."""

from __future__ import annotations

import unicodedata
from pathlib import Path, PurePosixPath

MAX_NAME_CHARS = 100  # leaves room for suffixes (".safetensors", "-<time>") under the 255-byte file-name limit
MAX_NAME_BYTES = 200
FORBIDDEN = set('/\\:*?"<>|')  # separators, and what Windows file names cannot hold
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


class UnsafeNameError(ValueError):
    """A name that would reach outside its folder."""


def check_name(name, what: str = "file") -> str:
    """`name` if it can be a file or folder name on Linux, macOS and Windows and come back as the same name when
    the folder is listed; else UnsafeNameError with the reason. Nothing is corrected: `a/b` is refused, not `a-b`."""
    if not isinstance(name, str) or not name.strip():
        raise UnsafeNameError(f"a {what} name is required")
    reason = _name_problem(name)
    if reason:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise UnsafeNameError(f"{what} name {shown!r} cannot be used: {reason}. Use letters, digits, spaces, "
                              f"'-', '_' and '.', up to {MAX_NAME_CHARS} characters")
    return name


def _name_problem(name: str) -> str | None:
    if name != name.strip():
        return "it starts or ends with a space"
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"it is {len(name)} characters long"
    bad = sorted({c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")})
    if bad:
        return f"it contains control characters ({', '.join(repr(c) for c in bad)})"
    bad = sorted(FORBIDDEN & set(name))
    if bad:
        return f"it contains {' '.join(bad)}, which cannot be in a file name"
    if name.startswith("."):
        return "it starts with a dot (hidden files are not listed)"
    if name.endswith("."):
        return "it ends with a dot (Windows drops it)"
    if name.split(".")[0].strip().upper() in RESERVED:
        return "it is a reserved device name on Windows"
    return None


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
