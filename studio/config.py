"""Paths and settings of one studio process: one dataclass, overridden by flags and env."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_ENV_PREFIX = "STUDIO_LIMIT_"


@dataclass(frozen=True)
class Limits:
    """What one request may cost, checked before any model work; raise one for a local run with
    STUDIO_LIMIT_<NAME>=N or app.py --limit name=N."""

    # characters of one prompt (prompt and negative prompt each); runs first, so nothing else sees a huge text.
    # 20,000 is about 5,700 CLIP tokens: far beyond max_prompt_chunks, so the chunk limit is what users meet
    max_prompt_chars: int = 20_000
    # 75-token chunks of one prompt, counted after BREAK splitting with the model's tokenizer, before the text
    # encoder runs (A1111 prompts rarely need more than 4; 32 chunks = 2,400 tokens)
    max_prompt_chunks: int = 32
    # BREAK keywords in one prompt: each starts a chunk, so 31 fill the 32 chunks
    max_breaks: int = 31
    # depth of nested ( ) and [ ] (emphasis, prompt editing); an unclosed bracket reaches to the end, so it counts
    # until then. ((((((word)))))) is 6; parsing time grows with depth times length
    max_nesting: int = 16
    # images x steps x megapixels of one request (batch size x batch count x steps x width x height / 1e6; a grid
    # or storyboard sums its cells or candidates). 100,000 allows every ordinary A1111 request: 16 x 100 images of
    # 150 steps at 512x768 (94,372), A1111's largest batch (8 x 100) of 150 steps at 768x768 (70,779), 1,000 grid
    # cells of 50 steps at 1024x1024 (52,429); Generate's slider maximum (16 x 100 x 150 steps at 2048x2048,
    # 1,006,633, about a day of GPU time) needs a raise
    max_work: int = 100_000
    # cells of one X/Y/Z plot (the values of one axis too: a range is counted before it is listed)
    max_grid_cells: int = 1000
    # the grid image of an X/Y/Z plot, in megapixels (A1111's default "maximum grid size", img_max_size_mp)
    max_grid_megapixels: int = 200
    # candidates of one storyboard shot
    max_storyboard_candidates: int = 64
    # shots of one storyboard
    max_storyboard_shots: int = 500

    def check(self, name: str, asked: float, what: str) -> None:
        """Raise LimitExceeded when `asked` is above limit `name`; `what` says what was asked ("prompt is 9 chunks")."""
        limit = getattr(self, name)
        if asked > limit:
            raise LimitExceeded(name, limit, what)

    def with_values(self, values: Mapping[str, int]) -> Limits:
        """These limits with `values` (name -> whole number >= 1) replacing some; a bad name or value is an error."""
        for name, value in values.items():
            _check_limit_value(name, value, f"limit {name}")
        return replace(self, **dict(values))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The defaults, with every STUDIO_LIMIT_<NAME> variable of `environ` (default os.environ) applied."""
        environ = os.environ if environ is None else environ
        values = {}
        for key, raw in environ.items():
            if not key.startswith(LIMIT_ENV_PREFIX):
                continue
            name = key[len(LIMIT_ENV_PREFIX):].lower()
            _check_limit_value(name, raw, key)
            values[name] = _limit_number(raw, key)
        return cls().with_values(values)


class LimitExceeded(ValueError):
    """A request above one of the Limits; the message names the limit and how to raise it."""

    def __init__(self, name: str, limit: int, what: str):
        self.name, self.limit, self.what = name, limit, what
        super().__init__(f"{what}; the limit is {limit:,} ({name}). For a local run, raise it with "
                         f"{LIMIT_ENV_PREFIX}{name.upper()}=... or app.py --limit {name}=...")


def limit_names() -> list[str]:
    return [f.name for f in fields(Limits)]


def _limit_number(raw, where: str) -> int:
    """A limit's value: a whole number >= 1, as text (`20000`, `20_000`, `20,000`) or a number."""
    value = raw
    if isinstance(raw, str):
        digits = raw.strip().replace("_", "").replace(",", "")
        if not re.fullmatch(r"\d+", digits):
            raise ValueError(f"{where} must be a whole number of 1 or more, got {raw!r}")
        value = int(digits)
    value = whole_number(where, value)
    if value < 1:
        raise ValueError(f"{where} must be a whole number of 1 or more, got {raw!r}")
    return value


def _check_limit_value(name: str, raw, where: str) -> None:
    if name not in limit_names():
        raise ValueError(f"{where}: there is no limit {name!r}; the limits are {', '.join(limit_names())}")
    _limit_number(raw, where)


