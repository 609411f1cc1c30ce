"""LyCORIS networks in kohya's key layout (LoCon, LoHa, LoKr, full/diff, each optionally DoRA): what a file holds and
each layer's ΔW, written from the published formulas (LyCORIS: arXiv 2309.14859; DoRA: arXiv 2402.09353).

A layer's tensors sit under its kohya name (`lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…`, no dots) followed
by a suffix: `.lora_down.weight`, `.hada_w1_a`, `.lokr_w2`, `.diff`, `.dora_scale`, `.alpha`, … `layer_delta` turns
one layer's tensors into the weight (and bias) delta of the model's layer, scaled by the layer's own alpha/rank rule,
not by the user's weight. Pure functions: the caller picks device and dtype (they also run on the meta device, which
checks shapes without computing anything)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch

T = TypeVar("T")

PLAIN_SUFFIXES = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})  # kohya LoRA (and its LoCon convs)
LYCORIS_SUFFIXES = frozenset({
    "lora_mid.weight", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b",
})
NORM_SUFFIXES = frozenset({"w_norm", "b_norm"})  # LyCORIS' trained norm layers: read, not applied
SUFFIXES = PLAIN_SUFFIXES | LYCORIS_SUFFIXES | NORM_SUFFIXES
LOADABLE = "LoRA, LoCon, LoHa, LoKr, DoRA and full (diff) networks"
# suffixes of the LyCORIS algorithms the studio does not merge, and their names
_UNSUPPORTED = {"oft_blocks": "OFT", "oft_diag": "OFT", "rescale": "OFT", "weight": "IA3", "on_input": "IA3",
                "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA"}
LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full (diff)"}
_PRIORITY = ("loha", "lokr", "full", "locon", "lora")  # what a file with several kinds of layers is called


class ShapeMismatchError(ValueError):
    """A layer's factors make a weight of another shape than the model's layer: a file for another model."""


def split_key(key: str) -> tuple[str, str]:
    """(kohya layer name, suffix): kohya layer names hold no dots, so the suffix is everything after the first."""
    base, _, suffix = key.partition(".")
    return base, suffix


def group_layers(items: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """kohya layer name -> {suffix: value} for a file's tensors (or their shapes), to read one layer at a time."""
    layers: dict[str, dict[str, T]] = {}
    for key, value in items.items():
        base, suffix = split_key(key)
        layers.setdefault(base, {})[suffix] = value
    return layers


def is_lycoris(keys: Iterable[str]) -> bool:
    """Whether a kohya file has keys beyond plain LoRA's down/up/alpha, so it takes the LyCORIS path."""
    return any(split_key(k)[1] in LYCORIS_SUFFIXES | NORM_SUFFIXES for k in keys)


def unsupported_algorithm(keys: Iterable[str]) -> str | None:
    """The name of an algorithm the studio cannot merge (OFT/BOFT, IA3, GLoRA) whose keys a kohya file uses."""
    return next((_UNSUPPORTED[s] for s in (split_key(k)[1] for k in keys) if s in _UNSUPPORTED), None)


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def layer_algorithm(parts: Mapping) -> str:
    """"lora", "locon", "loha", "lokr" or "full" for one layer's {suffix: tensor or shape}, read from its keys (and the
    down kernel's size: a k×k conv LoRA is LoCon)."""
    if any(s.startswith("hada_") for s in parts):
        return "loha"
    if any(s.startswith("lokr_") for s in parts):
        return "lokr"
    if {"diff", "diff_b"} & set(parts):
        return "full"
    down = _shape(parts.get("lora_down.weight", ()))
    if "lora_mid.weight" in parts or (len(down) == 4 and down[2:] != (1, 1)):
        return "locon"
    return "lora"


def network_algorithm(shapes: Mapping[str, object]) -> str:
    """A file's algorithm from its keys and shapes, e.g. "loha" or "lora+dora" (the name of its most specific kind of
    layer, "+dora" when any layer carries a DoRA magnitude), for the LoRA card and panel."""
    kohya = {k: v for k, v in shapes.items() if k.startswith(("lora_unet_", "lora_te"))}
    kinds = {layer_algorithm(parts) for parts in group_layers(kohya).values()}
    name = next((k for k in _PRIORITY if k in kinds), "lora")
    dora = any(k.endswith(".dora_scale") or "lora_magnitude_vector" in k for k in shapes)
    return name + "+dora" if dora else name


def algorithm_label(algorithm: str) -> str:
    """The words for network_algorithm's answer: "LoHa", "LoKr + DoRA", "DoRA" (a DoRA LoRA), …"""
    name, _, dora = algorithm.partition("+")
    if dora:
        return "DoRA" if name == "lora" else f"{LABELS.get(name, name)} + DoRA"
    return LABELS.get(name, name)


def in_width(parts: Mapping) -> int | None:
    """A Linear layer's input width as its factors tell it (None when they do not), to tell a file's model family."""
    shapes = {s: _shape(v) for s, v in parts.items()}

    def second(suffix: str) -> int | None:
        shape = shapes.get(suffix, ())
        return int(shape[1]) if len(shape) >= 2 else None

    for suffix in ("lora_down.weight", "hada_w1_b", "diff"):
        if second(suffix):
            return second(suffix)
    w1, w2 = second("lokr_w1") or second("lokr_w1_b"), second("lokr_w2") or second("lokr_w2_b")
    if w1 and w2:
        return w1 * w2
    dora = shapes.get("dora_scale", ())
    return int(dora[1]) if len(dora) >= 2 and dora[0] == 1 else None


def _alpha_scale(parts: Mapping[str, torch.Tensor], rank: int) -> float:
    """alpha / rank; a file without alpha means alpha = rank (scale 1), as kohya and LyCORIS write them."""
    alpha = parts.get("alpha")
    return 1.0 if alpha is None else float(alpha) / rank


