"""A1111 "parameters" infotext (prompt, "Negative prompt:" part, one line of `Label: value` pairs):
format, parse, normalize, and read it from PNG text chunks or JPEG/WebP EXIF UserComment."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from studio.files.images import SkipImage, Source, open_checked, read_bounded
from studio.generation import samplers

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
# PNG info decodes the whole image (text chunks may follow the pixels): larger images are refused, not decoded
MAX_INFO_PIXELS = 64_000_000
MAX_INFO_BYTES = 100_000_000

# A1111's own pattern for one `Label: value` pair of the last line
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_LABEL_RE = re.compile(r"\w[\w \-/]+")
_SIZE_RE = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*")

# normalized field -> A1111 label, in the order A1111 writes them
FIELD_LABELS: dict[str, str] = {
    "steps": "Steps",
    "sampler": "Sampler",
    "schedule_type": "Schedule type",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model_hash": "Model hash",
    "model": "Model",
}
_FIELD_ORDER = (
    "prompt",
    "negative_prompt",
    "steps",
    "sampler",
    "schedule_type",
    "cfg_scale",
    "seed",
    "width",
    "height",
    "model_hash",
    "model",
)
_CONVERTERS = {"steps": int, "seed": int, "cfg_scale": float}


def quote(value: str) -> str:
    """JSON-quote `value` when it holds `,` `:` `"` or a newline (which would break the pair line)."""
    value = str(value)
    if any(c in value for c in ',:"\n\r'):
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(value: str) -> str:
    """Undo `quote`; a value that only looks quoted but is not valid JSON is returned as is."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, str):
            return decoded
    return value


def _format_value(value: object) -> str:
    if isinstance(value, float):
        # A1111 writes whole floats without the ".0" (CFG scale: 7) and others in shortest form
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """`<prompt>\\nNegative prompt: <neg>\\n<Label: value, ...>`; empty negative and None values left out.

    Reading it back needs at least 3 pairs: with fewer, A1111 (and `parse_infotext`) take the line as prompt.
    """
    pairs = []
    for label, value in params.items():
        if value is None:
            continue
        if not _LABEL_RE.fullmatch(label):
            raise ValueError(
                f"infotext label {label!r} cannot be written: use letters, digits, ' ', '-', '/'"
            )
        pairs.append(f"{label}: {quote(_format_value(value))}")
    text = prompt
    if negative_prompt:
        text += f"\n{NEGATIVE_PREFIX} {negative_prompt}"
    if pairs:
        text += "\n" + ", ".join(pairs)
    return text


def parse_infotext(text: str) -> dict[str, str]:
    """{"prompt", "negative_prompt", and every `Label: value` of the last line, unquoted, as strings}.

    Like A1111, each line is stripped and the last line counts as parameters only with >= 3 pairs.
    """
    lines = text.strip().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    pairs = PARAM_RE.findall(lines[-1])
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []

    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if not in_negative and line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative if in_negative else prompt).append(line)

    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for label, value in pairs:
        result[label.strip()] = unquote(value.strip())
    return result


def _split_sampler(sampler: str) -> tuple[str, str | None]:
    """A sampler label and the schedule folded into it by older A1111 versions (None if none)."""
    try:
        name, schedule = samplers.split_legacy_name(sampler)
        return name, None if schedule == samplers.AUTOMATIC else schedule
    except ValueError:
        pass
    # a sampler we do not run (e.g. "DPM++ 3M SDE Karras"): still separate the schedule, keep the name
    for label in sorted(samplers.SCHEDULE_TYPES[1:], key=len, reverse=True):
        if sampler.endswith(" " + label):
            return sampler[: -len(label) - 1].strip(), label
    return sampler, None


def to_fields(parsed: Mapping[str, str]) -> dict[str, Any]:
    """Normalized fields from `parse_infotext`'s result; labels not known here go to "extra".

    prompt, negative_prompt, schedule_type and extra are always there; other fields only when the text has
    them (so `fields.get(key, default)` works). schedule_type is "Automatic" when neither a "Schedule type"
    label nor a legacy sampler name ("DPM++ 2M Karras") gives one. A malformed number raises ValueError.
    """
    fields: dict[str, Any] = {
        "prompt": parsed.get("prompt", ""),
        "negative_prompt": parsed.get("negative_prompt", ""),
    }
    for key, label in FIELD_LABELS.items():
        raw = parsed.get(label)
        if raw is None:
            continue
        if key == "size":
            match = _SIZE_RE.fullmatch(raw)
            if not match:
                raise ValueError(f"infotext field 'Size' is not WIDTHxHEIGHT: {raw!r}")
            fields["width"], fields["height"] = int(match[1]), int(match[2])
            continue
        if key in _CONVERTERS:
            try:
                raw = _CONVERTERS[key](raw)
            except ValueError:
                raise ValueError(f"infotext field {label!r} is not a number: {raw!r}") from None
        fields[key] = raw

    schedule = fields.get("schedule_type")
    if "sampler" in fields:
        fields["sampler"], folded = _split_sampler(fields["sampler"])
        # an explicit Schedule type wins over one folded into the sampler name
        if schedule in (None, samplers.AUTOMATIC) and folded:
            schedule = folded
    fields["schedule_type"] = schedule or samplers.AUTOMATIC
    fields = {k: fields[k] for k in _FIELD_ORDER if k in fields}  # A1111's order, for readable JSON

    known = {"prompt", "negative_prompt", *FIELD_LABELS.values()}
    fields["extra"] = {k: v for k, v in parsed.items() if k not in known}
    return fields


