"""Generation presets: JSON files that fill a GenerateJob's settings (shipped ones and the user's own)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

from studio.config import ROOT, check_settings
from studio.files.atomic import write_text
from studio.files.names import UnsafeNameError, check_name
from studio.generation.job import GenerateJob

SHIPPED = ROOT / "presets" / "generation"
# settings a preset may carry: everything of a job except what is per image
PRESET_KEYS = tuple(f.name for f in fields(GenerateJob) if f.name not in ("prompt", "negative_prompt"))


class PresetExistsError(ValueError):
    """Saving would replace a preset of the same name, and the caller did not ask to replace it."""


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


def list_presets(presets_dir: Path, skipped: dict[str, str] | None = None) -> dict[str, Preset]:
    """Name -> preset; a broken file is skipped (its reason in `skipped`) rather than hiding the others."""
    return scan_presets(_folders(presets_dir), load_preset, skipped)


def scan_presets(folders: list[Path], load, skipped: dict[str, str] | None = None) -> dict:
    """Name -> preset over `folders` (later ones win a name); a file `load` refuses, or whose name and file name
    are both names check_name refuses (a newline, CON), is skipped with its reason, not fatal."""
    found = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            try:
                preset = _with_usable_name(load(path), path)
            except ValueError as e:
                if skipped is not None:
                    skipped[path.name] = str(e)
                continue
            found[preset.name] = preset
    return found


def _with_usable_name(preset, path: Path):
    """`preset` under its own name if check_name accepts it, else under its file's name (an older slugged file)."""
    try:
        check_name(preset.name, "preset")
        return preset
    except UnsafeNameError as e:
        try:
            return dataclasses.replace(preset, name=check_name(path.stem, "preset"))
        except UnsafeNameError:
            raise e from None


def apply_preset(job: GenerateJob, preset: Preset) -> GenerateJob:
    values = job.to_dict()
    values.update(preset.settings)
    return GenerateJob.from_dict(values)


def save_preset(presets_dir: Path, name: str, job: GenerateJob, description: str = "",
                overwrite: bool = False) -> Path:
    """Save the job's settings (not its prompt) as presets/generation/<name>.json. A name check_name refuses is
    refused, never changed; a preset of the same name (any case) raises PresetExistsError unless `overwrite`."""
    check_name(name, "preset")
    job.validate()
    settings = {k: v for k, v in job.to_dict().items() if k in PRESET_KEYS}
    folder = Path(presets_dir) / "generation"
    path = folder / f"{name}.json"
    same = [p for p in (sorted(folder.glob("*.json")) if folder.is_dir() else [])
            if p.stem.casefold() == name.casefold()]
    taken = {n.casefold(): preset for n, preset in list_presets(presets_dir).items()}
    owner = taken[name.casefold()].path if name.casefold() in taken else None
    clash = same[0].name if same else (owner.name if owner is not None else None)
    if clash and not overwrite:
        raise PresetExistsError(f"a preset named {name!r} already exists ({clash}); choose another name, or ask to "
                                "replace it")
    if same:
        path = same[0]  # replacing: the same file, whatever case its name has (one file, not two that differ in case)
    elif owner is not None and owner.parent.resolve() == folder.resolve():
        path = owner  # the user's file that carries this name
    write_text(path, json.dumps({"name": name, "description": description, "settings": settings}, indent=2) + "\n")
    return path
