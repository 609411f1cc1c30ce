"""A1111-style prompt conditioning on the tiny pipelines, checked against diffusers' own encoder."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from studio.generation.conditioning import (
    EncodedPrompt,
    PromptEncoder,
    TextualInversion,
    _inject_hook,
    apply_emphasis,
)

WIDTH = 32  # the tiny CLIP's hidden size


def vectors(n: int, seed: int = 0, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def words(n: int, word: str = "cat") -> str:
    return " ".join([word] * n)  # "cat" is one CLIP token


def encoder(pipe, embeddings=None, clip_skip: int = 1) -> PromptEncoder:
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder, embeddings, clip_skip=clip_skip)


def diffusers_embeds(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def chunk(embeds: torch.Tensor, i: int) -> torch.Tensor:
    return embeds[:, 77 * i : 77 * (i + 1)]


@pytest.fixture(scope="module", params=["tiny_pipe", "tiny_pipe_sd2"])
def any_pipe(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "a cat, sitting on a mat!", words(75)])
def test_plain_prompt_is_bit_identical_to_diffusers(any_pipe, prompt):
    result = encoder(any_pipe).encode(prompt)
    assert isinstance(result, EncodedPrompt)
    assert result.embeds.shape == (1, 77, WIDTH)
    assert torch.equal(result.embeds, diffusers_embeds(any_pipe, prompt))
    assert result.used_embeddings == []


def snapshot(pipe):
    return len(pipe.tokenizer), {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}


def assert_unchanged(pipe, before):
    vocab, state = before
    assert len(pipe.tokenizer) == vocab
    after = pipe.text_encoder.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


@pytest.fixture(scope="module")
def with_diffusers_embeddings(any_pipe):
    """(pipe, embeddings, the pipe's deep copy with the same embeddings loaded by diffusers)."""
    embeddings = {
        "mystyle": TextualInversion("mystyle", vectors(1, 1)),
        "tristyle": TextualInversion("tristyle", vectors(3, 3)),
    }
    reference = copy.deepcopy(any_pipe)
    # diffusers adds tokens and rows to the copy; multi-vector ones become "tristyle tristyle_1 tristyle_2"
    reference.load_textual_inversion([e.vectors for e in embeddings.values()], token=list(embeddings))
    return any_pipe, embeddings, reference


@pytest.mark.parametrize("name", ["mystyle", "tristyle"])
def test_embedding_matches_diffusers_textual_inversion_without_changing_the_model(
    with_diffusers_embeddings, name
):
    pipe, embeddings, reference = with_diffusers_embeddings
    before = snapshot(pipe)
    prompt = f"a painting by {name}"
    result = encoder(pipe, embeddings).encode(prompt)
    assert torch.equal(result.embeds, diffusers_embeds(reference, prompt))
    assert result.used_embeddings == [name]
    assert_unchanged(pipe, before)
    # the embedding really takes part: without it the name is just words
    assert not torch.equal(result.embeds, encoder(pipe).encode(prompt).embeds)


def test_used_embeddings_in_order_of_first_use_without_duplicates(tiny_pipe):
    embeddings = {
        name: TextualInversion(name, vectors(1, i)) for i, name in enumerate(["alpha", "beta", "gamma"])
    }
    result = encoder(tiny_pipe, embeddings).encode("beta and alpha, (beta:1.2), [alpha]")
    assert result.used_embeddings == ["beta", "alpha"]


def test_embedding_name_matches_whole_tokens_only(tiny_pipe):
    result = encoder(tiny_pipe, {"mystyle": TextualInversion("mystyle", vectors(1))}).encode("mystyles")
    assert result.used_embeddings == []
    assert torch.equal(result.embeds, encoder(tiny_pipe).encode("mystyles").embeds)


def test_longest_embedding_name_wins(tiny_pipe):
    short, long = TextualInversion("mystyle", vectors(1, 1)), TextualInversion("mystyle-v2", vectors(2, 2))
    both = encoder(tiny_pipe, {"mystyle": short, "mystyle-v2": long})
    only_long = encoder(tiny_pipe, {"mystyle-v2": long})
    result = both.encode("by mystyle-v2, mystyle")
    assert result.used_embeddings == ["mystyle-v2", "mystyle"]
    assert not torch.equal(result.embeds, only_long.encode("by mystyle-v2, mystyle").embeds)
    assert torch.equal(both.encode("by mystyle-v2").embeds, only_long.encode("by mystyle-v2").embeds)


def test_long_prompt_is_split_into_chunks(tiny_pipe):
    enc = encoder(tiny_pipe)
    embeds = enc.encode(words(80)).embeds
    assert embeds.shape == (1, 154, WIDTH)
    assert torch.equal(chunk(embeds, 0), enc.encode(words(75)).embeds)
    assert torch.equal(chunk(embeds, 1), enc.encode(words(5)).embeds)
    assert enc.encode(words(151)).embeds.shape == (1, 231, WIDTH)


def test_comma_backtrack_moves_the_words_after_a_late_comma(tiny_pipe):
    enc = encoder(tiny_pipe)
    # 70 words, a comma, 10 words: the chunk fills 4 words after the comma, which move on with the rest
    embeds = enc.encode(words(70) + ", " + words(10, "dog")).embeds
    assert embeds.shape == (1, 154, WIDTH)
    assert torch.equal(chunk(embeds, 0), enc.encode(words(70) + ",").embeds)
    assert torch.equal(chunk(embeds, 1), enc.encode(words(10, "dog")).embeds)


def test_no_backtrack_when_the_comma_is_more_than_20_tokens_back(tiny_pipe):
    enc = encoder(tiny_pipe)
    embeds = enc.encode(words(50) + ", " + words(30, "dog")).embeds
    assert torch.equal(chunk(embeds, 0), enc.encode(words(50) + ", " + words(24, "dog")).embeds)
    assert torch.equal(chunk(embeds, 1), enc.encode(words(6, "dog")).embeds)


def test_backtrack_carries_an_embedding_along(tiny_pipe):
    enc = encoder(tiny_pipe, {"mystyle": TextualInversion("mystyle", vectors(2))})
    embeds = enc.encode(words(70) + ", dog mystyle " + words(5, "dog")).embeds
    assert torch.equal(chunk(embeds, 0), enc.encode(words(70) + ",").embeds)
    assert torch.equal(chunk(embeds, 1), enc.encode("dog mystyle " + words(5, "dog")).embeds)


def test_embedding_is_never_split_across_chunks(tiny_pipe):
    enc = encoder(tiny_pipe, {"mystyle": TextualInversion("mystyle", vectors(3))})
    result = enc.encode(words(74) + " mystyle")
    assert result.embeds.shape == (1, 154, WIDTH)
    assert torch.equal(chunk(result.embeds, 0), enc.encode(words(74)).embeds)
    assert torch.equal(chunk(result.embeds, 1), enc.encode("mystyle").embeds)


def test_emphasis_scales_positions_and_keeps_the_chunk_mean(tiny_pipe):
    # the random tiny CLIP's final norm has no bias, so its chunk mean is ~0 and the mean correction
    # would be numerically meaningless; give it one, as trained models have
    text_encoder = copy.deepcopy(tiny_pipe.text_encoder)
    torch.nn.init.constant_(text_encoder.final_layer_norm.bias, 0.1)
    enc = PromptEncoder(tiny_pipe.tokenizer, text_encoder)
    plain = enc.encode("a cat on a mat").embeds
    weighted = enc.encode("a (cat:1.5) on a mat").embeds
    assert not torch.equal(weighted, plain)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)
    weights = torch.ones(77)
    weights[2] = 1.5  # BOS, "a", "cat"
    expected = plain * weights[None, :, None]
    expected = expected * (plain.mean() / expected.mean())
    torch.testing.assert_close(weighted, expected)
    assert (weighted[0, 2] / plain[0, 2]).mean().item() > 1.4  # "cat" itself grew


