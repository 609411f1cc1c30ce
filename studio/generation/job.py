"""A text-to-image or image-to-image request as a typed job (A1111's parameters), validated before any model
work; the init image is read through the checked loaders of studio.files.images and resized per A1111's modes."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from studio.config import Limits, check_known_keys, real_number, text, whole_number
from studio.files.images import SkipImage, Source, load_image, to_rgb
from studio.generation import samplers
from studio.generation.prompt_syntax import check_prompt_limits

MAX_SEED = 2**32 - 1
# A1111's img2img resize modes (its "Just resize (latent upscale)" is not offered)
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
# an init image is refused above these, before it is decoded
MAX_INIT_PIXELS = 64_000_000
MAX_INIT_BYTES = 200_000_000


@dataclass
class GenerateJob:
    prompt: str
    negative_prompt: str = ""
    sampler: str = "DPM++ 2M"  # A1111 name (samplers.SAMPLERS)
    schedule: str = "Karras"  # A1111 schedule type (samplers.SCHEDULE_TYPES)
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1  # -1: a random seed, reported back
    width: int = 512
    height: int = 512
    batch_size: int = 1  # images per denoising pass
    batch_count: int = 1  # passes one after another
    clip_skip: int = 1  # A1111 "Clip skip": 2 uses the text encoder's penultimate layer
    # image to image: a file path or a PIL image (None: text to image), how much of it is redrawn (A1111's
    # "Denoising strength": 0 keeps it, 1 redraws it all) and how it is fitted to width x height
    init_image: str | os.PathLike | Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: str = "Just resize"

    @classmethod
    def from_dict(cls, values: dict) -> GenerateJob:
        """A job from a preset or API dict; unknown keys are an error, not silently dropped."""
        check_known_keys(cls, values, "generation")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, limits: Limits | None = None) -> None:
        """Raise ValueError naming the bad value and what would be right. Nothing is corrected (20.0 becomes 20,
        the same number). `limits` (default: Limits.from_env()) bounds the prompts and the work."""
        limits = limits or Limits.from_env()
        for name, label in (("prompt", "prompt"), ("negative_prompt", "negative prompt")):
            check_prompt_limits(text(label, getattr(self, name)), label, limits)
        text("sampler", self.sampler)
        text("schedule type", self.schedule)
        self.steps = whole_number("steps", self.steps, 1, 150)
        for name in ("width", "height"):
            value = whole_number(name, getattr(self, name))
            if value % 8 != 0:
                lo, hi = value - value % 8, value - value % 8 + 8
                raise ValueError(f"{name} must be a multiple of 8, got {value} (try {lo or 8} or {hi})")
            setattr(self, name, whole_number(name, value, 64, 2048))
        self.batch_size = whole_number("batch size", self.batch_size, 1, 16)
        self.batch_count = whole_number("batch count", self.batch_count, 1, 100)
        real_number("CFG scale", self.cfg_scale, 0, 30)
        self.clip_skip = whole_number("clip skip", self.clip_skip, 1, 12)
        seed = whole_number("seed", self.seed)
        if not -1 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}")
        self.seed = seed
        samplers.check(self.sampler, self.schedule)
        if self.init_image is not None:
            if not isinstance(self.init_image, (str, os.PathLike, Image.Image)):
                raise ValueError(f"init image must be an image file's path or an image, got "
                                 f"{type(self.init_image).__name__}")
            if isinstance(self.init_image, (str, os.PathLike)) and not Path(self.init_image).is_file():
                raise ValueError(f"init image {Path(self.init_image).name!r} does not exist")
            self.denoising_strength = real_number("denoising strength", self.denoising_strength, 0, 1)
            if text("resize mode", self.resize_mode) not in RESIZE_MODES:
                raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        images = self.batch_size * self.batch_count
        limits.check("max_work", work(images, self.steps, self.width, self.height),
                     f"{describe_work(images, self.steps, self.width, self.height)}")


    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def denoise_steps(self) -> int:
        """The steps that run: all of them for text to image; steps x strength (rounded down) for image to image,
        as diffusers' img2img pipelines and A1111's default "img2img steps" setting count them."""
        if not self.is_img2img or self.denoising_strength >= 1:
            return self.steps
        return min(int(self.steps * self.denoising_strength), self.steps)

    def init_picture(self) -> Image.Image:
        """The init image as upright RGB, fitted to width x height by `resize_mode`. A file is checked (size on disk,
        format, pixel count) before it is decoded; a refused one raises ValueError saying why."""
        return resize_image(load_init_image(self.init_image), self.resize_mode, self.width, self.height)


def load_init_image(value: str | os.PathLike | Image.Image) -> Image.Image:
    """An init image as upright RGB through studio.files.images (a file's header is checked before decoding)."""
    if isinstance(value, Image.Image):
        if value.width * value.height > MAX_INIT_PIXELS:
            raise ValueError(f"init image of {value.width}x{value.height} is over the limit of "
                             f"{MAX_INIT_PIXELS / 1e6:.0f} megapixels")
        return to_rgb(value, [])
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"init image {path.name!r} does not exist")
    try:
        return load_image(Source(path.name, path), min_side=8, max_pixels=MAX_INIT_PIXELS,
                          max_bytes=MAX_INIT_BYTES).image
    except SkipImage as e:
        raise ValueError(f"init image {path.name}: {e}") from None


def resize_image(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """A1111's img2img resize (modules/images.py resize_image, Lanczos): "Just resize" stretches to the size; "Crop
    and resize" scales to cover it and crops the centre; "Resize and fill" scales to fit inside it and fills the
    rest by stretching the image's edge rows or columns outwards."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    lanczos = Image.Resampling.LANCZOS
    if mode == "Just resize" or image.size == (width, height):
        return image.resize((width, height), resample=lanczos)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "Crop and resize":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=lanczos)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "Resize and fill":
        if ratio < src_ratio:  # wider than the frame: bands above and below
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:  # taller: bands left and right
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def work(images: int, steps: int, width: int, height: int) -> float:
    """The cost measure of Limits.max_work: images x steps x megapixels."""
    return images * steps * width * height / 1e6


def describe_work(images: int, steps: int, width: int, height: int) -> str:
    return (f"{images:,} image{'s' if images != 1 else ''} x {steps} steps x {width}x{height} px is "
            f"{work(images, steps, width, height):,.0f} step-megapixels of work")


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else seed