def from_fields(fields: Mapping[str, Any]) -> tuple[str, str, dict[str, object]]:
    """(prompt, negative, A1111-labelled params in A1111's order, then extras) for `format_infotext`."""
    params: dict[str, object] = {}
    for key, label in FIELD_LABELS.items():
        if key == "size":
            width, height = fields.get("width"), fields.get("height")
            value = f"{width}x{height}" if width is not None and height is not None else None
        else:
            value = fields.get(key)
        if value is not None:
            params[label] = value
    for label, value in (fields.get("extra") or {}).items():
        params.setdefault(label, value)
    return fields.get("prompt") or "", fields.get("negative_prompt") or "", params


def _decode_user_comment(raw: bytes | str) -> str | None:
    """EXIF UserComment: an 8-byte charset code, then the text (UTF-16 for "UNICODE", either byte order)."""
    if isinstance(raw, str):
        text = raw
    else:
        code, body = raw[:8], raw[8:]
        if code == b"UNICODE\x00":
            text = _decode_utf16(body)
        elif code in (b"ASCII\x00\x00\x00", b"\x00" * 8):
            text = body.decode("utf-8", errors="replace")
        elif code == b"JIS\x00\x00\x00\x00\x00":
            text = body.decode("shift_jis", errors="replace")
        else:
            # no known charset code: some writers store the bare text
            text = raw.decode("utf-8", errors="replace")
    text = text.rstrip("\x00")
    return text or None


def _decode_utf16(body: bytes) -> str:
    body = body[: len(body) // 2 * 2]  # a stray padding byte would make the decoder fail
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body.decode("utf-16", errors="replace")
    # no byte-order mark: mostly-ASCII text has its zero bytes first in big endian, second in little
    even_zeros = body[0::2].count(0)
    odd_zeros = body[1::2].count(0)
    return body.decode("utf-16-le" if odd_zeros > even_zeros else "utf-16-be", errors="replace")


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get(PNG_KEY)
    if text is None and hasattr(image, "text"):
        text = image.text.get(PNG_KEY)  # PNG text chunks after the image data
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if text:
        return text
    exif = image.getexif()
    # A1111 writes UserComment in the Exif sub-IFD, as the standard says; some tools put it in IFD0
    raw = exif.get_ifd(EXIF_IFD).get(USER_COMMENT) or exif.get(USER_COMMENT)
    return _decode_user_comment(raw) if raw else None


def read_image_infotext(path_or_image: str | os.PathLike | IO[bytes] | Image.Image) -> str | None:
    """The infotext in an image (PNG "parameters" chunk or EXIF UserComment), None if it has none. A file that is
    not a readable image, or is over MAX_INFO_PIXELS / MAX_INFO_BYTES (checked before decoding), raises ValueError."""
    if isinstance(path_or_image, Image.Image):
        return _infotext_of(path_or_image)
    if isinstance(path_or_image, (str, os.PathLike)):
        path = Path(path_or_image)
        if not path.is_file():
            raise FileNotFoundError(f"no image file {path.name!r}")
        source = Source(path.name, path)
    else:
        name = Path(str(getattr(path_or_image, "name", "") or "image data")).name
        source = _StreamSource(name, Path(name), stream=path_or_image)
    try:
        image = open_checked(source, MAX_INFO_PIXELS, MAX_INFO_BYTES)
    except SkipImage as exc:
        raise ValueError(f"cannot read generation parameters from {source.label}: {exc}") from None
    with image:
        return _infotext_of(image)


class _StreamSource(Source):
    """A Source over an open binary stream (read_image_infotext's file-like argument)."""

    def __init__(self, label: str, path: Path, stream: IO[bytes]):
        super().__init__(label, path)
        self.stream = stream

    def read(self, limit: int) -> bytes:
        return read_bounded(self.stream, limit)

    def size(self) -> None:
        return None


def png_info(infotext: str) -> PngInfo:
    """PNG text chunks carrying `infotext` as "parameters"; pass as `image.save(..., pnginfo=...)`."""
    info = PngInfo()
    info.add_text(PNG_KEY, infotext)
    return info


def rng_note(parsed: Mapping[str, str]) -> str | None:
    """What to tell a user who pastes parameters whose noise came from a GPU generator (A1111's default, which it
    writes as no `RNG` field or `RNG: GPU`): the studio draws noise on the CPU, so that seed gives another image."""
    rng = (parsed.get("RNG") or "").strip()
    from_studio = str(parsed.get("Version", "")).startswith("studio")
    if rng.upper() == "CPU" or (not rng and from_studio):
        return None
    source = f"RNG: {rng}" if rng else "no RNG field, which A1111 reads as GPU"
    return (f"these parameters drew their noise on the GPU ({source}); the studio draws it on the CPU like A1111's "
            "RNG: CPU setting, so the same seed gives a different image")
