"""The oracle of the micro world: reads a scene's attributes back from any RGB image (pure numpy).

It works on renders and on generated images alike: background from the border, objects as the
connected regions that differ from it, colour by nearest palette entry, shape from the fill and taper
of the object's box, position from its centroid, texture from directional pixel-difference energies.
"""

from __future__ import annotations

import numpy as np

from studio.micro.world import BACKGROUNDS, COLOURS, DARK, POSITIONS, RADIUS, SIZES, Scene, caption

ATTRIBUTES = ("background", "colour", "shape", "size", "position", "texture", "count")
MASK_THRESHOLD = 55.0  # RGB distance from the background colour that makes a pixel foreground
MIN_OBJECT = 12  # pixels at 64 px; smaller specks are noise
TEXTURED = 0.1  # luminance std / mean inside an object above which it is not plain
ORIENTED = 0.35  # along-stripe / across-stripe energy below which a texture is stripes


def _as_array(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr[..., :3].astype(np.float32)


def _nearest(pixels: np.ndarray, table: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into table of the nearest colour of each pixel (pixels: (..., 3))."""
    ref = np.array(list(table.values()), dtype=np.float32)
    d = ((pixels[..., None, :] - ref) ** 2).sum(-1)
    return d.argmin(-1)


def background(image) -> tuple[str, np.ndarray]:
    """(name, measured RGB) of the background: the majority palette colour of the border pixels."""
    img = _as_array(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    labels = _nearest(border, BACKGROUNDS)
    winner = int(np.bincount(labels, minlength=len(BACKGROUNDS)).argmax())
    return list(BACKGROUNDS)[winner], np.median(border[labels == winner], axis=0)


def foreground(image, bg_rgb=None) -> np.ndarray:
    img = _as_array(image)
    if bg_rgb is None:
        bg_rgb = background(img)[1]
    mask = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > MASK_THRESHOLD
    # 3x3 majority filter: drops single noisy pixels, keeps shapes
    p = np.pad(mask.astype(np.int32), 1)
    votes = sum(p[1 + dy: p.shape[0] - 1 + dy, 1 + dx: p.shape[1] - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return votes >= 5


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a mask, largest first, as boolean masks."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(h * w).reshape(h, w), h * w)
    big = h * w
    while True:  # propagate the smallest label through each region
        p = np.pad(labels, 1, constant_values=big)
        new = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [labels == ids[i] for i in order if counts[i] >= MIN_OBJECT]


def object_colour(image, obj: np.ndarray) -> str:
    """Majority palette colour of an object's pixels; a texture's dark pixels count for their colour."""
    img = _as_array(image)
    table = {**COLOURS, **{f"dark {k}": tuple(DARK * np.array(v)) for k, v in COLOURS.items()}}
    labels = _nearest(img[obj], table) % len(COLOURS)
    return list(COLOURS)[int(np.bincount(labels, minlength=len(COLOURS)).argmax())]


def object_shape(obj: np.ndarray) -> tuple[str, float, float]:
    """(shape, fill ratio of the box, taper = area of the box's top half / area of its bottom half)."""
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    fill = obj.sum() / float(h * w)
    box = obj[y0: y1 + 1].astype(np.float32)
    rows = np.arange(h) + 0.5
    top, bottom = box[rows < h / 2].sum(), box[rows > h / 2].sum()  # an odd middle row counts for neither
    taper = float(top / max(bottom, 1.0))
    if taper < 0.65:
        return "triangle", fill, taper
    return ("circle" if fill < 0.88 else "square"), fill, taper


def object_size(obj: np.ndarray) -> str:
    ys, xs = np.nonzero(obj)
    extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / obj.shape[0]
    return SIZES[0] if extent < (RADIUS["small"] + RADIUS["large"]) else SIZES[1]


def object_position(obj: np.ndarray) -> str:
    ys, xs = np.nonzero(obj)
    h, w = obj.shape
    row = min(int(ys.mean() + 0.5) * 3 // h, 2)
    col = min(int(xs.mean() + 0.5) * 3 // w, 2)
    return POSITIONS[row * 3 + col]


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def texture_energies(image, obj: np.ndarray) -> dict[str, float]:
    """Luminance contrast inside an object and the mean squared difference along four directions."""
    img = _as_array(image)
    lum = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    inner = _erode(_erode(obj))
    if inner.sum() < 8:
        return {"contrast": 0.0, "x": 0.0, "y": 0.0, "d1": 0.0, "d2": 0.0}
    out = {"contrast": float(lum[inner].std() / max(lum[inner].mean(), 1.0))}
    for name, (dy, dx) in {"x": (0, 1), "y": (1, 0), "d1": (1, 1), "d2": (-1, 1)}.items():
        a = inner[max(0, -dy): inner.shape[0] - max(0, dy), : inner.shape[1] - dx]
        b = inner[max(0, dy): inner.shape[0] - max(0, -dy) or None, dx:]
        la = lum[max(0, -dy): lum.shape[0] - max(0, dy), : lum.shape[1] - dx]
        lb = lum[max(0, dy): lum.shape[0] - max(0, -dy) or None, dx:]
        both = a & b
        out[name] = float(((la - lb)[both] ** 2).mean()) if both.any() else 0.0
    return out


def texture_class(e: dict[str, float]) -> str:
    if e["contrast"] < TEXTURED:
        return "plain"
    if e["x"] < ORIENTED * e["y"]:
        return "striped"  # horizontal stripes: flat along x
    if min(e["d1"], e["d2"]) < ORIENTED * max(e["d1"], e["d2"]):
        return "diagonal"
    return "dotted"


def diagonal_score(image) -> float:
    """0..1: how much the main object carries diagonal stripes (the held-out style); 0 without an object."""
    img = _as_array(image)
    objs = components(foreground(img))
    if not objs:
        return 0.0
    e = texture_energies(img, objs[0])
    if max(e["d1"], e["d2"]) <= 0:
        return 0.0
    orientation = 1.0 - min(e["d1"], e["d2"]) / max(e["d1"], e["d2"])
    strength = min(1.0, e["contrast"] / (2 * TEXTURED))
    return float(orientation * strength)


def read(image) -> dict[str, object]:
    """Every attribute the oracle can see; object attributes are None when no object is found."""
    img = _as_array(image)
    bg_name, bg_rgb = background(img)
    objs = components(foreground(img, bg_rgb))
    out: dict[str, object] = {"background": bg_name, "count": len(objs)}
    if not objs:
        return {**out, "colour": None, "shape": None, "size": None, "position": None, "texture": None}
    main = objs[0]
    if len(objs) > 1 and objs[1].sum() >= 0.5 * main.sum():
        out["count"] = 2
    else:
        out["count"] = 1
    out["colour"] = object_colour(img, main)
    out["shape"] = object_shape(main)[0]
    out["size"] = object_size(main)
    out["position"] = object_position(main)
    out["texture"] = texture_class(texture_energies(img, main))
    return out


def check(scene: Scene, image, attributes=ATTRIBUTES) -> dict[str, bool]:
    """Which of a scene's attributes the image shows (position only for single objects)."""
    seen = read(image)
    out = {}
    for a in attributes:
        if a == "position" and scene.count != 1:
            continue
        out[a] = seen[a] == getattr(scene, a)
    return out


def accuracy(scenes, images, attributes=("background", "colour", "shape", "position")) -> dict[str, float]:
    """Per-attribute accuracy and their mean ('all'), plus the rate of images with every attribute right."""
    hits = {a: [] for a in attributes}
    whole = []
    for scene, image in zip(scenes, images, strict=True):
        c = check(scene, image, attributes)
        for a in attributes:
            hits[a].append(c[a])
        whole.append(all(c.values()))
    out = {a: float(np.mean(v)) for a, v in hits.items()}
    out["mean"] = float(np.mean([out[a] for a in attributes]))
    out["all_correct"] = float(np.mean(whole))
    return out


__all__ = ["ATTRIBUTES", "accuracy", "background", "caption", "check", "components", "diagonal_score", "read"]
