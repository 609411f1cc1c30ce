"""Generation presets: JSON files that fill a GenerateJob's settings (shipped ones and the user's own)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from studio.config import ROOT, check_settings
from studio.files.atomic import write_text
from studio.generation.job import GenerateJob

SHIPPED = ROOT / "presets" / "generation"
# settings a preset may carry: everything of a job except what is per image
PRESET_KEYS = tuple(f.name for f in fields(GenerateJob) if f.name not in ("prompt", "negative_prompt"))


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: dict
    path: Path


def _folders(presets_dir: Path) -> list[Path]:
    user = Path(presets_dir) / "generation"
    return [SHIPPED] if user.resolve() == SHIPPED.resolve() else [SHIPPED, user]


def load_preset(path: Path) -> Preset:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        settings = dict(data["settings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"preset {Path(path).name} is not valid: {e}") from e
    unknown = sorted(set(settings) - set(PRESET_KEYS))
    if unknown:
        raise ValueError(f"preset {Path(path).name} has unknown settings {unknown}; known: {list(PRESET_KEYS)}")
    check_settings(lambda values: GenerateJob.from_dict({"prompt": "", **values}), settings,
                   f"preset {Path(path).name}")
    return Preset(str(data.get("name") or Path(path).stem), str(data.get("description", "")), settings, Path(path))


def list_presets(presets_dir: Path) -> dict[str, Preset]:
    """Name -> preset; a broken file is skipped rather than hiding the others."""
    return scan_presets(_folders(presets_dir), load_preset)


def scan_presets(folders: list[Path], load) -> dict:
    """Name -> preset over `folders` (later ones win a name); a file `load` refuses is skipped, not fatal."""
    found = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            try:
                preset = load(path)
            except ValueError:
                continue
            found[preset.name] = preset
    return found


def apply_preset(job: GenerateJob, preset: Preset) -> GenerateJob:
    values = job.to_dict()
    values.update(preset.settings)
    return GenerateJob.from_dict(values)


def save_preset(presets_dir: Path, name: str, job: GenerateJob, description: str = "") -> Path:
    """Save the job's settings (not its prompt) as presets/generation/<slug>.json."""
    name = (name or "").strip()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not slug:
        raise ValueError(f"preset name must contain letters or digits, got {name!r}")
    job.validate()
    settings = {k: v for k, v in job.to_dict().items() if k in PRESET_KEYS}
    path = Path(presets_dir) / "generation" / f"{slug}.json"
    write_text(path, json.dumps({"name": name, "description": description, "settings": settings}, indent=2) + "\n")
    return path
