"""Shared network files: Textual Inversion embeddings and LoRAs in A1111, kohya and diffusers formats.

Find them by name in embeddings/ and loras/, read them safely (safetensors, or pickles through
torch.load(weights_only=True) only), hash them the A1111 way, describe them for the UI, and write them back.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import pickle
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from studio.files import lycoris
from studio.files.atomic import atomic_path
from studio.files.hashes import addnet_hashes
from studio.files.pickles import unpickling_refusal

EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")


LORA_EXTS = (".safetensors", ".pt", ".ckpt", ".bin")


PICKLE_EXTS = (".pt", ".ckpt", ".bin", ".pth")


# A1111's search order for a card picture: NAME.png, NAME.preview.png, then the same for each other type
PREVIEW_SUFFIXES = tuple(s for ext in ("png", "jpg", "jpeg", "webp", "gif") for s in (f".{ext}", f".preview.{ext}"))
USER_METADATA_KEYS = ("description", "sd version", "activation text", "preferred weight", "negative text", "notes")
MAX_USER_METADATA_BYTES = 1_000_000


KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_TE_PREFIX = {"text_encoder": "lora_te_", "xl:text_encoder": "lora_te1_", "xl:text_encoder_2": "lora_te2_"}

# how messages name the model families a LoRA or embedding is made for
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# the UNet's cross-attention width (attn2.to_k's input) and the text encoder's width, per family
_CROSS_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


class NetworkFileError(ValueError):
    """A LoRA or embedding file that cannot be used, with the reason."""


class UnknownNetworkError(NetworkFileError):
    """A name in a prompt that matches no file."""


def read_tensor_file(path: Path) -> tuple[dict, dict[str, str]]:
    """(contents, safetensors metadata). Pickles only through torch.load(weights_only=True)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise NetworkFileError(f"{path.name}: cannot read ({e.strerror or e})") from e
    if size == 0:
        raise NetworkFileError(f"{path.name} is empty (0 bytes)")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors has its own error types for a bad header
            raise NetworkFileError(f"{path.name} is not a valid safetensors file ({e})") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise NetworkFileError(unpickling_refusal(path, e)) from e
    except Exception as e:
        raise NetworkFileError(f"{path.name} is not a readable file ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise NetworkFileError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors")
    return data, {}


def read_metadata(path: Path) -> dict[str, str]:
    """safetensors header metadata without reading the tensors ({} for other formats)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise NetworkFileError(f"{Path(path).name} is not a valid safetensors file ({e})") from e


_hash_cache: dict[tuple, str] = {}


_hash_lock = threading.Lock()


def _cached_sha256(path: Path, skip_header: bool) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, skip_header)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            # safetensors: 8-byte little-endian header length, then the JSON header, then tensor bytes
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = value
    return value


def lora_hash(path: Path) -> str:
    """A1111's LoRA short hash: 12 hex digits of SHA-256 over a safetensors file's bytes after its header."""
    return _cached_sha256(path, skip_header=Path(path).suffix.lower() == ".safetensors")[:12]


def embedding_hash(path: Path) -> str:
    """A1111's embedding short hash: 12 hex digits of SHA-256 over the whole file."""
    return _cached_sha256(path, skip_header=False)[:12]


