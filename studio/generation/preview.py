"""Live previews while denoising. A1111's "Approx cheap": the latents mapped to colours by one linear map per VAE,
no VAE decode, so a preview every few steps costs microseconds; the map is fitted once per VAE by least squares from
the VAE's own decodes of a few pictures' latents (SD 1.x/2.x and SDXL VAEs, a user's VAE file). A VAE whose colours
are not linear in its latents (the fit explains under MIN_FIT of them: micro's small VAE) gets A1111's "Full"
previews, decoded by the VAE itself. Off unless asked for: without a Preview the denoise loop does nothing more."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MIN_FIT = 0.8  # the share of the colours' variance the linear map must explain to be used
FIT_SIZE = 64  # pixels per side of the fitting pictures: 8x8 latents each for an SD VAE, quick on a CPU
_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE module -> weights [C+1, 3], or None


@dataclass(frozen=True)
class Preview:
    """Ask denoise for a preview every `every` steps (not after the last: the real image follows); `show` gets the
    batch's pictures at latent resolution."""

    every: int
    show: Callable[[list[Image.Image]], None]

    def due(self, done: int, total: int) -> bool:
        """Whether step `done` (1-based) of `total` shows a preview."""
        return self.every > 0 and done < total and done % self.every == 0


def fitting_pictures(n: int = 6, size: int = FIT_SIZE) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]: colour gradients and flat patches spanning the RGB cube (seeded, no files)."""
    g = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    pictures = []
    for k in range(n):
        a, b = g.random(3, dtype=np.float32), g.random(3, dtype=np.float32)
        horizontal = a[:, None, None] * ramp[None, None, :] + b[:, None, None] * (1 - ramp[None, None, :])
        vertical = np.broadcast_to(ramp[None, :, None], (3, size, size)) * (k % 2)
        blocks = np.kron(g.random((3, 4, 4), dtype=np.float32), np.ones((size // 4, size // 4), np.float32))
        pictures.append(np.clip((horizontal + vertical + blocks) / 2.5, 0, 1))
    return torch.from_numpy(np.stack(pictures)) * 2 - 1


@torch.no_grad()
def fit_latent_to_rgb(vae) -> tuple[torch.Tensor, float]:
    """([C + 1, 3], R²): the least-squares map from a latent pixel (scaled as the UNet sees it, plus 1) to the colour
    of the VAE's decode averaged over the pixels that latent covers, fitted on fitting_pictures' latents, and the
    share of those colours' variance it explains."""
    dtype, device = next(vae.parameters()).dtype, next(vae.parameters()).device
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # SDXL's VAE overflows in fp16
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        pictures = fitting_pictures().to(device, next(vae.parameters()).dtype)
        latents = vae.encode(pictures).latent_dist.mean
        decoded = vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1)
    finally:
        if upcast:
            vae.to(dtype=dtype)
    factor = decoded.shape[-1] // latents.shape[-1]
    colours = torch.nn.functional.avg_pool2d(decoded, factor)  # [n, 3, h, w]
    z = latents.float() * vae.config.scaling_factor
    x = torch.cat([z, torch.ones_like(z[:, :1])], dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    x, y = x.cpu(), y.cpu()
    weights = torch.linalg.lstsq(x, y).solution  # [C + 1, 3]
    explained = 1 - float(((x @ weights - y) ** 2).sum() / ((y - y.mean(dim=0)) ** 2).sum().clamp_min(1e-12))
    return weights, explained


def latent_to_rgb(vae) -> torch.Tensor | None:
    """The VAE's fitted map, or None when it explains under MIN_FIT of the colours (then previews are decoded);
    fitted on first use and kept while the VAE is loaded."""
    if vae not in _FITS:
        weights, explained = fit_latent_to_rgb(vae)
        _FITS[vae] = weights if explained >= MIN_FIT else None
    return _FITS[vae]


@torch.no_grad()
def approximate(latents: torch.Tensor, weights: torch.Tensor) -> list[Image.Image]:
    """The batch's latents ([B, C, h, w], as the UNet sees them) as pictures at latent resolution."""
    z = latents.detach().float().cpu()
    x = torch.cat([z, torch.ones_like(z[:, :1])], dim=1).permute(0, 2, 3, 1)
    rgb = ((x @ weights).clamp(-1, 1) + 1) * 127.5
    return [Image.fromarray(row.round().to(torch.uint8).numpy()) for row in rgb]


def preview_grid(pictures: list[Image.Image], width: int, height: int, longest: int = 512) -> Image.Image:
    """The batch's previews side by side (up to 4 a row) in the generation's aspect, the sheet's longest side at most
    `longest` pixels (nearest: they are coarse)."""
    columns = min(len(pictures), 4)
    rows = -(-len(pictures) // columns)
    scale = min(1.0, longest / max(columns * width, rows * height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    sheet = Image.new("RGB", (columns * w, rows * h))
    for k, picture in enumerate(pictures):
        sheet.paste(picture.resize((w, h), Image.NEAREST), ((k % columns) * w, (k // columns) * h))
    return sheet
