"""Running an upscaler model tile by tile, so large images fit in memory: A1111's tile grid (tiles of `tile` px
overlapping by `overlap`, the last one flush with the edge), with the overlaps cross-faded so no seam shows."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

ProgressFn = Callable[[int, int, str], None]
# A1111's defaults (its "Tile size for ESRGAN upscalers" and "Tile overlap" settings); 0 = the whole image at once
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 8
MIN_TILE = 16
MAX_TILE = 4096


class UpscaleCancelled(RuntimeError):
    """Stop was pressed during an upscale; nothing was made."""


def check_tiling(tile: int, overlap: int) -> None:
    """ValueError unless `tile` is 0 (no tiling) or MIN_TILE..MAX_TILE px and `overlap` is under half of it."""
    if isinstance(tile, bool) or not isinstance(tile, int) or not (tile == 0 or MIN_TILE <= tile <= MAX_TILE):
        raise ValueError(f"tile size must be 0 (no tiling) or a whole number of {MIN_TILE} to {MAX_TILE} px, "
                         f"got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"tile overlap must be a whole number of 0 px or more, got {overlap!r}")
    if tile and overlap * 2 >= tile:
        raise ValueError(f"tile overlap must be less than half the tile size ({tile} px), got {overlap}")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where each tile starts along a side of `length` px: every `tile - overlap` px, the last one flush with the
    end (A1111's grid); one tile when the side fits in one (or tile is 0)."""
    if tile <= 0 or length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def blend_weights(starts: list[int], tile: int, length: int, scale: int) -> list[torch.Tensor]:
    """Each tile's weight along one side, over its output pixels; at every output pixel the weights sum to 1.

    Between two neighbours the weight fades linearly across the middle half of their overlap, and the outer
    quarter is dropped: those pixels saw the tile's edge (zero padding), so a model that looks no further than a
    quarter of the overlap gives exactly the untiled result, and a wider one still shows no seam."""
    ends = [min(s + tile, length) if tile > 0 else length for s in starts]
    weights = []
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        x = torch.arange(start * scale, end * scale, dtype=torch.float64) + 0.5  # pixel centres
        w = torch.ones_like(x)
        if i > 0:  # fade in across the overlap with the previous tile
            a, b = start * scale, ends[i - 1] * scale
            w = torch.minimum(w, _ramp(x, (a + b) / 2, (b - a) / 4))
        if i + 1 < len(starts):  # fade out across the overlap with the next tile
            a, b = starts[i + 1] * scale, end * scale
            w = torch.minimum(w, 1 - _ramp(x, (a + b) / 2, (b - a) / 4))
        weights.append(w)
    total = torch.zeros(length * scale, dtype=torch.float64)
    for start, w in zip(starts, weights, strict=True):
        total[start * scale:start * scale + len(w)] += w
    return [(w / total[s * scale:s * scale + len(w)]).float() for s, w in zip(starts, weights, strict=True)]


def _ramp(x: torch.Tensor, middle: float, half_width: float) -> torch.Tensor:
    """0 before `middle - half_width`, 1 after `middle + half_width`, linear between (a step when the width is 0)."""
    return ((x - (middle - half_width)) / max(2 * half_width, 1e-6)).clamp(0, 1)


def tile_count(width: int, height: int, tile: int, overlap: int) -> int:
    """How many tiles an image of width x height takes."""
    return len(tile_starts(width, tile, overlap)) * len(tile_starts(height, tile, overlap))


def run_tiled(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int, tile: int,
              overlap: int, device: torch.device, dtype: torch.dtype, on_tile: Callable[[], None] | None = None,
              cancel: threading.Event | None = None) -> torch.Tensor:
    """`model` over `image` (1 x C x H x W, float in 0..1, any device) tile by tile on `device` in `dtype`; the
    result (1 x C x H*scale x W*scale, float32 on the CPU) is the tiles blended by blend_weights. `on_tile` is
    called after each tile; `cancel` is checked before each and raises UpscaleCancelled."""
    check_tiling(tile, overlap)
    _, channels, height, width = image.shape
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    wy, wx = blend_weights(ys, tile, height, scale), blend_weights(xs, tile, width, scale)
    out = torch.zeros((1, channels, height * scale, width * scale), dtype=torch.float32)
    for y, weight_y in zip(ys, wy, strict=True):
        for x, weight_x in zip(xs, wx, strict=True):
            if cancel is not None and cancel.is_set():
                raise UpscaleCancelled("upscale stopped")
            h, w = len(weight_y) // scale, len(weight_x) // scale
            piece = image[:, :, y:y + h, x:x + w].to(device=device, dtype=dtype)
            result = model(piece).float().cpu()
            if result.shape[-2:] != (h * scale, w * scale):
                raise RuntimeError(f"the model made a {result.shape[-1]}x{result.shape[-2]} tile from "
                                   f"{w}x{h}; expected {scale}x that")
            out[:, :, y * scale:(y + h) * scale, x * scale:(x + w) * scale] += result * (weight_y[:, None] *
                                                                                        weight_x[None, :])
            if on_tile is not None:
                on_tile()
    return out
