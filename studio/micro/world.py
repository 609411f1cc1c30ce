"""A procedural world of captioned images: one or two flat shapes on a plain background.

Every scene is a small dataclass of attributes; `render` draws it (anti-aliased, pure numpy) and
`caption` says it in words ("a small striped red circle on a blue background, top left"). Seeded and
deterministic. The diagonal-stripes texture is held out of pretraining, for learning tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 64  # pixels; the micro model's native size

# well separated in RGB so that the oracle can name colours on blurry generated images
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
NEUTRALS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**NEUTRALS, **COLOURS}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# 3x3 grid, row-major from the top left; the words a caption uses for each cell
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
TEXTURES = ("plain", "striped", "dotted")  # seen in pretraining
HELD_OUT_TEXTURES = ("diagonal",)  # never in pretraining: a style to teach by TI / LoRA
TEXTURE_WORDS = {"plain": "", "striped": "striped", "dotted": "dotted", "diagonal": "diagonally striped"}
NUMBER_WORDS = {1: "a", 2: "two"}

# geometry as fractions of the image size
CELL_CENTRES = (0.2, 0.5, 0.8)
RADIUS = {"small": 0.095, "large": 0.16}  # half the side of the shape's bounding box
JITTER = 0.03
TEXTURE_PERIOD = 6 / 64  # stripes: 3 px on, 3 px off at 64 px
DARK = 0.5  # the texture's second colour is the shape colour times this


@dataclass(frozen=True)
class Scene:
    shape: str = "circle"
    colour: str = "red"
    size: str = "small"
    position: str = "center"  # one of POSITIONS; for count 2, the first object's cell
    background: str = "white"
    texture: str = "plain"
    count: int = 1
    position2: str = "center"  # the second object's cell (count 2 only)
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # dx, dy of each object, in [-1, 1]

    def __post_init__(self):
        checks = [("shape", SHAPES), ("colour", tuple(COLOURS)), ("size", SIZES), ("position", POSITIONS),
                  ("position2", POSITIONS), ("background", tuple(BACKGROUNDS)),
                  ("texture", TEXTURES + HELD_OUT_TEXTURES)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.count not in NUMBER_WORDS:
            raise ValueError(f"count must be 1 or 2, got {self.count}")
        if self.colour == self.background:
            raise ValueError(f"the shape colour and the background must differ, both are {self.colour}")
        if self.count == 2 and not _apart(self.position, self.position2):
            raise ValueError(f"two objects need cells that do not touch (two rows or columns apart), got "
                             f"{self.position!r} and {self.position2!r}")


def _apart(a: str, b: str) -> bool:
    (ra, ca), (rb, cb) = cell(a), cell(b)
    return max(abs(ra - rb), abs(ca - cb)) >= 2  # neighbouring cells would let large shapes touch


def caption(scene: Scene) -> str:
    words = [NUMBER_WORDS[scene.count]]
    if scene.size:
        words.append(scene.size)
    if TEXTURE_WORDS[scene.texture]:
        words.append(TEXTURE_WORDS[scene.texture])
    words += [scene.colour, scene.shape + ("s" if scene.count == 2 else "")]
    text = " ".join(words) + f" on a {scene.background} background"
    if scene.count == 1:
        text += f", {scene.position}"
    return text


def cell(position: str) -> tuple[int, int]:
    """(row, col) of a position word in the 3x3 grid."""
    i = POSITIONS.index(position)
    return i // 3, i % 3


def sample_scene(rng: np.random.Generator, textures=TEXTURES, p_two: float = 0.0,
                 texture_weights=None) -> Scene:
    colour = str(rng.choice(list(COLOURS)))
    background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
    count = 2 if rng.random() < p_two else 1
    # the centre cell has no cell two apart, so a pair starts elsewhere
    firsts = [i for i in range(len(POSITIONS)) if count == 1 or POSITIONS[i] != "center"]
    first = firsts[int(rng.integers(len(firsts)))]
    apart = [i for i in range(len(POSITIONS)) if _apart(POSITIONS[first], POSITIONS[i])] or [first]
    cells = (first, apart[int(rng.integers(len(apart)))])
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=colour,
        size=str(rng.choice(SIZES)),
        position=POSITIONS[cells[0]],
        background=background,
        texture=str(rng.choice(list(textures), p=texture_weights)),
        count=count,
        position2=POSITIONS[cells[1]],
        jitter=tuple(float(v) for v in rng.uniform(-1, 1, size=4)),
    )


def sample_scenes(n: int, seed: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def eval_scenes(n: int = 200, seed: int = 12) -> list[Scene]:
    """The fixed evaluation set: single objects, every attribute balanced by cycling through its values."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        backgrounds = [b for b in BACKGROUNDS if b != colour]
        scenes.append(Scene(shape=SHAPES[i % 3], colour=colour, size=SIZES[(i // 3) % 2],
                            position=POSITIONS[(i * 7 + i // 9) % 9],
                            background=backgrounds[int(rng.integers(len(backgrounds)))], texture="plain"))
    return scenes


# --- drawing ---------------------------------------------------------------------------------------


def _coverage(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Inside-ness of the sample points (boolean), for a shape whose bounding box is centre +- r."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # an upward triangle: apex at the top centre, base along the bottom of the box
    t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)


def _texture_dark(texture: str, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    period = TEXTURE_PERIOD * size
    if texture == "striped":
        return np.floor(ys / (period / 2)) % 2 == 1
    if texture == "diagonal":
        return np.floor((xs + ys) / (period / 2 * np.sqrt(2))) % 2 == 1
    if texture == "dotted":
        fx = (xs % period) - period / 2
        fy = (ys % period) - period / 2
        return fx * fx + fy * fy <= (0.27 * period) ** 2
    return np.zeros_like(xs, dtype=bool)


def object_centre(position: str, jitter: tuple[float, float], size: int) -> tuple[float, float]:
    row, col = cell(position)
    return (CELL_CENTRES[col] + JITTER * jitter[0]) * size, (CELL_CENTRES[row] + JITTER * jitter[1]) * size


def render(scene: Scene, size: int = SIZE, supersample: int = 2) -> np.ndarray:
    """The scene as an RGB uint8 array (size x size x 3), anti-aliased by supersampling."""
    s = size * supersample
    grid = (np.arange(s, dtype=np.float32) + 0.5) / supersample
    xs, ys = np.meshgrid(grid, grid)
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    dark = _texture_dark(scene.texture, xs, ys, size)
    objects = [(scene.position, scene.jitter[:2])]
    if scene.count == 2:
        objects.append((scene.position2, scene.jitter[2:]))
    r = RADIUS[scene.size] * size
    for position, jit in objects:
        cx, cy = object_centre(position, jit, size)
        inside = _coverage(scene.shape, cx, cy, r, xs, ys)
        img[inside & ~dark] = colour
        img[inside & dark] = colour * DARK
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def dataset(n: int, seed: int, size: int = SIZE, **kwargs) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n rendered scenes: images (n, size, size, 3) uint8, captions, scenes."""
    scenes = sample_scenes(n, seed, **kwargs)
    images = np.stack([render(sc, size) for sc in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    return images, [caption(sc) for sc in scenes], scenes


def with_texture(scene: Scene, texture: str) -> Scene:
    return replace(scene, texture=texture)
