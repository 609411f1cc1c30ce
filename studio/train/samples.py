"""Sample prompts for training previews, in kohya's `--sample_prompts` line format: one prompt per line with
options after it, `--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps (lines
starting with # and blank lines are skipped). Pure parsing; the trainer renders each line at every preview."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SAMPLES = 16  # lines per preview: each costs a full sampling pass
OPTION = re.compile(r"\s--([a-z]+)\s+")
KNOWN = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed", "l": "CFG scale", "s": "steps"}
IGNORED = {"ss"}  # kohya's sampler option: read and left out, previews use DPM++ 2M Karras (a shared file still loads)


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = 1
    cfg: float = 7.0
    steps: int = 20


def _number(line_no: int, label: str, raw: str, kind, lo, hi):
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"sample prompt line {line_no}: {label} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ValueError(f"sample prompt line {line_no}: {label} must be between {lo} and {hi}, got {raw}")
    return value


def parse_line(line: str, line_no: int, defaults: SamplePrompt) -> SamplePrompt:
    """One kohya sample line: the prompt, then `--key value` options (a value runs to the next option)."""
    parts = OPTION.split(" " + line.strip())
    prompt, values = parts[0].strip(), dict(zip(parts[1::2], (v.strip() for v in parts[2::2]), strict=True))
    unknown = sorted(set(values) - set(KNOWN) - IGNORED)
    if unknown:
        raise ValueError(f"sample prompt line {line_no}: unknown option --{unknown[0]} (known: "
                         + ", ".join(f"--{k} {v}" for k, v in KNOWN.items()) + ")")
    if not prompt:
        raise ValueError(f"sample prompt line {line_no}: the prompt is empty")
    size = {}
    for key, label in (("w", "width"), ("h", "height")):
        value = getattr(defaults, label)
        if key in values:
            value = _number(line_no, label, values[key], int, 64, 2048)
        if value % 8:
            raise ValueError(f"sample prompt line {line_no}: {label} must be a multiple of 8, got {value}")
        size[label] = value
    return SamplePrompt(
        prompt=prompt, negative=values.get("n", defaults.negative), **size,
        seed=_number(line_no, "seed", values["d"], int, 0, 2**32 - 1) if "d" in values else defaults.seed,
        cfg=_number(line_no, "CFG scale", values["l"], float, 1.0, 30.0) if "l" in values else defaults.cfg,
        steps=_number(line_no, "steps", values["s"], int, 1, 150) if "s" in values else defaults.steps)


def parse_sample_prompts(text: str, defaults: SamplePrompt) -> list[SamplePrompt]:
    """Every sample line of `text` (at most MAX_SAMPLES), each option it leaves out taken from `defaults`."""
    samples = [parse_line(line, n, defaults) for n, line in enumerate(str(text or "").splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if len(samples) > MAX_SAMPLES:
        raise ValueError(f"{len(samples)} sample prompts: at most {MAX_SAMPLES} (each one is a sampling pass at "
                         "every preview)")
    return samples
