"""Generation on demo-tiny: reproducible, validated, stoppable, saved with A1111 infotext."""

import threading

import numpy as np
import pytest
from PIL import Image

from studio.generation import samplers
from studio.generation.generate import Generator
from studio.generation.infotext import parse_infotext, read_image_infotext, to_fields
from studio.generation.job import GenerateJob
from studio.models.manager import ModelManager


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from studio.config import StudioConfig

    cfg = StudioConfig().with_home(tmp_path_factory.mktemp("home"))
    cfg.ensure_dirs()
    manager = ModelManager(cfg)
    manager.load("demo-tiny")
    return Generator(manager), cfg


def job(**kw):
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=4, width=64, height=64, seed=1234)
    base.update(kw)
    return GenerateJob(**base)


def pixels(result):
    return [np.asarray(im.image) for im in result.images]


def test_same_seed_same_pixels(generator):
    gen, _ = generator
    a, b = gen.run(job()), gen.run(job())
    assert np.array_equal(pixels(a)[0], pixels(b)[0])
    c = gen.run(job(seed=1235))
    assert not np.array_equal(pixels(a)[0], pixels(c)[0])


def test_batch_uses_consecutive_seeds_like_a1111(generator):
    gen, _ = generator
    batch = gen.run(job(batch_size=2, batch_count=2))
    assert [im.seed for im in batch.images] == [1234, 1235, 1236, 1237]
    # image 2 of the run equals a single image generated with its seed
    single = gen.run(job(seed=1236))
    assert np.abs(pixels(batch)[2].astype(int) - pixels(single)[0].astype(int)).max() <= 1


def test_random_seed_is_reported_and_reproduces(generator):
    gen, _ = generator
    first = gen.run(job(seed=-1))
    seed = first.images[0].seed
    assert 0 <= seed < 2**32
    again = gen.run(job(seed=seed))
    assert np.array_equal(pixels(first)[0], pixels(again)[0])


def test_saved_png_carries_parameters(generator):
    gen, cfg = generator
    result = gen.run(job(sampler="Euler a", schedule="Automatic", cfg_scale=6.5), cfg.outputs_dir)
    path = result.images[0].path
    assert path.parent.parent == cfg.outputs_dir and path.suffix == ".png"
    fields = to_fields(parse_infotext(read_image_infotext(path)))
    assert fields["prompt"] == "a red circle" and fields["negative_prompt"] == "blurry"
    assert fields["steps"] == 4 and fields["sampler"] == "Euler a" and fields["cfg_scale"] == 6.5
    assert fields["seed"] == 1234 and (fields["width"], fields["height"]) == (64, 64)
    assert fields["model"] == "demo-tiny"
    assert len(fields["model_hash"]) == 10
    assert fields["model_hash"] == gen.manager.model_hash()[:10]
    assert Image.open(path).size == (64, 64)


@pytest.mark.parametrize("sampler", list(samplers.SAMPLERS))
def test_every_sampler_makes_an_image(generator, sampler):
    gen, _ = generator
    spec = samplers.SAMPLERS[sampler]
    out = gen.run(job(sampler=sampler, schedule=spec.default_schedule, steps=3))
    arr = pixels(out)[0]
    assert arr.shape == (64, 64, 3) and np.isfinite(arr).all()


def test_stop_interrupts_and_does_not_save(generator, tmp_path):
    gen, _ = generator
    cancel = threading.Event()
    steps_seen = []

    def progress(done, total, info):
        steps_seen.append(done)
        if done == 2:
            cancel.set()

    result = gen.run(job(steps=10, batch_count=3), tmp_path, on_progress=progress, cancel=cancel)
    assert result.interrupted
    assert max(steps_seen) < 10  # stopped in the first pass, not after all 30 steps
    assert len(result.images) == 1 and result.images[0].path is None
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("changes, message", [
    (dict(width=500), "width must be a multiple of 8, got 500"),
    (dict(height=70), "height must be a multiple of 8"),
    (dict(steps=0), "steps must be between 1 and 150, got 0"),
    (dict(sampler="Eulerr"), "Eulerr"),
    (dict(sampler="DDIM", schedule="Karras"), "Karras"),
    (dict(seed=-5), "seed"),
    (dict(cfg_scale=-1.0), "CFG scale"),
    (dict(batch_size=0), "batch size"),
])
def test_bad_input_is_refused_with_a_clear_message(generator, changes, message):
    gen, _ = generator
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        gen.run(job(**changes))


