"""ControlNets: find them (controlnet/, a diffusers folder, a single file, a hub id, or the built-in `micro-canny`),
tell their family (SD 1.x / 2.x or SDXL) and load them offline onto the model's device. The denoise loop takes them
as a `Control`."""

from __future__ import annotations

import inspect
import json
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from studio.config import ROOT
from studio.files.names import safe_child
from studio.models import speed
from studio.models.builtin import MICRO_CONTROLNET_NAME, micro_controlnet_available, micro_controlnet_dir
from studio.models.checkpoints import ModelLoadError, load_pickle_checkpoint
from studio.models.hub import offline, offline_reason
from studio.models.manager import HUB_ID

# the default for SD 1.x models (a hub id: downloaded once while online); the micro model's is MICRO_CONTROLNET_NAME
DEFAULT_CONTROLNET = "lllyasviel/control_v11p_sd15_canny"
# the default for SDXL models
DEFAULT_SDXL_CONTROLNET = "diffusers/controlnet-canny-sdxl-1.0"


WEIGHT_EXTS = (".safetensors", ".pth", ".ckpt", ".bin", ".pt")


# what a ControlNet file we write carries in its safetensors metadata: its diffusers config
CONFIG_METADATA_KEY = "studio.controlnet_config"


ASSETS_DIR = ROOT / "assets"  # StudioConfig.assets_dir's default


ASSETS = ASSETS_DIR / "configs"


# cross-attention width -> the shipped UNet config a ControlNet of that family copies its shape from
FAMILY_BY_WIDTH = {768: "sd1", 1024: "sd2-base", 2048: "sdxl"}


# a key only SDXL ControlNets have (their size-and-pooled-text embedding); files in the original layout are SD 1.x / 2.x
XL_KEY = "add_embedding.linear_1.weight"


@dataclass(frozen=True)
class ControlNetEntry:
    name: str  # path relative to controlnet/ (posix), or a built-in's name: what the dropdown shows
    path: Path
    kind: str  # "diffusers", "single-file" or "micro" (built in, a diffusers folder in assets/)

    @property
    def built_in(self) -> bool:
        return self.kind == "micro"


def built_in_controlnets(assets_dir: Path | None = None) -> list[ControlNetEntry]:
    """The ControlNets that ship with the studio: micro-canny (when its folder is in assets/)."""
    assets_dir = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
    if not micro_controlnet_available(assets_dir):
        return []
    return [ControlNetEntry(MICRO_CONTROLNET_NAME, micro_controlnet_dir(assets_dir), "micro")]


def list_controlnets(folder: Path, assets_dir: Path | None = None) -> list[ControlNetEntry]:
    """The ControlNets in `folder` (see local_controlnets), then the built-in ones."""
    return local_controlnets(folder) + built_in_controlnets(assets_dir)


def local_controlnets(folder: Path) -> list[ControlNetEntry]:
    """Diffusers folders (config.json + weights) and single weight files under `folder`, as loras/ is scanned."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries: list[ControlNetEntry] = []
    dirs: set[Path] = set()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or any(p in dirs for p in path.parents):
            continue
        if path.is_dir() and (path / "config.json").is_file():
            dirs.add(path)
            entries.append(ControlNetEntry(rel.as_posix(), path, "diffusers"))
        elif path.is_file() and path.suffix.lower() in WEIGHT_EXTS:
            entries.append(ControlNetEntry(rel.as_posix(), path, "single-file"))
    return entries


def controlnet_choices(folder: Path, assets_dir: Path | None = None, model=None) -> list[str]:
    """What a ControlNet picker offers: the local ones, the built-in ones, then the default hub id for `model`'s
    family (SDXL's for an SDXL model, else SD 1.5's)."""
    return list(dict.fromkeys([e.name for e in list_controlnets(folder, assets_dir)] + [hub_default(model)]))


def hub_default(model=None) -> str:
    """The canny ControlNet hub id for the loaded model's family (SD 1.5's when no model is loaded)."""
    return DEFAULT_SDXL_CONTROLNET if getattr(model, "is_xl", False) else DEFAULT_CONTROLNET


def default_controlnet(model=None, assets_dir: Path | None = None) -> str:
    """The ControlNet a new storyboard starts with: micro-canny when the loaded model is of its family (the micro
    model; its 128-wide text encoder fits no SD ControlNet), else the canny hub id of the model's family."""
    for entry in built_in_controlnets(assets_dir):
        if model is not None and _text_width(model) == _config_width(entry.path):
            return entry.name
    return hub_default(model)


def _text_width(model) -> int | None:
    try:
        return int(model.pipe.unet.config.cross_attention_dim)
    except (AttributeError, TypeError, ValueError):
        return None


