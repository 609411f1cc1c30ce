"""A1111's X/Y/Z plot syntax as pure functions: axis names, comma lists with CSV quoting, integer and float
ranges (`1-5`, `1-5 (+2)`, `10-30 [5]`, `0.5-1.5 (+0.25)`, `3-11 [5]`), Prompt S/R, sizes, and the prompt
edits of the LoRA axes. Every error quotes the value it could not use."""

from __future__ import annotations

import csv
import difflib
import io
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from studio.config import LimitExceeded
from studio.generation.prompt_syntax import NETWORK_TAG_RE, extract_network_tags, format_lora_tag

MAX_SEED = 2**32 - 1
NONE_VALUE = "None"  # in the LoRA / embedding axis: the prompt without the tag or word


class AxisSyntaxError(ValueError):
    """Axis values that cannot be read; the message quotes the bad value and shows the right form."""


# --- axis names --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisType:
    name: str  # as A1111 writes it in "X Type: ..."
    kind: str  # int, float, sampler, schedule, size, prompt_sr, negative_sr, lora_weight, network, checkpoint,
    #            denoising, hires_steps, hires_scale, hires_upscaler, vae
    bare_label: bool = False  # legend shows the value alone (A1111 does so for sampler, S/R and checkpoint)
    aliases: tuple[str, ...] = ()


NOTHING = "Nothing"
AXIS_TYPES: dict[str, AxisType] = {
    t.name: t
    for t in (
        AxisType(NOTHING, "nothing", aliases=("", "none")),
        AxisType("Seed", "int"),
        AxisType("Steps", "int"),
        AxisType("Hires steps", "hires_steps", aliases=("hires second pass steps", "hr steps", "hires fix steps",
                                                        "hr second pass steps")),
        AxisType("CFG Scale", "float", aliases=("cfg",)),
        AxisType("Sampler", "sampler", bare_label=True, aliases=("sampler name",)),
        AxisType("Schedule type", "schedule", aliases=("schedule", "scheduler")),
        AxisType("Size", "size"),
        AxisType("Denoising", "denoising", aliases=("denoising strength", "denoise", "strength")),
        AxisType("Hires upscale", "hires_scale", aliases=("hires scale", "hr scale", "hires upscale by",
                                                          "hr upscale", "upscale by")),
        AxisType("Hires upscaler", "hires_upscaler", aliases=("hr upscaler", "hires fix upscaler", "upscaler")),
        AxisType("Prompt S/R", "prompt_sr", bare_label=True, aliases=("s/r", "prompt sr")),
        AxisType("Negative prompt S/R", "negative_sr", bare_label=True, aliases=("negative s/r", "negative sr")),
        AxisType("LoRA weight", "lora_weight", aliases=("lora alpha",)),
        AxisType("LoRA / embedding", "network", bare_label=True,
                 aliases=("lora", "embedding", "network", "lora or embedding", "lora/embedding")),
        AxisType("Checkpoint name", "checkpoint", bare_label=True, aliases=("checkpoint", "model")),
        AxisType("VAE", "vae", aliases=("sd vae", "vae name")),
    )
}
_BY_LOWER = {n.lower(): n for n in AXIS_TYPES} | {a: t.name for t in AXIS_TYPES.values() for a in t.aliases}


def axis_type(name: str) -> AxisType:
    """The axis called `name` (any case; A1111's names and a few aliases), or an error listing the names."""
    key = " ".join((name or "").split()).lower()
    if key in _BY_LOWER:
        return AXIS_TYPES[_BY_LOWER[key]]
    msg = f"unknown axis {name!r}; choose one of: {', '.join(AXIS_TYPES)}"
    close = difflib.get_close_matches(key, list(_BY_LOWER), n=2, cutoff=0.6)
    if close:
        msg += f"; did you mean {' or '.join(repr(_BY_LOWER[c]) for c in close)}?"
    raise AxisSyntaxError(msg)


_SPEC_RE = re.compile(r"\s*([^:(]+?)\s*(?:\(\s*([^)]*?)\s*\))?\s*:(.*)", re.S)


