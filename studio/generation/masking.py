"""Inpainting and outpainting in pixels, A1111's rules as pure functions: a mask read from a picture (white or
opaque = redraw), blurred, cropped to its area with padding ("Only masked"), the masked content pre-filled, and the
original pixels laid back over the result outside the mask (its "overlay"). No model work here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# A1111's names, in its menus' order
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
INPAINT_AREAS = ("Whole picture", "Only masked")
OUTPAINT_SIDES = ("left", "right", "top", "bottom")


def binary_mask(mask: Image.Image) -> Image.Image:
    """The mask as black/white "L": a picture with real transparency gives its alpha (painted = redraw), any other
    its luminance; both rounded at half (A1111's create_binary_mask)."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L").point(lambda v: 255 if v > 128 else 0)


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's "Mask blur": a Gaussian of sigma `radius` along x then along y (kernel 2*int(2.5*r+0.5)+1)."""
    if radius <= 0:
        return mask
    import cv2

    kernel = 2 * int(2.5 * radius + 0.5) + 1
    pixels = np.asarray(mask.convert("L"))
    pixels = cv2.GaussianBlur(pixels, (kernel, 1), radius)
    pixels = cv2.GaussianBlur(pixels, (1, kernel), radius)
    return Image.fromarray(pixels)


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-black pixels grown by `padding` on each side and kept inside
    the picture; None for an empty mask."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) to `want` pixels about its middle, shifted back inside [0, limit)."""
    extra = want - (hi - lo)
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_region(box: tuple[int, int, int, int], width: int, height: int, image_width: int,
                  image_height: int) -> tuple[int, int, int, int]:
    """`box` grown along one side to the generation's aspect (width:height), so the crop is not distorted when it
    is scaled to the generation size (A1111's expand_crop_region)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height), image_width)
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted with the colours around it ("Masked content: fill"): the unmasked pixels blurred at
    shrinking radii and layered, so far from the edge the colour is an average and near it the neighbours' colour."""
    keep = ImageOps.invert(mask.convert("L"))
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


@dataclass
class InpaintPlan:
    """A prepared inpainting: what the sampler sees and how its result goes back into the picture.

    `picture` and `mask` are at the generation size (the crop, scaled, for "Only masked"); `original` is the
    picture the result is laid into; `overlay_mask` says, at the original's size, how much of the result shows
    (1 = all of it); `paste_box` is where a cropped result goes (None: the whole picture)."""

    picture: Image.Image
    mask: Image.Image
    original: Image.Image
    overlay_mask: Image.Image
    paste_box: tuple[int, int, int, int] | None = None

    def finish(self, generated: Image.Image) -> Image.Image:
        """The result with the original pixels kept outside the mask (A1111's overlay); a cropped result is scaled
        back into its box first."""
        base = self.original
        if self.paste_box is not None:
            x1, y1, x2, y2 = self.paste_box
            from studio.generation.job import resize_image

            base = self.original.copy()
            base.paste(resize_image(generated, "Crop and resize", x2 - x1, y2 - y1), (x1, y1))
            generated = base
        return Image.composite(generated, self.original, self.overlay_mask)


def plan_inpaint(image: Image.Image, mask: Image.Image, width: int, height: int, resize_mode: str = "Just resize",
                 mask_blur: int = 4, mask_mode: str = "Inpaint masked", masked_content: str = "original",
                 inpaint_area: str = "Whole picture", padding: int = 32) -> InpaintPlan:
    """A1111's inpainting set-up: the mask made binary, inverted for "Inpaint not masked", blurred; for "Only
    masked" the mask's area plus `padding` (grown to the generation's aspect) cropped and scaled to width x height,
    else picture and mask fitted by `resize_mode`; the masked area pre-filled unless the content is "original"."""
    from studio.generation.job import resize_image

    mask = binary_mask(mask)
    if mask.size != image.size:  # a mask drawn for another size covers the same part of the picture
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    if mask_mode == "Inpaint not masked":
        mask = ImageOps.invert(mask)
    if mask.getbbox() is None:
        what = "covers the whole picture" if mask_mode == "Inpaint not masked" else "is empty"
        raise ValueError(f"the mask {what}, so nothing would be redrawn: paint the area to change (white or "
                         "opaque), or use image to image without a mask")
    mask = blur_mask(mask, mask_blur)
    if inpaint_area == "Only masked":
        box = expand_region(crop_region(mask, padding), width, height, image.width, image.height)
        picture = resize_image(image.crop(box), "Resize and fill", width, height)
        small = resize_image(mask.crop(box).convert("RGB"), "Resize and fill", width, height).convert("L")
        if masked_content != "original":
            picture = fill_masked(picture, small)
        return InpaintPlan(picture, small, image, mask, box)
    original = resize_image(image, resize_mode, width, height)
    fitted = resize_image(mask.convert("RGB"), resize_mode, width, height).convert("L")
    overlay = fitted.point(lambda v: min(2 * v, 255))  # A1111 doubles the blurred mask for the overlay
    picture = original if masked_content == "original" else fill_masked(original, fitted)
    return InpaintPlan(picture, fitted, original, overlay)


def parse_outpaint(value: str | dict | None) -> dict[str, int]:
    """`"left=64,right=64"` (or a dict) -> {side: pixels}; each a multiple of 8 from 0 to 1024."""
    if not value:
        return {}
    if isinstance(value, str):
        pairs = {}
        for part in value.split(","):
            side, sep, amount = part.partition("=")
            if not sep:
                raise ValueError(f"outpaint must be like left=64,right=64, got {value!r}")
            pairs[side.strip().lower()] = amount.strip()
        value = pairs
    out = {}
    for side, amount in value.items():
        if side not in OUTPAINT_SIDES:
            raise ValueError(f"outpaint side must be one of {', '.join(OUTPAINT_SIDES)}, got {side!r}")
        try:
            pixels = int(str(amount))
        except ValueError:
            raise ValueError(f"outpaint {side} must be a whole number of pixels, got {amount!r}") from None
        if not 0 <= pixels <= 1024 or pixels % 8:
            raise ValueError(f"outpaint {side} must be a multiple of 8 between 0 and 1024, got {pixels}")
        if pixels:
            out[side] = pixels
    return out


def outpaint_canvas(image: Image.Image, pads: dict[str, int], overlap: int = 8) -> tuple[Image.Image, Image.Image]:
    """The picture on a larger canvas and the mask of what to draw: the new bands (pre-filled from the picture's
    colours) plus `overlap` pixels into the picture, so the seam is redrawn too."""
    left, right, top, bottom = (pads.get(s, 0) for s in OUTPAINT_SIDES)
    size = (image.width + left + right, image.height + top + bottom)
    canvas = Image.new("RGB", size)
    canvas.paste(image, (left, top))
    mask = Image.new("L", size, 255)
    inner = (left + (overlap if left else 0), top + (overlap if top else 0),
             left + image.width - (overlap if right else 0), top + image.height - (overlap if bottom else 0))
    mask.paste(0, inner)
    return fill_masked(canvas, mask), mask


def pads_for_aspect(width: int, height: int, aspect: float) -> dict[str, int]:
    """Even left/right (or top/bottom) pads, multiples of 8, that bring width x height to about `aspect` (w/h)."""
    if aspect <= 0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    if width / height < aspect:
        extra = int(round((height * aspect - width) / 16)) * 8
        return {"left": extra, "right": extra} if extra else {}
    extra = int(round((width / aspect - height) / 16)) * 8
    return {"top": extra, "bottom": extra} if extra else {}