def test_job_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="sampler_name"):
        GenerateJob.from_dict({"prompt": "x", "sampler_name": "Euler"})


def test_prompt_weighting_long_prompts_and_clip_skip_reach_the_image(generator):
    gen, _ = generator
    base = pixels(gen.run(job(prompt="a red circle")))[0]
    weighted = pixels(gen.run(job(prompt="a (red:1.6) circle")))[0]
    assert not np.array_equal(base, weighted)
    # brackets are syntax, not text: (word:1) is the plain prompt
    assert np.array_equal(pixels(gen.run(job(prompt="a (red:1) circle")))[0], base)
    long_prompt = ", ".join(["a red circle on a blue square"] * 20)  # well over 75 tokens: two or more chunks
    long_result = gen.run(job(prompt=long_prompt))
    assert long_result.images[0].image.size == (64, 64)
    skipped = gen.run(job(prompt="a red circle", clip_skip=2))
    assert not np.array_equal(pixels(skipped)[0], base)
    assert to_fields(parse_infotext(skipped.images[0].infotext))["extra"]["Clip skip"] == "2"
    with pytest.raises(ValueError, match="clip skip"):
        gen.run(job(clip_skip=0))


def test_prompt_encoder_is_reused_until_the_model_or_the_embeddings_change(generator, monkeypatch):
    """Building a PromptEncoder tokenizes every embedding name (and used to copy the vocabulary): Generate keeps the
    model's one and builds a new one only when the embeddings, the clip skip or the model change, so an embedding
    dropped into embeddings/ still works without a restart."""
    import os

    import torch

    import studio.generation.generate as generate
    from studio.files.networks import save_embedding

    gen, cfg = generator
    built = []

    class Counted(generate.PromptEncoder):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("clip_skip"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generate, "PromptEncoder", Counted)
    model = gen.manager.current
    model.prompt_encoders.clear()
    prompt = job(prompt="a red circle by cachestyle")
    plain, _, nets = gen.encode(prompt, model)
    gen.encode(job(prompt="a blue square by cachestyle"), model)
    assert len(built) == 1 and nets.ti_hashes == {}
    gen.encode(job(clip_skip=2), model)
    gen.encode(job(clip_skip=2), model)
    assert built == [1, 2]
    # a new embedding file: a new encoder, and the name is the embedding now
    path = cfg.embeddings_dir / "cachestyle.safetensors"
    save_embedding(path, torch.randn(2, 32, generator=torch.Generator().manual_seed(1)))
    with_embedding, _, nets = gen.encode(prompt, model)
    assert len(built) == 3 and "cachestyle" in nets.ti_hashes
    assert not torch.equal(with_embedding, plain)
    gen.encode(prompt, model)
    assert len(built) == 3
    # the file overwritten with other vectors: used at once
    save_embedding(path, torch.randn(2, 32, generator=torch.Generator().manual_seed(2)))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed, _, _ = gen.encode(prompt, model)
    assert len(built) == 4 and not torch.equal(changed, with_embedding)
    # removed: the plain prompt again
    path.unlink()
    removed, _, nets = gen.encode(prompt, model)
    assert len(built) == 5 and nets.ti_hashes == {} and torch.equal(removed, plain)
    # another model (or the same one loaded again) starts with its own
    other = gen.manager.open("demo-tiny")
    gen.encode(prompt, other)
    assert len(built) == 6 and other.prompt_encoders and model.prompt_encoders[1][-1] is not other.prompt_encoders[1][-1]


def test_the_model_is_taken_under_the_lock(generator):
    """A model loaded while a generation waits for the manager's lock is the one it runs on (the infotext says so)."""
    from studio.models.manager import LoadedModel
    from studio.models.tiny import build_tiny_pipeline

    gen, _ = generator
    manager = gen.manager
    old, real_lock = manager.current, manager.lock
    other = LoadedModel("other-tiny", "demo", "sd1", "epsilon", build_tiny_pipeline("sd1"))

    class SwitchingLock:
        def __enter__(self):
            manager.current = other  # as a load from another tab that finishes first
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

    manager.lock = SwitchingLock()
    try:
        result = gen.run(job(steps=2))
    finally:
        manager.lock, manager.current = real_lock, old
    assert parse_infotext(result.images[0].infotext)["Model"] == "other-tiny"
