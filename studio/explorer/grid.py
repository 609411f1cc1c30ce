"""The parameter explorer: A1111's X/Y/Z plot planned into GenerateJobs, run as batched passes of the Generate
denoise loop (cells sharing checkpoint, LoRAs, sampler, steps and size), written as a lettered grid PNG, a PNG
per cell and the table of cells (JSON, CSV)."""

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
from studio.generation import samplers
from studio.generation.denoise import denoise, pass_noise_is_shared
from studio.generation.generate import GeneratedImage, Generator, build_infotext, save_png
from studio.generation.infotext import format_infotext, parse_infotext
from studio.generation.job import MAX_SEED, GenerateJob, work
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


@dataclass
class GridGroup:
    """Cells that can share denoising passes: same checkpoint, LoRA set, sampler, schedule, steps, size."""

    key: tuple
    checkpoint: str
    cells: list[int]
    passes: list[list[int]]


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
        return sum(self.cells[p[0]].job.steps for p in self.passes)

    def summary(self) -> str:
        shape = " × ".join(str(len(a.values)) for a in self.axes if a.active)
        w, h = self.layout.size
        loads = len({g.checkpoint for g in self.groups} - {""})
        text = (f"{len(self.cells)} cells ({shape}) in {len(self.passes)} denoising pass"
                f"{'es' if len(self.passes) != 1 else ''} ({len(self.groups)} group{'s' if len(self.groups) != 1 else ''})"
                f", grid {w}×{h} px")
        if loads:
            text += f", {loads} checkpoint load{'s' if loads != 1 else ''}"
        return text

    def estimate_seconds(self, seconds_per_step_megapixel: float | None) -> float | None:
        """Denoising time from a measured rate (seconds per step, cell and megapixel), or None without one."""
        if not seconds_per_step_megapixel:
            return None
        total = 0.0
        for p in self.passes:
            job = self.cells[p[0]].job
            total += job.steps * len(p) * job.width * job.height / 1e6
        return total * seconds_per_step_megapixel


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _label(axis_type_: AxisType, value_text: str) -> str:
    # formats.md: "Label: value"; sampler, S/R, networks and checkpoint show the bare value (as A1111)
    return value_text if axis_type_.bare_label else f"{axis_type_.name}: {value_text}"


def read_axis(letter: str, spec: AxisSpec, base: GenerateJob, keep_random_seeds: bool = False,
              rng: random.Random | None = None, check_checkpoint: Callable[[str], str] | None = None,
              check_network: Callable[[str, str], None] | None = None, limits: Limits | None = None) -> Axis:
    """Read one axis's values against the base job (pure unless the two checks are given). Errors name the axis
    and quote the value; an axis of more values than max_grid_cells is refused before its ranges are listed."""
    atype = axis_type(spec.type)
    axis = Axis(letter, spec, atype)
    if atype.kind == "nothing":
        return axis
    where = f"{letter} axis ({spec.title()})"
    max_values = (limits or Limits.from_env()).max_grid_cells
    try:
        if not isinstance(spec.values, str):
            raise AxisSyntaxError(f"the values must be text, got {spec.values!r}")
        values, texts = _read_values(atype, spec, base, check_checkpoint, check_network, max_values)
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
             "lora_weight": "0, 0.5, 1", "network": "inkwash, paperfold, None", "checkpoint": "demo-tiny"}


def _read_values(atype, spec, base, check_checkpoint, check_network, max_values) -> tuple[list, list[str]]:
    kind, text = atype.kind, spec.values
    if kind == "int":
        values = parse_int_values(text, atype.name.lower(), max_values)
        return values, [str(v) for v in values]
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


