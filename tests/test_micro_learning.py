"""Learning tests on the micro model (issue 12): LoRA, TI and TI-MoE trained on 8 images of the held-out style
(diagonal stripes, never in the UNet's or text encoder's pretraining; the VAE draws them) through the studio's
trainer, then judged on new prompts by the micro world's oracle.

* LoRA draws the style on new scenes: the oracle's `diagonal_score` rises by >= 0.3 and prompts are still followed.
* TI and TI-MoE only steer the frozen UNet, which has no way to draw diagonal stripes (even a free 77 x 128 offset of
  the whole prompt conditioning, trained like an embedding, raised the score by only ~0.03 to 0.06;
  docs/micro-model.md), so the score barely moves for them. What they do learn is measured on the training objective
  itself: on new diagonally striped scenes, the denoising loss with the embedding is clearly below the loss with no
  texture word, with every texture word the model knows ("striped" is also TI's initializer, so an embedding that
  did not train scores exactly that) and with random vectors of the embedding's length.
* A DINO-style similarity to the training images (studio.evaluate.metrics) ranks the LoRA's images above the base
  model's, on a texture embedding that sees the style (the demo-tiny CLIP/DINO/FID networks have random weights and
  cannot tell diagonal stripes from plain objects even on clean renders).

Everything is seeded and runs on one thread; about two minutes on a 2-core machine (docs/micro-model.md,
"Learning tests").
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from micro_kit import dataset_home, micro_generator, one_thread
from micro_kit import generate as generate_images
from PIL import Image

from studio.config import StudioConfig
from studio.micro import oracle, world
from studio.models.builtin import MICRO_NAME, micro_available

pytestmark = pytest.mark.skipif(not micro_available(StudioConfig().assets_dir), reason="assets/micro is missing")

DATA = "diagonal"
LORA, TI, MOE = "diag-lora", "diag-style", "diag-moe"
SLOT = "a large "  # every caption here starts so; pretraining put the texture words right after it
TEMPLATE = "texture_slot"  # TI's prompts: SLOT + [name] + the caption, i.e. the token where texture words go
GENERATE = dict(sampler="DPM++ 2M", schedule="Automatic", steps=20, cfg_scale=5.0, width=world.SIZE, height=world.SIZE)
ACCURACY = ("background", "colour", "shape", "size", "position")
COMMON = dict(model=MICRO_NAME, data=DATA, resolution=world.SIZE, batch_size=4, seed=0, save_every=1_000_000,
              preview_every=0)
JOBS = {
    # attention-only LoRA: on every layer ("all") or also the feed-forward ("transformer") it learns the 8 training
    # scenes but hardly carries the stripes to new ones
    LORA: dict(method="lora", rank=8, lora_targets="attention", learning_rate="4e-3", max_grad_norm=1.0, max_steps=200,
               instance_prompt=SLOT + "[filewords]"),
    TI: dict(method="ti", init_word="striped", learning_rate="0.05", max_steps=100),
    MOE: dict(method="ti-moe", image_encoder="demo-tiny", learning_rate="6e-3", max_steps=150),
}


def make_scenes() -> tuple[list[world.Scene], list[world.Scene]]:
    """8 large training objects (every colour, every shape, 8 cells) and 6 large evaluation objects; no training
    image has the colour of an evaluation object together with its shape, its background or its cell."""
    rng = np.random.default_rng(5)
    colours = list(world.COLOURS)

    def scene(i: int, shape_shift: int, position: int, texture: str) -> world.Scene:
        colour = colours[i % len(colours)]
        backgrounds = [b for b in world.BACKGROUNDS if b != colour]
        return world.Scene(shape=world.SHAPES[(i + shape_shift) % 3], colour=colour, size="large",
                           position=world.POSITIONS[position % 9], texture=texture,
                           background=backgrounds[int(rng.integers(len(backgrounds)))])

    train = [scene(i, 0, 2 * i, "diagonal") for i in range(8)]
    evaluation = [scene(i, 1, 2 * i + 1, "plain") for i in range(6)]
    return train, evaluation


TRAIN, EVAL = make_scenes()


def prompt(scene: world.Scene, with_: str | None = None) -> str:
    """The scene's caption; with an embedding its name takes the texture word's place, a LoRA gets its tag."""
    caption = world.caption(scene)
    if with_ in (TI, MOE):
        return caption.replace(SLOT, f"{SLOT}{with_} ", 1)
    if with_ == LORA:
        return f"{caption} <lora:{LORA}:1>"
    return caption


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


def plain_caption(scene: world.Scene) -> str:
    caption = world.caption(replace(scene, texture="plain"))
    assert "striped" not in caption
    return caption


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A studio home with the dataset: PNGs and .txt captions without the texture word (and without "a large",
    which the TI template and the LoRA instance prompt put back, so that TI's token sits where texture words go)."""
    return dataset_home(tmp_path_factory.mktemp("home"), DATA, TRAIN, plain_caption, SLOT, TEMPLATE)


