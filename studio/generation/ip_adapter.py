"""IP-Adapter image prompts (issue 23): a picture steers the generation beside the prompt, through diffusers' own
IP-Adapter support (IPAdapterMixin.load_ip_adapter, its attention processors and image projections), offline.

Files, in the IP-Adapter folder (StudioConfig's `ipadapter/`):

- `NAME.safetensors` (or `.bin`, read with torch.load(weights_only=True) only): the weights in the layout
  diffusers' loader reads, keys `image_proj.*` and `ip_adapter.*` (h94/IP-Adapter's files as they are). Plain,
  Plus and Plus-Face (and Full-Face) differ by their image_proj keys; diffusers tells them apart. FaceID adapters
  need insightface's face embeddings and are refused.
- a CLIP image encoder, a transformers CLIPVisionModelWithProjection folder (config.json + weights), found at
  `ipadapter/NAME/image_encoder/`, else `image_encoder/` in the file's folder or any folder above it up to
  `ipadapter/image_encoder/`. Nothing is downloaded.

A unit's pictures are encoded once per run the way StableDiffusionPipeline.prepare_ip_adapter_image_embeds does
(the plain variant: the projected image embeds, zeros for the negative prompt; Plus and Full-Face: the encoder's
penultimate hidden states, the negative from an all-zero picture); several pictures of one unit are handed to
diffusers together, which attends to all their tokens (it concatenates them; it does not average embeddings).
The adapters are put on the UNet for the run and taken off afterwards (IPAdapterMixin.unload_ip_adapter, then the
UNet's own attention processors back), so a run without them is what it was. The denoise loop
(studio.generation.denoise) passes the embeds to the UNet as `added_cond_kwargs["image_embeds"]` and sets each
adapter's scale per step (pipe.set_ip_adapter_scale): 0 outside its start/end window, as ControlNet's guidance
start/end; at scale 0 diffusers' processor skips the adapter, so weight 0 is exactly no adapter.

Infotext: `IP-Adapter: NAME [hash]`, `IP-Adapter scale: 0.6` (and `IP-Adapter start` / `IP-Adapter end` when they
are not 0 and 1, `IP-Adapter images` when a unit has several pictures); a second unit writes `IP-Adapter 2`,
`IP-Adapter 2 scale`, ... A1111's ControlNet extension records an IP-Adapter as a `ControlNet N` unit (module
ip-adapter_clip_*); the studio writes its own fields, because its IP-Adapter is not a ControlNet unit (no map,
preprocessor or resize mode) and pasting one into the ControlNet fields would try to load it as a ControlNet.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from studio.config import real_number, text
from studio.files.names import UnsafeNameError, safe_child
from studio.models.checkpoints import ModelLoadError, load_pickle_checkpoint

WEIGHT_EXTS = (".safetensors", ".bin")
ENCODER_FOLDER = "image_encoder"
MAX_ADAPTERS = 4
MAX_IMAGES = 8  # pictures per unit
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


class IPAdapterError(ModelLoadError):
    """An IP-Adapter (or its image encoder) that cannot be used: the message says why and what to do."""


def family_name(width: int) -> str:
    return FAMILIES.get(int(width), f"a model of text width {width}")


# ---------------------------------------------------------------------------------------------------- the unit


@dataclass
class IPAdapterUnit:
    name: str  # a file in ipadapter/ (with or without its extension)
    images: list = field(default_factory=list)  # picture file paths or PIL images (one or more)
    scale: float = 1.0
    start: float = 0.0  # fractions of the steps it acts in
    end: float = 1.0

    @classmethod
    def from_value(cls, value) -> IPAdapterUnit:
        """A unit from an IPAdapterUnit or a dict (presets, the API); unknown keys are an error."""
        if isinstance(value, IPAdapterUnit):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"an IP-Adapter must be a dict with name, images, scale; got {type(value).__name__}")
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown IP-Adapter keys: {', '.join(sorted(unknown))}")
        return cls(**value)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["images"] = [None if isinstance(i, Image.Image) else str(i) for i in self.images]
        return out

    def validate(self, index: int = 0) -> None:
        where = f"IP-Adapter {index + 1}"
        try:
            if not text("name", self.name).strip():
                raise ValueError("name must name an IP-Adapter file in ipadapter/")
            if isinstance(self.images, (str, os.PathLike, Image.Image)):
                self.images = [self.images]
            if not isinstance(self.images, (list, tuple)) or not self.images:
                raise ValueError("give at least one picture")
            if len(self.images) > MAX_IMAGES:
                raise ValueError(f"at most {MAX_IMAGES} pictures, got {len(self.images)}")
            for image in self.images:
                if not isinstance(image, (str, os.PathLike, Image.Image)):
                    raise ValueError(f"a picture must be a file's path or an image, got {type(image).__name__}")
                if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
                    raise ValueError(f"picture {Path(image).name!r} does not exist")
            self.images = list(self.images)
            self.scale = real_number("scale", self.scale, 0, 2)
            self.start = real_number("start", self.start, 0, 1)
            self.end = real_number("end", self.end, 0, 1)
            if self.start >= self.end:
                raise ValueError(f"start must be before end, got {self.start:g} >= {self.end:g}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def pictures(self) -> list[Image.Image]:
        """The pictures as RGB, files read through the checked loader (header first)."""
        from studio.generation.job import load_init_image

        return [load_init_image(image) for image in self.images]


def check_units(units) -> list[IPAdapterUnit]:
    """GenerateJob.ip_adapters as validated IPAdapterUnits (at most MAX_ADAPTERS)."""
    if not isinstance(units, (list, tuple)):
        raise ValueError(f"ip_adapters must be a list, got {type(units).__name__}")
    if len(units) > MAX_ADAPTERS:
        raise ValueError(f"at most {MAX_ADAPTERS} IP-Adapters at once, got {len(units)}")
    out = [IPAdapterUnit.from_value(u) for u in units]
    for i, unit in enumerate(out):
        unit.validate(i)
    return out


# ---------------------------------------------------------------------------------------------------- the files


def _in_encoder(rel: Path) -> bool:
    return ENCODER_FOLDER in rel.parts[:-1]


def list_ip_adapters(folder: Path) -> list[str]:
    """The IP-Adapter files under `folder` (names relative to it, without the extension); image encoder folders
    and hidden files are not adapters."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if (path.is_file() and path.suffix.lower() in WEIGHT_EXTS and not _in_encoder(rel)
                and not any(p.startswith(".") for p in rel.parts)):
            out.append(rel.with_suffix("").as_posix())
    return out


