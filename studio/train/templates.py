"""Training prompt templates: one prompt per line, `[name]` and `[filewords]` filled in as A1111 does."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from studio.files.names import safe_child


@dataclass(frozen=True)
class Templates:
    name: str
    lines: tuple[str, ...]

    @property
    def uses_filewords(self) -> bool:
        return any("[filewords]" in line for line in self.lines)

    def fill(self, rng: random.Random, token: str, caption: str) -> str:
        return fill_template(rng.choice(self.lines), token, caption)


def fill_template(line: str, token: str, caption: str) -> str:
    """`[name]` -> the token, `[filewords]` -> the caption (A1111 also drops the token from the caption)."""
    words = caption.replace(token, "").strip(" ,") if token else caption
    return " ".join(line.replace("[name]", token).replace("[filewords]", words).split())


def template_dirs(assets_dir: Path, presets_dir: Path | None = None) -> list[Path]:
    """User templates (presets/templates/) first, then the shipped ones (assets/templates/)."""
    dirs = [Path(presets_dir) / "templates"] if presets_dir else []
    return dirs + [Path(assets_dir) / "templates"]


def list_templates(assets_dir: Path, presets_dir: Path | None = None) -> list[str]:
    names: list[str] = []
    for folder in template_dirs(assets_dir, presets_dir):
        if folder.is_dir():
            names += [p.stem for p in sorted(folder.glob("*.txt")) if p.stem not in names]
    return names


def load_templates(name_or_path: str, assets_dir: Path, presets_dir: Path | None = None) -> Templates:
    """A template by name (`style_filewords`) or a path to a `.txt` file."""
    path = Path(name_or_path)
    if not (path.suffix == ".txt" and path.is_file()):
        path = None
        for folder in template_dirs(assets_dir, presets_dir):
            candidate = safe_child(folder, f"{name_or_path}.txt") if folder.is_dir() else None
            if candidate is not None and candidate.is_file():
                path = candidate
                break
        if path is None:
            known = ", ".join(list_templates(assets_dir, presets_dir))
            raise ValueError(f"unknown prompt template {name_or_path!r}; choose one of: {known}")
    lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not lines:
        raise ValueError(f"prompt template {path.name} has no lines")
    if not any("[name]" in line or "[filewords]" in line for line in lines):
        raise ValueError(f"prompt template {path.name} never uses [name] or [filewords], so training would not "
                         "see the embedding")
    return Templates(path.stem, lines)
