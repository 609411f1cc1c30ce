"""File hashes: SHA-256 of files and diffusers folders (A1111's "Model hash" is its first 10 hex digits),
cached by path, size and mtime because checkpoints are gigabytes."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from studio.files.atomic import write_text

_hash_lock = threading.Lock()


def sha256_file(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) because checkpoints are gigabytes."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _read_cache(cache_file)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache_file is not None:
        with _hash_lock:
            cache = _read_cache(cache_file)
            cache[key] = value
            write_text(cache_file, json.dumps(cache, indent=0))
    return value


def sha256_folder(folder: Path, cache_file: Path | None = None) -> str:
    """A diffusers folder's hash: SHA-256 over its weight files' hashes, in name order."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin"):
            digest.update(f.relative_to(folder).as_posix().encode())
            digest.update(sha256_file(f, cache_file).encode())
    return digest.hexdigest()


def _read_cache(cache_file: Path | None) -> dict:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return json.loads(Path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache only costs a re-hash


def addnet_hashes(tensors: dict, metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's trainers precompute them for a LoRA file: SHA-256 of the
    tensor bytes after the safetensors header (A1111's LoRA hash, independent of metadata), and the old 8-digit
    hash of the 64 KiB at offset 1 MiB of the file serialized with its `ss_*` metadata only."""
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash
