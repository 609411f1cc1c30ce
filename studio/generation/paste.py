"""Pasting an A1111 infotext: its `Lora hashes` field read back, `<lora:...>` tags pointed at local files by hash,
and the image-to-image and VAE fields (`Denoising strength`, `VAE`) turned into settings."""

from __future__ import annotations

import math
from collections.abc import Mapping

from studio.files.networks import NetworkLibrary, UnknownNetworkError


def parse_hash_field(value: str) -> dict[str, str]:
    """`"name: 0123456789ab, other: ..."` (Lora hashes / TI hashes) -> {name: hash}."""
    out = {}
    for part in (value or "").split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip() and digest.strip():
            out[name.strip()] = digest.strip().lower()
    return out


def restore_lora_names(prompt: str, lora_hashes: str, library: NetworkLibrary) -> tuple[str, list[str]]:
    """Point the `<lora:name…>` tags of a pasted prompt at local files: a name not found here whose hash matches a
    local file is renamed to it (the file was renamed or shared under another name). Returns (prompt, notes)."""
    from studio.generation.prompt_syntax import extract_network_tags

    hashes = parse_hash_field(lora_hashes)
    if not hashes:
        return prompt, []
    scan = library.loras()
    _, tags = extract_network_tags(prompt)
    notes = []
    for tag in tags:
        if tag.kind != "lora" or tag.name not in hashes:
            continue
        try:
            library.find_lora(tag.name, scan)
            continue
        except UnknownNetworkError:
            pass
        local = library.find_lora_by_hash(hashes[tag.name], scan)
        if local is None:
            notes.append(f"LoRA {tag.name} (hash {hashes[tag.name]}) is not in {library.loras_dir.name}/")
            continue
        prompt = prompt.replace(tag.text, tag.text.replace(f":{tag.name}", f":{local.name}", 1), 1)
        notes.append(f"LoRA {tag.name} found by its hash as {local.name}")
    return prompt, notes


def denoising_strength(extra: Mapping[str, str]) -> float | None:
    """A pasted infotext's `Denoising strength` (A1111 writes it for image to image) as a number in 0..1; None when
    the field is absent or not such a number."""
    raw = str(extra.get("Denoising strength", "")).strip()
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= 1 else None


def vae_choice(extra: Mapping[str, str], choices: list[str]) -> tuple[str | None, str | None]:
    """(the VAE menu choice a pasted `VAE:` field names, a note for the user): the choice when it is in `choices`,
    else None and a note saying the VAE is missing here. (None, None) when the infotext names no VAE."""
    name = str(extra.get("VAE", "")).strip()
    if not name:
        return None, None
    if name in choices:
        return name, None
    by_stem = [c for c in choices if c.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]]
    if by_stem:
        return by_stem[0], None
    digest = str(extra.get("VAE hash", "")).strip()
    return None, f"VAE {name}{f' (hash {digest})' if digest else ''} is not in vae/; the current VAE is kept"