def test_all_unit_weights_are_bit_identical_to_the_plain_prompt(tiny_pipe):
    enc = encoder(tiny_pipe)
    assert torch.equal(enc.encode("a (cat:1) on a (mat:1.0)").embeds, enc.encode("a cat on a mat").embeds)
    z = torch.randn(1, 77, WIDTH)
    assert apply_emphasis(z, [1.0] * 77) is z


def test_emphasis_applies_to_embedding_positions(tiny_pipe):
    enc = encoder(tiny_pipe, {"mystyle": TextualInversion("mystyle", vectors(2))})
    plain = enc.encode("by mystyle").embeds
    weighted = enc.encode("by (mystyle:0.5)").embeds
    weights = torch.ones(77)
    weights[2:4] = 0.5  # BOS, "by", the two vectors
    torch.testing.assert_close(weighted, apply_emphasis(plain, weights.tolist()))


def test_break_starts_a_new_chunk(tiny_pipe):
    enc = encoder(tiny_pipe)
    embeds = enc.encode("a cat BREAK a dog").embeds
    assert embeds.shape == (1, 154, WIDTH)
    assert torch.equal(chunk(embeds, 0), enc.encode("a cat").embeds)
    assert torch.equal(chunk(embeds, 1), enc.encode("a dog").embeds)
    assert enc.encode("a cat BREAK").embeds.shape == (1, 77, WIDTH)
    # as in A1111, a leading BREAK leaves an empty first chunk
    leading = enc.encode("BREAK a cat").embeds
    assert torch.equal(chunk(leading, 0), enc.encode("").embeds)
    assert torch.equal(chunk(leading, 1), enc.encode("a cat").embeds)


