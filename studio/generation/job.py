"""A text-to-image request as a typed job (A1111's parameters), validated before any model work."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from studio.config import check_known_keys
from studio.generation import samplers

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

    def validate(self) -> None:
        """Raise ValueError naming the bad value and what would be right. Nothing is corrected."""
        if not isinstance(self.prompt, str):
            raise ValueError("prompt must be text")
        for name in ("steps", "width", "height", "batch_size", "batch_count", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    setattr(self, name, int(value))  # 20.0 from a slider is 20
                else:
                    raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not 1 <= self.steps <= 150:
            raise ValueError(f"steps must be between 1 and 150, got {self.steps}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % 8 != 0:
                lo, hi = value - value % 8, value - value % 8 + 8
                raise ValueError(f"{name} must be a multiple of 8, got {value} (try {lo or 8} or {hi})")
            if not 64 <= value <= 2048:
                raise ValueError(f"{name} must be between 64 and 2048, got {value}")
        if not 1 <= self.batch_size <= 16:
            raise ValueError(f"batch size must be between 1 and 16, got {self.batch_size}")
        if not 1 <= self.batch_count <= 100:
            raise ValueError(f"batch count must be between 1 and 100, got {self.batch_count}")
        if not isinstance(self.cfg_scale, (int, float)) or not 0 <= self.cfg_scale <= 30:
            raise ValueError(f"CFG scale must be between 0 and 30, got {self.cfg_scale!r}")
        if isinstance(self.clip_skip, float) and self.clip_skip.is_integer():
            self.clip_skip = int(self.clip_skip)
        if not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= 12:
            raise ValueError(f"clip skip must be between 1 and 12, got {self.clip_skip!r}")
        if not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {self.seed}")
        samplers.check(self.sampler, self.schedule)


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else seed