def parse_limit_overrides(items: list[str] | None) -> dict[str, int]:
    """`["max_prompt_chars=50000", ...]` (app.py --limit NAME=VALUE) -> {name: value}; a bad item is an error
    naming it and the known limits."""
    out: dict[str, int] = {}
    for item in items or []:
        name, eq, value = str(item).partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise ValueError(f"--limit {item!r}: write NAME=VALUE, e.g. max_prompt_chars=50000; the limits are "
                             f"{', '.join(limit_names())}")
        where = f"--limit {name}"
        _check_limit_value(name, value, where)
        out[name] = _limit_number(value, where)
    return out


@dataclass(frozen=True)
class StudioConfig:
    root: Path = ROOT
    # user folders, scanned at start and on refresh
    models_dir: Path = ROOT / "models"
    loras_dir: Path = ROOT / "loras"
    embeddings_dir: Path = ROOT / "embeddings"
    outputs_dir: Path = ROOT / "outputs"
    presets_dir: Path = ROOT / "presets"
    # training datasets the Dataset tab writes (images, captions, dataset.json)
    datasets_dir: Path = ROOT / "datasets"
    # training runs: runs/<name>-<time>/ with config.yaml, loss.csv, checkpoints, previews
    runs_dir: Path = ROOT / "runs"
    # storyboard projects: storyboards/<name>/project.json, references, frames, exports
    storyboards_dir: Path = ROOT / "storyboards"
    # ControlNet weights (diffusers folders or single files), scanned like loras/
    controlnet_dir: Path = ROOT / "controlnet"
    # VAEs (single .safetensors files or diffusers folders), chosen in Generate's VAE menu
    vae_dir: Path = ROOT / "vae"
    # upscaler model files (ESRGAN / Real-ESRGAN / SwinIR / ... .pth or .safetensors), read with spandrel
    upscalers_dir: Path = ROOT / "upscalers"
    # IP-Adapter weights (image prompts) and their CLIP image encoders (image_encoder/ folders)
    ipadapter_dir: Path = ROOT / "ipadapter"
    # shipped data: model configs for offline single-file loading, templates
    assets_dir: Path = ROOT / "assets"
    # files we derive once and reuse (the CLIP tokenizer built from open_clip's BPE file)
    cache_dir: Path = ROOT / ".cache"
    # "auto" picks cuda, then mps, then cpu
    device: str = "auto"
    # "auto": fp16 on CUDA/MPS, fp32 on CPU; or "fp16", "bf16", "fp32"
    precision: str = "auto"
    # memory options users know from A1111/diffusers
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    # torch.compile the UNet (studio.models.speed.COMPILE_MODES); CUDA only: faster after the first image at each size
    compile: str = "off"
    # eager sampling replays the UNet's forward as a CUDA graph after recording it once per size (studio.models.
    # cuda_graphs); CUDA only, the same images; STUDIO_CUDA_GRAPHS=0 turns it off
    cuda_graphs: bool = True
    # A1111's "Clip skip SDXL: apply to CLIP-L": off, clip skip leaves SDXL alone (both encoders' penultimate layer, as
    # A1111 and ComfyUI by default); on, CLIP-L takes the layer clip skip names (STUDIO_SDXL_CLIP_L_SKIP=1)
    sdxl_clip_l_skip: bool = False
    # what one request may cost (Limits): STUDIO_LIMIT_<NAME> variables, app.py --limit NAME=VALUE
    limits: Limits = field(default_factory=Limits)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> StudioConfig:
        """Defaults, then STUDIO_* environment variables, then explicit overrides. `limits` may be a Limits or a
        dict of some limits (parse_limit_overrides), applied over the STUDIO_LIMIT_* variables."""
        limits = Limits.from_env()
        given = overrides.pop("limits", None)
        if isinstance(given, Limits):
            limits = given
        elif given:
            limits = limits.with_values(given)
        cfg = cls(limits=limits)
        home = os.environ.get("STUDIO_HOME")
        if home:
            cfg = cfg.with_home(Path(home))
        env = {
            "device": os.environ.get("STUDIO_DEVICE"),
            "precision": os.environ.get("STUDIO_PRECISION"),
        }
        cfg = replace(cfg, **{k: v for k, v in env.items() if v})
        if os.environ.get("STUDIO_SDXL_CLIP_L_SKIP", "").strip().lower() in ("1", "true", "yes", "on"):
            cfg = replace(cfg, sdxl_clip_l_skip=True)
        if os.environ.get("STUDIO_CUDA_GRAPHS", "").strip().lower() in ("0", "false", "no", "off"):
            cfg = replace(cfg, cuda_graphs=False)
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def with_home(self, home: Path) -> StudioConfig:
        """The same settings with every user folder under `home` (tests use a tmp dir)."""
        home = Path(home)
        return replace(
            self,
            models_dir=home / "models",
            loras_dir=home / "loras",
            embeddings_dir=home / "embeddings",
            outputs_dir=home / "outputs",
            presets_dir=home / "presets",
            datasets_dir=home / "datasets",
            runs_dir=home / "runs",
            storyboards_dir=home / "storyboards",
            controlnet_dir=home / "controlnet",
            vae_dir=home / "vae",
            upscalers_dir=home / "upscalers",
            ipadapter_dir=home / "ipadapter",
            cache_dir=home / ".cache",
        )

    def ensure_dirs(self) -> None:
        for d in (self.models_dir, self.loras_dir, self.embeddings_dir, self.outputs_dir,
                  self.presets_dir, self.datasets_dir, self.runs_dir, self.cache_dir, self.storyboards_dir,
                  self.controlnet_dir, self.vae_dir, self.upscalers_dir, self.ipadapter_dir):
            d.mkdir(parents=True, exist_ok=True)


