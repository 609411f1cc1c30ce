"""A1111's prompt editing and alternation as pure functions: `[from:to:when]`, `[to:when]`, `[from::when]` and
`[a|b]` turned into the prompt text at each sampling step (A1111's `get_learned_conditioning_prompt_schedules`,
its default, non-legacy scheduling). Emphasis such as `[word]` and `(word:1.2)` is left for the prompt encoder."""

from __future__ import annotations

import re
from dataclasses import dataclass

# what A1111's grammar takes as the `when` of a scheduled edit (a lark NUMBER, optionally padded with spaces);
# possessive quantifiers: `\d+\.?\d*` would try every split of a long digit run (quadratic)
_WHEN_RE = re.compile(r"\s*+([+-]?(?:\d++(?:\.\d*+)?|\.\d++)(?:[eE][+-]?\d++)?)\s*+")


@dataclass(frozen=True)
class _Scheduled:
    before: tuple  # the text up to and including step `when` (a parsed tree; empty for `[to:when]`)
    after: tuple
    when: int  # a step number, already resolved from a fraction


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # one parsed tree per option; step s uses option (s - 1) % len


def has_schedule(text: str) -> bool:
    """Whether `text` has any prompt editing or alternation (a cheap check before parsing)."""
    return any(isinstance(node, _Scheduled | _Alternate) for node in _walk(_parse(text, 1)))


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, prompt text)]: the text applies while the sampler's step counter is at most `last step`
    (A1111 compares its 0-based counter with these). One entry, `(steps, text)`, when nothing is scheduled."""
    if "[" not in text:
        return [(steps, text)]
    tree = _parse(text, steps)
    ends = {steps}
    for node in _walk(tree):
        if isinstance(node, _Scheduled) and node.when >= 1:
            ends.add(node.when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _at_step(tree, end)) for end in sorted(ends)]


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The text of `schedule` at A1111's 0-based step counter `step` (the last entry after the end)."""
    return next((text for end, text in schedule if step <= end), schedule[-1][1])


def merge_schedules(prompt: list[tuple[int, str]], negative: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
    """[(last step, prompt text, negative text)] over the union of both schedules' boundaries."""
    ends = sorted({end for end, _ in prompt} | {end for end, _ in negative})
    return [(end, text_at(prompt, end), text_at(negative, end)) for end in ends]


# --- parsing --------------------------------------------------------------------------------------------------


def _resolve_when(raw: str, steps: int) -> int:
    value = float(raw)
    # A1111: a number written with a dot is a fraction of the steps, without one a step number
    return min(steps, int(value * steps if "." in raw else value))


def _parse(text: str, steps: int) -> tuple:
    """The text as a tree: plain strings, _Scheduled and _Alternate nodes. An unmatched `[` is plain text."""
    nodes: list = []
    plain: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            plain.append(text[i : i + 2])
            i += 2
            continue
        if c == "[":
            close = _matching(text, i)
            if close is not None:
                node = _bracket(text[i + 1 : close], steps)
                if node is not None:
                    if plain:
                        nodes.append("".join(plain))
                        plain = []
                    nodes.append(node)
                    i = close + 1
                    continue
                # emphasis `[...]`: keep the brackets, but still read edits nested inside
                inner = _parse(text[i + 1 : close], steps)
                if any(not isinstance(n, str) for n in inner):
                    if plain:
                        nodes.append("".join(plain))
                        plain = []
                    nodes += ["[", *inner, "]"]
                else:
                    plain.append(text[i : close + 1])
                i = close + 1
                continue
        plain.append(c)
        i += 1
    if plain:
        nodes.append("".join(plain))
    return tuple(nodes)


def _matching(text: str, start: int) -> int | None:
    """The index of the `]` closing the `[` at `start` (nested brackets and escapes skipped), or None."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` where it is outside every () and [] pair and not escaped."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


def _bracket(inner: str, steps: int):
    """The node for `[inner]`: an alternation, a scheduled edit, or None for plain emphasis."""
    options = _split_top(inner, "|")
    if len(options) > 1:
        return _Alternate(tuple(_parse(o, steps) for o in options))
    parts = _split_top(inner, ":")
    if len(parts) in (2, 3):
        match = _WHEN_RE.fullmatch(parts[-1])
        if match:
            before = parts[0] if len(parts) == 3 else ""
            after = parts[-2]
            return _Scheduled(_parse(before, steps), _parse(after, steps), _resolve_when(match[1], steps))
    return None


def _walk(tree: tuple):
    for node in tree:
        yield node
        if isinstance(node, _Scheduled):
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _at_step(tree: tuple, step: int) -> str:
    out = []
    for node in tree:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_at_step(node.before if step <= node.when else node.after, step))
        else:
            out.append(_at_step(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)
