"""ControlNet preprocessors by their A1111 ControlNet-extension names (canny, openpose_full, depth_midas, ...): what
each makes, its parameters with defaults and ranges, the weight files it needs, and a `run` that turns a picture into
its control map at the picture's size. The detectors are controlnet_aux's; A1111's plain image operations (xdog,
invert, binary, colour grid, tile resample) are cv2 calls here. Weight files are read from a local folder first, then
the Hugging Face cache, and downloaded only when the hub can be reached."""

from __future__ import annotations

import pickle
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from studio.files.pickles import risky_globals, unpickling_refusal
from studio.models.checkpoints import ModelLoadError
from studio.models.hub import offline, offline_reason

ANNOTATORS_REPO = "lllyasviel/Annotators"  # where controlnet_aux (and A1111's extension) load annotator weights from
DEPTH_ANYTHING_REPO = "LiheYoung/depth-anything-large-hf"  # Depth Anything ViT-L, A1111's depth_anything, for transformers


class MissingWeights(ModelLoadError):
    """A preprocessor's weight files are neither local nor cached and cannot be downloaded; the message says which
    files, where they go and the command that fetches them."""


@dataclass(frozen=True)
class Param:
    """One numeric parameter of a preprocessor, as A1111's sliders show it."""

    name: str  # the key run() and check_params() take
    label: str  # what a slider says
    default: float
    minimum: float
    maximum: float
    step: float = 1
    integer: bool = True


@dataclass(frozen=True)
class WeightFile:
    """A weight file a detector loads: a file of a hub repo, or of a folder under annotators_dir (`folder`)."""

    repo: str
    filename: str
    folder: str = ""  # its sub-folder under annotators_dir (models loaded as a folder); "" = annotators_dir itself

    def local_path(self, annotators_dir: Path) -> Path:
        return Path(annotators_dir) / self.folder / self.filename


@dataclass(frozen=True)
class Preprocessor:
    """One entry of the registry; `run` makes its map."""

    name: str  # A1111's module name ("openpose_full")
    label: str  # what a menu shows
    control_type: str  # the ControlNet it feeds: canny, openpose, depth, lineart, softedge, scribble, mlsd, ...
    params: tuple[Param, ...]
    fn: Callable  # (rgb uint8 HxWx3, params dict, detector or None) -> map as uint8 array, any size
    weights: tuple[WeightFile, ...] = ()
    loader: Callable | None = None  # ({filename: Path}, device) -> detector; entries sharing one share a cache slot
    binary: bool = False  # a black and white map (edges, lines): shrunk so that no thin line vanishes

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights)

    def run(self, image: Image.Image, *, annotators_dir: Path | None = None, device: str = "cpu",
            **params) -> Image.Image:
        """The RGB control map of `image` at its size; `params` are checked and completed with the defaults."""
        values = check_params(self.name, params)
        rgb = np.asarray(image.convert("RGB"))
        detector = _detector(self, annotators_dir, device) if self.loader is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # controlnet_aux's deprecation and timm notices are not the user's
            out = self.fn(rgb, values, detector)
        return Image.fromarray(_fit(np.asarray(out), rgb.shape[1], rgb.shape[0], self.binary))