def _listing(folder: Path) -> str:
    return ", ".join(list_ip_adapters(folder)) or "none"


def resolve_ip_adapter(name: str, folder: Path) -> Path:
    """The weight file for `name` inside `folder` (never outside it: ../ and absolute names are refused)."""
    folder = Path(folder)
    name = (name or "").strip()
    if not name:
        raise IPAdapterError(f"no IP-Adapter given; the ones in {folder}: {_listing(folder)}")
    path = safe_child(folder, name)  # UnsafeNameError for names leaving the folder
    candidates = [path] if path.suffix.lower() in WEIGHT_EXTS else []
    candidates += [path.with_name(path.name + ext) for ext in WEIGHT_EXTS]
    for candidate in candidates:
        if candidate.is_file():
            safe_child(folder, candidate.relative_to(folder.resolve()).as_posix())  # a symlink leaving it
            return candidate
    raise IPAdapterError(f"IP-Adapter {name!r} not found in {folder} (there: {_listing(folder)}). Put its "
                         ".safetensors file there, e.g. ip-adapter_sd15.safetensors from h94/IP-Adapter's models/, "
                         f"with its image encoder folder in {folder / ENCODER_FOLDER}")


def find_image_encoder(weights: Path, folder: Path) -> Path | None:
    """`ipadapter/NAME/image_encoder`, else `image_encoder/` in the file's folder or a folder above it, up to
    `ipadapter/image_encoder` (the first that holds a config.json)."""
    folder = Path(folder).resolve()
    weights = Path(weights).resolve()
    candidates = [weights.with_suffix("") / ENCODER_FOLDER]
    parent = weights.parent
    while True:
        candidates.append(parent / ENCODER_FOLDER)
        if parent == folder or folder not in parent.parents:
            break
        parent = parent.parent
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            try:
                return safe_child(folder, candidate.relative_to(folder).as_posix())
            except (UnsafeNameError, ValueError):
                continue
    return None


