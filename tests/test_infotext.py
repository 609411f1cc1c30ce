"""A1111 infotext: parsing real-world strings, round trips, and reading it back from image files."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from studio.generation.infotext import (
    format_infotext,
    from_fields,
    parse_infotext,
    png_info,
    quote,
    read_image_infotext,
    to_fields,
)

FORMATS_EXAMPLE = (
    "a photo of a cat, best quality\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "name: 0123456789ab", '
    'TI hashes: "tok: 0123456789ab", Version: v1.10.1'
)

# as A1111 1.10 writes it: prompt and negative over several lines, BREAK, weights, a LoRA tag
A1111_MULTILINE = (
    "masterpiece, (best quality:1.2), 1girl, <lora:detail-tweaker:0.8>\n"
    "BREAK\n"
    "forest background, [sunlight]\n"
    "Negative prompt: (worst quality, low quality:1.4),\n"
    "EasyNegative, watermark\n"
    "Steps: 28, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6.5, Seed: 3937281901, "
    "Size: 768x512, Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.45, Clip skip: 2, "
    'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "detail-tweaker: 8bd6b4a1c2d3", Version: v1.10.1'
)


def test_formats_md_example_parses():
    parsed = parse_infotext(FORMATS_EXAMPLE)
    assert parsed["prompt"] == "a photo of a cat, best quality"
    assert parsed["negative_prompt"] == "blurry, lowres"
    assert parsed["Steps"] == "20"
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["CFG scale"] == "7"
    assert parsed["Seed"] == "1234"
    assert parsed["Size"] == "512x512"
    assert parsed["Model hash"] == "6ce0161689"
    assert parsed["Model"] == "v1-5-pruned-emaonly"
    assert parsed["Lora hashes"] == "name: 0123456789ab"
    assert parsed["TI hashes"] == "tok: 0123456789ab"
    assert parsed["Version"] == "v1.10.1"

    fields = to_fields(parsed)
    assert fields == {
        "prompt": "a photo of a cat, best quality",
        "negative_prompt": "blurry, lowres",
        "steps": 20,
        "sampler": "DPM++ 2M",
        "schedule_type": "Karras",
        "cfg_scale": 7.0,
        "seed": 1234,
        "width": 512,
        "height": 512,
        "model_hash": "6ce0161689",
        "model": "v1-5-pruned-emaonly",
        "extra": {
            "Lora hashes": "name: 0123456789ab",
            "TI hashes": "tok: 0123456789ab",
            "Version": "v1.10.1",
        },
    }


def test_multiline_prompt_and_negative():
    parsed = parse_infotext(A1111_MULTILINE)
    assert parsed["prompt"] == (
        "masterpiece, (best quality:1.2), 1girl, <lora:detail-tweaker:0.8>\nBREAK\nforest background, [sunlight]"
    )
    assert parsed["negative_prompt"] == "(worst quality, low quality:1.4),\nEasyNegative, watermark"
    fields = to_fields(parsed)
    assert (fields["steps"], fields["sampler"], fields["schedule_type"]) == (28, "Euler a", "Automatic")
    assert (fields["cfg_scale"], fields["seed"], fields["width"], fields["height"]) == (
        6.5,
        3937281901,
        768,
        512,
    )
    assert fields["extra"]["Clip skip"] == "2"
    assert fields["extra"]["Denoising strength"] == "0.45"
    assert fields["extra"]["Lora hashes"] == "detail-tweaker: 8bd6b4a1c2d3"


def test_windows_line_endings():
    parsed = parse_infotext(A1111_MULTILINE.replace("\n", "\r\n"))
    assert parsed == parse_infotext(A1111_MULTILINE)


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
        ("Euler a", ("Euler a", "Automatic")),
        ("DPM++ SDE Karras", ("DPM++ SDE", "Karras")),
        ("LMS Karras", ("LMS", "Karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "Karras")),
        ("DPM2 a Karras", ("DPM2 a", "Karras")),
        ("DDIM", ("DDIM", "Automatic")),
        # samplers the studio does not run keep their name; a folded schedule is still split off
        ("DPM++ 3M SDE Exponential", ("DPM++ 3M SDE", "Exponential")),
        ("Restart", ("Restart", "Automatic")),
    ],
)
def test_legacy_sampler_without_schedule_type(sampler, expected):
    text = f"a cat\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1, Size: 512x512"
    fields = to_fields(parse_infotext(text))
    assert (fields["sampler"], fields["schedule_type"]) == expected


def test_explicit_schedule_type_wins_over_legacy_suffix():
    text = "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, Schedule type: Exponential, CFG scale: 7"
    fields = to_fields(parse_infotext(text))
    assert (fields["sampler"], fields["schedule_type"]) == ("DPM++ 2M", "Exponential")


def test_prompt_with_colons_commas_and_quoted_value_with_escaped_quotes():
    text = (
        "portrait: a woman, (red hair:1.3), style: oil painting\n"
        'Steps: 30, Sampler: Euler, CFG scale: 5.5, Seed: 7, Note: "she said \\"hi, there\\": twice"'
    )
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "portrait: a woman, (red hair:1.3), style: oil painting"
    assert parsed["negative_prompt"] == ""
    assert parsed["Note"] == 'she said "hi, there": twice'
    assert to_fields(parsed)["cfg_scale"] == 5.5


@pytest.mark.parametrize(
    "text",
    [
        "a cat, Steps: 20, Sampler: Euler",  # only 2 pairs
        "a cat\nlighting: soft, mood: calm",
        "a cat\nNegative prompt: dog\nSteps: 20, Seed: 3",
    ],
)
def test_fewer_than_three_pairs_is_all_prompt(text):
    parsed = parse_infotext(text)
    assert set(parsed) == {"prompt", "negative_prompt"}
    before_negative = text.split("\nNegative prompt:")[0]
    assert parsed["prompt"] == before_negative


def test_params_only_text():
    parsed = parse_infotext("Steps: 20, Sampler: Euler, CFG scale: 7")
    assert parsed["prompt"] == "" and parsed["Steps"] == "20"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("a, b", '"a, b"'),
        ("k: v", '"k: v"'),
        ('say "x"', '"say \\"x\\""'),
        ("two\nlines", '"two\\nlines"'),
        ("ünïcode 猫", "ünïcode 猫"),
    ],
)
def test_quote(value, expected):
    assert quote(value) == expected


def test_format_numbers_like_a1111():
    text = format_infotext("p", "", {"Steps": 20, "CFG scale": 7.0, "Denoising strength": 0.45, "Seed": 5})
    assert text == "p\nSteps: 20, CFG scale: 7, Denoising strength: 0.45, Seed: 5"


def test_format_leaves_out_empty_negative_and_none():
    text = format_infotext("p", "", {"Steps": 20, "Model hash": None, "Sampler": "Euler", "Seed": 1})
    assert text == "p\nSteps: 20, Sampler: Euler, Seed: 1"


def test_format_rejects_labels_that_cannot_be_parsed():
    with pytest.raises(ValueError, match="label"):
        format_infotext("p", "", {"Bad: label": 1})


ROUND_TRIP_CASES = [
    pytest.param(
        {
            "prompt": "a cat",
            "negative_prompt": "blurry",
            "steps": 20,
            "sampler": "DPM++ 2M",
            "schedule_type": "Karras",
            "cfg_scale": 7.0,
            "seed": 1234,
            "width": 512,
            "height": 768,
            "model_hash": "6ce0161689",
            "model": "v1-5-pruned-emaonly",
            "extra": {"Lora hashes": "name: 0123456789ab, other: 0123456789cd", "Version": "studio 0.1.0"},
        },
        id="full",
    ),
    pytest.param(
        {
            "prompt": "a cat",
            "negative_prompt": "",
            "steps": 4,
            "sampler": "Euler a",
            "schedule_type": "Automatic",
            "cfg_scale": 6.5,
            "seed": 0,
            "width": 64,
            "height": 64,
            "model_hash": None,
            "model": None,
            "extra": {},
        },
        id="empty-negative",
    ),
    pytest.param(
        {
            "prompt": '猫, ünïcode: «quotes» "double"\nsecond line',
            "negative_prompt": "нет\nzweite Zeile",
            "steps": 30,
            "sampler": "UniPC",
            "schedule_type": "SGM Uniform",
            "cfg_scale": 11.25,
            "seed": 4294967295,
            "width": 1024,
            "height": 576,
            "model_hash": "abcdef0123",
            "model": "모델",
            "extra": {"Note": "line one\nline two, with comma", "Quoted": 'he said "hi"'},
        },
        id="unicode-and-newline-in-value",
    ),
]


@pytest.mark.parametrize("fields", ROUND_TRIP_CASES)
def test_round_trip(fields):
    prompt, negative, params = from_fields(fields)
    assert list(params)[:3] == ["Steps", "Sampler", "Schedule type"]
    text = format_infotext(prompt, negative, params)
    assert to_fields(parse_infotext(text)) == {k: v for k, v in fields.items() if v is not None}
    # and the raw labels come back as strings of what was written
    parsed = parse_infotext(text)
    assert (parsed["prompt"], parsed["negative_prompt"]) == (prompt, negative)
    assert parsed["Size"] == f"{fields['width']}x{fields['height']}"


def test_from_fields_order():
    fields = to_fields(parse_infotext(FORMATS_EXAMPLE))
    _, _, params = from_fields(fields)
    assert list(params) == [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
        "Lora hashes", "TI hashes", "Version",
    ]  # fmt: skip
    assert format_infotext(*from_fields(fields)) == FORMATS_EXAMPLE


def test_missing_fields_are_left_out():
    fields = to_fields(parse_infotext("a cat\nSteps: 20, CFG scale: 7, Clip skip: 2"))
    assert fields == {
        "prompt": "a cat",
        "negative_prompt": "",
        "steps": 20,
        "schedule_type": "Automatic",
        "cfg_scale": 7.0,
        "extra": {"Clip skip": "2"},
    }
    assert from_fields(fields) == (
        "a cat",
        "",
        {"Steps": 20, "Schedule type": "Automatic", "CFG scale": 7.0, "Clip skip": "2"},
    )


def test_malformed_number_names_the_field():
    with pytest.raises(ValueError, match="Steps"):
        to_fields(parse_infotext("p\nSteps: many, Sampler: Euler, CFG scale: 7"))


def test_png_round_trip(tmp_path):
    text = format_infotext(*from_fields(to_fields(parse_infotext(A1111_MULTILINE))))
    text += ", Note: 猫"  # non-Latin-1 text needs an iTXt chunk
    path = tmp_path / "out.png"
    Image.new("RGB", (8, 8), "blue").save(path, pnginfo=png_info(text))
    assert read_image_infotext(path) == text
    assert read_image_infotext(str(path)) == text
    with Image.open(path) as image:
        assert read_image_infotext(image) == text


def test_png_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_image_infotext(path) is None


def _save_with_user_comment(path, fmt, comment: bytes, sub_ifd: bool):
    exif = Image.Exif()
    # A1111 (piexif) puts UserComment in the Exif sub-IFD; naive writers put it in IFD0
    (exif.get_ifd(0x8769) if sub_ifd else exif)[0x9286] = comment
    Image.new("RGB", (16, 16), "red").save(path, fmt, exif=exif)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize(
    ("prefix", "encoding"),
    [(b"UNICODE\x00", "utf-16-be"), (b"UNICODE\x00", "utf-16-le"), (b"ASCII\x00\x00\x00", "ascii")],
)
@pytest.mark.parametrize("sub_ifd", [True, False], ids=["exif-ifd", "ifd0"])
def test_exif_user_comment(tmp_path, fmt, prefix, encoding, sub_ifd):
    text = FORMATS_EXAMPLE if encoding == "ascii" else A1111_MULTILINE.replace("1girl", "1girl, 猫")
    path = tmp_path / f"out.{fmt.lower()}"
    _save_with_user_comment(path, fmt, prefix + text.encode(encoding), sub_ifd)
    assert read_image_infotext(path) == text
    assert to_fields(parse_infotext(read_image_infotext(path)))["steps"] in (20, 28)


def test_jpeg_without_exif(tmp_path):
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(path)
    assert read_image_infotext(path) is None


def test_file_like(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=png_info("x\nSteps: 1, Seed: 2, CFG scale: 3"))
    buf.seek(0)
    assert read_image_infotext(buf) == "x\nSteps: 1, Seed: 2, CFG scale: 3"


def test_not_an_image_raises_value_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a PNG")
    with pytest.raises(ValueError, match="notes.png"):
        read_image_infotext(path)


def test_truncated_png_raises_value_error(tmp_path):
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(
        good, pnginfo=png_info("p\nSteps: 1, Seed: 2, CFG scale: 3")
    )
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="broken.png"):
        read_image_infotext(bad)
