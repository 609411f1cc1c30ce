"""The parameter explorer: A1111's X/Y/Z plot planned into GenerateJobs, run as batched passes of the Generate
denoise loop (cells sharing checkpoint, VAE, LoRAs, sampler, steps, size, denoising strength and hires fix), written
as a lettered grid PNG, a PNG per cell and the table of cells (JSON, CSV). Text to image, image to image,
inpainting and outpainting and hires fix cells each run as Generate runs them."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from studio.config import LimitExceeded, Limits, whole_number
from studio.explorer.grid_image import GridDrawing, GridLayout, draw_grid, grid_layout
from studio.explorer.syntax import (
    AXIS_TYPES,
    NONE_VALUE,
    NOTHING,
    AxisSyntaxError,
    AxisType,
    apply_prompt_sr,
    axis_type,
    check_prompt_sr,
    default_lora_target,
    fix_seeds,
    format_size,
    match_choice,
    network_in,
    parse_float_values,
    parse_int_values,
    parse_size,
    set_lora_weight,
    split_axis_spec,
    split_values,
    swap_network,
)
from studio.files.atomic import write_text
from studio.generation import hires, samplers
from studio.generation.denoise import denoise, encode_init, pass_noise_is_shared
from studio.generation.generate import GeneratedImage, Generator, build_infotext, save_png
from studio.generation.infotext import format_infotext, parse_infotext
from studio.generation.job import MAX_SEED, GenerateJob, load_init_image, work
from studio.generation.oom import generation_advice, run_with_advice
from studio.generation.prompt_syntax import extract_network_tags
from studio.models import speed
from studio.models.manager import ModelManager

# the cells of a grid, its image size and its work are bounded by Limits (max_grid_cells, max_grid_megapixels,
# max_work); this one bounds the memory of one denoising pass
MAX_CELLS_PER_PASS = 64
ProgressFn = Callable[[int, int, str], None]
LETTERS = ("X", "Y", "Z")


# --- the job ---------------------------------------------------------------------------------------------------


@dataclass
class AxisSpec:
    """One axis as the user wrote it: its A1111 name, its values, and (LoRA weight) the LoRA it acts on."""

    type: str = NOTHING
    values: str = ""
    target: str = ""  # LoRA weight: the LoRA whose tag weight varies ("" = the prompt's only LoRA)

    @classmethod
    def parse(cls, text: str | None) -> AxisSpec:
        """From the command line form `"CFG Scale: 3,7,11"` or `"LoRA weight (ink): 0, 0.5, 1"`."""
        if not text or not text.strip():
            return cls()
        name, target, values = split_axis_spec(text)
        return cls(name, values, target)

    @property
    def active(self) -> bool:
        return axis_type(self.type).kind != "nothing"

    def title(self) -> str:
        return f"{self.type} ({self.target})" if self.target else self.type


@dataclass
class GridJob:
    base: GenerateJob  # prompt and settings of every cell; the axes change some of them
    x: AxisSpec = field(default_factory=AxisSpec)
    y: AxisSpec = field(default_factory=AxisSpec)
    z: AxisSpec = field(default_factory=AxisSpec)
    checkpoint: str = ""  # model of the cells a Checkpoint axis does not set; "" = the loaded model
    keep_random_seeds: bool = False  # A1111 "Keep -1 for seeds": every cell draws its own random seed
    cells_per_pass: int = 8  # the largest denoising batch; lower it when memory is short

    def axes(self) -> list[AxisSpec]:
        return [self.x, self.y, self.z]

    def validate(self, limits: Limits | None = None) -> None:
        """Raise ValueError naming the bad value; cell values are checked when the grid is planned."""
        if not any(a.active for a in self.axes()):
            raise ValueError("choose at least one axis (X, Y or Z) with values")
        self.cells_per_pass = whole_number("cells per pass", self.cells_per_pass, 1, MAX_CELLS_PER_PASS)
        self.base.validate(limits)
        if self.base.controls:
            raise ValueError("the explorer does not run ControlNets yet: make the grid without them, or generate "
                             "each setting in Generate")
        if self.base.batch_size != 1 or self.base.batch_count != 1:
            raise ValueError(f"a grid makes one image per cell: batch size and batch count must be 1, got "
                             f"{self.base.batch_size} and {self.base.batch_count} (cells per pass sets the batching)")
        kinds = [axis_type(a.type).name for a in self.axes() if a.active]
        for name in set(kinds):
            repeatable = AXIS_TYPES[name].kind in ("prompt_sr", "negative_sr", "network", "lora_weight")
            if kinds.count(name) > 1 and not repeatable:
                raise ValueError(f"two axes are both {name!r}; give each parameter one axis")


# --- the plan --------------------------------------------------------------------------------------------------


@dataclass
class Axis:
    """An axis with its values read and checked: typed values and the legend text of each."""

    letter: str
    spec: AxisSpec
    type: AxisType
    values: list = field(default_factory=lambda: [None])
    labels: list[str] = field(default_factory=lambda: [""])
    fixed_seeds: list[int] | None = None  # Seed axis: the values after -1 became random seeds (when it changed)
    target: str = ""  # LoRA weight: the LoRA it acts on (named, or the prompt's only one)

    @property
    def active(self) -> bool:
        return self.type.kind != "nothing"


@dataclass
class GridCell:
    index: int  # X fastest, then Y, then Z (A1111's order)
    pos: tuple[int, int, int]  # (ix, iy, iz)
    job: GenerateJob  # what Generate would run for this cell (batch 1, a real seed)
    checkpoint: str  # "" = the model loaded when the grid starts
    labels: tuple[str, str, str]
    vae: str = ""  # a VAE axis's choice (a name of ModelManager.vae_choices()); "" = the VAE menu's setting
    size: tuple[int, int] = (0, 0)  # the finished image's size (hires fix: the second pass's); (0, 0) = the job's


@dataclass
class GridGroup:
    """Cells that can share denoising passes: same checkpoint, VAE, LoRA set, sampler, schedule, steps, size,
    clip skip, denoising strength (image to image) and hires fix settings."""

    key: tuple
    checkpoint: str
    cells: list[int]
    passes: list[list[int]]
    vae: str = ""  # "" = the VAE menu's setting when the grid starts


@dataclass
class GridPlan:
    job: GridJob
    axes: list[Axis]
    cells: list[GridCell]
    groups: list[GridGroup]
    layout: GridLayout

    @property
    def passes(self) -> list[list[int]]:
        return [p for g in self.groups for p in g.passes]

    @property
    def total_steps(self) -> int:
        """The sampling steps the passes run (image to image: steps x strength; hires fix: both passes)."""
        return sum(sum(run_steps(self.cells[p[0]].job)) for p in self.passes)

    def summary(self) -> str:
        shape = " × ".join(str(len(a.values)) for a in self.axes if a.active)
        w, h = self.layout.size
        loads = len({g.checkpoint for g in self.groups} - {""})
        vaes = len({g.vae for g in self.groups} - {""})
        text = (f"{len(self.cells)} cells ({shape}) in {len(self.passes)} denoising pass"
                f"{'es' if len(self.passes) != 1 else ''} ({len(self.groups)} group{'s' if len(self.groups) != 1 else ''})"
                f", grid {w}×{h} px")
        if loads:
            text += f", {loads} checkpoint load{'s' if loads != 1 else ''}"
        if vaes:
            text += f", {vaes} VAE{'s' if vaes != 1 else ''}"
        base = self.job.base
        if base.hires_fix:
            text += ", hires fix on"
        elif base.is_inpaint:
            text += ", outpainting" if base.outpaint else ", inpainting"
        elif base.is_img2img:
            text += ", image to image"
        return text

    def estimate_seconds(self, seconds_per_step_megapixel: float | None) -> float | None:
        """Denoising time from a measured rate (seconds per step, cell and megapixel), or None without one."""
        if not seconds_per_step_megapixel:
            return None
        total = sum(len(p) * run_work(self.cells[p[0]].job) for p in self.passes)
        return total * seconds_per_step_megapixel


def run_steps(job: GenerateJob) -> tuple[int, int]:
    """(steps the first pass runs, steps the hires fix's second pass runs), counted as Generate counts them: image
    to image runs steps x strength, and so does the second pass (steps x hires denoising)."""
    second = job.hires_pass()
    if second is None:
        return job.denoise_steps(), 0
    steps = second.steps or job.steps
    return job.denoise_steps(), min(int(steps * second.denoising_strength), steps)


def run_work(job: GenerateJob) -> float:
    """Step-megapixels one cell's passes run (what the measured rate is per)."""
    first, second_steps = run_steps(job)
    width, height = job.frame_size()
    out = work(1, first, width, height)
    second = job.hires_pass()
    if second is not None:
        out += work(1, second_steps, second.width, second.height)
    return out


def limit_work(job: GenerateJob) -> float:
    """One cell's work as Limits.max_work counts it (GenerateJob.validate's count: all steps, the hires fix's
    second pass included)."""
    out = work(1, job.steps, *job.frame_size())
    second = job.hires_pass()
    if second is not None:
        out += work(1, second.steps or job.steps, second.width, second.height)
    return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(axis_type_: AxisType, value_text: str) -> str:
    # formats.md: "Label: value"; sampler, S/R, networks and checkpoint show the bare value (as A1111)
    return value_text if axis_type_.bare_label else f"{axis_type_.name}: {value_text}"


ChoicesFn = Callable[[str], list[str]]  # axis kind ("hires_upscaler", "vae") -> the names it may take


def hires_upscaler_choices(upscalers_dir: Path | None = None) -> list[str]:
    """The hires fix's upscalers, as Generate takes them: A1111's latent upscalers, Lanczos, Nearest, then the model
    files in `upscalers_dir` ("None" is left out: it would not reach the target size)."""
    names = [*hires.LATENT_UPSCALERS, "Lanczos", "Nearest"]
    if upscalers_dir is not None:
        from studio.upscale.library import local_upscalers

        names += [e.name for e in local_upscalers(upscalers_dir)]
    return names


def default_choices(kind: str) -> list[str]:
    """The names an axis takes when no studio folder is known: the latent upscalers, Lanczos and Nearest for
    Hires upscaler (files in upscalers/ need GridRunner's list); Automatic and None for VAE."""
    if kind == "hires_upscaler":
        return hires_upscaler_choices()
    if kind == "vae":
        return ["Automatic", "None"]
    return []


def read_axis(letter: str, spec: AxisSpec, base: GenerateJob, keep_random_seeds: bool = False,
              rng: random.Random | None = None, check_checkpoint: Callable[[str], str] | None = None,
              check_network: Callable[[str, str], None] | None = None, limits: Limits | None = None,
              choices: ChoicesFn | None = None) -> Axis:
    """Read one axis's values against the base job (pure unless the checks are given; `choices` lists the hires
    upscalers and VAEs there are). Errors name the axis and quote the value; an axis of more values than
    max_grid_cells is refused before its ranges are listed."""
    atype = axis_type(spec.type)
    axis = Axis(letter, spec, atype)
    if atype.kind == "nothing":
        return axis
    where = f"{letter} axis ({spec.title()})"
    max_values = (limits or Limits.from_env()).max_grid_cells
    try:
        if not isinstance(spec.values, str):
            raise AxisSyntaxError(f"the values must be text, got {spec.values!r}")
        _check_mode(atype, base)
        values, texts = _read_values(atype, spec, base, check_checkpoint, check_network, max_values, choices)
        if len(values) > max_values:
            raise LimitExceeded("max_grid_cells", max_values, f"{len(values):,} values")
        if atype.kind == "lora_weight":
            axis.target = spec.target or default_lora_target(base.prompt)
            set_lora_weight(base.prompt, axis.target, 1.0)  # the tag must be in the prompt
    except LimitExceeded as e:
        raise LimitExceeded(e.name, e.limit, f"{where}: {e.what}") from None
    except AxisSyntaxError as e:
        raise AxisSyntaxError(f"{where}: {e}") from None
    if not values:
        raise AxisSyntaxError(f"{where}: no values; write them comma-separated, e.g. {_EXAMPLES[atype.kind]!r}")
    if atype.kind == "int" and atype.name == "Seed":
        fixed = fix_seeds(values, keep_random_seeds, rng)
        if fixed != values:
            axis.fixed_seeds = fixed
        values = fixed
        texts = [str(v) for v in values]
    axis.values, axis.labels = values, [_label(atype, t) for t in texts]
    return axis


_EXAMPLES = {"int": "10, 20, 30", "float": "3, 7, 11", "sampler": "Euler a, DPM++ 2M", "schedule": "Karras, Beta",
             "size": "512x512, 768x512", "prompt_sr": "red, blue, green", "negative_sr": "blurry, noisy",
             "lora_weight": "0, 0.5, 1", "network": "inkwash, paperfold, None", "checkpoint": "demo-tiny",
             "denoising": "0.3, 0.5, 0.7", "hires_steps": "0, 10, 20", "hires_scale": "1.5, 2",
             "hires_upscaler": "Latent, Lanczos", "vae": "Automatic, None"}
# the ranges of the numeric axes of this module's own (as GenerateJob.validate checks them)
_RANGES = {"denoising": (0.0, 1.0, "denoising strength", "0 to 1"),
           "hires_steps": (0, 150, "hires steps", "0 (the same as steps) to 150"),
           "hires_scale": (1.0, 4.0, "hires upscale", "1 to 4")}


def _check_mode(atype: AxisType, base: GenerateJob) -> None:
    """Refuse an axis the base job gives nothing to act on (a Denoising axis on text to image, a hires axis without
    hires fix), saying what to set."""
    if atype.kind == "denoising" and not base.is_img2img and not base.hires_fix:
        raise AxisSyntaxError("the Denoising axis sets the denoising strength of image to image (or of the hires "
                              "fix's second pass), and the base settings are text to image: add an init image or "
                              "turn hires fix on")
    if atype.kind in ("hires_steps", "hires_scale", "hires_upscaler") and not base.hires_fix:
        raise AxisSyntaxError(f"the {atype.name} axis changes the hires fix, which is off in the base settings: turn hires "
                              "fix on")
    if atype.kind == "hires_scale" and (base.hires_width or base.hires_height):
        raise AxisSyntaxError(f"the base settings resize the hires fix to {base.hires_width}x{base.hires_height} "
                              "(resize width/height), so the upscale is not used: set them to 0")


def _in_range(kind: str, values: list) -> None:
    lo, hi, label, allowed = _RANGES[kind]
    for v in values:
        if not lo <= v <= hi:
            raise AxisSyntaxError(f"{label} {_number(v)} is out of range; use {allowed}")


def _read_values(atype, spec, base, check_checkpoint, check_network, max_values,
                 choices: ChoicesFn | None = None) -> tuple[list, list[str]]:
    kind, text = atype.kind, spec.values
    if kind in ("int", "hires_steps"):
        values = parse_int_values(text, atype.name.lower(), max_values)
        if kind in _RANGES:
            _in_range(kind, values)
        return values, [str(v) for v in values]
    if kind in ("denoising", "hires_scale"):
        values = parse_float_values(text, _RANGES[kind][2], max_values)
        _in_range(kind, values)
        return values, [_number(v) for v in values]
    if kind in ("hires_upscaler", "vae"):
        names = choices(kind) if choices is not None else default_choices(kind)
        what = "hires upscaler" if kind == "hires_upscaler" else "VAE"
        values = []
        for v in split_values(text):
            if kind == "vae" and choices is None and v.lower() not in ("automatic", "none"):
                values.append(v)  # no studio to list vae/: GridRunner checks the name
            else:
                values.append(match_choice(v, names, what))
        return values, values
    if kind in ("float", "lora_weight"):
        values = parse_float_values(text, "weight" if kind == "lora_weight" else atype.name, max_values)
        return values, [_number(v) for v in values]
    raw = split_values(text)
    if kind == "sampler":
        values = []
        for v in raw:
            try:
                values.append(samplers.split_legacy_name(v))  # "DPM++ 2M Karras" carries its schedule
            except ValueError as e:
                raise AxisSyntaxError(str(e)) from None
        return values, raw
    if kind == "schedule":
        values = [match_choice(v, samplers.SCHEDULE_TYPES, "schedule type") for v in raw]
        return values, values
    if kind == "size":
        values = [parse_size(v) for v in raw]
        return values, [format_size(v) for v in values]
    if kind in ("prompt_sr", "negative_sr"):
        check_prompt_sr(raw, base.prompt, base.negative_prompt, negative_only=kind == "negative_sr")
        return raw, raw
    if kind == "network":
        if raw:
            found = network_in(base.prompt, base.negative_prompt, raw[0])
            if found is None:
                swap_network(base.prompt, base.negative_prompt, raw[0], raw[0])  # raises the explaining error
            for v in raw:
                if v.lower() != NONE_VALUE.lower() and check_network is not None:
                    try:
                        check_network(found, v)
                    except ValueError as e:
                        raise AxisSyntaxError(f"value {v!r}: {e}") from None
        return raw, raw
    if kind == "checkpoint":
        values = []
        for v in raw:
            try:
                values.append(check_checkpoint(v) if check_checkpoint else v)
            except (ValueError, RuntimeError) as e:
                raise AxisSyntaxError(f"value {v!r}: {e}") from None
        return values, [Path(v).stem if Path(v).suffix in (".safetensors", ".ckpt") else Path(v).name for v in raw]
    raise AxisSyntaxError(f"axis type {atype.name!r} has no reader")  # a new AxisType without a reader


def _check_sr_length(search: str, replacement: str, texts: dict[str, str], limits: Limits) -> None:
    """Refuse a Prompt S/R value that would make a prompt longer than max_prompt_chars, before it is made."""
    for label, text in texts.items():
        length = len(text) + text.count(search) * (len(replacement) - len(search))
        limits.check("max_prompt_chars", length, f"Prompt S/R value {replacement[:40]!r} makes the {label} "
                                                 f"{length:,} characters")


def _apply(axis: Axis, value, job: GenerateJob, cell: dict, limits: Limits | None = None) -> None:
    """Set one axis value on a cell's job (A1111 applies X, then Y, then Z)."""
    kind = axis.type.kind
    if kind == "nothing":
        return
    if axis.type.name == "Seed":
        job.seed = value
    elif axis.type.name == "Steps":
        job.steps = value
    elif kind == "float":
        job.cfg_scale = value
    elif kind == "denoising":  # A1111's denoising_strength: hires fix's second pass in text to image
        if job.hires_fix:
            job.hires_denoising = value
        else:
            job.denoising_strength = value
    elif kind == "hires_steps":
        job.hires_steps = value
    elif kind == "hires_scale":
        job.hires_scale = value
    elif kind == "hires_upscaler":
        job.hires_upscaler = value
    elif kind == "vae":
        cell["vae"] = value
    elif kind == "sampler":
        job.sampler = value[0]
        if value[1] != samplers.AUTOMATIC:
            job.schedule = value[1]
    elif kind == "schedule":
        job.schedule = value
    elif kind == "size":
        job.width, job.height = value
    elif kind in ("prompt_sr", "negative_sr"):
        texts = {"negative prompt": job.negative_prompt}
        if kind == "prompt_sr":
            texts["prompt"] = job.prompt
        _check_sr_length(axis.values[0], value, texts, limits or Limits.from_env())
        job.prompt, job.negative_prompt = apply_prompt_sr(axis.values[0], value, job.prompt, job.negative_prompt,
                                                          negative_only=kind == "negative_sr")
    elif kind == "lora_weight":
        job.prompt = set_lora_weight(job.prompt, axis.target, value)
    elif kind == "network":
        job.prompt, job.negative_prompt = swap_network(job.prompt, job.negative_prompt, axis.values[0], value)
    elif kind == "checkpoint":
        cell["checkpoint"] = value


def lora_set(prompt: str) -> tuple:
    """The LoRAs and weights a prompt applies: cells with different sets cannot share a pass."""
    _, tags = extract_network_tags(prompt)
    return tuple(sorted((t.name, t.te, t.unet) for t in tags))


def pass_key(cell: GridCell) -> tuple:
    """What must be equal in one denoising call: checkpoint, VAE, LoRA set (the slow changes, in that order),
    sampler, schedule, steps, size, clip skip, image to image's strength and the hires fix's second pass."""
    j = cell.job
    strength = float(j.denoising_strength) if j.is_img2img else None
    return (cell.checkpoint, cell.vae, lora_set(j.prompt), j.sampler, samplers.resolve_schedule(j.sampler, j.schedule),
            j.steps, j.width, j.height, j.clip_skip, strength, j.hires_pass())


def plan_groups(cells: list[GridCell], cells_per_pass: int) -> list[GridGroup]:
    """Group cells that can share denoising passes and order the groups so that the slow changes (checkpoint,
    then VAE, then LoRA set) happen least often; split each group into passes of at most `cells_per_pass` cells
    (one cell per pass for samplers whose noise belongs to the whole pass)."""
    groups: dict[tuple, GridGroup] = {}
    for cell in cells:
        key = pass_key(cell)
        groups.setdefault(key, GridGroup(key, cell.checkpoint, [], [], cell.vae)).cells.append(cell.index)
    first_seen: dict[tuple, int] = {}
    for key in groups:
        for part in (key[:1], key[:2], key[:3]):
            first_seen.setdefault(part, len(first_seen))
    ordered = sorted(groups.values(), key=lambda g: (first_seen[g.key[:1]], first_seen[g.key[:2]],
                                                     first_seen[g.key[:3]], g.cells[0]))
    for group in ordered:
        size = 1 if pass_noise_is_shared(cells[group.cells[0]].job.sampler) else cells_per_pass
        group.passes = [group.cells[i : i + size] for i in range(0, len(group.cells), size)]
    return ordered


def output_size(job: GenerateJob, init_size: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """The size of the image Generate makes for `job`: the hires fix's target, the init's own size for "Only
    masked" inpainting (the result is laid back into it), else the frame (outpainting adds its bands)."""
    second = job.hires_pass()
    if second is not None:
        return second.width, second.height
    if job.is_inpaint and not job.outpaint and job.inpaint_area == "Only masked":
        return init_size()
    return job.frame_size()


def plan_grid(job: GridJob, rng: random.Random | None = None, check_checkpoint: Callable[[str], str] | None = None,
              check_network: Callable[[str, str], None] | None = None, limits: Limits | None = None,
              choices: ChoicesFn | None = None) -> GridPlan:
    """Validate the job, read the axes, make every cell's GenerateJob, group the cells into passes and lay out
    the grid image. Errors name the axis and quote the value; nothing has run yet. `limits` (default:
    Limits.from_env()) bounds the cells, each cell's prompts, the grid image and the work (hires fix's second
    passes included); `choices` lists the hires upscalers and VAEs (default: default_choices)."""
    # 1. validate the job and read the axes
    limits = limits or Limits.from_env()
    job.validate(limits)
    rng = rng or random.Random()
    axes = [read_axis(letter, spec, job.base, job.keep_random_seeds, rng, check_checkpoint, check_network, limits,
                      choices)
            for letter, spec in zip(LETTERS, job.axes(), strict=True)]
    n_cells = len(axes[0].values) * len(axes[1].values) * len(axes[2].values)
    shape = " × ".join(str(len(a.values)) for a in axes if a.active)
    limits.check("max_grid_cells", n_cells, f"the grid has {n_cells:,} cells ({shape}; use fewer values)")
    # 2. one GenerateJob per cell; seeds: -1 is one random seed for all cells, or one per cell with keep -1
    shared_seed = rng.randint(0, MAX_SEED) if job.base.seed == -1 and not job.keep_random_seeds else job.base.seed
    cells: list[GridCell] = []
    init_sizes: list[tuple[int, int]] = []

    def init_size() -> tuple[int, int]:  # read once, only for "Only masked" inpainting
        if not init_sizes:
            init_sizes.append(load_init_image(job.base.init_image).size)
        return init_sizes[0]
    for iz, z in enumerate(axes[2].values):
        for iy, y in enumerate(axes[1].values):
            for ix, x in enumerate(axes[0].values):
                cell_job = replace(job.base, seed=shared_seed)
                extra = {"checkpoint": job.checkpoint, "vae": ""}
                pos = (ix, iy, iz)
                labels = tuple(a.labels[i] for a, i in zip(axes, pos, strict=True))
                try:
                    for axis, value in zip(axes, (x, y, z), strict=True):
                        _apply(axis, value, cell_job, extra, limits)
                    if cell_job.seed == -1:
                        cell_job.seed = rng.randint(0, MAX_SEED)
                    cell_job.validate(limits)
                    size = output_size(cell_job, init_size)
                except LimitExceeded as e:
                    raise LimitExceeded(e.name, e.limit, f"cell {_where(axes, labels)}: {e.what}") from None
                except ValueError as e:
                    raise ValueError(f"cell {_where(axes, labels)}: {e}") from None
                cells.append(GridCell(len(cells), pos, cell_job, extra["checkpoint"], labels, extra["vae"], size))
    total = sum(limit_work(c.job) for c in cells)
    limits.check("max_work", total, f"the grid's {len(cells):,} cells are {total:,.0f} step-megapixels of work "
                                    "(steps x width x height / 1e6, summed, hires fix second passes included)")
    # 3. groups and passes
    groups = plan_groups(cells, job.cells_per_pass)
    # 4. the size guard: the grid image must stay drawable
    layout = layout_for(axes, cells)
    w, h = layout.size
    limits.check("max_grid_megapixels", w * h / 1e6, f"the grid image would be {w}×{h} px ({w * h / 1e6:,.0f} "
                                                     "megapixels; use fewer values or a smaller size)")
    return GridPlan(job, axes, cells, groups, layout)


def _where(axes: list[Axis], labels: tuple[str, str, str]) -> str:
    def short(label: str) -> str:
        return label if len(label) <= 60 else f"{label[:40]}... ({len(label):,} characters)"

    return ", ".join(f"{a.letter} {short(lab)!r}" for a, lab in zip(axes, labels, strict=True) if a.active)


def layout_for(axes: list[Axis], cells: list[GridCell]) -> GridLayout:
    nx, ny = len(axes[0].values), len(axes[1].values)
    col_w, row_h = [0] * nx, [0] * ny
    for cell in cells:
        ix, iy, _ = cell.pos
        width, height = cell.size if cell.size != (0, 0) else (cell.job.width, cell.job.height)
        col_w[ix] = max(col_w[ix], width)
        row_h[iy] = max(row_h[iy], height)
    return grid_layout(col_w, row_h, *[a.labels if a.active else [] for a in axes])


# --- running it ------------------------------------------------------------------------------------------------


@dataclass
class GridResult:
    plan: GridPlan
    images: dict[int, GeneratedImage] = field(default_factory=dict)  # finished cells by index
    pass_of: dict[int, int] = field(default_factory=dict)  # cell index -> the denoising pass it ran in
    passes_run: int = 0
    drawing: GridDrawing | None = None
    grid_path: Path | None = None
    z_paths: list[Path] = field(default_factory=list)  # one grid per Z value (when Z has several)
    table_paths: list[Path] = field(default_factory=list)
    infotext: str = ""
    interrupted: bool = False
    message: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def grid(self) -> Image.Image | None:
        return self.drawing.image if self.drawing else None


def next_grid_path(outputs_dir: Path, when: dt.datetime | None = None) -> Path:
    """outputs/grids/<YYYY-MM-DD>/<NNNNN>-grid.png, numbered after what is there."""
    when = when or dt.datetime.now()
    folder = Path(outputs_dir) / "grids" / when.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m[1]) for p in folder.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    return folder / f"{max(numbers, default=-1) + 1:05d}-grid.png"


class GridRunner:
    """Runs grids on the manager's models with the generator's encoding (LoRAs, embeddings, A1111 prompts)."""

    _path_lock = threading.Lock()

    def __init__(self, manager: ModelManager, generator: Generator | None = None):
        self.manager = manager
        self.generator = generator or Generator(manager)
        self.rates: dict[str, float] = {}  # model name -> measured seconds per step, cell and megapixel

    # 1. checks that need the library and the model folder

    def _check_checkpoint(self, spec: str) -> str:
        self.manager.resolve(spec)
        return spec

    def _check_network(self, kind: str, name: str) -> None:
        lib = self.generator.networks
        if kind == "lora":
            lib.find_lora(name)
        elif name not in lib.embeddings().found:
            known = ", ".join(lib.embeddings().found) or "none"
            raise ValueError(f"no embedding {name!r} in {lib.embeddings_dir} (found: {known})")

    def _choices(self, kind: str) -> list[str]:
        if kind == "hires_upscaler":
            return hires_upscaler_choices(self.manager.cfg.upscalers_dir)
        if kind == "vae":
            return self.manager.vae_choices()
        return default_choices(kind)

    def plan(self, job: GridJob, rng: random.Random | None = None) -> GridPlan:
        return plan_grid(job, rng, self._check_checkpoint, self._check_network, self.manager.cfg.limits,
                         self._choices)

    def prepare_inits(self, plan: GridPlan) -> dict[int, tuple]:
        """Per group (by its first cell): (inpaint plan, init picture), read and checked before any cell runs, as
        Generate reads them before any model work; hires fix's upscalers are resolved now too."""
        out: dict[int, tuple] = {}
        by_size: dict[tuple[int, int], tuple] = {}
        for group in plan.groups:
            j = plan.cells[group.cells[0]].job
            second = j.hires_pass()
            if second is not None and not second.in_latent_space:  # a missing file fails now, not after pass 1
                from studio.upscale.library import resolve_upscaler

                resolve_upscaler(second.upscaler, self.manager.cfg.upscalers_dir)
            if not j.is_img2img:
                out[group.cells[0]] = (None, None)
                continue
            if (j.width, j.height) not in by_size:
                inpaint = j.inpaint_plan()
                by_size[j.width, j.height] = (inpaint, inpaint.picture if inpaint is not None else j.init_picture())
            out[group.cells[0]] = by_size[j.width, j.height]
        return out

    def check_chunks(self, plan: GridPlan) -> None:
        """Every cell's prompts within max_prompt_chunks, counted with the loaded model's tokenizer before any
        cell runs (a long prompt in the last group fails now, not after the others)."""
        with self.manager.lock:
            model = self.manager.current
            seen = set()
            for cell in plan.cells:
                key = _encoding_key(cell.job)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    self.generator.check_chunks(cell.job, model)
                except LimitExceeded as e:
                    raise LimitExceeded(e.name, e.limit, f"cell {_where(plan.axes, cell.labels)}: {e.what}") from None

    def estimate(self, plan: GridPlan) -> float | None:
        model = self.manager.current
        return plan.estimate_seconds(self.rates.get(model.name) if model else None)

    # 2. run

    def _is_loaded(self, spec: str) -> bool:
        current = self.manager.current
        if current is None:
            return False
        kind, path = self.manager.resolve(spec)
        if kind == "demo":  # demo-tiny and demo-tiny-xl are both built in: the name tells them apart
            return current.is_demo and current.name == spec.strip()
        if path is not None and current.path is not None:
            return Path(path).resolve() == Path(current.path).resolve()
        return current.name == spec

    def run(self, job: GridJob | GridPlan, outputs_dir: Path | None = None, grid_path: Path | None = None,
            on_progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> GridResult:
        """Run every pass of the plan, save cells as they finish, then draw and save the grid and its table.
        On cancel the running pass is dropped; finished cells are kept, saved and drawn (the rest grey)."""
        started = time.perf_counter()
        plan = job if isinstance(job, GridPlan) else self.plan(job)
        if self.manager.current is None:
            raise RuntimeError("no model is loaded; load one first")
        self.check_chunks(plan)
        inits = self.prepare_inits(plan)
        if grid_path is None and outputs_dir is not None:
            with self._path_lock:
                grid_path = next_grid_path(outputs_dir)
                grid_path.touch()  # claim the number
        cells_dir = grid_path.with_name(grid_path.stem.removesuffix("-grid") + "-cells") if grid_path else None
        result = GridResult(plan)
        original = self.manager.current
        original_spec = str(original.path) if original.path else original.name
        original_vae = self.manager.vae_setting
        vae_axis = any(a.active and a.type.kind == "vae" for a in plan.axes)
        done, total = 0, plan.total_steps
        n_passes = len(plan.passes)
        try:
            for group in plan.groups:
                if cancel is not None and cancel.is_set():
                    result.interrupted = True
                    break
                # 3. the group's checkpoint (the slowest change: groups are ordered to need few), then its VAE
                spec = group.checkpoint or original_spec
                if not self._is_loaded(spec):
                    if on_progress:
                        on_progress(done, total, f"loading {spec}")
                    self.manager.load(spec)
                if vae_axis:
                    want = group.vae or original_vae
                    # a VAE the checkpoint's load could not apply (vae_note) is tried again: it fails, naming why
                    if want != self.manager.vae_setting or (group.vae and self.manager.vae_note):
                        if on_progress:
                            on_progress(done, total, f"VAE {want}")
                        self.manager.set_vae(want)
                init = inits[group.cells[0]]
                with self.manager.lock:
                    # out of GPU memory: freed, and a message with what to change (studio.oom)
                    done = run_with_advice(
                        lambda done=done, group=group, init=init: self._run_group(
                            plan, group, result, cells_dir, done, total, n_passes, on_progress, cancel, init),
                        "the X/Y/Z plot", lambda group=group: generation_advice(
                            max(len(p) for p in group.passes), plan.job.base.width, plan.job.base.height,
                            self.manager.memory, "number of cells per pass", "the grid then takes more passes"))
                if result.interrupted:
                    break
        except BaseException:
            if grid_path is not None and grid_path.is_file() and grid_path.stat().st_size == 0:
                grid_path.unlink()  # the claimed number, never written: a failed grid leaves no empty file
            raise
        finally:
            if not self._is_loaded(original_spec):
                self.manager.load(original_spec)  # as A1111 does: the grid leaves the model it found
            if vae_axis:
                self._restore_vae(original_vae)
        if result.interrupted:
            result.message = (f"stopped: {len(result.images)} of {len(plan.cells)} cells finished and kept; "
                              "the pass that was running is dropped")
        result.seconds = time.perf_counter() - started
        self._finish(result, grid_path)
        return result

    def _restore_vae(self, name: str) -> None:
        """The VAE menu's choice back as the user had it (and on the model the grid leaves loaded)."""
        if self.manager.vae_setting == name and not self.manager.vae_note:
            return
        try:
            self.manager.set_vae(name)
        except (RuntimeError, ValueError):  # it did not fit this model before the grid either: keep the choice
            self.manager.vae_setting = name

    def _run_group(self, plan, group, result, cells_dir, done, total, n_passes, on_progress, cancel,
                   init: tuple = (None, None)) -> int:
        model = self.manager.current
        pipe = model.pipe
        model_hash = self.manager.model_hash(model)
        # the group shares sampler, steps, size, strength and hires fix: its first cell's job says them
        lead = plan.cells[group.cells[0]].job
        second = lead.hires_pass()
        # 4. encode each distinct prompt pair once (this applies the group's LoRAs), and the hires fix's prompts
        encoded = {}
        for index in group.cells:
            j = plan.cells[index].job
            key = _encoding_key(j)
            if key not in encoded:
                cond, uncond, nets = self.generator.encode(j, model)
                hires_nets = self.generator.hires_prompts(j, model, nets, cond, uncond) if second is not None else None
                encoded[key] = (cond, uncond, nets, hires_nets)
                for note in nets.notes:
                    if note not in result.notes:
                        result.notes.append(note)
        # image to image and inpainting: the init's latents once per group, with the group's VAE
        inpaint_plan, picture = init
        init_latents = encode_init(pipe, picture) if picture is not None else None
        width, height = lead.frame_size()
        inpaint = self.generator.inpaint_for(lead, pipe, inpaint_plan, width, height)
        first_steps, hires_steps = run_steps(lead)
        steps_run = first_steps + hires_steps
        # 5. passes (split further when prompts of different lengths meet: their conditionings cannot stack)
        for planned in group.passes:
            by_length: dict[tuple, list[int]] = {}
            for index in planned:
                cond, _, _, hires_nets = encoded[_encoding_key(plan.cells[index].job)]
                length = (cond.shape[1], hires_nets.cond.shape[1] if hires_nets is not None else 0)
                by_length.setdefault(length, []).append(index)
            for indices in by_length.values():
                jobs = [plan.cells[i].job for i in indices]
                items, hires_items = [], []
                for j in jobs:
                    cond, uncond, nets, hires_nets = encoded[_encoding_key(j)]
                    items.append(nets.item(cond, uncond, j.cfg_scale, j.seed))
                    if hires_nets is not None:
                        hires_items.append(hires_nets.item(hires_nets.cond, hires_nets.uncond, j.cfg_scale, j.seed))
                number = result.passes_run + 1
                label = f"pass {number}/{n_passes}" if number <= n_passes else f"pass {number}"

                def on_step(i, n, done=done, steps=first_steps, what="", label=f"{label} ({len(items)} cells)"):
                    if on_progress:
                        step = -(-i * steps // n)  # 2nd-order samplers take more timesteps than steps
                        on_progress(done + step, total, f"{label}, {what}step {step}/{steps}")

                def hires_step(i, n, done=done + first_steps):
                    on_step(i, n, done, hires_steps, "hires fix, ")

                note = speed.compile_note(pipe.unet, (len(items), width, height, False))
                if note and on_progress:
                    on_progress(done, total, f"{label}: {note}")
                t0 = time.perf_counter()
                out = denoise(pipe, items, lead.sampler, lead.schedule, lead.steps, width, height,
                              on_step=on_step, cancel=cancel, init_latents=init_latents,
                              strength=lead.denoising_strength, inpaint=inpaint,
                              decode=second is None or not second.in_latent_space)
                if second is not None:  # the second pass, as Generate runs it (a stopped first pass returns as is)
                    out = self.generator.run_hires_pass(lead, pipe, second, out, hires_items, hires_step, cancel)
                if out.interrupted:
                    result.interrupted = True
                    return done
                result.passes_run += 1
                cost = len(items) * run_work(lead)
                if cost > 0:
                    rate = (time.perf_counter() - t0) / cost
                    old = self.rates.get(model.name)
                    self.rates[model.name] = rate if old is None else 0.5 * (old + rate)
                done += steps_run
                images = out.images
                if inpaint_plan is not None:  # the original's pixels back outside the mask (A1111's overlay)
                    images = [inpaint_plan.finish(image) for image in images]
                # 6. save each cell with the infotext Generate writes for it
                for index, j, image in zip(indices, jobs, images, strict=True):
                    nets = encoded[_encoding_key(j)][2]
                    info = build_infotext(j, j.seed, model, model_hash, nets)
                    item = GeneratedImage(image, j.seed, info)
                    if cells_dir is not None:
                        item.path = save_png(image, info, cells_dir / f"{index:04d}-{j.seed}.png")
                    result.images[index] = item
                    result.pass_of[index] = result.passes_run
                if cancel is not None and cancel.is_set():
                    result.interrupted = True
                    return done
        return done

    # 7. the grid image, its infotext and the table

    def _finish(self, result: GridResult, grid_path: Path | None) -> None:
        plan = result.plan
        images = {plan.cells[i].pos: item.image for i, item in result.images.items()}
        result.drawing = draw_grid(images, plan.layout)
        result.infotext = grid_infotext(plan, result)
        if grid_path is None:
            return
        result.grid_path = save_png(result.grid, result.infotext, grid_path)
        nz = len(plan.axes[2].values)
        if nz > 1:
            for iz in range(nz):
                part = draw_grid(images, plan.layout, z_index=[iz]).image
                result.z_paths.append(save_png(part, result.infotext,
                                               grid_path.with_name(f"{grid_path.stem}-z{iz + 1}.png")))
        rows = table_rows(result)
        table = {"grid": grid_path.name, "infotext": result.infotext, "interrupted": result.interrupted,
                 "passes": result.passes_run, "seconds": round(result.seconds, 3),
                 "axes": [{"axis": a.letter, "type": a.type.name, "target": a.target, "values": a.spec.values,
                           "labels": a.labels, **({"fixed_seeds": a.fixed_seeds} if a.fixed_seeds else {})}
                          for a in plan.axes if a.active],
                 "cells": rows}
        json_path, csv_path = grid_path.with_suffix(".json"), grid_path.with_suffix(".csv")
        write_text(json_path, json.dumps(table, indent=2, ensure_ascii=False))
        write_text(csv_path, cells_csv(rows))
        result.table_paths = [json_path, csv_path]


def _encoding_key(job: GenerateJob) -> tuple:
    """What a cell's conditioning depends on (steps too: prompt editing switches at a step; the hires prompts)."""
    return job.prompt, job.negative_prompt, job.clip_skip, job.steps, job.hires_prompt, job.hires_negative_prompt


def grid_infotext(plan: GridPlan, result: GridResult) -> str:
    """The first finished cell's parameters (prompt: the base prompt) plus A1111's script fields:
    `Script: X/Y/Z plot, X Type: CFG Scale, X Values: "3,7,11", ...`."""
    base = plan.job.base
    first = next((result.images[c.index] for c in plan.cells if c.index in result.images), None)
    if first is not None:
        params = {k: v for k, v in parse_infotext(first.infotext).items() if k not in ("prompt", "negative_prompt")}
    else:
        j = plan.cells[0].job
        params = {"Steps": j.steps, **samplers.infotext_names(j.sampler, j.schedule), "CFG scale": j.cfg_scale,
                  "Seed": j.seed, "Size": f"{j.width}x{j.height}"}
    params.pop("Version", None)
    params["Script"] = "X/Y/Z plot"
    for axis in plan.axes:
        if axis.active:
            params[f"{axis.letter} Type"] = f"{axis.type.name} ({axis.target})" if axis.target else axis.type.name
            params[f"{axis.letter} Values"] = axis.spec.values
            if axis.fixed_seeds:
                params[f"Fixed {axis.letter} Values"] = ", ".join(map(str, axis.fixed_seeds))
    if plan.job.keep_random_seeds:
        params["Keep -1 for seeds"] = "True"
    from studio import __version__

    params["Version"] = f"studio {__version__}"
    return format_infotext(base.prompt, base.negative_prompt, params)


CSV_COLUMNS = ["index", "x", "y", "z", "x_label", "y_label", "z_label", "status", "pass", "file", "checkpoint",
               "prompt", "negative_prompt", "sampler", "schedule", "steps", "cfg_scale", "seed", "width", "height",
               "clip_skip", "vae", "denoising_strength", "hires_upscaler", "hires_scale", "hires_steps", "infotext"]


def table_rows(result: GridResult) -> list[dict]:
    rows = []
    for cell in result.plan.cells:
        j, item = cell.job, result.images.get(cell.index)
        rows.append({
            "index": cell.index, "x": cell.pos[0], "y": cell.pos[1], "z": cell.pos[2],
            "x_label": cell.labels[0], "y_label": cell.labels[1], "z_label": cell.labels[2],
            "status": "done" if item else "not run", "pass": result.pass_of.get(cell.index),
            "file": str(item.path) if item and item.path else None,
            "checkpoint": cell.checkpoint,
            "prompt": j.prompt, "negative_prompt": j.negative_prompt, "sampler": j.sampler,
            "schedule": samplers.resolve_schedule(j.sampler, j.schedule), "steps": j.steps, "cfg_scale": j.cfg_scale,
            "seed": j.seed, "width": j.width, "height": j.height, "clip_skip": j.clip_skip,
            "vae": cell.vae,
            # the strength that ran: the hires fix's second pass's, image to image's, or none (text to image)
            "denoising_strength": j.hires_denoising if j.hires_fix else j.denoising_strength if j.is_img2img else None,
            "hires_upscaler": j.hires_upscaler if j.hires_fix else None,
            "hires_scale": j.hires_scale if j.hires_fix else None,
            "hires_steps": j.hires_steps if j.hires_fix else None,
            "infotext": item.infotext if item else None,
        })
    return rows


def cells_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})
    return out.getvalue()