@pytest.fixture(scope="module")
def generator(home):
    return micro_generator(home)


def generate(generator, with_: str | None = None) -> list[np.ndarray]:
    return generate_images(generator, [prompt(scene, with_) for scene in EVAL], GENERATE)


def diagonal(images) -> float:
    return float(np.mean([oracle.diagonal_score(im) for im in images]))


@pytest.fixture(scope="module")
def base_images(generator):
    return generate(generator)


@pytest.fixture(scope="module")
def trained(home, generator):
    """Train a method once per module (by name); its result and its images of the evaluation prompts."""
    from studio.train.job import TrainJob
    from studio.train.loop import Trainer

    done = {}

    def get(name: str):
        if name not in done:
            job = TrainJob(name=name, template=TEMPLATE, **COMMON, **JOBS[name])
            result = Trainer(home).start(job)
            assert result.state == "finished", result.message
            done[name] = result, generate(generator, name)
        return done[name]

    return get


def test_lora_draws_the_held_out_style_on_new_prompts(trained, base_images):
    result, images = trained(LORA)
    base, learned = diagonal(base_images), diagonal(images)
    accuracy = oracle.accuracy(EVAL, images, ACCURACY)
    print(f"LoRA: diagonal score {base:.3f} -> {learned:.3f}; accuracy {accuracy['mean']:.2f} "
          f"(base {oracle.accuracy(EVAL, base_images, ACCURACY)['mean']:.2f}); loss {np.mean(result.losses[:20]):.4f}"
          f" -> {np.mean(result.losses[-20:]):.4f}")
    assert base < 0.1, base  # the base model does not draw the style by itself
    assert learned - base >= 0.3, (base, learned)
    assert accuracy["mean"] >= 0.7, accuracy


def held_out_loss(manager, word: str | None = None, vectors: torch.Tensor | None = None) -> float:
    """The training objective (v-prediction squared error) on the evaluation scenes drawn with diagonal stripes,
    with a known `word` or an embedding's `vectors` in the texture slot of their captions (neither: the plain
    captions); fixed noise at timesteps 50, 150, 300 and 500, two draws each."""
    from diffusers import DDPMScheduler

    from studio.generation.conditioning import PromptEncoder, TextualInversion

    with torch.no_grad(), manager.lock:
        manager.current.loras().apply([])  # the base model, whatever the last image used
        pipe = manager.current.pipe
        pixels = np.stack([world.render(replace(s, texture="diagonal")) for s in EVAL])
        x = torch.from_numpy(pixels).float().permute(0, 3, 1, 2) / 127.5 - 1
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        token = "held-out-token" if vectors is not None else word
        encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder,
                                {token: TextualInversion(token, vectors)} if vectors is not None else {})
        texts = [prompt(s).replace(SLOT, f"{SLOT}{token} ", 1) if token else prompt(s) for s in EVAL]
        cond = torch.cat([encoder.encode(t).embeds for t in texts])
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        losses = []
        for t in (50, 150, 300, 500):
            for draw in range(2):
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1000 * draw + t))
                steps = torch.full((len(latents),), t)
                pred = pipe.unet(scheduler.add_noise(latents, noise, steps), steps, encoder_hidden_states=cond).sample
                losses.append(float(((pred - scheduler.get_velocity(latents, noise, steps)) ** 2).mean()))
    return float(np.mean(losses))


