"""Upscaling one image as A1111 does: a pixel resize, or a model run (in tiles) as many times as the factor needs
(at most 3), then a Lanczos resize to the exact size asked for (a 4x model asked for 2x runs once, then halves).
The size is checked against a pixel limit before any work."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from studio.upscale.library import BUILT_IN, LANCZOS, NEAREST, NONE, load_upscaler, resolve_upscaler
from studio.upscale.tiling import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    ProgressFn,
    check_tiling,
    run_tiled,
    tile_count,
)

MAX_OUTPUT_PIXELS = 64_000_000  # the largest image an upscale makes, model passes included (64 MP = 8000 x 8000)
MAX_SCALE = 16.0
MAX_PASSES = 3  # A1111 runs a model at most 3 times (a 2x model asked for 8x)
RESAMPLE = {LANCZOS: Image.Resampling.LANCZOS, NEAREST: Image.Resampling.NEAREST}


@dataclass
class UpscalePlan:
    """What an upscale will do, computed before any work: the sizes of the source, each model pass and the result."""

    source: tuple[int, int]
    target: tuple[int, int]
    passes: list[tuple[int, int]] = field(default_factory=list)  # the image size after each model pass
    tiles: int = 0  # tiles over all passes

    @property
    def resized(self) -> bool:
        """Whether a Lanczos resize follows the model (or is the whole upscale)."""
        return (self.passes[-1] if self.passes else self.source) != self.target


@dataclass
class Upscaled:
    """An upscaled image and how it was made."""

    image: Image.Image
    upscaler: str  # the menu name
    plan: UpscalePlan
    architecture: str = ""  # spandrel's name of the model's architecture ("" for a built-in)
    model_scale: int = 1  # the model's own factor (1 for a built-in)
    dtype: str = ""  # the dtype the model ran in ("float16", ...)


def target_size(width: int, height: int, scale: float | None = None,
                size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The result's size: `size` (width, height) when given, else the source times `scale`, rounded (at least 1 px).
    A1111's Extras also rounds down to a multiple of 8; hires fix asks for its exact size here instead."""
    if size is not None:
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise ValueError(f"size must be (width, height) in whole pixels of 1 or more, got {size!r}")
        return int(size[0]), int(size[1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not 0 < scale <= MAX_SCALE:
        raise ValueError(f"scale must be a number above 0 and at most {MAX_SCALE:g}, got {scale!r}")
    return max(1, round(width * scale)), max(1, round(height * scale))


def model_passes(source: tuple[int, int], target: tuple[int, int], model_scale: int) -> list[tuple[int, int]]:
    """The size after each model pass, as A1111's Upscaler.upscale decides: run until the image covers the target
    (at most MAX_PASSES times), once when the target is the source's size (a 1x or sharpening run), and none when
    the target is smaller."""
    sizes, (w, h) = [], source
    for i in range(MAX_PASSES):
        if w >= target[0] and h >= target[1] and (i > 0 or target != source):
            break
        sizes.append((w * model_scale, h * model_scale))
        w, h = sizes[-1]
        if model_scale == 1:
            break
    return sizes


def plan_upscale(source: tuple[int, int], target: tuple[int, int], model_scale: int | None, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, max_pixels: int = MAX_OUTPUT_PIXELS,
                 upscaler: str = "") -> UpscalePlan:
    """The plan for a source -> target upscale with a model of `model_scale` (None: a built-in resize); ValueError
    when the result or a model pass would be over `max_pixels`."""
    check_tiling(tile, overlap)
    passes = model_passes(source, target, model_scale) if model_scale else []
    for size in [target, *passes]:
        if size[0] * size[1] > max_pixels:
            what = (f"its {model_scale}x model makes {size[0]}x{size[1]} on the way" if size != target
                    else f"the result is {size[0]}x{size[1]}")
            raise ValueError(f"upscaling {source[0]}x{source[1]} to {target[0]}x{target[1]}"
                             f"{f' with {upscaler}' if upscaler else ''}: {what} = {size[0] * size[1] / 1e6:.1f} "
                             f"megapixels, over the limit of {max_pixels / 1e6:.0f}. Use a smaller scale or "
                             f"image{', or a model of a smaller factor' if size != target else ''}")
    tiles, (w, h) = 0, source
    for size in passes:
        tiles += tile_count(w, h, tile, overlap)
        w, h = size
    return UpscalePlan(source, target, passes, tiles)


def upscale(image: Image.Image, upscaler: str, scale: float | None = 4.0, *, folder: Path | None = None,
            size: tuple[int, int] | None = None, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
            device: str | torch.device = "cpu", precision: str = "auto", max_pixels: int = MAX_OUTPUT_PIXELS,
            on_progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> Upscaled:
    """`image` upscaled by `scale` (or to `size`) with `upscaler`: "None" (the image as it is, as A1111's Extras),
    "Lanczos" or "Nearest" (PIL), or a model file's name in `folder` (upscalers/), run in tiles on `device` (fp32
    on the CPU; on CUDA fp16 when the model supports it, see library.pick_dtype). `on_progress(done, total, info)`
    counts tiles; `cancel` is checked between tiles (UpscaleCancelled). Bad input is a ValueError before any work."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    if image.width * image.height > max_pixels:
        raise ValueError(f"image of {image.width}x{image.height} is over the limit of {max_pixels / 1e6:.0f} "
                         "megapixels")
    source = image.size
    target = target_size(*source, scale=scale, size=size)
    if upscaler == NONE:
        return Upscaled(image, NONE, UpscalePlan(source, source))
    if upscaler in BUILT_IN:
        plan = plan_upscale(source, target, None, tile, overlap, max_pixels, upscaler)
        return Upscaled(image.resize(target, resample=RESAMPLE[upscaler]), upscaler, plan)
    if folder is None:
        raise ValueError(f"upscaler {upscaler!r} is not a built-in ({', '.join(BUILT_IN)}); give the upscalers "
                         "folder to find it in")
    entry = resolve_upscaler(upscaler, folder)
    check_tiling(tile, overlap)  # before the model file is read
    loaded = load_upscaler(entry, device, precision)
    plan = plan_upscale(source, target, loaded.scale, tile if loaded.tiling_supported else 0, overlap, max_pixels,
                        entry.name)
    pixels = image_to_tensor(image)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, plan.tiles, f"tile {done}/{plan.tiles}")

    for _ in plan.passes:
        try:
            pixels = run_tiled(loaded.model, pixels, loaded.scale, tile if loaded.tiling_supported else 0, overlap,
                               loaded.device, loaded.dtype, on_tile=tick, cancel=cancel)
        except RuntimeError as e:  # an architecture whose code mixes dtypes in half precision
            if loaded.dtype == torch.float32 or "type" not in str(e):
                raise
            raise ValueError(f"{entry.name} ({loaded.architecture}) does not run in {loaded.dtype}: "
                             f"{str(e)[:200]}; use precision fp32") from None
    result = tensor_to_image(pixels)
    if result.size != target:
        result = result.resize(target, resample=Image.Resampling.LANCZOS)
    dtype = str(loaded.dtype).removeprefix("torch.")
    return Upscaled(result, entry.name, plan, loaded.architecture, loaded.scale, dtype)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as a 1 x 3 x H x W float32 tensor in 0..1 (converted to RGB first)."""
    rgb = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """A 1 x 3 x H x W float tensor in 0..1 as an RGB image, rounded to the nearest 8-bit value. Works in place
    (`pixels` is used up): a 64 MP result has no second float copy."""
    array = pixels[0].clamp_(0, 1).mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, "RGB")
