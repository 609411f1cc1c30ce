"""Masked training (OneTrainer's masked training, kohya's --masked_loss): a mask per image, white where the loss
counts, from a `NAME.mask.png` beside the image (studio.dataset.sources pairs them) or else the image's alpha
channel; cropped like its image, scaled
to the latents and used to weight the per-pixel loss. Pure functions; the trainer caches the latent masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def as_mask(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask picture (grey levels, RGB or with alpha: its luminance) as an L image of `size` (the image's)."""
    mask = picture.convert("L")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def useful_alpha(alpha: Image.Image | None) -> Image.Image | None:
    """An alpha channel as a mask, or None when it is fully opaque (then it masks nothing)."""
    if alpha is None or alpha.getextrema()[0] == 255:
        return None
    return alpha


def latent_mask(mask: Image.Image | None, latent_size: tuple[int, int], flipped: bool = False) -> torch.Tensor:
    """The mask at latent size ([1, h, w], 0..1, area-averaged as OneTrainer scales its masks), mirrored with its
    image; all ones for an image without a mask."""
    height, width = latent_size
    if mask is None:
        return torch.ones(1, height, width)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    if flipped:
        pixels = pixels.flip(-1)
    return F.interpolate(pixels, size=(height, width), mode="area")[0]


def loss_weights(masks: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    """Per-pixel loss weights from latent masks: 1 inside the mask, `unmasked_weight` outside (0: kohya's masked
    loss, the outside ignored; OneTrainer's "unmasked weight" keeps some of it)."""
    return unmasked_weight + (1.0 - unmasked_weight) * masks


def weighted_losses(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-item mean squared error, each pixel's error times its weight ([B, 1, h, w], broadcast over channels) as
    kohya's masked loss weights it (then averaged over the whole latent, not the mask's area)."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weights is not None:
        error = error * weights.to(error.device, error.dtype)
    return error.mean(dim=(1, 2, 3))
