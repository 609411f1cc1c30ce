"""A1111's learning-rate schedule syntax: `0.005:100, 1e-3:1000, 1e-5` (rate until step, ..., rate to the end)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LearnRateSchedule:
    """Pieces of (rate, last step it applies to); the last piece's end is None (to the end of training)."""

    pieces: tuple[tuple[float, int | None], ...]

    def rate_at(self, step: int) -> float:
        """The rate for optimizer step `step` (1-based, as A1111 counts)."""
        for rate, end in self.pieces:
            if end is None or step <= end:
                return rate
        return self.pieces[-1][0]  # past the last end: keep the last rate, as A1111 does

    @property
    def last_step(self) -> int | None:
        """The last step the schedule names, when its final piece has an end (A1111 stops there)."""
        return self.pieces[-1][1]

    def __str__(self) -> str:
        return ", ".join(f"{r:g}" if e is None else f"{r:g}:{e}" for r, e in self.pieces)


def parse_schedule(text: str | float | int) -> LearnRateSchedule:
    """Parse `0.005` or `0.005:100, 1e-3:1000, 1e-5`. Errors quote the bad piece."""
    if isinstance(text, bool):
        raise ValueError(f"learning rate must be a number or a schedule like '0.005:100, 1e-3', got {text!r}")
    if isinstance(text, (int, float)):
        text = repr(float(text))
    raw = str(text).strip()
    if not raw:
        raise ValueError("learning rate is empty; give a number (0.005) or a schedule ('0.005:100, 1e-3:1000')")
    pieces: list[tuple[float, int | None]] = []
    parts = [p.strip() for p in raw.split(",")]
    for i, part in enumerate(parts):
        if not part:
            raise ValueError(f"learning rate schedule {raw!r} has an empty piece (a stray comma?)")
        rate_text, sep, end_text = part.partition(":")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ValueError(f"learning rate {rate_text.strip()!r} in {raw!r} is not a number") from None
        if not rate > 0 or rate != rate or rate == float("inf"):
            raise ValueError(f"learning rate must be positive, got {rate_text.strip()!r} in {raw!r}")
        end: int | None = None
        if sep:
            try:
                end = int(end_text)
            except ValueError:
                raise ValueError(f"step {end_text.strip()!r} in {part!r} must be a whole number") from None
            if end < 1:
                raise ValueError(f"step must be at least 1, got {end} in {part!r}")
            if pieces and pieces[-1][1] is not None and end <= pieces[-1][1]:
                raise ValueError(f"steps must increase: {part!r} ends at {end}, not after {pieces[-1][1]}")
        elif i != len(parts) - 1:
            raise ValueError(f"only the last piece may omit its step: {part!r} in {raw!r} needs ':STEP'")
        pieces.append((rate, end))
    return LearnRateSchedule(tuple(pieces))


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def warmup_steps(warmup: float, max_steps: int) -> int:
    """Warmup given as steps (>= 1) or as a fraction of the run (below 1: 0.1 = the first 10 %)."""
    return int(round(warmup * max_steps)) if 0 < warmup < 1 else int(warmup)


def lr_factor(kind: str, step: int, max_steps: int, warmup: int, cycles: int = 1) -> float:
    """The multiplier of the base rate at optimizer step `step` (1-based), as diffusers' get_scheduler computes
    it for the step's 0-based index: linear warmup from 0, then constant, linear decay to 0, a half cosine, or
    `cycles` half cosines each restarting from the full rate (get_cosine_with_hard_restarts_schedule_with_warmup)."""
    s = step - 1
    if kind not in LR_SCHEDULERS:
        raise ValueError(f"learning-rate scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {kind!r}")
    if kind == "constant":
        return 1.0
    if s < warmup:
        return s / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (s - warmup) / max(1, max_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
