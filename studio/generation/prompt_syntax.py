"""AUTOMATIC1111 prompt syntax as pure functions: extra-network tags (`<lora:name:0.8>`) and
attention emphasis (`(word:1.3)`, `[word]`, `BREAK`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from studio.config import Limits

# A1111's pattern for an extra-network tag: <kind:arguments>
NETWORK_TAG_RE = re.compile(r"<(\w+):([^>]+)>")
# float() alone would also take "nan", "inf" and "1_0"; a weight is a plain decimal number. Possessive quantifiers
# (no backtracking): `\d+\.?\d*` tries every split of a long digit run, quadratic in its length
_NUMBER_RE = re.compile(r"[+-]?(?:\d++(?:\.\d*+)?|\.\d++)(?:[eE][+-]?\d++)?")
# lycoris' `dyn=` (dynamic rank) is valid A1111 syntax that this studio has no use for
_IGNORED_NAMED_ARGS = frozenset({"dyn"})
_WEIGHT_NAMES = frozenset({"te", "unet"})
# te, unet and A1111's positional dyn dim
_MAX_POSITIONAL_WEIGHTS = 3

# one emphasis token: escapes, brackets, a `:weight)` closer, a run of plain text, or a stray colon.
# A1111 reads the weight as `[.\d]+`; a stricter number keeps `(a:1.2.3)` literal text instead of a crash.
_ATTENTION_RE = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*+([+-]?(?:\d++(?:\.\d*+)?|\.\d++))\s*+\)|\)|]|[^\\()\[\]:]+|:"
)
# BREAK as a word; the blanks around it are stripped in Python (`\s*\bBREAK\b\s*` is quadratic in a run of blanks)
_BREAK_RE = re.compile(r"\bBREAK\b")
# what nests: ( and [ and their closers; a backslash escapes the next character
_NESTING_RE = re.compile(r"\\.|[()\[\]]", re.S)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)


class PromptSyntaxError(ValueError):
    """A prompt that cannot be read, with a message meant for the user."""


@dataclass(frozen=True)
class NetworkTag:
    kind: str
    name: str
    te: float
    unet: float
    text: str


def _parse_weight(value: str, tag: str) -> float:
    value = value.strip()
    if not _NUMBER_RE.fullmatch(value):
        raise PromptSyntaxError(f"could not read weight {value!r} in {tag}")
    return float(value)


def _parse_network_tag(kind: str, args: str, tag: str) -> NetworkTag:
    name, *rest = (part.strip() for part in args.split(":"))
    if not name:
        raise PromptSyntaxError(f"empty name in {tag}")
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in rest:
        key, eq, value = arg.partition("=")
        if not eq:
            positional.append(arg)
            continue
        key = key.strip()
        if key not in _WEIGHT_NAMES | _IGNORED_NAMED_ARGS:
            raise PromptSyntaxError(f"unknown argument {key!r} in {tag} (use te=, unet= or dyn=)")
        named[key] = value
    if len(positional) > _MAX_POSITIONAL_WEIGHTS:
        raise PromptSyntaxError(
            f"too many arguments in {tag} (at most te, unet and dyn, e.g. <{kind}:{name}:0.8:0.5>)"
        )
    weights = [_parse_weight(p, tag) for p in positional]
    # A1111's order: te defaults to 1, unet to te; a named value overrides the positional one
    te = weights[0] if weights else 1.0
    te = _parse_weight(named["te"], tag) if "te" in named else te
    unet = weights[1] if len(weights) > 1 else te
    unet = _parse_weight(named["unet"], tag) if "unet" in named else unet
    return NetworkTag(kind="lora" if kind == "lyco" else kind, name=name, te=te, unet=unet, text=tag)


def extract_network_tags(prompt: str) -> tuple[str, list[NetworkTag]]:
    """Remove every `<kind:...>` tag from the prompt; return the rest of the text and the tags in order."""
    # no tag starts after the last '>': searching there would rescan the rest of the text from every '<'
    end = prompt.rfind(">") + 1
    head, tail = prompt[:end], prompt[end:]
    tags = [_parse_network_tag(m[1], m[2], m[0]) for m in NETWORK_TAG_RE.finditer(head)]
    return NETWORK_TAG_RE.sub("", head) + tail, tags


def _format_weight(weight: float) -> str:
    if not math.isfinite(weight):
        raise ValueError(f"a LoRA weight must be a finite number, got {weight}")
    return str(int(weight)) if weight == int(weight) and abs(weight) < 1e15 else repr(float(weight))


def format_lora_tag(name: str, te: float = 1.0, unet: float | None = None) -> str:
    """`<lora:name:te>`, or `<lora:name:te:unet>` when the UNet weight differs (the parser's inverse)."""
    if not name.strip() or name != name.strip() or any(c in name for c in ":<>"):
        raise ValueError(f"cannot write a LoRA tag for the name {name!r}")
    weights = [te] if unet is None or unet == te else [te, unet]
    return "<lora:" + ":".join([name, *map(_format_weight, weights)]) + ">"


def _multiply_from(segments: list[list], start: int, factor: float) -> None:
    for segment in segments[start:]:
        # a BREAK inside brackets still only starts a chunk (A1111 would turn it into the word "BREAK")
        if not segment[2]:
            segment[1] *= factor


def _append_text(segments: list[list], text: str) -> None:
    parts = _BREAK_RE.split(text)
    for i, part in enumerate(parts):
        if i:
            segments.append([*BREAK, True])
            part = part.lstrip()
        if i < len(parts) - 1:
            part = part.rstrip()
        segments.append([part, 1.0, False])


def _merge(segments: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight, is_break in segments:
        if not text:
            continue
        last = merged[-1] if merged else None
        if last and not is_break and not last[2] and last[1] == weight:
            last[0] += text
        else:
            merged.append([text, weight, is_break])
    return [(text, weight) for text, weight, _ in merged] or [("", 1.0)]


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) segments with A1111's emphasis rules.

    `BREAK` comes out as the marker segment ("BREAK", -1.0): start a new 75-token chunk there.
    """
    segments: list[list] = []  # [text, weight, is_break]
    round_starts: list[int] = []
    square_starts: list[int] = []
    for match in _ATTENTION_RE.finditer(text):
        token, weight = match[0], match[1]
        if token.startswith("\\"):
            segments.append([token[1:], 1.0, False])
        elif token == "(":
            round_starts.append(len(segments))
        elif token == "[":
            square_starts.append(len(segments))
        elif weight is not None and round_starts:
            _multiply_from(segments, round_starts.pop(), float(weight))
        elif token == ")" and round_starts:
            _multiply_from(segments, round_starts.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_starts:
            _multiply_from(segments, square_starts.pop(), SQUARE_MULTIPLIER)
        else:
            _append_text(segments, token)
    # brackets left open reach to the end of the prompt
    for start in round_starts:
        _multiply_from(segments, start, ROUND_MULTIPLIER)
    for start in square_starts:
        _multiply_from(segments, start, SQUARE_MULTIPLIER)
    return _merge(segments)


def nesting_depth(text: str) -> int:
    """The deepest nesting of ( ) and [ ] brackets (each kind counted on its own, then added); an unclosed one
    counts to the end of the text, escaped ones not at all."""
    depth = {"(": 0, "[": 0}
    deepest = 0
    for match in _NESTING_RE.finditer(text):
        c = match[0]
        if c in depth:
            depth[c] += 1
            deepest = max(deepest, depth["("] + depth["["])
        elif c in ")]":
            kind = "(" if c == ")" else "["
            depth[kind] = max(0, depth[kind] - 1)
    return deepest


def check_prompt_limits(text: str, what: str, limits: Limits) -> None:
    """Refuse a prompt above the character, BREAK or nesting limit before anything parses it (pure, fast: the
    character count runs first)."""
    limits.check("max_prompt_chars", len(text), f"{what} is {len(text):,} characters")
    breaks = sum(1 for _ in _BREAK_RE.finditer(text))
    limits.check("max_breaks", breaks, f"{what} has {breaks:,} BREAKs")
    depth = nesting_depth(text)
    limits.check("max_nesting", depth, f"{what} nests brackets {depth:,} deep")
