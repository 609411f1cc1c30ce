"""The experiment runner: a YAML file names styles (reference images), methods, prompts and training settings; the
runner trains each style x method cell with the studio's trainer, generates with fixed seeds, scores the images
(CLIP-I accuracy, CLIP-T editability, optionally DINO) and writes seed 000's tables 1 and 2 and a scatter plot.
Resumable: a cell with a result is not redone. Under `accelerate launch` generation and scoring are split over
the processes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from studio.config import StudioConfig
from studio.files.atomic import write_text
from studio.files.names import check_name

PE = "pe"
METHODS = (PE, "ti", "ti-att", "ti-moe", "lora", "finetune")
EXPERIMENT_METRICS = ("clip-i", "clip-t", "dino")
# the training preset each method starts from unless the file names another (or none)
DEFAULT_PRESETS = {"ti": "seed000-ti", "ti-att": "seed000-ti-att", "ti-moe": "seed000-ti-moe",
                   "lora": "kohya-lora-defaults", "finetune": "seed001-finetune"}
ProgressFn = Callable[[int, int, str], None]
LogFn = Callable[[str], None]


# --- the file ------------------------------------------------------------------------------------


@dataclass
class StyleSpec:
    name: str  # shown in the tables; prompt engineering writes it into the prompt ("Claude Monet")
    references: str  # folder of the style's reference images (relative paths: from the YAML file's folder)
    token: str = ""  # stem of the trained embedding / LoRA / checkpoint names (default: from the name)
    train_data: str = ""  # training images (default: the references)

    @property
    def slug(self) -> str:
        return self.token or slugify(self.name)


@dataclass
class GenerationSpec:
    sampler: str = "DPM++ 2M"
    schedule: str = "Karras"
    steps: int = 25
    cfg_scale: float = 7.5
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    batch_size: int = 4  # images per denoising pass (memory)
    clip_skip: int = 1


@dataclass
class TrainingSpec:
    presets: dict = field(default_factory=dict)  # method -> preset name/file, or "" for none (DEFAULT_PRESETS)
    settings: dict = field(default_factory=dict)  # TrainJob fields for every trained method
    per_method: dict = field(default_factory=dict)  # method -> TrainJob fields


@dataclass
class Experiment:
    name: str
    styles: list[StyleSpec]
    methods: list[str]
    prompts: list[str]  # content prompts; the template adds the style
    model: str = "demo-tiny"
    images_per_prompt: int = 8  # seed 000: 8
    seed: int = 0  # image j of prompt i uses seed + i * images_per_prompt + j, in every cell (paired images)
    prompt_template: str = "{prompt} in the style of {style}"  # {style}: the name (pe) or the trained token
    lora_weight: float = 1.0
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    metrics: list[str] = field(default_factory=lambda: ["clip-i", "clip-t"])
    clip_model: str = "ViT-L-14"
    dino_model: str = "facebook/dino-vits16"
    output: str = ""  # results folder (default outputs/experiments/NAME)
    base_dir: str = "."  # the YAML file's folder: relative paths not naming a dataset start there
    datasets_dir: str = ""  # the studio's datasets/: a relative folder is first looked up there

    # --- building and checking ---

    @classmethod
    def from_dict(cls, data: dict, base_dir: Path | str = ".") -> Experiment:
        if not isinstance(data, dict):
            raise ValueError("an experiment file must be a YAML mapping with name, styles, methods, prompts")
        data = {k: v for k, v in data.items() if k != "studio_experiment"}
        _check_keys(data, cls, "experiment", exclude={"base_dir", "datasets_dir"})
        for key in ("name", "styles", "methods", "prompts"):
            if key not in data:
                raise ValueError(f"the experiment file has no {key!r}")
        styles = data.get("styles")
        if not isinstance(styles, list) or not styles:
            raise ValueError(f"styles must be a list of {{name, references}}, got {styles!r}")
        parsed = []
        for i, s in enumerate(styles):
            if not isinstance(s, dict):
                raise ValueError(f"styles[{i}] must be a mapping with name and references, got {s!r}")
            _check_keys(s, StyleSpec, f"styles[{i}]")
            if not s.get("name") or not s.get("references"):
                raise ValueError(f"styles[{i}] needs a name and a references folder, got {s!r}")
            parsed.append(StyleSpec(**{k: str(v) for k, v in s.items()}))
        gen = data.get("generation") or {}
        if not isinstance(gen, dict):
            raise ValueError(f"generation must be a mapping, got {gen!r}")
        _check_keys(gen, GenerationSpec, "generation")
        training = data.get("training") or {}
        if not isinstance(training, dict):
            raise ValueError(f"training must be a mapping, got {training!r}")
        _check_keys(training, TrainingSpec, "training")
        values = {**data, "styles": parsed, "generation": GenerationSpec(**gen), "training": TrainingSpec(**training),
                  "base_dir": str(base_dir)}
        return cls(**values)

    def validate(self, cfg: StudioConfig | None = None) -> None:
        """Raise ValueError naming the bad value; also builds and checks every cell's training job."""
        from studio.generation.job import GenerateJob

        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise ValueError(f"name must be 1-64 letters, digits, '-', '_' or '.', got {self.name!r}")
        check_name(self.name, "experiment")  # its folder's name: not CON, aux, lpt1, nor ending with a dot
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError(f"methods must be a list, some of {', '.join(METHODS)}, got {self.methods!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; methods are {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        if not isinstance(self.prompts, list) or not self.prompts or not all(
                isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError(f"prompts must be a list of non-empty texts, got {self.prompts!r}")
        for name, lo, hi in (("images_per_prompt", 1, 1000), ("seed", 0, 2**32 - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
        if self.seed + len(self.prompts) * self.images_per_prompt > 2**32 - 1:
            raise ValueError(f"seed {self.seed} is too large for {len(self.prompts) * self.images_per_prompt} images")
        if "{prompt}" not in self.prompt_template or "{style}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{prompt}} and {{style}}, got {self.prompt_template!r}")
        if not isinstance(self.lora_weight, (int, float)) or isinstance(self.lora_weight, bool):
            raise ValueError(f"lora_weight must be a number, got {self.lora_weight!r}")
        bad = [m for m in self.metrics if m not in EXPERIMENT_METRICS] if isinstance(self.metrics, list) else [0]
        if bad or not self.metrics:
            raise ValueError(f"metrics must be some of {', '.join(EXPERIMENT_METRICS)}, got {self.metrics!r}")
        slugs = [s.slug for s in self.styles]
        dupes = sorted({s for s in slugs if slugs.count(s) > 1})
        if dupes:
            raise ValueError(f"two styles have the same name or token {dupes}; give them different tokens")
        for s in self.styles:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,50}", s.slug):
                raise ValueError(f"style token {s.slug!r} (style {s.name!r}) must be 1-50 lowercase letters, digits, "
                                 "'-', '_' or '.'")
            check_name(s.slug, "style token")  # a folder name: not con, aux, lpt1, nor ending with a dot
            for what, folder in (("references", s.references), ("train_data", s.train_data)):
                if folder and not self.path(folder).is_dir():
                    where = f" nor a dataset in {self.datasets_dir}" if self.datasets_dir else ""
                    raise ValueError(f"style {s.name!r}: {what} folder {self.path(folder)} does not exist{where}")
        GenerateJob.from_dict({"prompt": "x", **asdict(self.generation)}).validate()
        for method in self.training.presets:
            if method not in METHODS or method == PE:
                raise ValueError(f"training.presets names {method!r}, which is not a trained method")
        for method in self.training.per_method:
            if method not in METHODS or method == PE:
                raise ValueError(f"training.per_method names {method!r}, which is not a trained method")
        for style in self.styles:
            for method in self.methods:
                if method != PE:
                    job = self.train_job(style, method, cfg or StudioConfig(), Path("/nonexistent-exp"))
                    job.validate()

    # --- what a cell does ---

    def path(self, p: str) -> Path:
        """An absolute folder, a dataset name in datasets/, or a folder relative to the YAML file."""
        path = Path(p).expanduser()
        if path.is_absolute():
            return path
        if self.datasets_dir and (Path(self.datasets_dir) / path).is_dir():
            return (Path(self.datasets_dir) / path).resolve()
        return (Path(self.base_dir) / path).resolve()

    def token(self, style: StyleSpec, method: str) -> str:
        return f"{style.slug}-{method}"

    def prompt(self, content: str, style: StyleSpec, method: str) -> str:
        """The prompt a cell generates with: the template with the style's name (pe) or its trained token."""
        word = style.name if method == PE else self.token(style, method)
        text = self.prompt_template.format(prompt=content, style=word)
        if method == "lora":
            text += f" <lora:{self.token(style, method)}:{self.lora_weight:g}>"
        return text

    def seeds(self) -> list[tuple[int, int, int]]:
        """(prompt index, image index, seed) of every image of a cell: the same in every cell."""
        n = self.images_per_prompt
        return [(i, j, self.seed + i * n + j) for i in range(len(self.prompts)) for j in range(n)]

    def train_job(self, style: StyleSpec, method: str, cfg: StudioConfig, out_dir: Path):
        """Defaults, then the method's preset, then training.settings, then training.per_method[method];
        '{token}' in a text setting is the cell's trained name."""
        from studio.train.job import TrainJob, find_train_preset

        token = self.token(style, method)
        values = TrainJob.for_method(method).to_dict()
        values.update({"preview_every": 0, "overwrite": True})  # previews cost time; the experiment owns its files
        if method == "lora":
            values["instance_prompt"] = "a painting in the style of {token}"
        preset = self.training.presets.get(method, DEFAULT_PRESETS.get(method, ""))
        if preset:
            values.update(find_train_preset(preset, cfg.presets_dir).settings)
        for extra in (self.training.settings, self.training.per_method.get(method) or {}):
            if not isinstance(extra, dict):
                raise ValueError(f"training settings must be mappings of training fields, got {extra!r}")
            values.update(extra)
        values = {k: v.replace("{token}", token) if isinstance(v, str) else v for k, v in values.items()}
        values.update(method=method, model=self.model, name=token,
                      data=str(self.path(style.train_data or style.references)))
        if method == "finetune":
            values["output"] = str(Path(out_dir) / "models" / f"{token}.safetensors")
        return TrainJob.from_dict(values)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("base_dir")
        data.pop("datasets_dir")
        return data


def _check_keys(values: dict, cls, where: str, exclude: set | None = None) -> None:
    known = {f.name for f in fields(cls)} - (exclude or set())
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:50] or "style"


