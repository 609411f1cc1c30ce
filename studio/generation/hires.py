"""Hires fix (A1111's two-pass text to image): the first pass at the base size, its latents or its pictures upscaled
to the target size, then a second, image-to-image pass at a denoising strength. The names, sizes and infotext fields
are A1111's; the passes themselves run in studio.generation.generate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A1111's latent upscalers: (interpolation mode, antialias), in its menu order
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_UPSCALER = "Latent"


@dataclass(frozen=True)
class HiresPass:
    """The second pass of a hires fix: its size, upscaler, steps (0: the first pass's), strength, sampler and
    prompts ("" / None: the first pass's)."""

    width: int
    height: int
    upscaler: str
    steps: int
    denoising_strength: float
    sampler: str | None = None
    schedule: str | None = None
    prompt: str = ""
    negative_prompt: str = ""

    @property
    def in_latent_space(self) -> bool:
        return self.upscaler in LATENT_UPSCALERS


def target_size(width: int, height: int, scale: float, resize_width: int = 0,
                resize_height: int = 0) -> tuple[int, int]:
    """A1111's hires target: width and height times `scale`, or "Resize width/height to" when set (one of them 0:
    kept in proportion), down to the 8-px latent grid."""
    if resize_width or resize_height:
        w = resize_width or int(resize_height * width / height)
        h = resize_height or int(resize_width * height / width)
    else:
        w, h = int(width * scale), int(height * scale)
    return max(w // 8 * 8, 64), max(h // 8 * 8, 64)


def upscale_latents(latents: torch.Tensor, upscaler: str, width: int, height: int, scale_factor: int) -> torch.Tensor:
    """Latents scaled to width x height pixels with one of A1111's latent upscalers (torch's interpolate)."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    size = (height // scale_factor, width // scale_factor)
    kwargs = {"antialias": True} if antialias else {}
    if mode in ("bilinear", "bicubic"):
        kwargs["align_corners"] = False
    return torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, **kwargs).to(latents.dtype)


def infotext_fields(job_scale: float, hires: HiresPass, resized: bool, base_sampler: str) -> dict:
    """A1111's hires fields: upscale (or resize), steps when set, upscaler, and the sampler and prompts when they
    differ from the first pass's."""
    out: dict = {"Hires upscale": job_scale} if not resized else {"Hires resize": f"{hires.width}x{hires.height}"}
    if hires.steps:
        out["Hires steps"] = hires.steps
    out["Hires upscaler"] = hires.upscaler
    if hires.sampler and hires.sampler != base_sampler:
        out["Hires sampler"] = hires.sampler
    if hires.prompt:
        out["Hires prompt"] = hires.prompt
    if hires.negative_prompt:
        out["Hires negative prompt"] = hires.negative_prompt
    return out
