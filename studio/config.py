"""Paths and settings of one studio process: one dataclass, overridden by flags and env."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StudioConfig:
    root: Path = ROOT
    # user folders, scanned at start and on refresh
    models_dir: Path = ROOT / "models"
    loras_dir: Path = ROOT / "loras"
    embeddings_dir: Path = ROOT / "embeddings"
    outputs_dir: Path = ROOT / "outputs"
    presets_dir: Path = ROOT / "presets"
    # training datasets the Dataset tab writes (images, captions, dataset.json)
    datasets_dir: Path = ROOT / "datasets"
    # training runs: runs/<name>-<time>/ with config.yaml, loss.csv, checkpoints, previews
    runs_dir: Path = ROOT / "runs"
    # storyboard projects: storyboards/<name>/project.json, references, frames, exports
    storyboards_dir: Path = ROOT / "storyboards"
    # ControlNet weights (diffusers folders or single files), scanned like loras/
    controlnet_dir: Path = ROOT / "controlnet"
    # shipped data: model configs for offline single-file loading, templates
    assets_dir: Path = ROOT / "assets"
    # files we derive once and reuse (the CLIP tokenizer built from open_clip's BPE file)
    cache_dir: Path = ROOT / ".cache"
    # "auto" picks cuda, then mps, then cpu
    device: str = "auto"
    # "auto": fp16 on CUDA/MPS, fp32 on CPU; or "fp16", "bf16", "fp32"
    precision: str = "auto"
    # memory options users know from A1111/diffusers
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    # torch.compile the UNet (studio.models.speed.COMPILE_MODES); CUDA only: faster after the first image at each size
    compile: str = "off"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> StudioConfig:
        """Defaults, then STUDIO_* environment variables, then explicit overrides."""
        cfg = cls()
        home = os.environ.get("STUDIO_HOME")
        if home:
            cfg = cfg.with_home(Path(home))
        env = {
            "device": os.environ.get("STUDIO_DEVICE"),
            "precision": os.environ.get("STUDIO_PRECISION"),
        }
        cfg = replace(cfg, **{k: v for k, v in env.items() if v})
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def with_home(self, home: Path) -> StudioConfig:
        """The same settings with every user folder under `home` (tests use a tmp dir)."""
        home = Path(home)
        return replace(
            self,
            models_dir=home / "models",
            loras_dir=home / "loras",
            embeddings_dir=home / "embeddings",
            outputs_dir=home / "outputs",
            presets_dir=home / "presets",
            datasets_dir=home / "datasets",
            runs_dir=home / "runs",
            storyboards_dir=home / "storyboards",
            controlnet_dir=home / "controlnet",
            cache_dir=home / ".cache",
        )

    def ensure_dirs(self) -> None:
        for d in (self.models_dir, self.loras_dir, self.embeddings_dir, self.outputs_dir,
                  self.presets_dir, self.datasets_dir, self.runs_dir, self.cache_dir, self.storyboards_dir,
                  self.controlnet_dir):
            d.mkdir(parents=True, exist_ok=True)


def check_settings(make: Callable[[dict], object], settings: dict, source: str) -> None:
    """Validate a settings file's values (a preset, a run's config.yaml) by building a job from them and calling
    its validate(); on failure the error names the file, the bad key and its value.

    `make(values)` builds the job from the defaults plus `values`. Each key is then tried alone to find the one at
    fault; when every key is fine alone, the combination is reported."""
    bad = (ValueError, TypeError, AttributeError)
    try:
        make(dict(settings)).validate()
        return
    except bad as e:
        whole = e
    for key, value in settings.items():
        try:
            make({key: value}).validate()
        except bad as e:
            raise ValueError(f"{source}: setting {key!r} = {value!r} is not valid: {e}") from None
    raise ValueError(f"{source}: the settings {sorted(settings)} do not fit together: {whole}") from None


def check_known_keys(cls, values: dict, what: str) -> None:
    """Unknown keys in a settings dict for dataclass `cls` are an error naming them, not silently dropped."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {sorted(names)}")
