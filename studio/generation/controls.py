"""ControlNet units of a generation (A1111's ControlNet extension: model, picture, preprocessor, weight, start/end,
control mode, resize mode), validated before model work, their maps made from checked pictures, the command
line's TYPE:MODEL:IMAGE[:WEIGHT[:START:END]] read, and the `ControlNet N` infotext fields A1111 writes."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from studio.config import real_number, text
from studio.control import preprocessors
from studio.generation.denoise import CONTROL_MODES

# sd-webui-controlnet's resize modes, and the img2img resize each one is (studio.generation.job.resize_image)
RESIZE_MODES = {"Just Resize": "Just resize", "Crop and Resize": "Crop and resize", "Resize and Fill": "Resize and fill"}
MAX_UNITS = 4


@dataclass
class ControlUnit:
    model: str  # a ControlNet in controlnet/ (name), micro-canny, a hub id, or a path where paths are allowed
    image: str | os.PathLike | Image.Image  # the picture (or a map the user made: module "none")
    module: str = "none"  # a preprocessor (studio.control.preprocessors), "none" for a finished map
    weight: float = 1.0
    start: float = 0.0  # guidance start and end: fractions of the steps it acts in
    end: float = 1.0
    mode: str = CONTROL_MODES[0]
    resize_mode: str = "Crop and Resize"
    params: dict = field(default_factory=dict)  # the preprocessor's (e.g. {"low": 100, "high": 200})

    @classmethod
    def from_value(cls, value) -> ControlUnit:
        """A unit from a ControlUnit or a dict (presets, the API); unknown keys are an error."""
        if isinstance(value, ControlUnit):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"a control must be a dict with model, image, module, ...; got {type(value).__name__}")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown control keys: {', '.join(sorted(unknown))}")
        return cls(**value)

    def to_dict(self) -> dict:
        out = asdict(self)
        if isinstance(self.image, Image.Image):
            out["image"] = None
        elif self.image is not None:
            out["image"] = str(self.image)
        return out

    def validate(self, index: int = 0) -> None:
        where = f"ControlNet {index}"
        try:
            text("model", self.model)
            if not self.model.strip():
                raise ValueError("model must name a ControlNet")
            if not isinstance(self.image, (str, os.PathLike, Image.Image)):
                raise ValueError(f"image must be a picture file's path or an image, got {type(self.image).__name__}")
            if isinstance(self.image, (str, os.PathLike)) and not Path(self.image).is_file():
                raise ValueError(f"image {Path(self.image).name!r} does not exist")
            self.params = preprocessors.check_params(text("module", self.module), self.params)
            self.weight = real_number("weight", self.weight, 0, 2)
            self.start = real_number("guidance start", self.start, 0, 1)
            self.end = real_number("guidance end", self.end, 0, 1)
            if self.start >= self.end:
                raise ValueError(f"guidance start must be before its end, got {self.start:g} >= {self.end:g}")
            if self.mode not in CONTROL_MODES:
                raise ValueError(f"control mode must be one of {', '.join(CONTROL_MODES)}, got {self.mode!r}")
            if self.resize_mode not in RESIZE_MODES:
                raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def make_map(self, width: int, height: int, annotators_dir: Path | None = None, device: str = "cpu") -> Image.Image:
        """The control map at width x height: the picture read through the checked loader, fitted by the resize
        mode, then through the preprocessor (a missing weight file raises its offline message)."""
        from studio.generation.job import load_init_image, resize_image

        picture = resize_image(load_init_image(self.image), RESIZE_MODES[self.resize_mode], width, height)
        return preprocessors.get(self.module).run(picture, annotators_dir=annotators_dir, device=device,
                                                  **self.params)


def check_units(units: list) -> list[ControlUnit]:
    """The job's controls as validated ControlUnits (at most MAX_UNITS)."""
    if not isinstance(units, (list, tuple)):
        raise ValueError(f"controls must be a list, got {type(units).__name__}")
    if len(units) > MAX_UNITS:
        raise ValueError(f"at most {MAX_UNITS} ControlNets at once, got {len(units)}")
    out = [ControlUnit.from_value(u) for u in units]
    for i, unit in enumerate(out):
        unit.validate(i)
    return out


def parse_control_flag(value: str) -> ControlUnit:
    """`TYPE:MODEL:IMAGE[:WEIGHT[:START:END]]` (the command line's --control): TYPE is a preprocessor or none."""
    parts = value.split(":")
    if len(parts) < 3:
        raise ValueError(f"--control must be TYPE:MODEL:IMAGE[:WEIGHT[:START:END]], got {value!r}")
    module, model, rest = parts[0], parts[1], parts[2:]
    numbers: list[float] = []
    for count in (3, 1):  # WEIGHT:START:END or WEIGHT, read from the end (a path may hold a colon)
        if len(rest) > count:
            try:
                numbers = [float(x) for x in rest[-count:]]
                rest = rest[:-count]
                break
            except ValueError:
                continue
    unit = ControlUnit(model=model, image=":".join(rest), module=module or "none")
    if numbers:
        unit.weight = numbers[0]
    if len(numbers) == 3:
        unit.start, unit.end = numbers[1], numbers[2]
    return unit


def infotext_fields(units: list[ControlUnit], loaded: list, width: int, height: int) -> dict:
    """`ControlNet 0`, `ControlNet 1`, ...: each unit as sd-webui-controlnet writes it (one quoted field)."""
    out = {}
    for i, (unit, net) in enumerate(zip(units, loaded, strict=True)):
        model = f"{net.name} [{net.hash}]" if net.hash else net.name
        values = list(unit.params.items())
        resolution = next((v for k, v in values if k == "resolution"), min(width, height))
        thresholds = [v for k, v in values if k != "resolution"]
        a = thresholds[0] if thresholds else -1
        b = thresholds[1] if len(thresholds) > 1 else -1
        out[f"ControlNet {i}"] = (f"Module: {unit.module}, Model: {model}, Weight: {unit.weight:g}, Resize Mode: "
                                  f"{unit.resize_mode}, Processor Res: {resolution:g}, Threshold A: {a:g}, "
                                  f"Threshold B: {b:g}, Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}, "
                                  f"Pixel Perfect: False, Control Mode: {unit.mode}")
    return out
