"""A1111 prompt syntax: extra-network tags and attention emphasis, as tables."""

from __future__ import annotations

import pytest

from studio.generation.prompt_syntax import (
    NetworkTag,
    PromptSyntaxError,
    extract_network_tags,
    format_lora_tag,
    parse_attention,
)

TAGS = [
    ("<lora:name>", "lora", "name", 1.0, 1.0),
    ("<lora:name:0.8>", "lora", "name", 0.8, 0.8),
    ("<lora:name:0.8:0.5>", "lora", "name", 0.8, 0.5),
    ("<lora:name:unet=0.2>", "lora", "name", 1.0, 0.2),
    ("<lora:name:te=0.3>", "lora", "name", 0.3, 0.3),
    ("<lora:name:te=0.3:unet=0.2>", "lora", "name", 0.3, 0.2),
    ("<lora:name:0.8:unet=0>", "lora", "name", 0.8, 0.0),
    ("<lora:name:0.8:0.5:te=0.1>", "lora", "name", 0.1, 0.5),
    ("<lora:name:-0.5>", "lora", "name", -0.5, -0.5),
    ("<lora:name:+1.5e-1>", "lora", "name", 0.15, 0.15),
    ("<lora:name:.5>", "lora", "name", 0.5, 0.5),
    ("<lora:name: 0.7 >", "lora", "name", 0.7, 0.7),
    ("<lora:my lora v2:0.6>", "lora", "my lora v2", 0.6, 0.6),
    ("<lyco:name:0.8:dyn=16>", "lora", "name", 0.8, 0.8),
    ("<lora:name:0.8:0.5:16>", "lora", "name", 0.8, 0.5),  # A1111's positional dyn dim, ignored
    ("<hypernet:anime:0.5>", "hypernet", "anime", 0.5, 0.5),
]


@pytest.mark.parametrize(("tag", "kind", "name", "te", "unet"), TAGS)
def test_network_tag_forms(tag, kind, name, te, unet):
    prompt, tags = extract_network_tags(f"a cat {tag}, sitting")
    assert prompt == "a cat , sitting"
    assert tags == [
        NetworkTag(kind=kind, name=name, te=pytest.approx(te), unet=pytest.approx(unet), text=tag)
    ]


def test_all_tags_are_removed_and_returned_in_order():
    prompt, tags = extract_network_tags("<lora:a>x<hypernet:h:2> y <lora:a:0.5>")
    assert prompt == "x y "
    assert [(t.kind, t.name, t.te) for t in tags] == [
        ("lora", "a", 1.0),
        ("hypernet", "h", 2.0),
        ("lora", "a", 0.5),
    ]


@pytest.mark.parametrize("prompt", ["", "plain text", "a <lora:> b", "<:x>", "(a:1.2) <lora x>", "a < b > c"])
def test_text_without_tags_is_unchanged(prompt):
    assert extract_network_tags(prompt) == (prompt, [])


BAD_TAGS = [
    ("<lora:x:abc>", "could not read weight 'abc' in <lora:x:abc>"),
    ("<lora:x:0.8:1,2>", "could not read weight '1,2' in <lora:x:0.8:1,2>"),
    ("<lora:x:te=>", "could not read weight '' in <lora:x:te=>"),
    ("<lora:x:unet=high>", "could not read weight 'high' in <lora:x:unet=high>"),
    ("<lora:x:nan>", "could not read weight 'nan' in <lora:x:nan>"),
    ("<lora:x:inf>", "could not read weight 'inf' in <lora:x:inf>"),
    ("<lora:x:>", "could not read weight '' in <lora:x:>"),
    ("<lora::0.8>", "empty name in <lora::0.8>"),
    ("<lora: :0.8>", "empty name in <lora: :0.8>"),
    ("<lora:x:foo=1>", "unknown argument 'foo' in <lora:x:foo=1>"),
    ("<lora:x:1:2:3:4>", "too many arguments in <lora:x:1:2:3:4>"),
]


@pytest.mark.parametrize(("tag", "message"), BAD_TAGS)
def test_bad_tags_name_the_problem_and_the_tag(tag, message):
    with pytest.raises(PromptSyntaxError) as caught:
        extract_network_tags(f"a cat, {tag}")
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


FORMATS = [
    # (arguments, tag, (te, unet) read back)
    (("name",), "<lora:name:1>", (1.0, 1.0)),
    (("name", 0.8), "<lora:name:0.8>", (0.8, 0.8)),
    (("name", 0.8, 0.5), "<lora:name:0.8:0.5>", (0.8, 0.5)),
    (("name", 0.8, 0.8), "<lora:name:0.8>", (0.8, 0.8)),
    (("name", 2.0, 0), "<lora:name:2:0>", (2.0, 0.0)),
    (("name", -0.25), "<lora:name:-0.25>", (-0.25, -0.25)),
    (("my lora", 1.0, 0.123456789), "<lora:my lora:1:0.123456789>", (1.0, 0.123456789)),
]


@pytest.mark.parametrize(("args", "expected", "weights"), FORMATS)
def test_format_lora_tag_and_round_trip(args, expected, weights):
    assert format_lora_tag(*args) == expected
    (tag,) = extract_network_tags(expected)[1]
    assert (tag.kind, tag.name, (tag.te, tag.unet)) == ("lora", args[0], weights)


@pytest.mark.parametrize("name", ["", " x", "a:b", "a>b", "a<b"])
def test_format_lora_tag_refuses_names_that_would_not_round_trip(name):
    with pytest.raises(ValueError):
        format_lora_tag(name)


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_format_lora_tag_refuses_non_finite_weights(weight):
    with pytest.raises(ValueError):
        format_lora_tag("x", weight)


ATTENTION = [
    # A1111's own examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # more forms
    ("", [("", 1.0)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("( word : 1.3 )", [(" word ", 1.3)]),
    ("(word:-0.5)", [("word", -0.5)]),
    ("(word:.5)", [("word", 0.5)]),
    ("((word:1.3))", [("word", 1.3 * 1.1)]),
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
    ("(word:1.3", [("word:1.3", 1.1)]),
    ("(word:abc)", [("word:abc", 1.1)]),
    ("(word:1.2.3)", [("word:1.2.3", 1.1)]),
    ("word:1.3)", [("word:1.3)", 1.0)]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),
    ("()", [("", 1.0)]),
    ("time: 10:30", [("time: 10:30", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("\\(x\\) \\[y\\]", [("(x) [y]", 1.0)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    ("a\\b", [("ab", 1.0)]),
    # BREAK: a chunk marker, whitespace around it dropped
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK a", [("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),
    ("a BREAKING b", [("a BREAKING b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION)
def test_parse_attention(text, expected):
    result = parse_attention(text)
    assert [t for t, _ in result] == [t for t, _ in expected]
    assert [w for _, w in result] == pytest.approx([w for _, w in expected])
    assert all(isinstance(item, tuple) for item in result)
