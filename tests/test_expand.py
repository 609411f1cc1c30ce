"""Prompt expansion with the tiny GPT-2 built in code: seeding, cleanup, loading rules and errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from studio.generation.expand import (
    DEFAULT_EXPANDER,
    TINY_EXPANDER,
    ExpandError,
    ExpandJob,
    ExpandResult,
    PromptExpander,
    build_tiny_expander,
    clean_expansion,
)

PROMPT = "a cat"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_expander(tmp_path_factory.mktemp("expander") / "tiny")


@pytest.fixture(scope="module")
def expander(tiny_folder):
    return PromptExpander()


def job(folder, **kw) -> ExpandJob:
    return ExpandJob(prompt=kw.pop("prompt", PROMPT), model=str(folder), **kw)


def test_same_seed_same_texts_and_different_seeds_differ(expander, tiny_folder):
    first = expander.expand(job(tiny_folder, seed=7, num_variants=2))
    again = expander.expand(job(tiny_folder, seed=7, num_variants=2))
    assert first == again and first.seed == 7
    others = {tuple(expander.expand(job(tiny_folder, seed=s, num_variants=2)).texts) for s in range(100, 104)}
    assert len(others | {tuple(first.texts)}) > 1


def test_results_start_with_prompt_one_line_and_count(expander, tiny_folder):
    result = expander.expand(job(tiny_folder, prompt="  a portrait of\n a man ", seed=3, num_variants=3))
    assert isinstance(result, ExpandResult) and len(result.texts) == 3
    for text in result.texts:
        assert text.startswith("a portrait of a man")
        assert "\n" not in text and "  " not in text and text == text.strip()


def test_long_prompt_and_budget_fit_the_model_window(expander, tiny_folder):
    long = ", ".join(["a very detailed castle on a hill"] * 40)  # far beyond the tiny model's 128 positions
    result = expander.expand(job(tiny_folder, prompt=long, seed=0, max_new_tokens=512))
    assert result.texts[0].startswith(long)


def test_random_seed_is_reported_and_reproduces(expander, tiny_folder):
    result = expander.expand(job(tiny_folder, seed=-1))
    assert 0 <= result.seed <= 2**32 - 1
    assert expander.expand(job(tiny_folder, seed=result.seed)).texts == result.texts


def test_variant_i_uses_seed_plus_i(expander, tiny_folder):
    batch = expander.expand(job(tiny_folder, seed=20, num_variants=3)).texts
    assert expander.expand(job(tiny_folder, seed=22)).texts == batch[2:]


def test_global_rng_untouched_and_progress_reported(expander, tiny_folder):
    calls = []
    state = torch.get_rng_state()
    expander.expand(job(tiny_folder, seed=1, num_variants=2), on_progress=lambda *a: calls.append(a))
    assert torch.equal(state, torch.get_rng_state())
    assert calls[-1][:2] == (2, 2)


def test_local_folder_loads_offline_and_is_cached(monkeypatch, tiny_folder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exp = PromptExpander()
    tokenizer, model = exp.load(str(tiny_folder))
    assert tokenizer.pad_token_id is not None  # the eos fallback
    assert exp.load(str(tiny_folder))[1] is model
    assert exp.loaded_spec == str(tiny_folder)


def test_missing_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExpandError, match="not available: the hub is offline") as info:
        PromptExpander().load("studio-tests/no-such-expander")
    assert "local folder" in str(info.value)


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/expander", "models/a/b", "nonsense"])
def test_missing_local_path_is_a_clear_error(spec):
    with pytest.raises(ExpandError, match="not found"):
        PromptExpander().load(spec)


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ExpandError, match="is a file"):
        PromptExpander().load(str(tmp_path / "model.bin"))


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ExpandError, match="not a model folder"):
        PromptExpander().load(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExpandError, match="could not load the expander folder"):
        PromptExpander().load(str(tmp_path))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(prompt="   "), "empty"),
        (dict(model=""), "model"),
        (dict(seed=-2), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_variants=0), "num_variants"),
    ],
)
def test_validate(changes, message):
    with pytest.raises(ValueError, match=message):
        ExpandJob(**{"prompt": PROMPT, **changes}).validate()
    assert ExpandJob(PROMPT).validate().model == DEFAULT_EXPANDER


def test_unload_frees_the_model(tiny_folder):
    exp = PromptExpander()
    ref = weakref.ref(exp.load(str(tiny_folder))[1])
    exp.expand(job(tiny_folder, seed=0))
    exp.unload()
    gc.collect()
    assert ref() is None and exp.model is None and exp.loaded_spec is None


def test_demo_tiny_expands_built_once_and_deterministically(tmp_path, tiny_folder):
    exp = PromptExpander(cache_dir=tmp_path)
    result = exp.expand(ExpandJob(PROMPT, model=TINY_EXPANDER, seed=0, num_variants=2))
    assert all(len(t) > len(PROMPT) and t.startswith(PROMPT) for t in result.texts)
    built = next(tmp_path.glob("*/config.json")).parent
    for name in ("model.safetensors", "tokenizer.json"):  # the same bytes as the fixture's own build
        assert (built / name).read_bytes() == (tiny_folder / name).read_bytes()
    mtime = (built / "config.json").stat().st_mtime_ns
    again = PromptExpander(cache_dir=tmp_path).expand(
        ExpandJob(PROMPT, model=TINY_EXPANDER, seed=0, num_variants=2))
    assert again == result and (built / "config.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "continuation, hit_budget, expected",
    [
        (", highly detailed, digital pai", True, "a cat, highly detailed"),
        (", highly detailed, digital pai", False, "a cat, highly detailed, digital pai"),
        (" on a mat, 8k,\nnext prompt, art", True, "a cat on a mat, 8k"),  # a finished line is not cut
        ("s  playing   with yarn", True, "a cats playing with yarn"),  # no comma: nothing to drop
        ("\n, other prompt", False, "a cat"),
        ("", True, "a cat"),
    ],
)
def test_clean_expansion(continuation, hit_budget, expected):
    assert clean_expansion("a  cat ", continuation, hit_budget) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_expansion_is_seeded_and_leaves_global_rngs_alone(tiny_folder):
    exp = PromptExpander(device="cuda")
    exp.load(str(tiny_folder))
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    first = exp.expand(job(tiny_folder, seed=5, num_variants=2))
    assert first == exp.expand(job(tiny_folder, seed=5, num_variants=2))
    assert next(exp.model.parameters()).device.type == "cuda"
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(cuda, torch.cuda.get_rng_state())