def _tucker(core: torch.Tensor, to_out: torch.Tensor, to_in: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored conv kernel: core [r1, r2, k, k] with its first mode mapped by to_out [r1, out] and its second
    by to_in [r2, in]: W[o, i, :, :] = Σ_ab core[a, b] · to_out[a, o] · to_in[b, i]."""
    return torch.einsum("abkl,ao,bi->oikl", core, to_out, to_in)


def lora_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """LoRA / LoCon: up·down · alpha/r (r = down's rows); with a Tucker mid kernel, up·mid·down, the three convolutions
    (1×1 in→r, k×k r→r, 1×1 r→out) folded into one kernel."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if "lora_mid.weight" in parts:
        # up [out, r, 1, 1] takes mid's output channels, down [r, in, 1, 1] feeds its input channels
        delta = _tucker(parts["lora_mid.weight"], up.flatten(1).T, down.flatten(1))
    else:
        delta = up.flatten(1) @ down.flatten(1)  # a k×k down kernel stays folded into the input dim: [out, in·k·k]
    return delta * _alpha_scale(parts, down.shape[0])


def loha_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """LoHa: the Hadamard product (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, r = w1b's rows; with Tucker cores t1/t2 (convs),
    each factor is rebuilt as _tucker(t, a, b), a and b then being [r, out] and [r, in]."""
    w1a, w1b, w2a, w2b = (parts[f"hada_w{n}_{s}"] for n in (1, 2) for s in ("a", "b"))
    if "hada_t1" in parts:
        w1, w2 = _tucker(parts["hada_t1"], w1a, w1b), _tucker(parts["hada_t2"], w2a, w2b)
    else:
        w1, w2 = w1a @ w1b, w2a @ w2b
    return w1 * w2 * _alpha_scale(parts, w1b.shape[0])


def _lokr_factor(parts: Mapping[str, torch.Tensor], n: int) -> tuple[torch.Tensor, int | None]:
    """One Kronecker factor of LoKr, full (`lokr_wN`) or low-rank (a·b, or Tucker for w2), and its rank (None if full)."""
    if f"lokr_w{n}" in parts:
        return parts[f"lokr_w{n}"], None
    a, b = parts[f"lokr_w{n}_a"], parts[f"lokr_w{n}_b"]
    if n == 2 and "lokr_t2" in parts:
        return _tucker(parts["lokr_t2"], a, b), b.shape[0]
    return a @ b, b.shape[0]


def lokr_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """LoKr: kron(w1, w2) · alpha/r, r the rank of the decomposed factor (w1's first); scale 1 when neither is
    decomposed (alpha then ignored, as LyCORIS and A1111 do). A 4-D w2 (conv) takes w1 as [o1, i1, 1, 1]."""
    (w1, r1), (w2, r2) = _lokr_factor(parts, 1), _lokr_factor(parts, 2)
    rank = r1 or r2
    if w2.ndim == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    # torch.kron fails on some non-contiguous inputs (an einsum's output)
    return torch.kron(w1.contiguous(), w2.contiguous()) * (1.0 if rank is None else _alpha_scale(parts, rank))


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA: W' = m · (W + ΔW) / ‖W + ΔW‖ with m = dora_scale, returned as W' − W. The norm is per output channel
    when m is [out, 1, …] (LyCORIS' wd_on_out), per input column when m is [1, in, …] (older files)."""
    merged = weight + delta
    out, inputs, ones = merged.shape[0], merged.shape[1], [1] * (merged.ndim - 2)
    if dora_scale.shape[0] == out and dora_scale.numel() == out:
        norm = merged.reshape(out, -1).norm(dim=1).reshape(out, 1, *ones)
    elif dora_scale.numel() == inputs:
        norm = merged.transpose(0, 1).reshape(inputs, -1).norm(dim=1).reshape(1, inputs, *ones)
    else:
        raise ShapeMismatchError(f"has a DoRA scale of shape {list(dora_scale.shape)} for a weight of shape "
                                 f"{list(weight.shape)}")
    eps = torch.finfo(merged.dtype).eps  # keeps an all-zero channel finite
    return merged * (dora_scale.reshape(norm.shape) / (norm + eps)) - weight


def _fit(delta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """ΔW in the weight's shape (a conv kernel is often built as [out, in·k·k]); the same outputs and size, or refused."""
    if delta.shape[0] != shape[0] or delta.numel() != shape.numel():
        raise ShapeMismatchError(f"makes a weight of shape {list(delta.shape)} but the model's is {list(shape)}")
    return delta.reshape(shape)


_DELTAS = {"lora": lora_delta, "locon": lora_delta, "loha": loha_delta, "lokr": lokr_delta,
           "full": lambda parts: parts["diff"]}


def layer_delta(parts: Mapping[str, torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW in `weight`'s shape, the bias delta or None) of one layer from its {suffix: tensor}, scaled by its own
    alpha/rank rule; with `dora_scale`, ΔW is DoRA's W' − W, which needs the layer's weight W."""
    try:
        algorithm = layer_algorithm(parts)
        if algorithm == "full" and "diff" not in parts:  # a bias delta only
            delta = torch.zeros_like(weight)
        else:
            delta = _fit(_DELTAS[algorithm](parts), weight.shape)
        if "dora_scale" in parts:
            delta = dora_delta(weight, delta, parts["dora_scale"])
    except KeyError as e:
        raise ValueError(f"lacks {e.args[0]}") from e
    except RuntimeError as e:  # einsum, matmul or kron of factors that do not fit together
        raise ValueError(f"has factors that do not fit together ({e})") from e
    return delta, parts.get("diff_b")
