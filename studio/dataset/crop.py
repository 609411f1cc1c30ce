"""Where to crop a training image: center, content-aware (saliency or entropy, with OpenCV), kohya buckets.
Pure functions over sizes and pixel arrays; boxes are (left, top, right, bottom) in source pixels."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]
CROP_MODES = ("center", "smart", "entropy", "bucket")
# analysis runs on a small copy: saliency is about layout, not detail, and this keeps it fast
_ANALYSIS_SIDE = 256


def center_box(width: int, height: int, target_w: int, target_h: int) -> Box:
    """The largest box of the target's aspect ratio, centered."""
    w, h = _fit_aspect(width, height, target_w, target_h)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def saliency_map(rgb: np.ndarray) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang 2007) of an RGB uint8 array, same height/width, 0..1.

    OpenCV's contrib module has the same algorithm as StaticSaliencySpectralResidual; the base
    opencv wheels do not ship it, so it is written here with cv2 filters and numpy's FFT.
    """
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    h, w = gray.shape
    small = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA)
    spectrum = np.fft.fft2(small)
    log_amp = np.log(np.abs(spectrum) + 1e-8)
    phase = np.angle(spectrum)
    # the "residual": what the log spectrum has beyond its local average is what stands out
    residual = log_amp - cv2.blur(log_amp.astype(np.float32), (3, 3))
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    sal = cv2.GaussianBlur(sal.astype(np.float32), (9, 9), 2.5)
    sal = cv2.resize(sal, (w, h), interpolation=cv2.INTER_LINEAR)
    return _normalize(sal)


def entropy_map(rgb: np.ndarray, cell: int = 8) -> np.ndarray:
    """Local Shannon entropy of the gray levels (16 bins) in cells of `cell` px, upsampled to the image."""
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    rows, cols = max(1, h // cell), max(1, w // cell)
    bins = (gray[: rows * cell, : cols * cell] // 16).reshape(rows, cell, cols, cell).transpose(0, 2, 1, 3)
    bins = bins.reshape(rows, cols, -1)
    counts = np.stack([(bins == b).sum(-1) for b in range(16)], axis=-1).astype(np.float32)
    p = counts / counts.sum(-1, keepdims=True)
    ent = -(p * np.log2(np.where(p > 0, p, 1))).sum(-1)
    return _normalize(cv2.resize(ent, (w, h), interpolation=cv2.INTER_NEAREST))


def best_window(weights: np.ndarray, win_w: int, win_h: int) -> tuple[int, int]:
    """Top-left corner of the win_w x win_h window with the largest total weight (summed-area table).

    Ties go to the window closest to the center, so a featureless image crops like center crop.
    """
    h, w = weights.shape
    win_w, win_h = min(win_w, w), min(win_h, h)
    sat = np.pad(weights.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = sat[win_h:, win_w:] - sat[:-win_h, win_w:] - sat[win_h:, :-win_w] + sat[:-win_h, :-win_w]
    ys, xs = np.mgrid[0 : sums.shape[0], 0 : sums.shape[1]]
    cy, cx = (h - win_h) / 2, (w - win_w) / 2
    distance = np.hypot(ys - cy, xs - cx)
    # a tiny center preference breaks ties without overruling real content
    score = sums - 1e-6 * (sums.max() + 1) * distance / (distance.max() + 1)
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return int(x), int(y)


def content_box(image: Image.Image, target_w: int, target_h: int, method: str = "smart") -> Box:
    """The box of the target's aspect ratio that holds the most salient (or highest-entropy) content."""
    width, height = image.size
    box_w, box_h = _fit_aspect(width, height, target_w, target_h)
    if (box_w, box_h) == (width, height):
        return 0, 0, width, height
    scale = min(1.0, _ANALYSIS_SIDE / max(width, height))
    small = image.convert("RGB").resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                        Image.Resampling.BILINEAR)
    rgb = np.asarray(small)
    weights = saliency_map(rgb) if method == "smart" else entropy_map(rgb)
    win_w = max(1, min(rgb.shape[1], round(box_w * scale)))
    win_h = max(1, min(rgb.shape[0], round(box_h * scale)))
    x, y = best_window(weights, win_w, win_h)
    left = min(round(x / scale), width - box_w)
    top = min(round(y / scale), height - box_h)
    return left, top, left + box_w, top + box_h


def bucket_resolutions(size: int, min_side: int | None = None, max_side: int | None = None,
                       step: int | None = None) -> list[tuple[int, int]]:
    """Bucket sizes (w, h) in multiples of `step` whose area is at most size*size (kohya's scheme).

    Defaults scale with the size: sides from size/2 to 2*size (256..1024 at 512, kohya's defaults), step 64
    (8 for sizes that are not multiples of 64).
    """
    step = step or (64 if size % 64 == 0 else 8)
    min_side = min_side or max(step, size // 2 // step * step)
    max_side = max(max_side or 2 * size, size)
    max_area = size * size
    found = {(size, size)}
    w = min_side
    while w <= max_side:
        h = min(max_side, (max_area // w) // step * step)
        if h >= min_side:
            found.add((w, h))
            found.add((h, w))
        w += step
    return sorted(found)


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space: 2:1 and 1:2 are equally far)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def plan_crop(image: Image.Image, size: int, mode: str) -> tuple[Box, tuple[int, int]]:
    """Where to crop `image` and the size to resize the crop to, for one of CROP_MODES."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {', '.join(CROP_MODES)}, got {mode!r}")
    width, height = image.size
    if mode == "bucket":
        target = pick_bucket(width, height, bucket_resolutions(size))
        return center_box(width, height, *target), target
    if mode == "center":
        return center_box(width, height, size, size), (size, size)
    return content_box(image, size, size, mode), (size, size)


def apply_crop(image: Image.Image, box: Box, target: tuple[int, int]) -> Image.Image:
    """Crop, then resize with Lanczos (reducing_gap keeps large downscales fast and sharp)."""
    cropped = image.crop(box)
    if cropped.size == target:
        return cropped
    return cropped.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _fit_aspect(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    if width * target_h > height * target_w:  # wider than the target: full height
        return max(1, round(height * target_w / target_h)), height
    return width, max(1, round(width * target_h / target_w))


def _normalize(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
