"""The models/ folder: the diffusers folders and single checkpoint files it holds, as the model dropdown lists them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_EXTS = (".safetensors", ".ckpt")
VAE_SIDECAR = ".vae.safetensors"  # NAME.vae.safetensors beside NAME.safetensors: its VAE (A1111), not a model


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
        elif path.is_file() and path.name.lower().endswith(VAE_SIDECAR):
            continue  # a checkpoint's own VAE, used when the VAE menu is Automatic
        elif path.is_file() and path.suffix.lower() in CHECKPOINT_EXTS:
            entries.append(ModelEntry(rel.as_posix(), path, "single-file"))
    return entries