def load_experiment(path: Path | str, cfg: StudioConfig | None = None) -> Experiment:
    """Read and validate an experiment YAML file; errors name the bad value."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path.name} is not valid YAML: {e}") from e
    try:
        exp = Experiment.from_dict(data, path.resolve().parent)
    except TypeError as e:
        raise ValueError(f"{path.name}: {e}") from e
    if cfg is not None:
        exp.datasets_dir = str(cfg.datasets_dir)
    exp.validate(cfg)
    return exp


# --- several processes ----------------------------------------------------------------------------


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: 0, 1 unless started by `accelerate launch` / torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(items: list, rank: int, world: int) -> list:
    """Process `rank`'s contiguous share of `items` (as accelerate's split_between_processes: the first
    len(items) % world processes get one more)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    size, extra = divmod(len(items), world)
    start = rank * size + min(rank, extra)
    return items[start : start + size + (1 if rank < extra else 0)]


def barrier() -> None:
    if process_rank()[1] > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


# --- the run -------------------------------------------------------------------------------------


@dataclass
class CellResult:
    style: str
    method: str
    status: str  # "done", "skipped" (finished before), "stopped"
    accuracy: float | None = None
    editability: float | None = None
    dino: float | None = None


@dataclass
class ExperimentResult:
    out_dir: Path
    cells: list[CellResult]
    files: dict[str, Path] = field(default_factory=dict)
    stopped: bool = False

    @property
    def skipped(self) -> int:
        return sum(c.status == "skipped" for c in self.cells)


