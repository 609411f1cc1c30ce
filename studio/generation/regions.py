"""Regional prompts as pure functions: a frame split into columns or rows by ratios ("cols 1,1", "rows 2,1,1"),
each region drawn from its own prompt; the masks at latent size that the denoise loop combines the regions'
noise predictions with (each region's prediction inside its own part of the frame)."""

from __future__ import annotations

import torch

MAX_REGIONS = 4
DIRECTIONS = ("cols", "rows")


def parse_layout(text: str) -> tuple[str, list[float]]:
    """`"cols 1,1"` -> ("cols", [0.5, 0.5]): the direction and each region's share of the frame."""
    parts = (text or "").strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() not in DIRECTIONS:
        raise ValueError(f"regions must be like 'cols 1,1' or 'rows 2,1' (a direction and ratios), got {text!r}")
    try:
        ratios = [float(x) for x in parts[1].replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"region ratios must be numbers, like 'cols 1,2', got {parts[1]!r}") from None
    if not 2 <= len(ratios) <= MAX_REGIONS:
        raise ValueError(f"regions need 2 to {MAX_REGIONS} ratios, got {len(ratios)}")
    if any(not r > 0 or r != r or r == float("inf") for r in ratios):
        raise ValueError(f"region ratios must be positive numbers, got {parts[1]!r}")
    total = sum(ratios)
    return parts[0].lower(), [r / total for r in ratios]


def latent_masks(layout: str, width: int, height: int, scale: int) -> list[torch.Tensor]:
    """One [1, 1, h, w] 0/1 mask per region at latent size (the image size / `scale`); every latent cell belongs to
    exactly one region, the borders rounded to whole cells."""
    direction, shares = parse_layout(layout)
    h, w = height // scale, width // scale
    length = w if direction == "cols" else h
    edges = [0]
    for share in shares[:-1]:
        edges.append(edges[-1] + share)
    cuts = [round(e * length) for e in edges] + [length]
    masks = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        if b <= a:
            raise ValueError(f"a region of {layout!r} is narrower than one latent cell ({scale} px): use wider ratios")
        mask = torch.zeros(1, 1, h, w)
        if direction == "cols":
            mask[..., :, a:b] = 1
        else:
            mask[..., a:b, :] = 1
        masks.append(mask)
    return masks


def region_text(prompt: str, region_prompt: str) -> str:
    """What a region's text encoder sees: the shared prompt (what all regions have in common: the setting, the
    style) and the region's own."""
    shared, own = prompt.strip(), region_prompt.strip()
    return f"{shared}, {own}" if shared and own else shared or own