def test_encode_pair_pads_the_shorter_side_with_empty_chunks(tiny_pipe):
    enc = encoder(tiny_pipe)
    empty = enc.encode("").embeds
    cond, uncond, used = enc.encode_pair("a cat BREAK a dog BREAK a bird", "blurry")
    assert cond.shape == uncond.shape == (1, 231, WIDTH)
    assert torch.equal(chunk(uncond, 0), enc.encode("blurry").embeds)
    assert torch.equal(chunk(uncond, 1), empty) and torch.equal(chunk(uncond, 2), empty)
    assert used == []

    cond, uncond, _ = enc.encode_pair("a cat", "blurry BREAK ugly")
    assert cond.shape == uncond.shape == (1, 154, WIDTH)
    assert torch.equal(chunk(cond, 0), enc.encode("a cat").embeds)
    assert torch.equal(chunk(cond, 1), empty)

    cond, uncond, _ = enc.encode_pair("a cat", "")
    assert torch.equal(cond, enc.encode("a cat").embeds) and torch.equal(uncond, empty)


def test_encode_pair_reports_embeddings_from_both_sides(tiny_pipe):
    embeddings = {
        name: TextualInversion(name, vectors(1, i)) for i, name in enumerate(["good", "bad", "style"])
    }
    _, _, used = encoder(tiny_pipe, embeddings).encode_pair("style, good", "bad, style")
    assert used == ["style", "good", "bad"]


def test_clip_skip_uses_an_earlier_layer_through_the_final_norm(tiny_pipe):
    ids = tiny_pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tiny_pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = tiny_pipe.text_encoder.final_layer_norm(hidden[-2])
    skipped = encoder(tiny_pipe, clip_skip=2).encode("a cat").embeds
    assert torch.equal(skipped, expected)
    assert not torch.equal(skipped, encoder(tiny_pipe).encode("a cat").embeds)


@pytest.mark.parametrize("clip_skip", [0, 4])
def test_clip_skip_out_of_range(tiny_pipe, clip_skip):
    with pytest.raises(ValueError, match="clip skip"):
        encoder(tiny_pipe, clip_skip=clip_skip)


def test_embedding_of_another_width_is_refused_by_name(tiny_pipe):
    with pytest.raises(ValueError, match="'sdxl_style'.*width 768"):
        encoder(tiny_pipe, {"sdxl_style": TextualInversion("sdxl_style", vectors(1, width=768))})


@pytest.mark.parametrize("shape", [(WIDTH,), (0, WIDTH), (76, WIDTH)])
def test_embedding_of_unusable_shape_is_refused_by_name(tiny_pipe, shape):
    with pytest.raises(ValueError, match="'odd'"):
        encoder(tiny_pipe, {"odd": TextualInversion("odd", torch.zeros(shape))})


def test_output_follows_the_text_encoder_dtype(tiny_pipe):
    text_encoder = copy.deepcopy(tiny_pipe.text_encoder).to(torch.bfloat16)
    enc = PromptEncoder(
        tiny_pipe.tokenizer, text_encoder, {"mystyle": TextualInversion("mystyle", vectors(1))}
    )
    embeds = enc.encode("a (cat:1.3) by mystyle").embeds
    assert embeds.dtype == torch.bfloat16 and embeds.shape == (1, 77, WIDTH)
    assert not embeds.requires_grad


def test_embedding_hook_leaves_other_threads_forward_passes_alone(tiny_pipe):
    enc = encoder(tiny_pipe)
    plain = enc.encode("a cat").embeds
    layer = tiny_pipe.text_encoder.get_input_embeddings()
    hook = layer.register_forward_hook(_inject_hook([(0, 1, vectors(2))]))
    try:
        assert not torch.equal(enc.encode("a cat").embeds, plain)  # this thread's pass is changed
        with ThreadPoolExecutor(1) as pool:
            assert torch.equal(pool.submit(lambda: enc.encode("a cat").embeds).result(), plain)
    finally:
        hook.remove()


def test_comma_id_is_read_without_copying_the_vocabulary(any_pipe, monkeypatch):
    """get_vocab() copies CLIP's 49,408 entries (21 ms, most of a Generate encode); the comma's id is looked up alone,
    and the comma backtrack still sees it."""
    from studio.generation.conditioning import COMMA_TOKEN, token_id

    tokenizer = any_pipe.tokenizer
    expected = tokenizer.get_vocab().get(COMMA_TOKEN)
    assert expected is not None and token_id(tokenizer, COMMA_TOKEN) == expected
    assert token_id(tokenizer, "notaword-in-clip</w>") is None

    def copied(*args, **kwargs):
        raise AssertionError("PromptEncoder copied the whole vocabulary")

    monkeypatch.setattr(tokenizer, "get_vocab", copied)
    enc = encoder(any_pipe)
    assert enc._comma_id == expected
