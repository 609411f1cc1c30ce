"""Control images: a reference read safely, fitted to the frame, and turned into a canny edge map."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

MAX_REFERENCE_PIXELS = 64_000_000
MAX_REFERENCE_BYTES = 200_000_000


@dataclass
class Reference:
    image: Image.Image  # upright RGB
    notes: list[str] = field(default_factory=list)  # conversions done (CMYK, palette, alpha, EXIF rotation)


def read_reference(path: Path) -> Reference:
    """A reference picture or sketch as upright RGB; a file that is not a usable image raises ValueError naming it
    and why (empty, corrupt, truncated, oversized). CMYK, palette, grayscale and transparent images are converted,
    and the notes say so."""
    from studio.files.images import SkipImage, Source, load_image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference image {path.name!r} does not exist")
    try:
        decoded = load_image(Source(path.name, path), min_side=8, max_pixels=MAX_REFERENCE_PIXELS,
                             max_bytes=MAX_REFERENCE_BYTES)
    except SkipImage as e:
        raise ValueError(f"reference image {path.name}: {e}") from None
    return Reference(decoded.image, decoded.notes)


def fit_to_frame(image: Image.Image, width: int, height: int) -> Image.Image:
    """Crop to the frame's aspect ratio around the centre, then resize (A1111's "Crop and Resize")."""
    from PIL import ImageOps

    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def check_thresholds(low, high) -> tuple[int, int]:
    for name, value in (("low threshold", low), ("high threshold", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ValueError(f"canny {name} must be a whole number, got {value!r}")
        if not 1 <= int(value) <= 255:
            raise ValueError(f"canny {name} must be between 1 and 255, got {value}")
    if int(low) > int(high):
        raise ValueError(f"canny low threshold must not be above the high threshold, got {low} > {high}")
    return int(low), int(high)


def canny_map(image: Image.Image, low: int, high: int) -> Image.Image:
    """The canny edge map of `image` at its own size (controlnet_aux's CannyDetector: cv2.Canny on the RGB pixels),
    white edges on black, RGB."""
    import warnings

    with warnings.catch_warnings():
        # the first import loads every controlnet_aux detector (slow; timm and mediapipe notices): not the user's
        warnings.simplefilter("ignore")
        from controlnet_aux.canny import CannyDetector

    low, high = check_thresholds(low, high)
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    side = min(w, h)
    # detect and output at the image's own resolution; CannyDetector rounds sides to multiples of 64
    edges = CannyDetector()(rgb, low_threshold=low, high_threshold=high, detect_resolution=side,
                            image_resolution=side, output_type="np")
    if edges.shape[:2] != (h, w):
        import cv2

        edges = cv2.resize(edges, (w, h), interpolation=cv2.INTER_NEAREST)
    return Image.fromarray(edges)
