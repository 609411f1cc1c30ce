"""The upscaler menu and its model files: A1111's built-in names, the files in upscalers/ (resolved inside the
folder only), their weights read safely (safetensors, or pickles through torch.load(weights_only=True)) and
loaded with spandrel, which tells the architecture from the weights; the last model loaded is kept."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.files.names import UnsafeNameError, safe_child

# A1111's pixel upscalers, in its menu order: the image as it is, and two PIL resizes
NONE, LANCZOS, NEAREST = "None", "Lanczos", "Nearest"
BUILT_IN = (NONE, LANCZOS, NEAREST)
# model file types, best first: when two files share a name, the menu's entry is the first of these
MODEL_EXTS = (".safetensors", ".pth", ".pt")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class UpscalerEntry:
    """One menu choice: a built-in (path None) or a model file."""

    name: str  # what the menu shows and infotexts carry: a built-in's name, or the file's path in upscalers/
    #            without its extension ("4x-UltraSharp", "realesrgan/RealESRGAN_x4plus"), as A1111 names them
    path: Path | None = None

    @property
    def built_in(self) -> bool:
        return self.path is None


@dataclass
class LoadedUpscaler:
    """A model file loaded with spandrel, on the device and dtype it runs in."""

    name: str
    path: Path
    model: object  # spandrel.ImageModelDescriptor
    architecture: str  # spandrel's name for it ("ESRGAN", "SwinIR", "RealESRGAN Compact", ...)
    scale: int  # the model's own factor (1 for restoration models)
    device: torch.device
    dtype: torch.dtype

    @property
    def tiling_supported(self) -> bool:
        """False for models that tile internally (spandrel's ModelTiling.INTERNAL): they get the whole image."""
        from spandrel import ModelTiling

        return self.model.tiling != ModelTiling.INTERNAL


def local_upscalers(folder: Path) -> list[UpscalerEntry]:
    """The model files under `folder`, by name (sorted, case-insensitive); hidden files and links leaving the
    folder are skipped, and of two files with one name the safetensors one is listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: dict[str, Path] = {}
    files = [p for p in folder.rglob("*") if p.suffix.lower() in MODEL_EXTS]
    for path in sorted(files, key=lambda p: (p.with_suffix("").as_posix(), MODEL_EXTS.index(p.suffix.lower()))):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        try:
            safe_child(folder, rel.as_posix())
        except UnsafeNameError:
            continue
        found.setdefault(rel.with_suffix("").as_posix(), path)
    return [UpscalerEntry(name, path) for name, path in sorted(found.items(), key=lambda kv: kv[0].lower())]


def list_upscalers(folder: Path) -> list[UpscalerEntry]:
    """The built-ins (A1111's order), then the model files in `folder`."""
    return [UpscalerEntry(name) for name in BUILT_IN] + local_upscalers(folder)


def upscaler_choices(folder: Path) -> list[str]:
    """The names for an upscaler menu, like A1111's: None, Lanczos, Nearest, then the files, sorted."""
    return [entry.name for entry in list_upscalers(folder)]


def resolve_upscaler(name: str, folder: Path) -> UpscalerEntry:
    """The entry for `name`: a built-in, a file's menu name, or its file name with extension (the entry is then
    named so: "Compact-2x.pth" beside "Compact-2x.safetensors" is reached only that way). Names that would leave
    `folder` ("../x", absolute paths) raise UnsafeNameError; unknown names a ValueError listing the choices."""
    name = (name or "").strip() if isinstance(name, str) else name
    if name in BUILT_IN:
        return UpscalerEntry(name)
    path = safe_child(Path(folder), name)  # refuses "../x", "/x", "C:x" and NUL bytes before any look-up
    for entry in local_upscalers(folder):
        if name == entry.name:
            return entry
    if path.suffix.lower() in MODEL_EXTS and path.is_file() and not any(
            part.startswith(".") for part in path.relative_to(Path(folder).resolve()).parts):
        return UpscalerEntry(name, path)  # a file named with its extension (one a same-named file shadows too)
    choices = ", ".join(upscaler_choices(folder))
    raise ValueError(f"no upscaler named {name!r}; the choices are {choices} (model files go in "
                     f"{Path(folder).name}/: {', '.join(MODEL_EXTS)})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file on the CPU, unwrapped the way spandrel expects ("params_ema", "module."):
    safetensors, or a pickle through torch.load(weights_only=True), so a file that would run code is refused."""
    from spandrel import canonicalize_state_dict

    from studio.files.networks import read_tensor_file

    path = Path(path)
    try:
        state, _ = read_tensor_file(path)  # the project's checked reader: safetensors, or weights_only pickles
    except ValueError as e:
        if "TorchScript" in str(e):
            raise ValueError(f"{path.name} is a TorchScript program, which is not read (it can carry code); "
                             "use the model's .pth or .safetensors weights") from None
        raise
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds a {type(state).__name__}, not a state dict of weights")
    state = canonicalize_state_dict(state)
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name} is not a state dict of weights (it holds other Python values)")
    return state


def supported_architectures() -> list[str]:
    """The architectures spandrel tells from a state dict (the upscalers it can load)."""
    from spandrel import MAIN_REGISTRY

    return [support.architecture.name for support in MAIN_REGISTRY.architectures()]


def describe_state_dict(state: dict[str, torch.Tensor], file_name: str):
    """The spandrel ImageModelDescriptor for an upscaler's weights (CPU, fp32, eval); ValueError naming the file
    when spandrel knows no such architecture or the model is not an RGB image upscaler."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    try:
        model = ModelLoader(device="cpu").load_from_state_dict(state)
    except UnsupportedModelError:
        raise ValueError(f"{file_name} is not an upscaler model spandrel recognises (not an upscaler, or an "
                         f"architecture it does not know); it reads {', '.join(supported_architectures())}") from None
    except Exception as e:  # a detected architecture whose weights do not fit it (damaged or edited file)
        raise ValueError(f"{file_name} looks like an upscaler but its weights do not fit the architecture "
                         f"spandrel detected ({type(e).__name__}: {str(e)[:200]})") from None
    arch = model.architecture.name
    if not isinstance(model, ImageModelDescriptor):
        raise ValueError(f"{file_name} is a {arch} model for {model.purpose.lower()}, not an upscaler")
    if model.purpose == "FaceSR":
        raise ValueError(f"{file_name} is a {arch} face restoration model, not an upscaler")
    if (model.input_channels, model.output_channels) != (3, 3):
        raise ValueError(f"{file_name} is a {arch} model for {model.input_channels}-channel images in and "
                         f"{model.output_channels} out; only RGB (3-channel) upscalers are supported")
    return model.eval()


def pick_dtype(model, device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype an upscaler runs in: "auto" is fp16 on CUDA and MPS when the model supports it, else fp32 (not
    bf16: spandrel's SwinIR, marked bf16-capable, mixes dtypes in its attention mask and fails); an explicit
    precision the model or device cannot do is a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    arch = model.architecture.name
    if precision == "auto":
        return torch.float16 if device.type in ("cuda", "mps") and model.supports_half else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU; use fp32 or bf16")
    if precision == "fp16" and not model.supports_half:
        raise ValueError(f"{arch} models do not run in fp16 (spandrel marks them unsupported); use fp32")
    if precision == "bf16" and not model.supports_bfloat16:
        raise ValueError(f"{arch} models do not run in bf16 (spandrel marks them unsupported); use fp32")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


_cache: dict[tuple, LoadedUpscaler] = {}
_cache_lock = threading.Lock()


def load_upscaler(entry: UpscalerEntry, device: str | torch.device = "cpu",
                  precision: str = "auto") -> LoadedUpscaler:
    """The model of `entry` on `device`, loaded once: the last one is kept, keyed by the file's path, mtime and
    size and the device and dtype, so repeated upscales (a batch, hires fix) do not read the file again."""
    if entry.built_in:
        raise ValueError(f"{entry.name} is a built-in resize, not a model file")
    device = torch.device(device)
    path = Path(entry.path).resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise ValueError(f"upscaler {entry.name!r}: cannot read {path.name} ({e.strerror or e})") from e
    with _cache_lock:
        file_key = (str(path), stat.st_mtime_ns, stat.st_size, str(device))
        for key, loaded in _cache.items():
            if key[:-1] == file_key and loaded.dtype == pick_dtype(loaded.model, device, precision):
                return loaded
        _cache.clear()  # one model at a time: the old one goes before the new one is read
        model = describe_state_dict(read_state_dict(path), path.name)
        dtype = pick_dtype(model, device, precision)
        model = model.to(device=device, dtype=dtype)
        loaded = LoadedUpscaler(entry.name, path, model, model.architecture.name, int(model.scale), device, dtype)
        _cache[(*file_key, dtype)] = loaded
        return loaded


def clear_upscaler_cache() -> None:
    """Drop the kept upscaler model (frees its memory before a large model loads)."""
    with _cache_lock:
        devices = {loaded.device.type for loaded in _cache.values()}
        _cache.clear()
    if "cuda" in devices and torch.cuda.is_available():
        torch.cuda.empty_cache()