def default_out_dir(exp: Experiment, cfg: StudioConfig) -> Path:
    return exp.path(exp.output) if exp.output else Path(cfg.outputs_dir) / "experiments" / exp.name


class ExperimentChangedError(ValueError):
    """The results folder holds finished cells of another version of the experiment (the same name, other
    settings): running would replace their results, and the caller did not ask to."""


class ExperimentRunner:
    """Runs an Experiment cell by cell; finished cells (result.json with the same settings) are skipped."""

    def __init__(self, cfg: StudioConfig, on_progress: ProgressFn | None = None, on_log: LogFn | None = None,
                 cancel: threading.Event | None = None):
        self.cfg = cfg
        self.on_progress = on_progress or (lambda done, total, info: None)
        self.on_log = on_log or (lambda text: None)
        self.cancel = cancel or threading.Event()
        self._manager = None
        self._embedders = None
        self._references: dict[str, dict] = {}

    def run(self, exp: Experiment, out_dir: Path | None = None, replace: bool = False) -> ExperimentResult:
        """Run every cell; a cell finished before with the same settings is skipped (a stopped run continues). A
        finished cell whose settings changed (the same experiment name, an edited file) is redone only with
        `replace`, else ExperimentChangedError before anything runs."""
        # 1. validate, folders
        if not exp.datasets_dir:
            exp.datasets_dir = str(self.cfg.datasets_dir)
        exp.validate(self.cfg)
        out = Path(out_dir) if out_dir else default_out_dir(exp, self.cfg)
        rank, world = process_rank()
        self.exp, self.out, self.rank, self.world = exp, out, rank, world
        self.cell_cfg = dataclasses.replace(self.cfg, embeddings_dir=out / "embeddings", loras_dir=out / "loras",
                                            runs_dir=out / "runs",
                                            device=self._device())
        if not replace:
            changed = [f"{style.name} · {method}" for style in exp.styles for method in exp.methods
                       if (done := _read_json(self.cell_dir(style, method) / "result.json"))
                       and done.get("key") != self.cell_key(style, method)]
            if changed:
                raise ExperimentChangedError(
                    f"{out.name}/ holds results of this experiment with other settings ({', '.join(changed[:4])}"
                    f"{' …' if len(changed) > 4 else ''}); running would replace them. Give the experiment another "
                    "name, or ask to replace its results")
        if rank == 0:
            for d in (out, out / "embeddings", out / "loras", out / "runs", out / "models", out / "cells"):
                d.mkdir(parents=True, exist_ok=True)
            write_text(out / "experiment.yaml", yaml.safe_dump(exp.to_dict(), sort_keys=False, allow_unicode=True))
        barrier()
        cells = [(s, m) for s in exp.styles for m in exp.methods]
        results: list[CellResult] = []
        # 2. the cells
        for k, (style, method) in enumerate(cells):
            if self.cancel.is_set():
                break
            self.on_progress(k, len(cells), f"{style.name} · {method}")
            results.append(self.run_cell(style, method))
            if results[-1].status == "stopped":
                break
        stopped = self.cancel.is_set() or len(results) < len(cells)
        # 3. tables and plot, from every finished cell on disk (also those of earlier runs)
        files = {}
        if rank == 0:
            files = self.write_tables()
        self.on_progress(len(cells), len(cells), "stopped" if stopped else "done")
        return ExperimentResult(out, results, files, stopped)

    def _device(self) -> str:
        rank, world = process_rank()
        if world > 1:
            import torch

            if torch.cuda.is_available():
                return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        return self.cfg.device

    # --- one cell ---

    def cell_dir(self, style: StyleSpec, method: str) -> Path:
        return self.out / "cells" / style.slug / method

    def cell_key(self, style: StyleSpec, method: str) -> str:
        """Changes when anything that makes the cell's numbers changes (then the cell is redone)."""
        exp = self.exp
        parts = {"model": exp.model, "prompts": [exp.prompt(p, style, method) for p in exp.prompts],
                 "texts": exp.prompts, "seeds": exp.seeds(), "generation": asdict(exp.generation),
                 "metrics": sorted(exp.metrics), "clip": exp.clip_model, "dino": exp.dino_model,
                 "references": _listing(exp.path(style.references)),
                 "train": self.train_key(style, method)}
        return _digest(parts)

    def train_key(self, style: StyleSpec, method: str) -> str | None:
        if method == PE:
            return None
        job = self.exp.train_job(style, method, self.cfg, self.out).to_dict()
        return _digest({"job": job, "data": _listing(Path(job["data"]))})

    def run_cell(self, style: StyleSpec, method: str) -> CellResult:
        folder = self.cell_dir(style, method)
        key = self.cell_key(style, method)
        done = _read_json(folder / "result.json")
        if done and done.get("key") == key:
            self.on_log(f"{style.name} · {method}: finished before, skipped")
            return CellResult(style.name, method, "skipped", done.get("accuracy"), done.get("editability"),
                              done.get("dino"))
        if self.rank == 0:
            started = _read_json(folder / "cell.json")
            if started and started.get("key") != key:  # settings changed: old images are not this cell's
                self.on_log(f"{style.name} · {method}: settings changed, redoing the cell")
                shutil.rmtree(folder / "images", ignore_errors=True)
                (folder / "result.json").unlink(missing_ok=True)
            write_text(folder / "cell.json", json.dumps({"key": key, "style": style.name, "method": method}))
        barrier()
        # 1. train
        model = self.exp.model
        if method != PE:
            output = self.train(style, method)
            if output is None:
                return CellResult(style.name, method, "stopped")
            if method == "finetune":
                model = str(output)
        # 2. generate this process's share of the images (those already there are kept)
        mine = shard(self.exp.seeds(), self.rank, self.world)
        if not self.generate(style, method, model, mine):
            return CellResult(style.name, method, "stopped")
        # 3. embed this process's images, then the first process scores the cell
        self.embed_share(style, method, mine)
        barrier()
        result = None
        if self.rank == 0:
            result = self.score(style, method, key)
        barrier()
        if result is None:
            result = _read_json(folder / "result.json") or {}
        return CellResult(style.name, method, "done", result.get("accuracy"), result.get("editability"),
                          result.get("dino"))

    def train(self, style: StyleSpec, method: str) -> Path | None:
        """Train the cell's embedding / LoRA / checkpoint, or reuse the one a finished earlier run made."""
        from studio.train.loop import Trainer

        folder = self.cell_dir(style, method)
        key = self.train_key(style, method)
        info = _read_json(folder / "train.json")
        if info and info.get("key") == key and Path(info["output"]).exists():
            return Path(info["output"])
        job = self.exp.train_job(style, method, self.cfg, self.out)
        self._release_model()  # the trainer loads its own copy
        self.on_log(f"{style.name} · {method}: training {job.name} ({job.max_steps} steps)")

        def progress(done, total, text):
            self.on_progress(done, total, f"{style.name} · {method}: {text}")

        result = Trainer(self.cell_cfg, on_progress=progress, cancel=self.cancel).start(job)
        if result.state == "stopped":
            return None
        if result.state != "finished":
            raise RuntimeError(f"training {job.name} for {style.name} · {method} failed: {result.message}")
        if self.rank == 0:
            write_text(folder / "train.json", json.dumps({"key": key, "output": str(result.output),
                                                          "run_dir": str(result.run_dir), "steps": result.step}))
        barrier()
        return Path(_read_json(folder / "train.json")["output"])

    def _release_model(self) -> None:
        if self._manager is not None:
            self._manager.unload()
            self._manager = None

    def _generator(self, model: str):
        from studio.generation.generate import Generator
        from studio.models.manager import ModelManager

        if self._manager is None or self._manager_model != model:
            self._release_model()
            self._manager = ModelManager(self.cell_cfg)
            self._manager.load(model)
            self._manager_model = model
        return Generator(self._manager)

    def image_path(self, style: StyleSpec, method: str, i: int, j: int, seed: int) -> Path:
        return self.cell_dir(style, method) / "images" / f"p{i:03d}-{j:03d}-{seed}.png"

    def generate(self, style: StyleSpec, method: str, model: str, items: list[tuple[int, int, int]]) -> bool:
        """Generate the images of `items` that are not there yet; False when stopped."""
        from studio.generation.generate import save_png
        from studio.generation.job import GenerateJob

        todo = [it for it in items if not self.image_path(style, method, *it).is_file()]
        if not todo:
            return True
        generator = self._generator(model)
        gen = self.exp.generation
        # runs of consecutive seeds of one prompt go through in batches
        runs: list[list[tuple[int, int, int]]] = []
        for it in todo:
            if runs and runs[-1][-1][0] == it[0] and runs[-1][-1][2] + 1 == it[2] and len(runs[-1]) < gen.batch_size:
                runs[-1].append(it)
            else:
                runs.append([it])
        for n, run in enumerate(runs):
            if self.cancel.is_set():
                return False
            self.on_progress(n, len(runs), f"{style.name} · {method}: generating")
            prompt = self.exp.prompt(self.exp.prompts[run[0][0]], style, method)
            job = GenerateJob(prompt=prompt, negative_prompt=gen.negative_prompt, sampler=gen.sampler,
                              schedule=gen.schedule, steps=gen.steps, cfg_scale=gen.cfg_scale, seed=run[0][2],
                              width=gen.width, height=gen.height, batch_size=len(run), batch_count=1,
                              clip_skip=gen.clip_skip)
            result = generator.run(job, None, cancel=self.cancel)
            if result.interrupted:
                return False
            for item, image in zip(run, result.images, strict=True):
                save_png(image.image, image.infotext, self.image_path(style, method, *item))
        return True

    def embedders(self):
        from studio.evaluate.folders import EvaluateJob, load_embedders

        if self._embedders is None:
            job = EvaluateJob(generated=".", metrics=list(self.exp.metrics), clip_model=self.exp.clip_model,
                              dino_model=self.exp.dino_model, device=self.cell_cfg.device)
            self._embedders = load_embedders(job, self.cfg.cache_dir)
        return self._embedders

    def _embed(self, images) -> dict:
        emb = self.embedders()
        out = {}
        if emb.clip is not None:
            out["clip"] = emb.clip.image_embeddings(images)
        if emb.dino is not None:
            out["dino"] = emb.dino.image_embeddings(images)
        return out

    def embed_share(self, style: StyleSpec, method: str, items: list[tuple[int, int, int]]) -> None:
        """CLIP (and DINO) embeddings of this process's images, in a file per process for the first to merge."""
        from PIL import Image
        from safetensors.torch import save_file

        from studio.files.atomic import atomic_path

        images = []
        for it in items:
            with Image.open(self.image_path(style, method, *it)) as im:
                images.append(im.convert("RGB"))
        tensors = {k: v.contiguous() for k, v in self._embed(images).items()} if images else {}
        path = self.cell_dir(style, method) / f"embeddings-{self.rank}.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"items": json.dumps(items)})

    def reference_embeddings(self, style: StyleSpec) -> dict:
        if style.slug not in self._references:
            from studio.evaluate.folders import read_images

            _, images, _ = read_images(self.exp.path(style.references))
            if not images:
                raise ValueError(f"style {style.name!r}: no readable images in {self.exp.path(style.references)}")
            self._references[style.slug] = self._embed(images)
        return self._references[style.slug]

    def score(self, style: StyleSpec, method: str, key: str) -> dict:
        """Merge the processes' embeddings and compute the cell's per-prompt and mean metrics (result.json)."""
        import torch
        from safetensors import safe_open

        from studio.evaluate import metrics as M

        folder = self.cell_dir(style, method)
        by_item: dict[tuple, dict] = {}
        for r in range(self.world):
            path = folder / f"embeddings-{r}.safetensors"
            with safe_open(str(path), "pt") as f:
                items = [tuple(it) for it in json.loads(f.metadata()["items"])]
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            for n, it in enumerate(items):
                by_item[it] = {k: v[n] for k, v in tensors.items()}
        refs = self.reference_embeddings(style)
        emb = self.embedders()
        texts = [M.strip_style(p) for p in self.exp.prompts]
        text_emb = emb.clip.text_embeddings(texts) if "clip-t" in self.exp.metrics else None
        rows = []
        for i, content in enumerate(self.exp.prompts):
            mine = [it for it in self.exp.seeds() if it[0] == i]
            row = {"prompt": self.exp.prompt(content, style, method), "text": texts[i], "images": len(mine),
                   "files": [self.image_path(style, method, *it).name for it in mine]}
            if "clip-i" in self.exp.metrics:
                gen = torch.stack([by_item[it]["clip"] for it in mine])
                row["accuracy"] = M.clip_i_accuracy(gen, refs["clip"])
            if "clip-t" in self.exp.metrics:
                row["editability"] = M.clip_t(text_emb[i], torch.stack([by_item[it]["clip"] for it in mine]))
            if "dino" in self.exp.metrics:
                row["dino"] = M.dino_similarity(torch.stack([by_item[it]["dino"] for it in mine]), refs["dino"])
            rows.append(row)
        result = {"key": key, "style": style.name, "method": method, "per_prompt": rows,
                  "references": len(next(iter(refs.values()))),
                  **{k: M.mean(r.get(k) for r in rows) for k in ("accuracy", "editability", "dino")}}
        write_text(folder / "result.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        for r in range(self.world):
            (folder / f"embeddings-{r}.safetensors").unlink(missing_ok=True)
        return result

    # --- the tables ---

    def finished_cells(self) -> list[dict]:
        cells = []
        for style in self.exp.styles:
            for method in self.exp.methods:
                done = _read_json(self.cell_dir(style, method) / "result.json")
                if done and done.get("key") == self.cell_key(style, method):
                    cells.append(done)
        return cells

    def write_tables(self) -> dict[str, Path]:
        from studio.evaluate.report import write_tables

        cells = self.finished_cells()
        files = write_tables(cells, [s.name for s in self.exp.styles], list(self.exp.methods), self.out)
        write_text(self.out / "results.json", json.dumps({"experiment": self.exp.name, "cells": cells}, indent=2,
                                                         ensure_ascii=False) + "\n")
        files["results.json"] = self.out / "results.json"
        return files


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _listing(folder: Path) -> list:
    """File names and sizes of a folder: a changed reference or training set changes the cell's key."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file())
