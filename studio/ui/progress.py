"""Progress of a run of denoising steps in Gradio's bar, its text with the speed so far and an ETA (Generate, the
explorer and storyboards report steps the same way)."""

from __future__ import annotations

import time
from collections.abc import Callable


def clock(seconds: float) -> str:
    """0:42, 12:05, 1:02:03."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_text(info: str, done: int, remaining: int, elapsed: float) -> str:
    """`info` with the time per step so far and what is left ("… · 0.84 s/step · ETA 0:17"); `info` alone before
    the first step is done (nothing to measure yet)."""
    if done <= 0 or elapsed <= 0:
        return info
    per_step = elapsed / done
    rate = f"{per_step:.2f} s/step" if per_step >= 0.1 else f"{1 / per_step:.1f} steps/s"
    return f"{info} · {rate} · ETA {clock(per_step * remaining)}"


class StepProgress:
    """An on_progress(done, total, info) for the engine that drives a gr.Progress: the bar at done/total, the text
    with eta_text measured from the first report (model loading and map making before it do not count)."""

    def __init__(self, progress, now: Callable[[], float] = time.monotonic):
        self.progress, self.now = progress, now
        self.first: tuple[int, float] | None = None

    def __call__(self, done: int, total: int, info: str) -> None:
        t = self.now()
        if self.first is None or done < self.first[0]:
            self.first = (done, t)
        steps, elapsed = done - self.first[0], t - self.first[1]
        self.progress((done, total), desc=eta_text(info, steps, total - done, elapsed), unit="steps")