def _hwc3(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    if x.ndim == 2:
        x = x[:, :, None]
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[:, :, :3]


def _fit(out: np.ndarray, width: int, height: int, binary: bool) -> np.ndarray:
    """A map resized to (width, height), RGB. A shrunk binary map keeps every pixel any line touched."""
    import cv2

    out = _hwc3(out)
    h, w = out.shape[:2]
    if (w, h) == (width, height):
        return out
    shrink = width * height < w * h
    if binary and shrink:
        return np.where(cv2.resize(out, (width, height), interpolation=cv2.INTER_AREA) > 0, 255, 0).astype(np.uint8)
    interp = cv2.INTER_NEAREST if binary else cv2.INTER_AREA if shrink else cv2.INTER_CUBIC
    return _hwc3(cv2.resize(out, (width, height), interpolation=interp))


def _at_resolution(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """The picture with its short side at `resolution` (sides rounded to 64, as controlnet_aux and A1111 detect)."""
    from controlnet_aux.util import resize_image

    return resize_image(rgb, int(resolution))


# --- weight-free maps: controlnet_aux's detectors that load nothing, and A1111's plain image operations ---


def _canny(rgb, p, _):
    from controlnet_aux.canny import CannyDetector

    res = int(p["resolution"])
    return CannyDetector()(rgb, low_threshold=int(p["low"]), high_threshold=int(p["high"]), detect_resolution=res,
                           image_resolution=res, output_type="np")


def _lineart_standard(rgb, p, _):
    from controlnet_aux.lineart_standard import LineartStandardDetector

    return LineartStandardDetector()(rgb, detect_resolution=int(p["resolution"]), output_type="np")


def _xdog(rgb, p, _):
    """A1111's scribble_xdog: difference of two Gaussians, thresholded."""
    import cv2

    x = _at_resolution(rgb, p["resolution"]).astype(np.float32)
    g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    return np.where(2 * (255 - dog.astype(np.int32)) > p["threshold"], 255, 0).astype(np.uint8)


def _binary(rgb, p, _):
    """A1111's threshold (binary): dark strokes white on black; threshold 0 (or 255) picks it with Otsu's method."""
    import cv2

    gray = cv2.cvtColor(_at_resolution(rgb, p["resolution"]), cv2.COLOR_RGB2GRAY)
    t = int(p["threshold"])
    if t in (0, 255):
        return cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)[1]
    return cv2.threshold(gray, t, 255, cv2.THRESH_BINARY_INV)[1]


def _color_grid(rgb, p, _):
    """A1111's t2ia_color_grid: the picture's colours in 64-pixel cells."""
    import cv2

    x = _at_resolution(rgb, p["resolution"])
    h, w = x.shape[:2]
    small = cv2.resize(x, (max(1, w // 64), max(1, h // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


_shuffle_lock = threading.Lock()


def _shuffle(rgb, p, _):
    """controlnet_aux's content shuffle (random flow fields from numpy's global generator), seeded and with the
    generator's state put back, so the same seed gives the same map and nothing else's randomness changes."""
    from controlnet_aux.shuffle import ContentShuffleDetector

    res = int(p["resolution"])
    with _shuffle_lock:
        state = np.random.get_state()
        try:
            np.random.seed(int(p["seed"]))
            return ContentShuffleDetector()(rgb, detect_resolution=res, image_resolution=res, output_type="np")
        finally:
            np.random.set_state(state)


def _tile_resample(rgb, p, _):
    """A1111's tile_resample: the picture shrunk by the rate (then brought back to its size by run)."""
    import cv2

    rate = float(p["rate"])
    if rate < 1.1:  # as A1111: rates below 1.1 leave the picture as it is
        return rgb
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=cv2.INTER_AREA)


def _invert(rgb, p, _):
    return 255 - rgb


def _none(rgb, p, _):
    return rgb


# --- weight-needing detectors (controlnet_aux's from_pretrained, and transformers for Depth Anything) ---


def _from_files(cls_path: str, **names: str) -> Callable:
    """A loader calling controlnet_aux's `Class.from_pretrained(folder, filename=..., ...)`. Each name is passed as
    an absolute path: from_pretrained joins it to the folder, which keeps it as it is, so every file may come from
    wherever it was found (annotators_dir or the hub cache) and from_pretrained never reaches the hub itself."""

    def load(paths: dict[str, Path], device: str):
        import importlib

        module, cls = cls_path.rsplit(".", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detector_cls = getattr(importlib.import_module(module), cls)
        first = next(iter(paths.values()))
        kwargs = {arg: str(paths[filename]) for arg, filename in names.items()}
        detector = detector_cls.from_pretrained(str(first.parent), **kwargs)
        return detector.to(device)

    load.key = cls_path
    return load


def _load_depth_anything(paths: dict[str, Path], device: str):
    from transformers import pipeline

    folder = paths["config.json"].parent
    if any(path.parent != folder for path in paths.values()):
        raise ModelLoadError(f"depth_anything: config.json, model.safetensors and preprocessor_config.json must lie "
                             f"in one folder; found {', '.join(str(p) for p in paths.values())}")
    return pipeline("depth-estimation", model=str(folder), device=device)


_load_depth_anything.key = "depth_anything"


def _aux_call(**fixed) -> Callable:
    """A map from a controlnet_aux detector called at the chosen resolution with `fixed` keyword arguments."""

    def fn(rgb, p, detector):
        res = int(p["resolution"])
        return detector(rgb, detect_resolution=res, image_resolution=res, output_type="np", **fixed)

    return fn


def _mlsd(rgb, p, detector):
    res = int(p["resolution"])
    return detector(rgb, thr_v=float(p["value_threshold"]), thr_d=float(p["distance_threshold"]),
                    detect_resolution=res, image_resolution=res, output_type="np")


def _normal_midas(rgb, p, detector):
    res = int(p["resolution"])
    _, normal = detector(rgb, bg_th=float(p["background_threshold"]), depth_and_normal=True, detect_resolution=res,
                         image_resolution=res, output_type="np")
    return normal


def _leres(boost: bool) -> Callable:
    def fn(rgb, p, detector):
        res = int(p["resolution"])
        return detector(rgb, thr_a=float(p["remove_near"]), thr_b=float(p["remove_background"]), boost=boost,
                        detect_resolution=res, image_resolution=res, output_type="np")

    return fn


def _depth_anything(rgb, p, pipe):
    """Depth Anything's relative depth (near is bright), stretched to 0-255 as A1111 shows it."""
    depth = pipe(Image.fromarray(_at_resolution(rgb, p["resolution"])))["predicted_depth"]
    d = depth.squeeze().float().cpu().numpy()
    d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
    return (d * 255.0).round().astype(np.uint8)


# --- the registry ---


def _resolution(default: int = 512) -> Param:
    return Param("resolution", "Preprocessor resolution", default, 64, 2048, 8)


def _annotators(*filenames: str) -> tuple[WeightFile, ...]:
    return tuple(WeightFile(ANNOTATORS_REPO, f) for f in filenames)


_OPENPOSE_FILES = _annotators("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_OPENPOSE = _from_files("controlnet_aux.open_pose.OpenposeDetector", filename="body_pose_model.pth",
                        hand_filename="hand_pose_model.pth", face_filename="facenet.pth")
_MIDAS_FILES = _annotators("dpt_hybrid-midas-501f0c75.pt")
_MIDAS = _from_files("controlnet_aux.midas.MidasDetector", filename="dpt_hybrid-midas-501f0c75.pt")
_HED_FILES = _annotators("ControlNetHED.pth")
_HED = _from_files("controlnet_aux.hed.HEDdetector", filename="ControlNetHED.pth")
_PIDI_FILES = _annotators("table5_pidinet.pth")
_PIDI = _from_files("controlnet_aux.pidi.PidiNetDetector", filename="table5_pidinet.pth")
_LINEART_FILES = _annotators("sk_model.pth", "sk_model2.pth")
_LINEART = _from_files("controlnet_aux.lineart.LineartDetector", filename="sk_model.pth",
                       coarse_filename="sk_model2.pth")
_LERES_FILES = _annotators("res101.pth", "latest_net_G.pth")
_LERES = _from_files("controlnet_aux.leres.LeresDetector", filename="res101.pth", pix2pix_filename="latest_net_G.pth")
_LERES_PARAMS = (_resolution(), Param("remove_near", "Remove near %", 0, 0, 100, 0.1, False),
                 Param("remove_background", "Remove background %", 0, 0, 100, 0.1, False))
_DEPTH_ANYTHING_FILES = tuple(WeightFile(DEPTH_ANYTHING_REPO, f, "depth-anything-large-hf")
                              for f in ("config.json", "model.safetensors", "preprocessor_config.json"))


def _canny_order(values: dict) -> None:
    if values["low"] > values["high"]:
        raise ValueError(f"canny low threshold must not be above the high threshold, got {values['low']:g} > "
                         f"{values['high']:g}")


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "None (the picture as it is)", "any", (), _none),
    Preprocessor("canny", "Canny edges", "canny",
                 (_resolution(), Param("low", "Canny low threshold", 100, 1, 255),
                  Param("high", "Canny high threshold", 200, 1, 255)), _canny, binary=True),
    Preprocessor("invert", "Invert (white background, black lines)", "lineart", (), _invert),
    Preprocessor("threshold", "Binary (threshold; 0 = automatic)", "scribble",
                 (_resolution(), Param("threshold", "Binary threshold", 0, 0, 255)), _binary, binary=True),
    Preprocessor("lineart_standard", "Lineart standard (white background, black lines)", "lineart",
                 (_resolution(),), _lineart_standard),
    Preprocessor("scribble_xdog", "Scribble XDoG", "scribble",
                 (_resolution(), Param("threshold", "XDoG threshold", 32, 1, 64)), _xdog, binary=True),
    Preprocessor("shuffle", "Content shuffle", "shuffle",
                 (_resolution(), Param("seed", "Shuffle seed", 0, 0, 2**32 - 1)), _shuffle),
    Preprocessor("tile_resample", "Tile resample (downsample)", "tile",
                 (Param("rate", "Down sampling rate", 1.0, 1.0, 8.0, 0.01, False),), _tile_resample),
    Preprocessor("t2ia_color_grid", "Colour grid (T2I-Adapter color)", "color", (_resolution(),), _color_grid),
    Preprocessor("openpose", "OpenPose (body)", "openpose", (_resolution(),),
                 _aux_call(include_body=True, include_hand=False, include_face=False), _OPENPOSE_FILES, _OPENPOSE),
    Preprocessor("openpose_face", "OpenPose body and face", "openpose", (_resolution(),),
                 _aux_call(include_body=True, include_hand=False, include_face=True), _OPENPOSE_FILES, _OPENPOSE),
    Preprocessor("openpose_faceonly", "OpenPose face only", "openpose", (_resolution(),),
                 _aux_call(include_body=False, include_hand=False, include_face=True), _OPENPOSE_FILES, _OPENPOSE),
    Preprocessor("openpose_hand", "OpenPose body and hands", "openpose", (_resolution(),),
                 _aux_call(include_body=True, include_hand=True, include_face=False), _OPENPOSE_FILES, _OPENPOSE),
    Preprocessor("openpose_full", "OpenPose body, hands and face", "openpose", (_resolution(),),
                 _aux_call(include_body=True, include_hand=True, include_face=True), _OPENPOSE_FILES, _OPENPOSE),
    Preprocessor("depth_midas", "Depth (MiDaS)", "depth", (_resolution(),), _aux_call(), _MIDAS_FILES, _MIDAS),
    Preprocessor("depth_zoe", "Depth (ZoeDepth)", "depth", (_resolution(),), _aux_call(),
                 _annotators("ZoeD_M12_N.pt"), _from_files("controlnet_aux.zoe.ZoeDetector", filename="ZoeD_M12_N.pt")),
    Preprocessor("depth_leres", "Depth (LeReS)", "depth", _LERES_PARAMS, _leres(False), _LERES_FILES, _LERES),
    Preprocessor("depth_leres++", "Depth (LeReS++, boosted)", "depth", _LERES_PARAMS, _leres(True), _LERES_FILES,
                 _LERES),
    Preprocessor("depth_anything", "Depth (Depth Anything)", "depth", (_resolution(),), _depth_anything,
                 _DEPTH_ANYTHING_FILES, _load_depth_anything),
    Preprocessor("normal_bae", "Normal map (BAE)", "normalbae", (_resolution(),), _aux_call(),
                 _annotators("scannet.pt"), _from_files("controlnet_aux.normalbae.NormalBaeDetector",
                                                        filename="scannet.pt")),
    Preprocessor("normal_midas", "Normal map (MiDaS)", "normal",
                 (_resolution(), Param("background_threshold", "Normal background threshold", 0.4, 0.0, 1.0, 0.01,
                                       False)), _normal_midas, _MIDAS_FILES, _MIDAS),
    Preprocessor("lineart_realistic", "Lineart realistic", "lineart", (_resolution(),), _aux_call(coarse=False),
                 _LINEART_FILES, _LINEART),
    Preprocessor("lineart_coarse", "Lineart coarse", "lineart", (_resolution(),), _aux_call(coarse=True),
                 _LINEART_FILES, _LINEART),
    Preprocessor("lineart_anime", "Lineart anime", "lineart_anime", (_resolution(),), _aux_call(),
                 _annotators("netG.pth"), _from_files("controlnet_aux.lineart_anime.LineartAnimeDetector",
                                                      filename="netG.pth")),
    Preprocessor("softedge_hed", "Soft edge (HED)", "softedge", (_resolution(),), _aux_call(scribble=False),
                 _HED_FILES, _HED),
    Preprocessor("softedge_hedsafe", "Soft edge (HED, safe)", "softedge", (_resolution(),),
                 _aux_call(scribble=False, safe=True), _HED_FILES, _HED),
    Preprocessor("softedge_pidinet", "Soft edge (PiDiNet)", "softedge", (_resolution(),), _aux_call(scribble=False),
                 _PIDI_FILES, _PIDI),
    Preprocessor("softedge_pidisafe", "Soft edge (PiDiNet, safe)", "softedge", (_resolution(),),
                 _aux_call(scribble=False, safe=True), _PIDI_FILES, _PIDI),
    Preprocessor("scribble_hed", "Scribble (HED)", "scribble", (_resolution(),), _aux_call(scribble=True),
                 _HED_FILES, _HED, binary=True),
    Preprocessor("scribble_pidinet", "Scribble (PiDiNet)", "scribble", (_resolution(),), _aux_call(scribble=True),
                 _PIDI_FILES, _PIDI, binary=True),
    Preprocessor("mlsd", "M-LSD straight lines", "mlsd",
                 (_resolution(), Param("value_threshold", "MLSD value threshold", 0.1, 0.01, 2.0, 0.01, False),
                  Param("distance_threshold", "MLSD distance threshold", 0.1, 0.01, 20.0, 0.01, False)),
                 _mlsd, _annotators("mlsd_large_512_fp32.pth"),
                 _from_files("controlnet_aux.mlsd.MLSDdetector", filename="mlsd_large_512_fp32.pth"), binary=True),
)}

# cross-parameter rules beyond each parameter's range
_RULES: dict[str, Callable[[dict], None]] = {"canny": _canny_order}


def names() -> list[str]:
    """Every preprocessor's name, in menu order."""
    return list(PREPROCESSORS)


def offline_names() -> list[str]:
    """The preprocessors that need no weight files (they work offline on any machine)."""
    return [p.name for p in PREPROCESSORS.values() if not p.needs_weights]


def get(name: str) -> Preprocessor:
    """The preprocessor called `name`; an unknown name raises ValueError listing the known ones."""
    try:
        return PREPROCESSORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}") from None


