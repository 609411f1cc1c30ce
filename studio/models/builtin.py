"""The built-in models shipped in assets/: the micro model and its canny ControlNet (names, folders, presence)."""

from pathlib import Path

MICRO_NAME = "micro"
MICRO_CONTROLNET_NAME = "micro-canny"


def micro_dir(assets_dir: Path) -> Path:
    """Where the shipped micro model lives (a diffusers folder)."""
    return Path(assets_dir) / "micro"


def micro_available(assets_dir: Path) -> bool:
    folder = micro_dir(assets_dir)
    return (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()


def micro_controlnet_dir(assets_dir: Path) -> Path:
    """Where the shipped canny ControlNet of the micro model lives (a diffusers ControlNetModel folder)."""
    return Path(assets_dir) / "micro-controlnet-canny"


def micro_controlnet_available(assets_dir: Path) -> bool:
    folder = micro_controlnet_dir(assets_dir)
    return (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model.*"))