def check_settings(make: Callable[[dict], object], settings: dict, source: str) -> None:
    """Validate a settings file's values (a preset, a run's config.yaml) by building a job from them and calling
    its validate(); on failure the error names the file, the bad key and its value.

    `make(values)` builds the job from the defaults plus `values`. Each key is then tried alone to find the one at
    fault; when every key is fine alone, the combination is reported."""
    bad = (ValueError, TypeError, AttributeError)
    try:
        make(dict(settings)).validate()
        return
    except bad as e:
        whole = e
    for key, value in settings.items():
        try:
            make({key: value}).validate()
        except bad as e:
            raise ValueError(f"{source}: setting {key!r} = {value!r} is not valid: {e}") from None
    raise ValueError(f"{source}: the settings {sorted(settings)} do not fit together: {whole}") from None


def check_known_keys(cls, values: dict, what: str) -> None:
    """Unknown keys in a settings dict for dataclass `cls` are an error naming them, not silently dropped."""
    from dataclasses import fields

    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {sorted(names)}")


# --- values from widgets, the API and files: checked, never corrected ----------------------------------------


def _shown(value) -> str:
    """A value as an error message quotes it: NaN and inf spelled out, long text cut."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def _num(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _in_range(name: str, value, lo, hi) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            raise ValueError(f"{name} must be between {_num(lo)} and {_num(hi)}, got {_num(value)}")
        if lo is not None:
            raise ValueError(f"{name} must be {_num(lo)} or more, got {_num(value)}")
        raise ValueError(f"{name} must be {_num(hi)} or less, got {_num(value)}")


def whole_number(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int: an int, or a float that is exactly whole (20.0 from a slider is 20). Bool, fractions,
    NaN, inf, text and None are refused, naming `name`; so is a value outside lo..hi."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a whole number, got {_shown(value)}")
    if not isinstance(value, numbers.Integral):
        value = float(value)
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {_shown(value)}")
    value = int(value)
    _in_range(name, value, lo, hi)
    return value


def real_number(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """`value` as a float: an int or a finite float. Bool, NaN, inf, text and None are refused, naming `name`; so
    is a value outside lo..hi."""
    try:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int too large for a float
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    _in_range(name, number, lo, hi)
    return number


def text(name: str, value) -> str:
    """`value` when it is a str; None, numbers and anything else are refused, naming `name`."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {_shown(value)}")
    return value


_INT_TEXT = re.compile(r"[+-]?\d+")
_REAL_TEXT = re.compile(r"[+-]?(?:\d++(?:\.\d*+)?|\.\d++)(?:[eE][+-]?\d++)?")


def number_from_text(name: str, value: str, whole: bool = False) -> int | float:
    """A number typed as text (a CSV or table cell): `7`, `-1`, `0.5`, `1e-3`; not `nan`, `inf` or `1_0`. The
    result still goes through whole_number or real_number."""
    raw = text(name, value).strip()
    if _INT_TEXT.fullmatch(raw):
        return int(raw)
    if _REAL_TEXT.fullmatch(raw):
        return float(raw)
    raise ValueError(f"{name} must be a {'whole number' if whole else 'number'}, got {_shown(value)}")