def plan_groups(cells: list[GridCell], cells_per_pass: int) -> list[GridGroup]:
    """Group cells that can share denoising passes and order the groups so that the slow changes (checkpoint,
    then LoRA set) happen least often; split each group into passes of at most `cells_per_pass` cells (one cell per
    pass for samplers whose noise belongs to the whole pass)."""
    groups: dict[tuple, GridGroup] = {}
    for cell in cells:
        j = cell.job
        key = (cell.checkpoint, lora_set(j.prompt), j.sampler, samplers.resolve_schedule(j.sampler, j.schedule),
               j.steps, j.width, j.height, j.clip_skip)
        groups.setdefault(key, GridGroup(key, cell.checkpoint, [], [])).cells.append(cell.index)
    first_seen: dict[tuple, int] = {}
    for key in groups:
        for part in (key[0], key[:2]):
            first_seen.setdefault(part, len(first_seen))
    ordered = sorted(groups.values(), key=lambda g: (first_seen[g.key[0]], first_seen[g.key[:2]], g.cells[0]))
    for group in ordered:
        size = 1 if pass_noise_is_shared(group.key[2]) else cells_per_pass
        group.passes = [group.cells[i : i + size] for i in range(0, len(group.cells), size)]
    return ordered


def plan_grid(job: GridJob, rng: random.Random | None = None, check_checkpoint: Callable[[str], str] | None = None,
              check_network: Callable[[str, str], None] | None = None, limits: Limits | None = None) -> GridPlan:
    """Validate the job, read the axes, make every cell's GenerateJob, group the cells into passes and lay out
    the grid image. Errors name the axis and quote the value; nothing has run yet. `limits` (default:
    Limits.from_env()) bounds the cells, each cell's prompts, the grid image and the work."""
    # 1. validate the job and read the axes
    limits = limits or Limits.from_env()
    job.validate(limits)
    rng = rng or random.Random()
    axes = [read_axis(letter, spec, job.base, job.keep_random_seeds, rng, check_checkpoint, check_network, limits)
            for letter, spec in zip(LETTERS, job.axes(), strict=True)]
    n_cells = len(axes[0].values) * len(axes[1].values) * len(axes[2].values)
    shape = " × ".join(str(len(a.values)) for a in axes if a.active)
    limits.check("max_grid_cells", n_cells, f"the grid has {n_cells:,} cells ({shape}; use fewer values)")
    # 2. one GenerateJob per cell; seeds: -1 is one random seed for all cells, or one per cell with keep -1
    shared_seed = rng.randint(0, MAX_SEED) if job.base.seed == -1 and not job.keep_random_seeds else job.base.seed
    cells: list[GridCell] = []
    for iz, z in enumerate(axes[2].values):
        for iy, y in enumerate(axes[1].values):
            for ix, x in enumerate(axes[0].values):
                cell_job = replace(job.base, seed=shared_seed)
                extra = {"checkpoint": job.checkpoint}
                pos = (ix, iy, iz)
                labels = tuple(a.labels[i] for a, i in zip(axes, pos, strict=True))
                try:
                    for axis, value in zip(axes, (x, y, z), strict=True):
                        _apply(axis, value, cell_job, extra, limits)
                    if cell_job.seed == -1:
                        cell_job.seed = rng.randint(0, MAX_SEED)
                    cell_job.validate(limits)
                except LimitExceeded as e:
                    raise LimitExceeded(e.name, e.limit, f"cell {_where(axes, labels)}: {e.what}") from None
                except ValueError as e:
                    raise ValueError(f"cell {_where(axes, labels)}: {e}") from None
                cells.append(GridCell(len(cells), pos, cell_job, extra["checkpoint"], labels))
    total = sum(work(1, c.job.steps, c.job.width, c.job.height) for c in cells)
    limits.check("max_work", total, f"the grid's {len(cells):,} cells are {total:,.0f} step-megapixels of work "
                                    "(steps x width x height / 1e6, summed)")
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
        col_w[ix] = max(col_w[ix], cell.job.width)
        row_h[iy] = max(row_h[iy], cell.job.height)
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

    def plan(self, job: GridJob, rng: random.Random | None = None) -> GridPlan:
        return plan_grid(job, rng, self._check_checkpoint, self._check_network, self.manager.cfg.limits)

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
        if grid_path is None and outputs_dir is not None:
            with self._path_lock:
                grid_path = next_grid_path(outputs_dir)
                grid_path.touch()  # claim the number
        cells_dir = grid_path.with_name(grid_path.stem.removesuffix("-grid") + "-cells") if grid_path else None
        result = GridResult(plan)
        original = self.manager.current
        original_spec = str(original.path) if original.path else original.name
        done, total = 0, plan.total_steps
        n_passes = len(plan.passes)
        try:
            for group in plan.groups:
                if cancel is not None and cancel.is_set():
                    result.interrupted = True
                    break
                # 3. the group's checkpoint (the slowest change: groups are ordered to need few)
                spec = group.checkpoint or original_spec
                if not self._is_loaded(spec):
                    if on_progress:
                        on_progress(done, total, f"loading {spec}")
                    self.manager.load(spec)
                with self.manager.lock:
                    # out of GPU memory: freed, and a message with what to change (studio.oom)
                    done = run_with_advice(
                        lambda done=done, group=group: self._run_group(plan, group, result, cells_dir, done, total,
                                                                       n_passes, on_progress, cancel),
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
        if result.interrupted:
            result.message = (f"stopped: {len(result.images)} of {len(plan.cells)} cells finished and kept; "
                              "the pass that was running is dropped")
        result.seconds = time.perf_counter() - started
        self._finish(result, grid_path)
        return result

    def _run_group(self, plan, group, result, cells_dir, done, total, n_passes, on_progress, cancel) -> int:
        model = self.manager.current
        pipe = model.pipe
        model_hash = self.manager.model_hash(model)
        # 4. encode each distinct prompt pair once (this applies the group's LoRAs)
        encoded = {}
        for index in group.cells:
            j = plan.cells[index].job
            key = _encoding_key(j)
            if key not in encoded:
                encoded[key] = self.generator.encode(j, model)
                for note in encoded[key][2].notes:
                    if note not in result.notes:
                        result.notes.append(note)
        # 5. passes (split further when prompts of different lengths meet: their conditionings cannot stack)
        for planned in group.passes:
            by_length: dict[int, list[int]] = {}
            for index in planned:
                j = plan.cells[index].job
                by_length.setdefault(encoded[_encoding_key(j)][0].shape[1], []).append(index)
            for indices in by_length.values():
                jobs = [plan.cells[i].job for i in indices]
                first = jobs[0]
                items = []
                for j in jobs:
                    cond, uncond, nets = encoded[_encoding_key(j)]
                    items.append(nets.item(cond, uncond, j.cfg_scale, j.seed))
                number = result.passes_run + 1
                label = f"pass {number}/{n_passes}" if number <= n_passes else f"pass {number}"

                def on_step(i, n, done=done, first=first, label=f"{label} ({len(items)} cells)"):
                    if on_progress:
                        step = -(-i * first.steps // n)  # 2nd-order samplers take more timesteps than steps
                        on_progress(done + step, total, f"{label}, step {step}/{first.steps}")

                note = speed.compile_note(pipe.unet, (len(items), first.width, first.height, False))
                if note and on_progress:
                    on_progress(done, total, f"{label}: {note}")
                t0 = time.perf_counter()
                out = denoise(pipe, items, first.sampler, first.schedule, first.steps, first.width, first.height,
                              on_step=on_step, cancel=cancel)
                if out.interrupted:
                    result.interrupted = True
                    return done
                result.passes_run += 1
                megapixels = first.width * first.height / 1e6
                rate = (time.perf_counter() - t0) / (first.steps * len(items) * megapixels)
                old = self.rates.get(model.name)
                self.rates[model.name] = rate if old is None else 0.5 * (old + rate)
                done += first.steps
                # 6. save each cell with the infotext Generate writes for it
                for index, j, image in zip(indices, jobs, out.images, strict=True):
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
    """What a cell's conditioning depends on (steps too: prompt editing switches at a step)."""
    return job.prompt, job.negative_prompt, job.clip_skip, job.steps


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
               "clip_skip", "infotext"]


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
