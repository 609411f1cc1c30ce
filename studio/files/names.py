"""Names of user files: resolve a name inside its folder, refusing anything that would leave it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


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