def split_axis_spec(text: str) -> tuple[str, str, str]:
    """`"CFG Scale: 3,7,11"` -> ("CFG Scale", "", "3,7,11"); `"LoRA weight (ink): 0,1"` -> ("LoRA weight", "ink",
    "0,1"). The part in brackets names what the axis acts on (the LoRA of a LoRA weight axis)."""
    m = _SPEC_RE.fullmatch(text or "")
    if not m:
        raise AxisSyntaxError(f"could not read the axis {text!r}; write 'Axis name: values', "
                              "e.g. 'CFG Scale: 3,7,11'")
    return axis_type(m[1]).name, m[2] or "", m[3].strip()


# --- value lists and ranges -----------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """Comma-separated values read as CSV (A1111): `"a, b"` quotes keep commas; blanks around values and empty
    values are dropped."""
    rows = csv.reader(io.StringIO(text or ""), skipinitialspace=True)
    return [v.strip() for row in rows for v in row if v.strip()]


_INT = r"([+-]?\s*\d+)"
_FLOAT = r"([+-]?\s*(?:\d+(?:\.\d*)?|\.\d+))"
_INT_STEP_RE = re.compile(rf"\s*{_INT}\s*-\s*{_INT}(?:\s*\(\s*{_INT}\s*\))?\s*")
_INT_COUNT_RE = re.compile(rf"\s*{_INT}\s*-\s*{_INT}\s*\[\s*(\d+)\s*\]\s*")
_FLOAT_STEP_RE = re.compile(rf"\s*{_FLOAT}\s*-\s*{_FLOAT}(?:\s*\(\s*{_FLOAT}\s*\))?\s*")
_FLOAT_COUNT_RE = re.compile(rf"\s*{_FLOAT}\s*-\s*{_FLOAT}\s*\[\s*(\d+)\s*\]\s*")
# possessive: `\d+\.?\d*` would try every split of a long digit run (quadratic)
_PLAIN_FLOAT_RE = re.compile(r"[+-]?(?:\d++(?:\.\d*+)?|\.\d++)(?:[eE][+-]?\d++)?")


def _num(text: str, kind: type):
    return kind(text.replace(" ", ""))


def _empty_range(value: str, start, end, step) -> AxisSyntaxError:
    hint = f" (counting down needs a negative step, e.g. '{start}-{end} (-1)')" if end < start and step > 0 else ""
    return AxisSyntaxError(f"the range {value!r} gives no values{hint}")


def _count(value: str, n: int) -> int:
    if n < 1:
        raise AxisSyntaxError(f"the range {value!r} asks for {n} values; ask for at least 1")
    return n


def _linspace(start: float, end: float, n: int) -> list[float]:
    if n == 1:
        return [start]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def _room(value: str, had: int, more: int, max_values: int | None) -> None:
    """Refuse a value list growing past `max_values` (the grid's cell limit) before the values are made."""
    if max_values is not None and had + more > max_values:
        raise LimitExceeded("max_grid_cells", max_values, f"the values up to {value[:40]!r} are {had + more:,} "
                            "values (an axis cannot have more values than the grid has cells)")


def parse_int_values(text: str, label: str = "value", max_values: int | None = None) -> list[int]:
    """Whole numbers: `1, 5`, `1-5` (1..5), `1-5 (+2)` (1,3,5), `5-1 (-2)` (5,3,1), `10-30 [5]` (5 values).
    More than `max_values` values is refused before a range is listed."""
    out: list[int] = []
    for value in split_values(text):
        if m := _INT_STEP_RE.fullmatch(value):
            start, end = _num(m[1], int), _num(m[2], int)
            step = _num(m[3], int) if m[3] else 1
            if step == 0:
                raise AxisSyntaxError(f"the step of {value!r} is 0; use e.g. '1-5 (+2)'")
            values = range(start, end + (1 if step > 0 else -1), step)
            if not values:
                raise _empty_range(value, start, end, step)
            _room(value, len(out), len(values), max_values)
            out += values
        elif m := _INT_COUNT_RE.fullmatch(value):
            start, end, n = _num(m[1], int), _num(m[2], int), _count(value, int(m[3]))
            _room(value, len(out), n, max_values)
            out += [int(v) for v in _linspace(start, end, n)]  # int() truncates, as A1111's does
        else:
            try:
                out.append(_num(value, int))
            except ValueError:
                raise AxisSyntaxError(f"{label} {value!r} is not a whole number or a range "
                                      "(write e.g. '7', '1-5', '1-5 (+2)' or '10-30 [5]')") from None
            _room(value, len(out), 0, max_values)
    return out


def _clean_float(x: float) -> float:
    # 0.1 steps add up to 0.30000000000000004; keep what the user meant
    return float(round(x, 10))


def parse_float_values(text: str, label: str = "value", max_values: int | None = None) -> list[float]:
    """Numbers: `3, 7.5`, `0.5-1.5 (+0.25)` (end included), `3-11 [5]` (5 evenly spaced values). More than
    `max_values` values is refused before a range is listed."""
    out: list[float] = []
    for value in split_values(text):
        if m := _FLOAT_STEP_RE.fullmatch(value):
            start, end = _num(m[1], float), _num(m[2], float)
            step = _num(m[3], float) if m[3] else 1.0
            if step == 0:
                raise AxisSyntaxError(f"the step of {value!r} is 0; use e.g. '0.5-1.5 (+0.25)'")
            n = math.floor((end - start) / step + 1e-9) + 1
            if n < 1:
                raise _empty_range(value, start, end, step)
            _room(value, len(out), n, max_values)
            out += [_clean_float(start + i * step) for i in range(n)]
        elif m := _FLOAT_COUNT_RE.fullmatch(value):
            start, end, n = _num(m[1], float), _num(m[2], float), _count(value, int(m[3]))
            _room(value, len(out), n, max_values)
            out += [_clean_float(v) for v in _linspace(start, end, n)]
        elif _PLAIN_FLOAT_RE.fullmatch(value.replace(" ", "")):
            _room(value, len(out), 1, max_values)
            out.append(_num(value, float))
        else:
            raise AxisSyntaxError(f"{label} {value!r} is not a number or a range "
                                  "(write e.g. '7', '3-11 [5]' or '0.5-1.5 (+0.25)')")
    return out


# --- seeds ----------------------------------------------------------------------------------------------------


def fix_seeds(seeds: Sequence[int], keep_random: bool, rng: random.Random | None = None) -> list[int]:
    """A1111's seeds: with "keep -1" off, each -1 becomes one random seed now (the same one in every cell of that
    column or row); with it on, -1 stays and every cell draws its own."""
    rng = rng or random.Random()
    for seed in seeds:
        if not -1 <= seed <= MAX_SEED:
            raise AxisSyntaxError(f"seed {seed} is out of range; use -1 (random) or 0 to {MAX_SEED}")
    if keep_random:
        return list(seeds)
    return [rng.randint(0, MAX_SEED) if s == -1 else s for s in seeds]


# --- choices and sizes ------------------------------------------------------------------------------------------


def match_choice(value: str, choices: Iterable[str], what: str) -> str:
    """`value` spelled as in `choices` (any case, blanks collapsed), or an error with the choices and close ones."""
    choices = list(choices)
    lowered = {" ".join(c.split()).lower(): c for c in choices}
    key = " ".join(value.split()).lower()
    if key in lowered:
        return lowered[key]
    msg = f"unknown {what} {value!r}; choose one of: {', '.join(choices)}"
    close = difflib.get_close_matches(key, list(lowered), n=2, cutoff=0.5)
    if close:
        msg += f"; did you mean {' or '.join(repr(lowered[c]) for c in close)}?"
    raise AxisSyntaxError(msg)


_SIZE_RE = re.compile(r"\s*(\d+)\s*(?:[x×X*]\s*(\d+)\s*)?")


def parse_size(value: str) -> tuple[int, int]:
    """`512x768` -> (512, 768); `512` -> (512, 512)."""
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise AxisSyntaxError(f"size {value!r} is not WIDTHxHEIGHT (write e.g. '512x768', or '512' for 512x512)")
    width = int(m[1])
    return width, int(m[2]) if m[2] else width


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# --- prompt edits -------------------------------------------------------------------------------------------------


def check_prompt_sr(values: Sequence[str], prompt: str, negative: str, negative_only: bool = False) -> None:
    """A1111: the first value is searched for; every value replaces it. A search text found nowhere is an error."""
    if not values:
        return
    search = values[0]
    where = negative if negative_only else prompt + "\n" + negative
    if search not in where:
        place = "the negative prompt" if negative_only else "the prompt or negative prompt"
        raise AxisSyntaxError(f"Prompt S/R did not find {search!r} in {place}; the first value is the text to "
                              "replace, so it must appear there")


def apply_prompt_sr(search: str, replacement: str, prompt: str, negative: str,
                    negative_only: bool = False) -> tuple[str, str]:
    if negative_only:
        return prompt, negative.replace(search, replacement)
    return prompt.replace(search, replacement), negative.replace(search, replacement)


def lora_tags(prompt: str) -> list[tuple[str, str]]:
    """(name, tag text) of every `<lora:...>` tag in the prompt, in order."""
    return [(_tag_name(m), m[0]) for m in NETWORK_TAG_RE.finditer(prompt) if m[1] in ("lora", "lyco")]


def _tag_name(m: re.Match) -> str:
    return extract_network_tags(m[0])[1][0].name


def default_lora_target(prompt: str) -> str:
    """The LoRA a LoRA weight axis acts on when none is named: the prompt's only LoRA."""
    names = list(dict.fromkeys(name for name, _ in lora_tags(prompt)))
    if len(names) == 1:
        return names[0]
    if not names:
        raise AxisSyntaxError("the LoRA weight axis needs a <lora:name:weight> tag in the prompt")
    raise AxisSyntaxError(f"the prompt has several LoRAs ({', '.join(names)}); name the one to vary, "
                          f"e.g. 'LoRA weight ({names[0]}): 0, 0.5, 1'")


def set_lora_weight(prompt: str, name: str, weight: float) -> str:
    """Every `<lora:name:...>` tag of the prompt rewritten as `<lora:name:weight>` (text encoder and UNet)."""
    found = False

    def swap(m: re.Match) -> str:
        nonlocal found
        if m[1] not in ("lora", "lyco") or _tag_name(m) != name:
            return m[0]
        found = True
        return format_lora_tag(name, weight)

    out = NETWORK_TAG_RE.sub(swap, prompt)
    if not found:
        raise AxisSyntaxError(f"the prompt has no <lora:{name}:...> tag for the LoRA weight axis")
    return out


def _word_re(word: str) -> re.Pattern:
    # embedding names may hold '-' and '.', so a "word" ends where letters, digits, '_', '-' and '.' end
    return re.compile(rf"(?<![\w.-]){re.escape(word)}(?![\w-]|\.\w)")


def network_in(prompt: str, negative: str, name: str) -> str | None:
    """"lora" when the prompt has `<lora:name...>`, "embedding" when `name` is a word of a prompt, else None."""
    if any(n == name for n, _ in lora_tags(prompt)):
        return "lora"
    if _word_re(name).search(NETWORK_TAG_RE.sub(" ", prompt + "\n" + negative)):
        return "embedding"
    return None


def swap_network(prompt: str, negative: str, old: str, new: str) -> tuple[str, str]:
    """The LoRA tag `<lora:old:w>` becomes `<lora:new:w>` (weights kept), or the embedding word `old` becomes
    `new`, in both prompts. `new` = "None" removes the tag or word."""
    kind = network_in(prompt, negative, old)
    if kind is None:
        raise AxisSyntaxError(f"{old!r} is neither a <lora:{old}:...> tag nor a word of the prompt; the first value "
                              "of a LoRA / embedding axis must be in the prompt")
    if new == old:
        return prompt, negative
    removing = new.lower() == NONE_VALUE.lower()
    if kind == "lora":
        def swap(m: re.Match) -> str:
            if m[1] not in ("lora", "lyco") or _tag_name(m) != old:
                return m[0]
            _, colon, weights = m[2].partition(":")
            return "" if removing else f"<{m[1]}:{new}{colon}{weights}>"

        return NETWORK_TAG_RE.sub(swap, prompt), negative
    pattern = _word_re(old)
    repl = "" if removing else new.replace("\\", "\\\\")
    return pattern.sub(repl, prompt), pattern.sub(repl, negative)
