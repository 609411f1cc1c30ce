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


MODES = ("Attention", "Latent")  # Regional Prompter's: cross-attention masked per region, or noise predictions


class RegionalCrossAttention:
    """An attention processor for the UNet's cross-attention layers (set with diffusers' set_attn_processor while a
    pass with regions runs): the text holds each region's prompt one after another (`tokens` positions each); every
    region's prompt is attended to by the whole frame and the results are kept where that region's mask is (the
    masks scaled to the layer's resolution), so one UNet call draws each region from its own prompt."""

    def __init__(self, base, masks: torch.Tensor, tokens: int):
        self.base = base  # the processor it wraps (SDPA, or a LoRA-aware one)
        self.masks = masks  # [regions, 1, h, w] at latent size, 0/1, summing to 1
        self.tokens = tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] == self.tokens:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        outs = [self.base(attn, hidden_states, chunk, attention_mask, temb, **kwargs)
                for chunk in encoder_hidden_states.split(self.tokens, dim=1)]
        h, w = self.masks.shape[-2:]
        positions = outs[0].shape[1]
        factor = round((h * w / positions) ** 0.5)
        small = torch.nn.functional.interpolate(self.masks.to(outs[0].dtype), size=(h // factor, w // factor),
                                                mode="nearest")
        weights = small.flatten(2).transpose(1, 2)  # [regions, positions, 1]
        return sum(weights[r : r + 1].to(out.device) * out for r, out in enumerate(outs))


def regional_processors(unet, masks: torch.Tensor, tokens: int) -> dict:
    """The UNet's attention processors with every cross-attention one wrapped in RegionalCrossAttention."""
    return {name: RegionalCrossAttention(proc, masks, tokens) if ".attn2." in name else proc
            for name, proc in unet.attn_processors.items()}
