"""`micro`: a tiny SD 1.x-family text-to-image model pretrained on a procedural world of captioned shapes.

world.py draws the scenes and their captions, oracle.py reads the attributes back from any image,
pretrain.py trains the model (on the lent GPU) and writes the diffusers folder in assets/micro/.
"""

from pathlib import Path

MICRO_NAME = "micro"


def micro_dir(assets_dir: Path) -> Path:
    """Where the shipped micro model lives (a diffusers folder)."""
    return Path(assets_dir) / "micro"


def micro_available(assets_dir: Path) -> bool:
    folder = micro_dir(assets_dir)
    return (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
