"""Learning tests on the micro model (issue 12), a held-out palette: TI and TI-MoE learn a new word for a colour
scheme from 8 images through the studio's trainer, and the oracle finds the scheme on new prompts.

The palette is a yellow object on a blue background. The model draws both colours, but no caption ever named the
pair with one word. The training captions leave out the colour and background words, so the scheme can only go
into the trained token; the evaluation prompts (new shapes, sizes and cells) have no colour or background words
either, only the token where the colour word goes. This is the style an embedding can carry: it names something
the frozen model can draw. Diagonal stripes it never learned to draw (tests/test_micro_learning.py).

The training images are 8 large objects (every shape, 8 cells); their captions are "circle, top left", and the
template "a large [name] [filewords]" puts the token where pretraining put colour words. The 8 evaluation prompts
("a small pal-style square, top") have shape-cell pairs no training image has, and half ask for small objects.

Style score: the mean over images of (background is blue) and (object is yellow), read by the oracle; 0..1. The
base is the better of the same prompts with no word and with "*" (TI's starting word) in the token's place.
Prompt accuracy: the oracle's accuracy on what the prompts ask for (shape, size, position).

Everything is seeded and runs on one thread (docs/micro-model.md, "Learning tests").
"""

from __future__ import annotations

import numpy as np
import pytest
from micro_kit import dataset_home, micro_generator, one_thread
from micro_kit import generate as generate_images

from studio.config import StudioConfig
from studio.micro import oracle, world
from studio.models.builtin import MICRO_NAME, micro_available

pytestmark = pytest.mark.skipif(not micro_available(StudioConfig().assets_dir), reason="assets/micro is missing")

DATA = "palette"
COLOUR, BACKGROUND = "yellow", "blue"  # the palette: a yellow object on a blue background
TI, MOE = "pal-style", "pal-moe"
SLOT = "a large "  # every training caption starts so; the colour word comes right after it
TEMPLATE = "colour_slot"  # TI's prompts: SLOT + [name] + the caption, i.e. the token where colour words go
GENERATE = dict(sampler="DPM++ 2M", schedule="Automatic", steps=20, cfg_scale=5.0, width=world.SIZE, height=world.SIZE)
PROMPTED = ("shape", "size", "position")
COMMON = dict(model=MICRO_NAME, data=DATA, resolution=world.SIZE, batch_size=4, seed=0, save_every=1_000_000,
              preview_every=0)
JOBS = {
    TI: dict(method="ti", init_word="*", learning_rate="0.05", max_steps=100),
    MOE: dict(method="ti-moe", image_encoder="demo-tiny", learning_rate="6e-3", max_steps=150),
}


def make_scenes() -> tuple[list[world.Scene], list[world.Scene]]:
    """8 large training objects (every shape, 8 cells) and 8 evaluation objects (small and large, new
    shape-cell pairs), all in the palette."""
    palette = dict(colour=COLOUR, background=BACKGROUND)
    train = [world.Scene(shape=world.SHAPES[i % 3], size="large", position=world.POSITIONS[(2 * i) % 9], **palette)
             for i in range(8)]
    seen = {(s.shape, s.position) for s in train}
    evaluation = []
    for i in range(8):
        scene = world.Scene(shape=world.SHAPES[(i + 1) % 3], size=world.SIZES[i % 2],
                            position=world.POSITIONS[(2 * i + 1) % 9], **palette)
        assert (scene.shape, scene.position) not in seen
        evaluation.append(scene)
    return train, evaluation


TRAIN, EVAL = make_scenes()


def prompt(scene: world.Scene, token: str | None = None) -> str:
    """The scene's caption without colour and background words; a token takes the colour word's place."""
    words = ["a", scene.size] + ([token] if token else []) + [scene.shape]
    return " ".join(words) + f", {scene.position}"


def palette_hits(images) -> tuple[float, float]:
    """The fractions of images whose background is the palette's and whose object has the palette's colour."""
    seen = [oracle.read(im) for im in images]
    return (float(np.mean([s["background"] == BACKGROUND for s in seen])),
            float(np.mean([s["colour"] == COLOUR for s in seen])))


def style_score(images) -> float:
    """0..1: the mean of the two palette_hits."""
    return float(np.mean(palette_hits(images)))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A studio home with the dataset: PNGs and .txt captions without colour, background and "a large" (which the
    template puts back around the token)."""
    for scene in TRAIN:
        assert COLOUR not in prompt(scene) and BACKGROUND not in prompt(scene)
    return dataset_home(tmp_path_factory.mktemp("home"), DATA, TRAIN, prompt, SLOT, TEMPLATE)


@pytest.fixture(scope="module")
def generator(home):
    return micro_generator(home)


def generate(generator, token: str | None = None) -> list[np.ndarray]:
    return generate_images(generator, [prompt(scene, token) for scene in EVAL], GENERATE)


@pytest.fixture(scope="module")
def base_images(generator):
    """The untrained model's images of the evaluation prompts: with no word in the colour slot, and with the
    embeddings' starting point there (TI starts from "*"; an embedding that never trained draws exactly these)."""
    return {"no word": generate(generator), "*": generate(generator, "*")}


@pytest.mark.parametrize("name", [TI, MOE], ids=["ti", "ti-moe"])
def test_embedding_learns_a_held_out_palette(name, home, generator, base_images):
    from studio.train.job import TrainJob
    from studio.train.loop import Trainer

    job = TrainJob(name=name, template=TEMPLATE, **COMMON, **JOBS[name])
    result = Trainer(home).start(job)
    assert result.state == "finished", result.message
    images = generate(generator, name)
    bases = {word: style_score(ims) for word, ims in base_images.items()}
    base, learned = max(bases.values()), style_score(images)
    accuracy = oracle.accuracy(EVAL, images, PROMPTED)
    base_accuracy = {word: round(oracle.accuracy(EVAL, ims, PROMPTED)["mean"], 2) for word, ims in base_images.items()}
    print(f"{name}: palette score {bases} -> {learned:.3f} (background, colour {palette_hits(images)}); accuracy "
          f"{accuracy} (base {base_accuracy}); loss {np.mean(result.losses[:20]):.4f} -> "
          f"{np.mean(result.losses[-20:]):.4f}")
    assert learned - base >= 0.3, (bases, learned)  # over the better of the two untrained prompts
    assert accuracy["mean"] >= 0.7, accuracy  # the token does not break the prompt