def _config_width(folder: Path) -> int | None:
    try:
        return int(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))["cross_attention_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _local_and_built_in(folder: Path, assets_dir: Path | None) -> str:
    """'a, b' of the ControlNets in `folder` (or 'none'), plus the built-in ones: for messages."""
    text = ", ".join(e.name for e in local_controlnets(folder)) or "none"
    built_in = [e.name for e in built_in_controlnets(assets_dir)]
    return text + (f"; built in: {', '.join(built_in)} (for the micro model)" if built_in else "")




def resolve_controlnet(spec: str, folder: Path, allow_paths: bool = False,
                       assets_dir: Path | None = None) -> tuple[str, Path | None]:
    """(kind, path) for a ControlNet spec: micro-canny (built in, from `assets_dir`), a name in `folder` (never
    outside it), a hub id, or, with `allow_paths` (the command line), a folder or file anywhere."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError(f"no ControlNet given; local ones: {_local_and_built_in(folder, assets_dir)}, or "
                         f"{DEFAULT_CONTROLNET} (SD 1.x) or {DEFAULT_SDXL_CONTROLNET} (SDXL)")
    for entry in built_in_controlnets(assets_dir):
        if spec == entry.name:
            return entry.kind, entry.path
    candidates = []
    if allow_paths and (Path(spec).is_absolute() or Path(spec).expanduser().exists()):
        candidates.append(Path(spec).expanduser())
    if not Path(spec).is_absolute() or not allow_paths:
        local = local_controlnets(folder)
        by_name = {e.name: e.path for e in local}
        by_stem = {Path(e.name).with_suffix("").as_posix(): e.path for e in local if e.kind == "single-file"}
        if spec in by_name or spec in by_stem:
            candidates.insert(0, by_name.get(spec) or by_stem[spec])
        else:
            path = safe_child(folder, spec)  # refuses ../ and absolute names (UnsafeNameError)
            if path.exists():
                candidates.append(path)
    for path in candidates:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"ControlNet {spec}: the folder has no config.json, so it is not a diffusers "
                                     "ControlNet")
            return "diffusers", path
        if path.is_file():
            if path.suffix.lower() not in WEIGHT_EXTS:
                raise ModelLoadError(f"ControlNet {spec}: unsupported file type {path.suffix!r}; use .safetensors")
            return "single-file", path
    if HUB_ID.match(spec) and not spec.endswith(WEIGHT_EXTS):
        return "hub", None
    raise ModelLoadError(f"ControlNet {spec!r} not found. Local ControlNets in {folder}: "
                         f"{_local_and_built_in(folder, assets_dir)}; or a hub id such as {DEFAULT_CONTROLNET} "
                         f"(SD 1.x) or {DEFAULT_SDXL_CONTROLNET} (SDXL)")


def controlnet_config_for(unet_config: dict) -> dict:
    """A ControlNet config with the shape of a UNet config (what ControlNetModel.from_unet copies), for weight files
    that carry no config of their own."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet_config.items() if k in accepted}
    return {"_class_name": "ControlNetModel", **config}


def _read_weights(path: Path) -> tuple[dict, dict[str, str]]:
    """State dict and safetensors metadata of a weight file; pickles only as tensors (weights_only)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:
            raise ModelLoadError(f"ControlNet {path.name} is not a valid safetensors file ({e})") from e
    return load_pickle_checkpoint(path), {}


def _cross_attention_width(state: dict) -> int | None:
    for key, tensor in state.items():
        if key.endswith("attn2.to_k.weight") and tensor.ndim == 2:
            return int(tensor.shape[1])
    return None


def _transformer_depths(state: dict, config: dict) -> list:
    """`config`'s transformer_layers_per_block with each attention down block's depth counted in the (diffusers
    layout) weights: SDXL ControlNets come full, "mid" and "small", which differ only in these depths."""
    depths = config["transformer_layers_per_block"]
    depths = list(depths) if isinstance(depths, (list, tuple)) else [depths] * len(config["down_block_types"])
    for i in range(len(depths)):
        prefix = f"down_blocks.{i}.attentions.0."
        if any(k.startswith(prefix) for k in state):  # an attention block: count its transformer blocks
            blocks = prefix + "transformer_blocks."
            depths[i] = len({k[len(blocks):].split(".")[0] for k in state if k.startswith(blocks)})
    return depths


def is_xl_config(config) -> bool:
    """Whether a UNet or ControlNet config is SDXL's: its size-and-pooled-text ("text_time") added embedding."""
    return dict(config).get("addition_embed_type") == "text_time"


@dataclass
class LoadedControlNet:
    spec: str
    name: str  # what the infotext calls it (file stem, folder name or hub id)
    model: object  # diffusers ControlNetModel
    hash: str = ""  # short content hash, as A1111's ControlNet extension writes it


def _stamp(path: Path | None) -> tuple:
    """What changes when a ControlNet's weights change: size and mtime of the file, or of every file in the folder
    (overwriting a weights file inside a folder leaves the folder's own mtime as it was)."""
    if path is None:
        return ()
    if path.is_file():
        stat = path.stat()
        return ((path.name, stat.st_size, stat.st_mtime_ns),)
    out = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            stat = f.stat()
            out.append((f.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(out)


class ControlNetLoader:
    """Loads ControlNets and keeps the last `keep` of them (a storyboard uses one for all its shots; a generation
    with a pose and a depth ControlNet uses two at every step)."""

    def __init__(self, folder: Path, cache_dir: Path | None = None, assets_dir: Path | None = None, keep: int = 1):
        self.folder = Path(folder)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.assets_dir = Path(assets_dir) if assets_dir is not None else ASSETS_DIR
        self.keep = max(1, keep)
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple, LoadedControlNet] = OrderedDict()

    @property
    def hash_cache(self) -> Path | None:
        """The file the content hashes are cached in by (path, size, mtime): the model hashes' hashes.json."""
        return self.cache_dir / "hashes.json" if self.cache_dir else None

    def load(self, spec: str, device, dtype, cross_attention_dim: int, allow_paths: bool = False,
             compile_as: tuple[str, str] | None = None, xl: bool | None = None) -> LoadedControlNet:
        """`compile_as`: (mode, backend) of the UNet it will feed (speed.compiled_as), to compile the ControlNet the
        same way: the UNet alone compiled leaves half of each step's work eager (docs/benchmarks.md). `xl`: whether
        the model is SDXL; a ControlNet of the other family is refused (None: only the text width is checked)."""
        kind, path = resolve_controlnet(spec, self.folder, allow_paths, self.assets_dir)
        key = (kind, str(path) if path else spec, _stamp(path), str(device), str(dtype), compile_as)
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                loaded = self._kept[key]
            else:
                while len(self._kept) >= self.keep:  # free the oldest before loading the next
                    self._kept.popitem(last=False)
                loaded = self._open(spec, kind, path, dtype)
                loaded.model.to(device=device)
                loaded.model.eval()
                loaded.model.requires_grad_(False)
                if compile_as is not None:
                    speed.compile_unet(loaded.model, *compile_as)
                self._kept[key] = loaded
        width = loaded.model.config.cross_attention_dim
        if xl is not None and is_xl_config(loaded.model.config) != xl:
            fitting = DEFAULT_SDXL_CONTROLNET if xl else DEFAULT_CONTROLNET if cross_attention_dim == 768 else None
            raise ModelLoadError(
                f"ControlNet {loaded.name} is a ControlNet for {_family_name(width, not xl)} (text width {width}), "
                f"but the loaded model is {_family_name(cross_attention_dim, xl)} (text width {cross_attention_dim}); "
                "a ControlNet steers only models of its own family: pick one made for the model"
                + (f", such as {fitting}" if fitting else "") + self._fitting_hint(cross_attention_dim))
        if width != cross_attention_dim:
            raise ModelLoadError(
                f"ControlNet {loaded.name} is made for a model with text width {width} "
                f"({_family_name(width)}), but the loaded model has {cross_attention_dim} "
                f"({_family_name(cross_attention_dim)}); pick a ControlNet of the model's family"
                + self._fitting_hint(cross_attention_dim))
        return loaded

    def _fitting_hint(self, width: int) -> str:
        fits = [e.name for e in built_in_controlnets(self.assets_dir) if _config_width(e.path) == width]
        return f" ({', '.join(fits)} fits it)" if fits else ""

    def _open(self, spec: str, kind: str, path: Path | None, dtype) -> LoadedControlNet:
        from diffusers import ControlNetModel

        if kind in ("diffusers", "micro"):
            try:
                model = ControlNetModel.from_pretrained(path, local_files_only=True, dtype=dtype)
            except Exception as e:
                raise ModelLoadError(f"could not load the ControlNet folder {spec}: {type(e).__name__}: {e}") from e
            # a built-in one is called by its name (what the picker shows), as the micro model is called "micro"
            name = MICRO_CONTROLNET_NAME if kind == "micro" else path.name
            return LoadedControlNet(spec, name, model, _short_hash_folder(path, self.hash_cache))
        if kind == "single-file":
            return LoadedControlNet(spec, path.stem, self._open_file(path, dtype),
                                    _short_hash_file(path, self.hash_cache))
        try:
            model = ControlNetModel.from_pretrained(spec, local_files_only=True, dtype=dtype)
        except Exception as cached_error:
            if offline():
                raise ModelLoadError(self._offline_message(spec)) from cached_error
            try:  # the user asked for a hub id while online: download it into the Hugging Face cache
                model = ControlNetModel.from_pretrained(spec, dtype=dtype)
            except Exception as e:
                raise ModelLoadError(f"could not download ControlNet {spec} (no network, or not a ControlNet repo?): "
                                     f"{type(e).__name__}: {e}. " + self._offline_message(spec, downloading=False)
                                     ) from e
        return LoadedControlNet(spec, spec.split("/")[-1], model, "")

    def _offline_message(self, spec: str, downloading: bool = True) -> str:
        head = (f"ControlNet {spec} is not in the Hugging Face cache and {offline_reason()}, "
                "so it cannot be downloaded. " if downloading else "")
        return (head + f"Local ControlNets in {self.folder}: {_local_and_built_in(self.folder, self.assets_dir)}. "
                "Put a diffusers folder "
                f"(config.json + weights) or a .safetensors file there, or download {spec} once while online.")

    def _open_file(self, path: Path, dtype):
        from diffusers import ControlNetModel

        state, meta = _read_weights(path)
        # SDXL's "small" ControlNet has no cross-attention at all: its added embedding tells the family
        width = _cross_attention_width(state) or (2048 if XL_KEY in state else None)
        with tempfile.TemporaryDirectory(prefix="studio-controlnet-") as tmp:
            if CONFIG_METADATA_KEY in meta:
                config = json.loads(meta[CONFIG_METADATA_KEY])
            elif width in FAMILY_BY_WIDTH:
                unet_config = json.loads((ASSETS / FAMILY_BY_WIDTH[width] / "unet" / "config.json").read_text())
                config = controlnet_config_for(unet_config)
                if is_xl_config(config):
                    config["transformer_layers_per_block"] = _transformer_depths(state, config)
            else:
                raise ModelLoadError(
                    f"ControlNet {path.name}: cannot tell its model family (text width {width}); the studio knows "
                    "SD 1.x (768), SD 2.x (1024) and SDXL (2048) ControlNets, or files that carry their config")
            Path(tmp, "config.json").write_text(json.dumps(config), encoding="utf-8")
            from diffusers.utils import logging as diffusers_logging

            level = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # its fp32-modules notice about its own cast is noise here
            try:
                # diffusers converts the original (control_model.*) layout and takes the diffusers layout as it is
                return ControlNetModel.from_single_file(state, config=tmp, local_files_only=True, dtype=dtype)
            except Exception as e:
                raise ModelLoadError(f"could not load ControlNet {path.name}: {type(e).__name__}: {e}") from e
            finally:
                diffusers_logging.set_verbosity(level)


def _family_name(width: int, xl: bool | None = None) -> str:
    """How messages name a family: SDXL when `xl`, else by text width; with `xl` False, a width of no released
    family (a tiny test model's) is SD 1.x / 2.x."""
    if xl or (xl is None and width == 2048):
        return "SDXL"
    known = {768: "SD 1.x", 1024: "SD 2.x", 128: "the micro model"}
    return known.get(width, "SD 1.x / 2.x" if xl is False else f"width {width}")


def _short_hash_file(path: Path, cache_file: Path | None = None) -> str:
    from studio.files.hashes import sha256_file

    return sha256_file(path, cache_file)[:8]


def _short_hash_folder(path: Path, cache_file: Path | None = None) -> str:
    from studio.files.hashes import sha256_folder

    return sha256_folder(path, cache_file)[:8]


def save_controlnet_file(model, path: Path) -> Path:
    """A ControlNet as one diffusers-layout .safetensors file that carries its config (loads offline here)."""
    from safetensors.torch import save_file

    from studio.files.atomic import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    return Path(path)


@dataclass
class ControlSettings:
    """How strongly and when the ControlNet steers (A1111's Weight, Guidance Start, Guidance End)."""

    scale: float = 1.0
    start: float = 0.0  # fraction of the steps before the ControlNet starts
    end: float = 1.0  # fraction of the steps after which it stops

    def validate(self) -> None:
        for name, value, lo, hi in (("conditioning scale", self.scale, 0.0, 2.0), ("guidance start", self.start, 0, 1),
                                    ("guidance end", self.end, 0, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"ControlNet {name} must be between {lo:g} and {hi:g}, got {value!r}")
        if self.start >= self.end:
            raise ValueError(f"ControlNet guidance start must be before its end, got {self.start} >= {self.end}")