def defaults(name: str) -> dict[str, float]:
    """Each parameter of preprocessor `name` at its default."""
    return {p.name: p.default for p in get(name).params}


def check_params(name: str, params: Mapping | None = None) -> dict[str, float]:
    """`params` for preprocessor `name` checked (known keys, numbers, whole where they must be, within range) and
    completed with the defaults; anything wrong raises ValueError saying what would be right."""
    pre = get(name)
    given = dict(params or {})
    by_name = {p.name: p for p in pre.params}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        known = ", ".join(by_name) or "none"
        raise ValueError(f"{name} has no parameter {', '.join(map(repr, unknown))}; its parameters: {known}")
    values = {}
    for p in pre.params:
        value = given.get(p.name, p.default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{name} {p.name} must be a number, got {value!r}")
        if p.integer and float(value) != int(value):
            raise ValueError(f"{name} {p.name} must be a whole number, got {value!r}")
        if not p.minimum <= value <= p.maximum:
            raise ValueError(f"{name} {p.name} must be between {p.minimum:g} and {p.maximum:g}, got {value:g}")
        values[p.name] = int(value) if p.integer else float(value)
    if name in _RULES:
        _RULES[name](values)
    return values


def parse_param(text: str) -> tuple[str, float]:
    """'low=100' -> ('low', 100.0): a KEY=NUMBER of the command line."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise ValueError(f"a parameter is KEY=NUMBER, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise ValueError(f"parameter {key.strip()} must be a number, got {value.strip()!r}") from None


def default_annotators_dir() -> Path:
    """Where the studio looks for annotator weight files first: <cache_dir>/annotators."""
    from studio.config import StudioConfig

    return StudioConfig.from_env().cache_dir / "annotators"


def fetch_command(files: tuple[WeightFile, ...] | list[WeightFile], annotators_dir: Path) -> str:
    """The one command that downloads `files` into annotators_dir (files of one repo, one folder)."""
    first = files[0]
    target = Path(annotators_dir) / first.folder
    return f"hf download {first.repo} {' '.join(f.filename for f in files)} --local-dir {target}"


def _cached(weight: WeightFile) -> Path | None:
    """The file in the Hugging Face cache, looked up without the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(weight.repo, weight.filename)
    return Path(found) if isinstance(found, str) else None


def weight_paths(name: str, annotators_dir: Path | None = None, download: bool = True) -> dict[str, Path]:
    """{filename: path} of the weight files preprocessor `name` loads: from annotators_dir, else the Hugging Face
    cache, else (with `download` and the hub reachable) downloaded into the cache. A file found nowhere raises
    MissingWeights naming every missing file, where to put it and the command that fetches it."""
    pre = get(name)
    folder = Path(annotators_dir) if annotators_dir is not None else default_annotators_dir()
    paths: dict[str, Path] = {}
    missing: list[WeightFile] = []
    for weight in pre.weights:
        local = weight.local_path(folder)
        found = local if local.is_file() else _cached(weight)
        if found is None:
            missing.append(weight)
        else:
            paths[weight.filename] = found
    if not missing:
        return paths
    listed = ", ".join(f"{w.repo} {w.filename}" for w in missing)
    where = f"put {'it' if len(missing) == 1 else 'them'} in {missing[0].local_path(folder).parent}"
    if not download or offline():
        reason = offline_reason() if download else "downloading was not asked for"
        raise MissingWeights(f"preprocessor {name} needs {listed}, which is neither in {folder} nor in the Hugging "
                             f"Face cache, and {reason}. {where.capitalize()}, or fetch "
                             f"{'it' if len(missing) == 1 else 'them'} while online with: "
                             f"{fetch_command(missing, folder)}")
    from huggingface_hub import hf_hub_download

    for weight in missing:
        try:
            paths[weight.filename] = Path(hf_hub_download(weight.repo, weight.filename))
        except Exception as e:  # the hub's errors (HTTP, disk, a missing file) become one message with the way out
            raise MissingWeights(f"preprocessor {name}: downloading {weight.repo} {weight.filename} failed "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {where}, or "
                                 f"run: {fetch_command(missing, folder)}") from None
    return paths


_detector_lock = threading.Lock()
_last_detector: tuple[tuple, object] | None = None  # (key, detector): one loaded detector at a time


def _detector(pre: Preprocessor, annotators_dir: Path | None, device: str):
    """The loaded detector of `pre`, kept until another is asked for (openpose's variants share one)."""
    global _last_detector
    paths = weight_paths(pre.name, annotators_dir)
    # each file's path, size and mtime: a file replaced in place is loaded anew
    files = tuple(sorted((k, str(v), v.stat().st_size, v.stat().st_mtime_ns) for k, v in paths.items()))
    key = (getattr(pre.loader, "key", pre.name), files, str(device))
    with _detector_lock:
        if _last_detector is not None and _last_detector[0] == key:
            return _last_detector[1]
        _last_detector = None  # free the old one before loading the next
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                detector = pre.loader(paths, device)
        except pickle.UnpicklingError as e:  # controlnet_aux's torch.load runs with torch's weights_only=True
            culprit = next((p for p in paths.values() if risky_globals(p) != []), next(iter(paths.values())))
            raise ModelLoadError(f"preprocessor {pre.name} could not load its weights from {culprit}: "
                                 f"{unpickling_refusal(culprit, e)}; delete it and fetch it again") from None
        except Exception as e:  # a truncated or foreign file: say which and what to do
            files = ", ".join(str(p) for p in paths.values())
            raise ModelLoadError(f"preprocessor {pre.name} could not load its weights from {files} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); delete the "
                                 f"file and fetch it again") from None
        _last_detector = (key, detector)
        return detector


def preview(name: str, image: Image.Image, params: Mapping | None = None, annotators_dir: Path | None = None,
            device: str = "cpu") -> Image.Image:
    """The control map preprocessor `name` makes of `image` with `params` (what the UI shows beside the picture)."""
    return get(name).run(image, annotators_dir=annotators_dir, device=device, **dict(params or {}))
