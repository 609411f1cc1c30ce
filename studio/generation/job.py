"""A text-to-image request as a typed job (A1111's parameters), validated before any model work."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from studio.config import Limits, check_known_keys, real_number, text, whole_number
from studio.generation import samplers
from studio.generation.prompt_syntax import check_prompt_limits

MAX_SEED = 2**32 - 1


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
        images = self.batch_size * self.batch_count
        limits.check("max_work", work(images, self.steps, self.width, self.height),
                     f"{describe_work(images, self.steps, self.width, self.height)}")


def work(images: int, steps: int, width: int, height: int) -> float:
    """The cost measure of Limits.max_work: images x steps x megapixels."""
    return images * steps * width * height / 1e6


def describe_work(images: int, steps: int, width: int, height: int) -> str:
    return (f"{images:,} image{'s' if images != 1 else ''} x {steps} steps x {width}x{height} px is "
            f"{work(images, steps, width, height):,.0f} step-megapixels of work")


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else seed