def read_ip_adapter(path: Path) -> dict:
    """{"image_proj": {...}, "ip_adapter": {...}} from a weight file: safetensors as flat `image_proj.` /
    `ip_adapter.` keys (diffusers' own reading), a .bin as the nested dict h94's files hold, read with
    torch.load(weights_only=True) only (a pickle that asks to run code is refused, never run)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        state = {"image_proj": {}, "ip_adapter": {}}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    head, _, rest = key.partition(".")
                    if head in state:
                        state[head][rest] = f.get_tensor(key)
        except Exception as e:
            raise IPAdapterError(f"IP-Adapter {path.name} is not a valid safetensors file ({e})") from e
    else:
        try:
            raw = load_pickle_checkpoint(path)
        except ModelLoadError as e:
            raise IPAdapterError(f"IP-Adapter {path.name}: {e}") from e
        state = {k: raw.get(k) for k in ("image_proj", "ip_adapter")}
        if not all(isinstance(v, dict) for v in state.values()):  # a flat dict, as the safetensors layout
            state = {"image_proj": {}, "ip_adapter": {}}
            for key, value in raw.items():
                head, _, rest = str(key).partition(".")
                if head in state and isinstance(value, torch.Tensor):
                    state[head][rest] = value
    if not state["image_proj"] or not state["ip_adapter"]:
        raise IPAdapterError(f"{path.name} is not an IP-Adapter: it has no image_proj.* and ip_adapter.* weights")
    return state


def variant(state: dict) -> str:
    """"plain", "plus" (Plus and Plus-Face: the resampler), "full" (Full-Face) or "faceid", by diffusers' rules."""
    proj = state["image_proj"]
    if "proj.weight" in proj:
        return "plain"
    if "proj.3.weight" in proj:
        return "full"
    if "perceiver_resampler.proj_in.weight" in proj or "norm.weight" in proj:
        return "faceid"
    if "latents" in proj and "proj_in.weight" in proj and "proj_out.weight" in proj:
        return "plus"
    raise IPAdapterError("unknown IP-Adapter layout (its image_proj weights are none of plain, Plus, Full-Face)")


VARIANT_LABELS = {"plain": "IP-Adapter", "plus": "IP-Adapter Plus", "full": "IP-Adapter Full-Face",
                  "faceid": "IP-Adapter FaceID"}