def _as_vectors(tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise NetworkFileError(f"{name}: the embedding is a {type(tensor).__name__}, not a tensor")
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise NetworkFileError(f"{name}: embedding shape {tuple(tensor.shape)} is not [vectors, width]")
    if not torch.isfinite(tensor).all():
        raise NetworkFileError(f"{name}: the embedding contains NaN or infinite values")
    return tensor


def embedding_tensors(data: Mapping, name: str = "embedding") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(vectors, SDXL's second-encoder vectors or None) of an embedding in any format A1111 reads: [n, width]
    each; an SDXL file's `clip_l` (CLIP ViT-L) and `clip_g` (OpenCLIP bigG) must have the same number of vectors."""
    if "clip_l" in data or "clip_g" in data:  # SDXL, as A1111 and ComfyUI write and read it
        if "clip_l" not in data or "clip_g" not in data:
            raise NetworkFileError(f"{name}: an SDXL embedding needs both clip_l and clip_g, found {sorted(data)[:8]}")
        clip_l, clip_g = _as_vectors(data["clip_l"], name), _as_vectors(data["clip_g"], name)
        if clip_l.shape[0] != clip_g.shape[0]:
            raise NetworkFileError(f"{name}: clip_l has {clip_l.shape[0]} vectors but clip_g has {clip_g.shape[0]}")
        return clip_l, clip_g
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise NetworkFileError(f"{name}: 'string_to_param' should hold exactly one tensor")
        tensor = next(iter(params.values()))
    elif "emb_params" in data:  # kohya / A1111 safetensors
        tensor = data["emb_params"]
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:  # diffusers: {token: tensor}
            raise NetworkFileError(f"{name}: not an embedding (expected one tensor, found keys {sorted(data)[:8]})")
        tensor = tensors[0]
    return _as_vectors(tensor, name), None


def embedding_vectors(data: Mapping, name: str = "embedding") -> torch.Tensor:
    """The [n_vectors, dim] tensor of an SD 1.x/2.x embedding in any of the formats A1111 reads."""
    vectors, second = embedding_tensors(data, name)
    if second is not None:
        raise NetworkFileError(f"{name} is an SDXL embedding (clip_l/clip_g); SD 1.x/2.x models cannot use it")
    return vectors


def widths_label(widths: tuple[int, ...]) -> str:
    """The family an embedding or text encoder of these widths belongs to, in words."""
    return {(768,): "SD 1.x", (1024,): "SD 2.x", (768, 1280): "SDXL"}.get(tuple(widths), "x".join(map(str, widths))
                                                                         + "-wide")


@dataclass
class EmbeddingFile:
    name: str  # the file stem: what prompts use
    path: Path
    vectors: torch.Tensor  # [n_vectors, dim], float32 on the CPU (SDXL: the clip_l vectors)
    info: dict = field(default_factory=dict)
    vectors_g: torch.Tensor | None = None  # SDXL: the clip_g vectors for the second text encoder

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def widths(self) -> tuple[int, ...]:
        """Each text encoder's width: (768,) SD 1.x, (1024,) SD 2.x, (768, 1280) SDXL."""
        return (self.dim,) if self.vectors_g is None else (self.dim, int(self.vectors_g.shape[1]))

    @property
    def hash(self) -> str:
        return embedding_hash(self.path)


def load_embedding(path: Path) -> EmbeddingFile:
    path = Path(path)
    data, meta = read_tensor_file(path)
    vectors, vectors_g = embedding_tensors(data, path.name)
    info = {"vectors": int(vectors.shape[0]), "width": int(vectors.shape[1])}
    if vectors_g is not None:
        info["width"] = f"{vectors.shape[1]} + {vectors_g.shape[1]}"
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name", "name"):
        value = data.get(key, meta.get(key))
        if value is not None and not isinstance(value, torch.Tensor):
            info[key] = value
    info.update({k: v for k, v in meta.items() if k.startswith(("ss_", "modelspec.", "studio."))})
    return EmbeddingFile(path.stem, path, vectors, info, vectors_g)


@dataclass
class LoraFile:
    name: str  # the file stem
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None  # "sd1", "sd2" or "sdxl" as read from its keys and metadata; None when it cannot tell
    algorithm: str | None = None  # "lora", "locon", "loha", "lokr", "full", maybe "+dora" (lycoris.network_algorithm)

    @property
    def alias(self) -> str | None:
        return self.metadata.get("ss_output_name") or None

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family or "", "an unknown model family")

    @property
    def hash(self) -> str:
        """What A1111 writes in `Lora hashes`: the file's precomputed `sshs_model_hash` if it has one, else the
        hash of its tensor bytes (the same value for a file kohya or the studio wrote), 12 digits."""
        stored = self.metadata.get("sshs_model_hash", "").strip().lower()
        return stored[:12] if stored else lora_hash(self.path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        data, _ = read_tensor_file(self.path)
        check_lora_state_dict(data, self.path.name)
        return data


def lora_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> str | None:
    """The model family a LoRA is for ("sd1", "sd2", "sdxl"), from its tensor names and shapes (kohya's two text
    encoders, the cross-attention width of attn2.to_k: 768 / 1024 / 2048, the text encoder's width; for LyCORIS
    layers the input width their factors make), else from kohya's `ss_base_model_version` /
    `modelspec.architecture`; None when nothing tells."""
    keys = list(shapes)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    kohya = lycoris.group_layers({k: v for k, v in shapes.items() if k.startswith(KOHYA_PREFIXES)})
    # the UNet's cross-attention input is the text width: decisive
    widths = [lycoris.in_width(parts) for base, parts in kohya.items() if "attn2_to_k" in base]
    widths += [int(shapes[k][1]) for k in keys if "attn2.to_k" in k and k.endswith(("lora_A.weight", ".down.weight"))
               and len(shapes[k]) >= 2]
    for width in widths:
        if width in _CROSS_WIDTH_FAMILY:
            return _CROSS_WIDTH_FAMILY[width]
    # a text-encoder-only LoRA: the text encoder's width
    widths = [lycoris.in_width(parts) for base, parts in kohya.items()
              if base.startswith("lora_te_") and base.endswith("q_proj")]
    widths += [int(shapes[k][1]) for k in keys if k.startswith("text_encoder.") and k.endswith("q_proj.lora_A.weight")
               and len(shapes[k]) >= 2]
    for width in widths:
        if width in (768, 1024):
            return {768: "sd1", 1024: "sd2"}[width]
    meta = metadata or {}
    version = str(meta.get("ss_base_model_version", "")).lower()
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2") or str(meta.get("ss_v2")) == "True":
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def check_lora_state_dict(data: Mapping, name: str = "LoRA") -> None:
    """A kohya (lora_unet_*/lora_te*_*, plain LoRA or LyCORIS) or diffusers/peft (…lora_A/lora_B…) LoRA; a clear
    error otherwise, and for the LyCORIS algorithms the studio does not merge (OFT/BOFT, IA3, GLoRA)."""
    keys = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
    if not keys:
        raise NetworkFileError(f"{name} holds no tensors")
    kohya = all(k.startswith(KOHYA_PREFIXES) for k in keys)
    peft = any(".lora_A." in k or ".lora.down." in k or "lora_linear_layer" in k for k in keys)
    if not (kohya or peft):
        raise NetworkFileError(f"{name} is not a LoRA (keys such as {keys[0]!r} are neither kohya nor diffusers)")
    unsupported = lycoris.unsupported_algorithm(keys) if kohya else None
    if unsupported:
        article = "an" if unsupported[0] in "AEIOU" else "a"
        raise NetworkFileError(f"{name} is {article} {unsupported} network; the studio loads {lycoris.LOADABLE}")
    bad = [k for k in keys if not torch.isfinite(data[k]).all()]
    if bad:
        raise NetworkFileError(f"{name}: NaN or infinite values in {bad[0]}")


@dataclass
class Scan:
    """What a folder holds: usable files by name, and everything skipped with the reason."""

    found: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> reason


def _files(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    root = folder.resolve()
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in exts:
            continue
        if not path.is_file():
            continue
        if root not in path.resolve().parents:  # a symlink pointing outside the folder
            continue
        out.append(path)
    return out


class NetworkLibrary:
    """Scans loras/ and embeddings/ (cached by size and mtime, so rescans are cheap) and resolves names."""

    def __init__(self, loras_dir: Path, embeddings_dir: Path):
        self.loras_dir = Path(loras_dir)
        self.embeddings_dir = Path(embeddings_dir)
        self._lock = threading.Lock()
        self._cache: dict[tuple, object] = {}

    def _cached(self, path: Path, kind: str, load):
        stat = path.stat()
        key = (kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                value = self._cache[key]
                if isinstance(value, Exception):
                    raise value
                return value
        try:
            value = load(path)
        except NetworkFileError as e:
            value = e
        with self._lock:
            self._cache[key] = value
        if isinstance(value, Exception):
            raise value
        return value

    def _scan(self, folder: Path, exts: tuple[str, ...], kind: str, load, reject=None) -> Scan:
        """Usable files by stem; the rest (unreadable, refused, duplicate name, `reject` reason) with why."""
        scan = Scan()
        for path in _files(folder, exts):
            rel = path.relative_to(folder).as_posix()
            try:
                entry = self._cached(path, kind, load)
            except NetworkFileError as e:
                scan.skipped[rel] = str(e)
                continue
            reason = reject(entry) if reject else None
            if entry.name in scan.found:
                scan.skipped[rel] = f"same name as {scan.found[entry.name].path.relative_to(folder)}"
            elif reason:
                scan.skipped[rel] = reason
            else:
                scan.found[entry.name] = entry
        return scan

    def embeddings(self, widths: tuple[int, ...] | int | None = None) -> Scan:
        """Embeddings by file stem. With `widths` (each text encoder's width: the loaded model's), embeddings made
        for other text encoders are skipped with the reason."""
        if isinstance(widths, int):
            widths = (widths,)

        def wrong_width(emb: EmbeddingFile) -> str | None:
            if widths is None or emb.widths == tuple(widths):
                return None
            model = " + ".join(map(str, widths))
            return (f"made for {widths_label(emb.widths)} models (width {emb.info['width']}): it does not fit the "
                    f"loaded model (width {model}, {widths_label(widths)})")

        return self._scan(self.embeddings_dir, EMBEDDING_EXTS, "embedding", load_embedding, wrong_width)

    def loras(self, family: str | None = None) -> Scan:
        """LoRAs by file stem. Pickled ones are opened (weights_only) so a hostile file shows as refused. With
        `family`, LoRAs known to be for another family are skipped with the reason (the panel's filter)."""

        def other_family(lora: LoraFile) -> str | None:
            if family is None or lora.family in (None, family):
                return None
            return f"made for {lora.family_label} models; the loaded model is {FAMILY_LABELS.get(family, family)}"

        return self._scan(self.loras_dir, LORA_EXTS, "lora", _load_lora_entry, other_family)

    def find_lora(self, name: str, scan: Scan | None = None) -> LoraFile:
        """By file stem, else by the `ss_output_name` alias; an unknown name lists close matches."""
        scan = scan or self.loras()
        if name in scan.found:
            return scan.found[name]
        by_alias = {lora.alias: lora for lora in scan.found.values() if lora.alias}
        if name in by_alias:
            return by_alias[name]
        raise UnknownNetworkError(_unknown("LoRA", name, [*scan.found, *by_alias], self.loras_dir, scan))

    def find_lora_by_hash(self, short_hash: str, scan: Scan | None = None) -> LoraFile | None:
        scan = scan or self.loras()
        return next((lf for lf in scan.found.values() if lf.hash == short_hash.lower()), None)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors header, reading no tensor."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _load_lora_entry(path: Path) -> LoraFile:
    if path.suffix.lower() == ".safetensors":
        meta = read_metadata(path)
        shapes = _safetensors_shapes(path)
        check_lora_state_dict({k: torch.zeros(()) for k in shapes}, path.name)
        return LoraFile(path.stem, path, meta, lora_family(shapes, meta), lycoris.network_algorithm(shapes))
    data, _ = read_tensor_file(path)  # refuses hostile pickles at scan time
    check_lora_state_dict(data, path.name)
    shapes = {k: tuple(v.shape) for k, v in data.items() if isinstance(v, torch.Tensor)}
    return LoraFile(path.stem, path, {}, lora_family(shapes), lycoris.network_algorithm(shapes))


def _unknown(kind: str, name: str, known: list[str], folder: Path, scan: Scan) -> str:
    known = sorted(set(known))  # a file's alias is often its own name
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    msg = f"unknown {kind} {name!r}: no file with that name in {folder.name}/"
    if close:
        msg += f"; close matches: {', '.join(close)}"
    elif known:
        msg += f"; available: {', '.join(known[:10])}"
    refused = [rel for rel in scan.skipped if Path(rel).stem == name]
    if refused:
        msg += f" ({refused[0]} exists but was skipped: {scan.skipped[refused[0]]})"
    return msg


def preview_image(path: Path) -> Path | None:
    """The card picture beside a file, in A1111's order (`name.png`, `name.preview.png`, then jpg, webp, gif)."""
    path = Path(path)
    for suffix in PREVIEW_SUFFIXES:
        candidate = path.with_name(path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def save_preview(path: Path, image) -> Path:
    """Write `image` (a PIL image) as `name.preview.png` beside the file at `path`, the picture A1111's card shows."""
    target = Path(path).with_name(Path(path).stem + ".preview.png")
    with atomic_path(target) as tmp:
        image.convert("RGB").save(tmp, format="PNG")
    return target


def user_metadata(path: Path) -> dict:
    """A1111's `name.json` beside a LoRA or embedding (activation text, preferred weight, notes, ...): the keys
    A1111 writes, read as text (preferred weight as a number); {} when there is none or it is not readable."""
    sidecar = Path(path).with_suffix(".json")
    try:
        if not sidecar.is_file() or sidecar.stat().st_size > MAX_USER_METADATA_BYTES:
            return {}
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {k: str(data[k]).strip() for k in USER_METADATA_KEYS if data.get(k) not in (None, "")}
    try:
        weight = float(data.get("preferred weight") or 0)
        out.pop("preferred weight", None)
        if weight and math.isfinite(weight):
            out["preferred weight"] = weight
    except (TypeError, ValueError):
        out.pop("preferred weight", None)
    return out


def _top_tags(tag_frequency: str, n: int = 8) -> list[str]:
    try:
        freq = json.loads(tag_frequency)
    except ValueError:
        return []
    counts: dict[str, int] = {}
    for tags in freq.values() if isinstance(freq, dict) else []:
        if isinstance(tags, dict):
            for tag, count in tags.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(count)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


def lora_card(lora: LoraFile) -> dict:
    """Human-facing facts about a LoRA from its kohya `ss_*` / `modelspec.*` metadata, and its algorithm (LoRA,
    LoCon, LoHa, LoKr, DoRA, full) and rank read from its tensors."""
    m = lora.metadata
    card = {"name": lora.name, "file": lora.path.name, "for": lora.family_label}
    # the tensors' shapes (from the safetensors header) when the scan or the metadata left something to tell
    unknown = lora.algorithm is None or m.get("ss_network_dim") in (None, "", "None")
    shapes = _safetensors_shapes(lora.path) if unknown and lora.path.suffix.lower() == ".safetensors" else {}
    algorithm = lora.algorithm or (lycoris.network_algorithm(shapes) if shapes else None)
    if algorithm:
        card["algorithm"] = lycoris.algorithm_label(algorithm)
    pairs = {
        "alias": "ss_output_name", "base model": "ss_base_model_version", "trained on": "ss_sd_model_name",
        "rank": "ss_network_dim", "alpha": "ss_network_alpha", "module": "ss_network_module",
        "steps": "ss_steps", "epochs": "ss_epoch", "images": "ss_num_train_images",
        "resolution": "ss_resolution", "learning rate": "ss_learning_rate", "UNet lr": "ss_unet_lr",
        "text encoder lr": "ss_text_encoder_lr", "scheduler": "ss_lr_scheduler", "optimizer": "ss_optimizer",
        "seed": "ss_seed", "comment": "ss_training_comment", "architecture": "modelspec.architecture",
        "title": "modelspec.title", "trigger words": "modelspec.trigger_phrase",
    }
    for label, key in pairs.items():
        if m.get(key) not in (None, "", "None"):
            card[label] = m[key]
    if "trigger words" not in card and m.get("ss_tag_frequency"):
        tags = _top_tags(m["ss_tag_frequency"])
        if tags:
            card["frequent tags"] = ", ".join(tags)
    card.update(user_metadata(lora.path))
    # the rank: rows of the down (LoRA, LoCon), w1_b (LoHa) or a low-rank LoKr factor; full networks have none
    down = next((k for k in shapes if k.endswith(("lora_down.weight", "lora_A.weight", "hada_w1_b", "lokr_w1_b",
                                                  "lokr_w2_b"))), None)
    if "rank" not in card and down:
        card["rank"] = str(shapes[down][0])
    return card


def embedding_card(emb: EmbeddingFile) -> dict:
    card = {"name": emb.name, "file": emb.path.name, "vectors": emb.vectors.shape[0], "width": emb.info["width"],
            "for": widths_label(emb.widths)}
    for key in ("step", "sd_checkpoint_name", "modelspec.trigger_phrase", "studio.method"):
        if key in emb.info:
            card[key.replace("sd_checkpoint_name", "trained on")] = emb.info[key]
    card.update(user_metadata(emb.path))
    return card


EMBEDDING_FORMATS = ("a1111", "diffusers", "a1111-pt")


def save_embedding(path: Path, vectors: torch.Tensor, name: str | None = None, fmt: str = "a1111",
                   step: int | None = None, checkpoint_hash: str = "", checkpoint_name: str = "",
                   metadata: Mapping[str, str] | None = None, vectors_g: torch.Tensor | None = None) -> Path:
    """Write an embedding other tools load.

    a1111: `.safetensors` with `emb_params` (A1111 and kohya; diffusers with `token=`);
    diffusers: `.safetensors` with `{name: tensor}` (diffusers names the token itself; A1111 reads it too);
    a1111-pt: the legacy A1111 `.pt` dict (loadable with torch.load(weights_only=True)).
    SDXL (`vectors_g` given): `.safetensors` with `clip_l` and `clip_g`, the one layout A1111, ComfyUI and diffusers'
    SDXL example read, whatever `fmt` says but a1111-pt (which has no SDXL form and is refused).
    """
    path = Path(path)
    name = name or path.stem
    vectors = _checked_vectors(vectors)
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"unknown embedding format {fmt!r}; choose one of {', '.join(EMBEDDING_FORMATS)}")
    if vectors_g is not None:
        vectors_g = _checked_vectors(vectors_g)
        if vectors_g.shape[0] != vectors.shape[0]:
            raise ValueError(f"clip_l has {vectors.shape[0]} vectors but clip_g has {vectors_g.shape[0]}")
        if fmt == "a1111-pt":
            raise ValueError("SDXL embeddings have no .pt form: save them as .safetensors (clip_l + clip_g)")
    meta = {"format": "pt", "name": name, **({"step": str(step)} if step is not None else {}),
            "sd_checkpoint": checkpoint_hash, "sd_checkpoint_name": checkpoint_name, **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if fmt == "a1111-pt":
            torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name,
                        "step": int(step or 0), "sd_checkpoint": checkpoint_hash or None,
                        "sd_checkpoint_name": checkpoint_name or None}, tmp)
        else:
            key = "emb_params" if fmt == "a1111" else name
            tensors = {key: vectors} if vectors_g is None else {"clip_l": vectors, "clip_g": vectors_g}
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    return path


def _checked_vectors(vectors: torch.Tensor) -> torch.Tensor:
    vectors = vectors.detach().to("cpu", torch.float32).contiguous()
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2:
        raise ValueError(f"an embedding is [vectors, width], got shape {tuple(vectors.shape)}")
    return vectors


def kohya_name(component: str, module_path: str, xl: bool = False) -> str:
    """`lora_unet_…` / `lora_te_…` (SDXL: `lora_te1_…`, `lora_te2_…`) from a diffusers / transformers module path.
    For SDXL's UNet kohya uses the original (SGM) module names: pass those (studio.files.convert's
    original_unet_module_names maps them)."""
    if component == "unet":
        return "lora_unet_" + module_path.replace(".", "_")
    prefix = KOHYA_TE_PREFIX.get(f"xl:{component}" if xl else component)
    if prefix is None:
        raise ValueError(f"component must be 'unet', 'text_encoder' or (SDXL) 'text_encoder_2', got {component!r}")
    # kohya names the text encoder layers after the classic CLIPTextModel layout, which nests them in text_model
    if not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return prefix + module_path.replace(".", "_")


@dataclass
class LoraLayer:
    down: torch.Tensor  # [rank, in] (or a conv kernel [rank, in, kh, kw])
    up: torch.Tensor  # [out, rank]
    alpha: float


def peft_to_layers(peft_state_dict: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float],
                   ) -> dict[str, LoraLayer]:
    """Module path -> LoraLayer from `peft.get_peft_model_state_dict` output (…lora_A.weight / lora_B.weight).

    `alpha` is peft's lora_alpha, one number or a module-path -> alpha map (peft's alpha_pattern)."""
    layers: dict[str, LoraLayer] = {}
    for key, tensor in peft_state_dict.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        up_key = key.replace(".lora_A.", ".lora_B.")
        if up_key not in peft_state_dict:
            raise ValueError(f"{module}: lora_A without lora_B")
        a = alpha.get(module, alpha.get("default")) if isinstance(alpha, Mapping) else alpha
        if a is None:
            a = tensor.shape[0]
        layers[module] = LoraLayer(tensor, peft_state_dict[up_key], float(a))
    return layers


# peft's adapter parameter names (get_peft_model_state_dict, adapter name removed) -> LyCORIS' suffixes
PEFT_TO_LYCORIS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                   "lora_magnitude_vector": "dora_scale",
                   **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                              "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                              "lokr_t2")}}


def peft_to_lycoris_layers(peft_state_dict: Mapping[str, torch.Tensor], scaling: float | Mapping[str, float],
                           ) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> {LyCORIS suffix: tensor} from `peft.get_peft_model_state_dict` of a LoRA (LoCon, DoRA), LoHa
    or LoKr adapter, so that studio.files.lycoris.layer_delta (and A1111, ComfyUI, LyCORIS) rebuild the very ΔW peft
    trains. peft's parameters are LyCORIS' own (peft ported them), only the scale is written differently: peft
    multiplies by `scaling` (alpha / r, one number or module path -> number), the files by alpha / rank, the rank
    read from the factors' shapes. So alpha = scaling · rank, with two exceptions:

    * LoKr with both Kronecker factors full (`lokr_w1`, `lokr_w2`): loaders take the scale as 1 and ignore alpha, so
      the scaling is multiplied into lokr_w1 and alpha is 1 (scale 1 for any reader);
    * DoRA: peft's magnitude (one norm per output row: LyCORIS' wd_on_output) becomes `dora_scale` [out, 1, …]
      with as many dimensions as the layer's weight, the layout LyCORIS writes and the loaders read per output."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state_dict.items():
        found = next(((key[: -len(name) - 1], suffix) for name, suffix in PEFT_TO_LYCORIS.items()
                      if key.endswith("." + name)), None)
        if found is None:
            raise ValueError(f"{key}: not a LoRA, DoRA, LoHa or LoKr parameter of peft")
        layers.setdefault(found[0], {})[found[1]] = tensor.detach()
    for module, parts in layers.items():
        scale = scaling.get(module, scaling.get("default")) if isinstance(scaling, Mapping) else scaling
        if scale is None:
            raise ValueError(f"{module}: no scaling given for this layer")
        if "lora_down.weight" in parts:
            down, up = parts["lora_down.weight"], parts.get("lora_up.weight")
            if up is None:
                raise ValueError(f"{module}: lora_A without lora_B")
            rank = down.shape[0]
            if "dora_scale" in parts:
                parts["dora_scale"] = parts["dora_scale"].reshape(up.shape[0], *[1] * (down.ndim - 1))
        elif "hada_w1_b" in parts:
            rank = parts["hada_w1_b"].shape[0]
        elif any(s.startswith("lokr_") for s in parts):
            low = next((parts[s] for s in ("lokr_w1_b", "lokr_w2_b") if s in parts), None)
            if low is None:  # both factors full: the scale goes into w1
                parts["lokr_w1"] = parts["lokr_w1"] * scale
                rank, scale = 1, 1.0
            else:
                rank = low.shape[0]
        else:
            raise ValueError(f"{module}: {sorted(parts)} is no whole layer")
        parts["alpha"] = torch.tensor(float(scale) * rank)
    return layers


def save_kohya_lora(path: Path, unet: Mapping[str, LoraLayer] | None = None,
                    text_encoder: Mapping[str, LoraLayer] | None = None,
                    metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float16,
                    text_encoder_2: Mapping[str, LoraLayer] | None = None,
                    unet_names: Mapping[str, str] | None = None) -> Path:
    """A kohya-format LoRA (`lora_unet_*`/`lora_te_*` + `.alpha`), what A1111, ComfyUI and Civitai expect.

    SDXL: pass `text_encoder_2` (the text encoders become `lora_te1_*`/`lora_te2_*`, even when one is empty) and
    `unet_names`, diffusers UNet module path -> original module path, for kohya's SGM names of the UNet layers."""
    def as_parts(layers: Mapping[str, LoraLayer] | None) -> dict[str, dict[str, torch.Tensor]] | None:
        if layers is None:
            return None
        out = {}
        for module, layer in layers.items():
            rank = layer.down.shape[0]
            if layer.up.shape[1] != rank:
                raise ValueError(f"{module}: up has rank {layer.up.shape[1]}, down has rank {rank}")
            out[module] = {"lora_down.weight": layer.down, "lora_up.weight": layer.up,
                           "alpha": torch.tensor(float(layer.alpha))}
        return out

    return save_kohya_network(path, as_parts(unet), as_parts(text_encoder), metadata, dtype,
                              as_parts(text_encoder_2), unet_names)


def save_kohya_network(path: Path, unet: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                       text_encoder: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                       metadata: Mapping[str, str] | None = None, dtype: torch.dtype = torch.float16,
                       text_encoder_2: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                       unet_names: Mapping[str, str] | None = None) -> Path:
    """A LyCORIS network in kohya's layout: each layer's {suffix: tensor} (peft_to_lycoris_layers) under its kohya
    name (`lora_unet_….hada_w1_a`, `….alpha`), with save_kohya_lora's naming (SDXL: `text_encoder_2` and
    `unet_names` for the original UNet names), dtype, `sshs_*` hashes and metadata."""
    xl = text_encoder_2 is not None
    tensors: dict[str, torch.Tensor] = {}
    parts = (("unet", unet or {}), ("text_encoder", text_encoder or {}), ("text_encoder_2", text_encoder_2 or {}))
    for component, layers in parts:
        for module, layer in layers.items():
            if component == "unet" and unet_names is not None:
                if module not in unet_names:
                    raise ValueError(f"{module}: no original (SGM) name for this UNet layer")
                module = unet_names[module]
            base = kohya_name(component, module, xl)
            for suffix, tensor in layer.items():
                tensors[f"{base}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
    if not tensors:
        raise ValueError("a LoRA needs at least one layer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def kohya_metadata(*, output_name: str, family: str, rank: int, alpha: float, base_model_name: str = "",
                   steps: int | None = None, epochs: int | None = None, num_images: int | None = None,
                   resolution: tuple[int, int] | None = None, learning_rate: float | None = None,
                   unet_lr: float | None = None, text_encoder_lr: float | None = None,
                   lr_scheduler: str = "", optimizer: str = "", seed: int | None = None,
                   trigger_phrase: str = "", tag_frequency: Mapping | None = None, comment: str = "",
                   lr_warmup_steps: int | None = None, lr_scheduler_num_cycles: int | None = None,
                   shuffle_caption: bool | None = None, keep_tokens: int | None = None,
                   caption_dropout_rate: float | None = None, caption_tag_dropout_rate: float | None = None,
                   caption_dropout_every_n_epochs: int | None = None,
                   extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` metadata kohya's tools and A1111's extra-networks cards read. Values left None
    are not written; the caption options as kohya's train_network writes them (str() of a bool, an int, a float)."""
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)
    arch = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
            "sdxl": "stable-diffusion-xl-v1-base/lora"}.get(family, family)
    values = {
        "ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": alpha,
        "ss_output_name": output_name, "ss_sd_model_name": base_model_name, "ss_base_model_version": version,
        "ss_v2": family == "sd2", "ss_steps": steps, "ss_epoch": epochs, "ss_num_train_images": num_images,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})" if resolution else None,
        "ss_learning_rate": learning_rate, "ss_unet_lr": unet_lr, "ss_text_encoder_lr": text_encoder_lr,
        "ss_lr_scheduler": lr_scheduler, "ss_optimizer": optimizer, "ss_seed": seed,
        "ss_lr_warmup_steps": lr_warmup_steps, "ss_lr_scheduler_num_cycles": lr_scheduler_num_cycles,
        "ss_shuffle_caption": None if shuffle_caption is None else bool(shuffle_caption),
        "ss_keep_tokens": None if keep_tokens is None else int(keep_tokens),
        "ss_caption_dropout_rate": None if caption_dropout_rate is None else float(caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": None if caption_tag_dropout_rate is None else float(caption_tag_dropout_rate),
        "ss_training_comment": comment,
        "ss_tag_frequency": json.dumps(tag_frequency) if tag_frequency else None,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch, "modelspec.title": output_name,
        "modelspec.trigger_phrase": trigger_phrase,
    }
    out = {k: str(v) for k, v in values.items() if v not in (None, "")}
    out.update({k: str(v) for k, v in (extra or {}).items()})
    return out


# LyCORIS' algorithm names (its `algo` network argument) of the studio's networks
LYCORIS_ALGOS = {"locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "lora"}


def network_metadata(network: str, conv: tuple[int, float] | None = None, lokr_factor: int = -1,
                     rank_dropout: float = 0.0) -> dict[str, str]:
    """`ss_network_module` and `ss_network_args` of a trained network, as kohya's train_network writes them for
    LyCORIS (`--network_module lycoris.kohya --network_args algo=loha conv_dim=8 …`: the arguments as a JSON object
    of strings); plain LoRA is kohya's own `networks.lora`, without arguments. `conv` is the 3x3 convolutions' (rank,
    alpha) when they train at their own rank."""
    if network == "lora":
        return {"ss_network_module": "networks.lora"}
    args = {"algo": LYCORIS_ALGOS[network]}
    if conv is not None:
        args.update(conv_dim=str(conv[0]), conv_alpha=f"{float(conv[1]):g}")
    if network == "lokr":
        args["factor"] = str(lokr_factor)
    if network == "dora":
        args.update(dora_wd="True", wd_on_output="True")
    if rank_dropout:
        args["rank_dropout"] = f"{float(rank_dropout):g}"
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}