@pytest.mark.parametrize("name", [TI, MOE], ids=["ti", "ti-moe"])
def test_embedding_learns_the_style_the_frozen_unet_cannot_draw(name, trained, base_images, generator):
    from studio.files.networks import load_embedding

    result, images = trained(name)
    vectors = load_embedding(result.output).vectors
    manager = generator.manager
    learned = held_out_loss(manager, vectors=vectors)
    # what the frozen model does without learning: no texture word, the texture words it knows ("striped" is TI's
    # initializer: an embedding that never trained scores exactly that), and random vectors of the same length
    # (any unfamiliar vector in the slot already lowers the loss: the model stops insisting on a plain object)
    g = torch.Generator().manual_seed(0)
    randoms = [torch.randn(vectors.shape, generator=g) for _ in range(3)]
    controls = {"no word": held_out_loss(manager), "striped": held_out_loss(manager, "striped"),
                "dotted": held_out_loss(manager, "dotted"),
                **{f"random {i}": held_out_loss(manager, vectors=r * vectors.norm() / r.norm())
                   for i, r in enumerate(randoms)}}
    accuracy = oracle.accuracy(EVAL, images, ACCURACY)
    print(f"{name}: held-out loss {learned:.4f}, controls {({k: round(v, 4) for k, v in controls.items()})}; "
          f"diagonal score {diagonal(base_images):.3f} -> {diagonal(images):.3f}; accuracy {accuracy['mean']:.2f}")
    # on scenes it never saw, the embedding explains diagonal stripes clearly better than any of them
    assert learned <= 0.95 * min(controls.values()), (learned, controls)
    assert accuracy["mean"] >= 0.7, accuracy  # it sits in the caption without breaking the prompt


def orientation_spectrum(images, bins: int = 8) -> torch.Tensor:
    """[N, bins]: each image's share of luminance power per orientation, in the band of spatial frequencies of
    the world's textures (periods of 3 to 12 px at 64 px). A texture embedding for the metrics: it sees which way
    stripes run, which the demo-tiny networks (random weights) cannot."""
    out = []
    for image in images:
        lum = np.asarray(Image.fromarray(np.asarray(image)).convert("L"), dtype=np.float64)
        power = np.abs(np.fft.fftshift(np.fft.fft2(lum - lum.mean()))) ** 2
        n = lum.shape[0]
        y, x = np.mgrid[:n, :n] - n // 2
        radius, angle = np.hypot(x, y), np.mod(np.arctan2(y, x), np.pi)
        band = (radius > n / 12) & (radius < n / 3)
        which = np.floor(angle / np.pi * bins + 0.5).astype(int) % bins
        hist = np.array([power[band & (which == k)].sum() for k in range(bins)])
        out.append(hist / hist.sum())
    return torch.tensor(np.stack(out))


def test_style_similarity_to_the_training_images_ranks_the_lora_above_the_base_model(trained, base_images):
    from studio.evaluate import metrics

    _, images = trained(LORA)
    references = orientation_spectrum([world.render(s) for s in TRAIN])

    def scores(images):
        features = orientation_spectrum(images)
        return (metrics.dino_similarity(features, references),
                metrics.kernel_inception_distance(references, features, subsets=50)[0])

    # the embedding is meaningful here: clean renders of the evaluation scenes with the style rank far above the
    # same scenes without it
    clean_plain = scores([world.render(s) for s in EVAL])
    clean_diagonal = scores([world.render(replace(s, texture="diagonal")) for s in EVAL])
    base, lora = scores(base_images), scores(images)
    print(f"DINO-style similarity / KID to the training images: clean plain {clean_plain}, clean diagonal "
          f"{clean_diagonal}; base model {base}, LoRA {lora}")
    assert clean_diagonal[0] > clean_plain[0] + 0.2 and clean_diagonal[1] < clean_plain[1]
    assert lora[0] > base[0] + 0.1, (base, lora)
    assert lora[1] < base[1], (base, lora)