def _output_width(state: dict, kind: str) -> int:
    proj = state["image_proj"]
    if kind == "plain":
        return int(proj["proj.weight"].shape[0] // 4)  # 4 image tokens
    if kind == "full":
        return int(proj["proj.3.weight"].shape[0])
    return int(proj["proj_out.weight"].shape[0])


def _encoder_input(state: dict, kind: str) -> tuple[str, int]:
    """What the image projection reads from the encoder: ("image embeds" | "hidden states", width)."""
    proj = state["image_proj"]
    if kind == "plain":
        return "image embeds", int(proj["proj.weight"].shape[1])
    if kind == "full":
        return "hidden states", int(proj["proj.0.weight"].shape[1])
    return "hidden states", int(proj["proj_in.weight"].shape[1])


def _cross_attention_layers(unet) -> int:
    return sum(1 for n in unet.attn_processors if not n.endswith("attn1.processor") and "motion_modules" not in n)


def check_fits(state: dict, unet, name: str) -> str:
    """The adapter's variant, after checking it was made for this UNet's family: its key/value projections'
    text width, its image projection's output width and its number of cross-attention layers."""
    kind = variant(state)
    if kind == "faceid":
        raise IPAdapterError(f"IP-Adapter {name} is a FaceID adapter: it reads insightface face embeddings, which "
                             "the studio does not compute; use a plain, Plus or Plus-Face IP-Adapter")
    model_width = int(unet.config.cross_attention_dim)
    keys = [k for k in state["ip_adapter"] if k.endswith(".to_k_ip.weight")]
    widths = {int(state["ip_adapter"][k].shape[1]) for k in keys}
    width = widths.pop() if len(widths) == 1 else None
    out_width = _output_width(state, kind)
    if width is None:
        raise IPAdapterError(f"IP-Adapter {name}: its ip_adapter weights are damaged (no single text width)")
    if width != model_width or out_width != model_width:
        made = width if width != model_width else out_width
        raise IPAdapterError(f"IP-Adapter {name} is made for {family_name(made)} models (text width {made}), but "
                             f"the loaded model is {family_name(model_width)} (text width {model_width}); use an "
                             "IP-Adapter of the model's family")
    layers = _cross_attention_layers(unet)
    if len(keys) != layers:
        raise IPAdapterError(f"IP-Adapter {name} has {len(keys)} cross-attention layers, the loaded model's UNet "
                             f"{layers}: it is made for another model of text width {width} (SD 1.x has 16, SDXL "
                             "70); use an IP-Adapter of the model's family")
    return kind


def _stamp(path: Path) -> tuple:
    """What changes when a file or a folder's files change (size and mtime of each)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return tuple((f.as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


# ---------------------------------------------------------------------------------------------------- encoding


@dataclass
class ImagePrompt:
    """One adapter's share of a denoise pass: its image embeds for the prompt's and the negative prompt's rows
    ([1, images, dim] for the plain variant, [1, images, tokens, width] for Plus and Full-Face: the shapes
    prepare_ip_adapter_image_embeds gives for one image per prompt), its scale and its start/end window."""

    embeds: torch.Tensor
    negative: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def scale_at(self, i: int, n: int) -> float:
        """ControlNet's guidance start/end rule (Control.scale_at): 0 before `start` and after `end`."""
        off = i / n < self.start or (i + 1) / n > self.end
        return 0.0 if off else float(self.scale)


def feature_extractor_for(encoder):
    """What diffusers' load_ip_adapter registers when the pipeline has no feature extractor: a CLIPImageProcessor
    at the encoder's image size (CLIP's resize, centre crop and normalisation)."""
    from transformers import CLIPImageProcessor

    size = int(encoder.config.image_size)
    return CLIPImageProcessor(size=size, crop_size=size)


@torch.no_grad()
def encode_pictures(encoder, extractor, pictures: list[Image.Image], hidden_states: bool, device,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, negative) of one unit's pictures, as StableDiffusionPipeline.encode_image computes them."""
    dtype = next(encoder.parameters()).dtype
    pixels = extractor(pictures, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    if hidden_states:
        embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    else:
        embeds = encoder(pixels).image_embeds
        negative = torch.zeros_like(embeds)
    return embeds[None], negative[None]


# ---------------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedIPAdapter:
    name: str
    path: Path
    state: dict  # {"image_proj": ..., "ip_adapter": ...} on the CPU
    kind: str
    hash: str
    encoder_dir: Path


class IPAdapterLoader:
    """Finds IP-Adapters in `folder`, keeps their weights (by path, size and mtime) and the last image encoder
    (by its folder's files, device and dtype), and puts adapters on a pipe for a run (`apply`)."""

    def __init__(self, folder: Path | None, cache_dir: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._lock = threading.Lock()
        self._states: OrderedDict[tuple, LoadedIPAdapter] = OrderedDict()
        self._encoder: tuple[tuple, object] | None = None

    def _need_folder(self) -> Path:
        if self.folder is None:
            raise IPAdapterError("no IP-Adapter folder is configured (StudioConfig.ipadapter_dir)")
        return self.folder

    def open(self, name: str, unet) -> LoadedIPAdapter:
        """The adapter `name`, checked against `unet`'s family and with its image encoder found."""
        folder = self._need_folder()
        path = resolve_ip_adapter(name, folder)
        key = _stamp(path)
        with self._lock:
            loaded = self._states.get(key)
            if loaded is None:
                state = read_ip_adapter(path)
                from studio.files.hashes import sha256_file

                cache = self.cache_dir / "hashes.json" if self.cache_dir else None
                loaded = LoadedIPAdapter(Path(path).stem, path, state, variant(state), sha256_file(path, cache)[:8],
                                         Path())
                while len(self._states) >= MAX_ADAPTERS:
                    self._states.popitem(last=False)
                self._states[key] = loaded
            else:
                self._states.move_to_end(key)
        check_fits(loaded.state, unet, loaded.name)
        encoder = find_image_encoder(path, folder)
        if encoder is None:
            rel = path.relative_to(folder.resolve()).with_suffix("").as_posix() if path.is_relative_to(
                folder.resolve()) else loaded.name
            raise IPAdapterError(
                f"IP-Adapter {loaded.name} needs its CLIP image encoder, which is not there (it is never "
                f"downloaded): put a transformers CLIPVisionModelWithProjection folder (config.json and "
                f"model.safetensors; h94/IP-Adapter's models/image_encoder for SD 1.5 adapters and the "
                f"*_vit-h SDXL ones, sdxl_models/image_encoder for ip-adapter_sdxl) at "
                f"{folder / ENCODER_FOLDER} or {folder / rel / ENCODER_FOLDER}")
        loaded.encoder_dir = encoder
        return loaded

    def encoder(self, folder: Path, device, dtype):
        """The CLIP image encoder in `folder` on `device` in `dtype` (the last one is kept)."""
        key = (_stamp(folder), str(device), str(dtype))
        with self._lock:
            if self._encoder is not None and self._encoder[0] == key:
                return self._encoder[1]
            self._encoder = None  # free the last one before loading the next
            from transformers import CLIPVisionModelWithProjection

            try:
                model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, dtype=dtype)
            except Exception as e:
                from studio.files.pickles import folder_refusal, hostile_pickle_in

                if hostile_pickle_in(folder) is not None or "weights_only" in str(e):
                    raise IPAdapterError(f"image encoder {folder.name}: {folder_refusal(folder, e)}") from e
                raise IPAdapterError(f"could not load the image encoder in {folder} (a transformers "
                                     f"CLIPVisionModelWithProjection folder): {type(e).__name__}: {e}") from e
            model.to(device).eval().requires_grad_(False)
            self._encoder = (key, model)
            return model

    def prompts(self, units: list[IPAdapterUnit], pipe, pictures: list[list[Image.Image]] | None = None,
                ) -> tuple[list[LoadedIPAdapter], list[ImagePrompt]]:
        """Each unit's adapter (checked against the pipe's UNet) and its ImagePrompt: the pictures encoded once."""
        device, dtype = pipe._execution_device, pipe.unet.dtype
        loaded, out = [], []
        for k, unit in enumerate(units):
            adapter = self.open(unit.name, pipe.unet)
            encoder = self.encoder(adapter.encoder_dir, device, dtype)
            reads, width = _encoder_input(adapter.state, adapter.kind)
            gives = int(encoder.config.projection_dim if reads == "image embeds" else encoder.config.hidden_size)
            if gives != width:
                raise IPAdapterError(
                    f"IP-Adapter {adapter.name} reads {reads} of width {width} from its image encoder, but "
                    f"{adapter.encoder_dir} gives {gives}: put the encoder it was trained with (ViT-H for SD 1.5 "
                    "and *_vit-h adapters, ViT-bigG for ip-adapter_sdxl) in "
                    f"{adapter.path.with_suffix('') / ENCODER_FOLDER}")
            images = pictures[k] if pictures is not None else unit.pictures()
            embeds, negative = encode_pictures(encoder, feature_extractor_for(encoder), images,
                                               reads == "hidden states", device)
            loaded.append(adapter)
            out.append(ImagePrompt(embeds, negative, unit.scale, unit.start, unit.end))
        return loaded, out


@contextmanager
def adapters_on(pipe, adapters: list[LoadedIPAdapter]):
    """While active, `adapters` are on the pipe's UNet through diffusers' IPAdapterMixin.load_ip_adapter (state
    dicts; the image encoder is the studio's own, so none is registered on the pipe); afterwards
    unload_ip_adapter takes them off and the UNet's own attention processors, hidden-state projection and the
    pipe's feature extractor and image encoder are put back as they were."""
    if not adapters:
        yield
        return
    unet = pipe.unet
    if getattr(unet.config, "encoder_hid_dim_type", None) is not None:
        raise IPAdapterError("the loaded model's UNet already has an image or text projection "
                             f"({unet.config.encoder_hid_dim_type}); IP-Adapters are for SD 1.x / 2.x and SDXL UNets")
    original = dict(unet.attn_processors)
    kept = {name: getattr(pipe, name, None) for name in ("feature_extractor", "image_encoder")}
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "image_encoder is not loaded": the studio encodes the pictures
    try:
        pipe.load_ip_adapter([a.state for a in adapters], subfolder=[""] * len(adapters),
                             weight_name=[""] * len(adapters), image_encoder_folder=None)
    except Exception as e:
        _restore(pipe, original, kept)
        raise IPAdapterError(f"could not put IP-Adapter {', '.join(a.name for a in adapters)} on the model: "
                             f"{type(e).__name__}: {e}") from e
    finally:
        diffusers_logging.set_verbosity(level)
    try:
        yield
    finally:
        pipe.unload_ip_adapter()
        _restore(pipe, original, kept)


def _restore(pipe, original: dict, kept: dict) -> None:
    unet = pipe.unet
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None
    unet.set_attn_processor(original)
    for name, value in kept.items():
        if hasattr(pipe, name) and getattr(pipe, name) is not value:
            pipe.register_modules(**{name: value})


# ---------------------------------------------------------------------------------------------------- infotext


def infotext_fields(units: list[IPAdapterUnit], loaded: list[LoadedIPAdapter]) -> dict:
    """`IP-Adapter: NAME [hash]`, `IP-Adapter scale: 0.6` (start, end and the number of pictures when not the
    defaults); the second unit as `IP-Adapter 2`, `IP-Adapter 2 scale`, ..."""
    out = {}
    for k, (unit, adapter) in enumerate(zip(units, loaded, strict=True)):
        label = "IP-Adapter" if k == 0 else f"IP-Adapter {k + 1}"
        out[label] = f"{adapter.name} [{adapter.hash}]" if adapter.hash else adapter.name
        out[f"{label} scale"] = f"{unit.scale:g}"
        if unit.start > 0:
            out[f"{label} start"] = f"{unit.start:g}"
        if unit.end < 1:
            out[f"{label} end"] = f"{unit.end:g}"
        if len(unit.images) > 1:
            out[f"{label} images"] = len(unit.images)
    return out


def parse_ip_flags(names: list[str], images: list[str], scales: list[float]) -> list[IPAdapterUnit]:
    """The command line's --ip-adapter NAME --ip-image FILE [--ip-scale S]: one unit per --ip-adapter; with one
    adapter every --ip-image is its picture, with several the images and scales go to them in order."""
    if not names:
        if images:
            raise ValueError("--ip-image needs --ip-adapter NAME")
        return []
    if not images:
        raise ValueError("--ip-adapter needs a picture: --ip-image FILE")
    if len(names) == 1:
        groups = [list(images)]
    elif len(images) == len(names):
        groups = [[image] for image in images]
    else:
        raise ValueError(f"{len(names)} --ip-adapter flags need one --ip-image each, got {len(images)}")
    if len(scales) > len(names):
        raise ValueError(f"more --ip-scale values ({len(scales)}) than --ip-adapter flags ({len(names)})")
    return [IPAdapterUnit(name, group, scales[k] if k < len(scales) else (scales[-1] if scales else 1.0))
            for k, (name, group) in enumerate(zip(names, groups, strict=True))]
