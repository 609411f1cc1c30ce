"""The Train tab: a training job (Textual Inversion, TI-Att, TI-MoE, LoRA or a full UNet fine-tune) from a
dataset, run by the background worker, with live status, loss plot, previews and log that survive a page reload;
earlier runs resume from their last checkpoint."""

from __future__ import annotations

import html
import importlib.util
import re
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from studio.config import real_number, whole_number
from studio.dataset.curate import MANIFEST, read_manifest
from studio.dataset.sources import scan_inputs
from studio.models.builtin import MICRO_NAME
from studio.models.speed import TRAIN_COMPILE_MODES
from studio.models.tiny import TINY_NAME
from studio.train.data import MAX_FILE_BYTES, resolve_data_dir
from studio.train.image_encoder import DEFAULT_IMAGE_ENCODER
from studio.train.job import (
    CONV_NETWORKS,
    EMBEDDING_FORMATS,
    LORA_TARGETS,
    METHOD_DEFAULTS,
    METHOD_LABELS,
    METHODS,
    MIXED_PRECISION,
    NETWORK_LABELS,
    NETWORKS,
    OPTIMIZERS,
    TI_METHODS,
    OutputExistsError,
    TrainJob,
    TrainPreset,
    list_train_presets,
)
from studio.train.run_folder import RunFolder
from studio.train.schedule import LR_SCHEDULERS
from studio.train.templates import list_templates, load_templates
from studio.train.worker import RunView
from studio.ui.state import AppState

INTRO = ("Teach the model a style or a subject: pick a dataset (make one in the **Dataset** tab), a method and a "
         "name, press **Start**. Training runs in the background: you can keep generating, close the page and come "
         "back. **Textual Inversion** (and TI-Att, TI-MoE) learns a new word (`embeddings/NAME`, used by its name), "
         "**LoRA** a small add-on (`loras/NAME`, used as `<lora:NAME:0.8>`), a **full fine-tune** a new model "
         "(`models/NAME`, picked in the model list at the top).")
OVERWRITE_LABEL = "Replace an existing file of the same name"
# the shipped presets and prompt templates by what they do; their names (kept: runs, experiments and files use them)
# cite the papers they come from, which the preset's description and docs/training.md name
PRESET_LABELS = {
    "Seed 000: Textual Inversion": "Painting style: embedding (4 paintings, 1000 steps)",
    "Seed 000: TI-Att": "Painting style: embedding with an attention module (4 paintings, 1000 steps)",
    "Seed 000: TI-MoE": "Painting style: embedding with a mixture of experts (4 paintings, 1000 steps)",
    "Seed 001: full fine-tune": "One artist's paintings: whole-model fine-tune",
    "Seed 002: Textual Inversion": "Style embedding, web-UI recipe (2000 steps)",
    "Seed 003: fine-tune with EMA, 8-bit Adam": "Sketch style: fine-tune with EMA and 8-bit Adam",
    "Seed 004: DreamShot LoRA (table 5.1)": "Shot-type LoRA for storyboards (close, medium, long shot)",
}
TEMPLATE_LABELS = {
    "painting_style_seed000": "painting style (19 phrasings)",
    "style_seed002": "style, short list (7 phrasings)",
    "object_seed002": "object, short list (7 phrasings)",
}
# TrainJob fields that have a widget, in the order the handlers receive them
FORM = ("data", "method", "name", "init_word", "vectors", "template", "learning_rate", "batch_size", "grad_accum",
        "max_steps", "resolution", "buckets", "bucket_min_side", "bucket_max_side", "bucket_step", "bucket_no_upscale",
        "seed", "repeats", "flip_p", "mixed_precision", "image_encoder",
        "heads", "experts", "top_k", "aux_weight", "save_every", "preview_every", "preview_prompt", "sample_prompts",
        "embedding_format",
        "overwrite",
        # LoRA, DreamBooth, fine-tune
        "rank", "alpha", "dropout", "lora_targets", "train_text_encoder", "text_encoder_lr", "instance_prompt",
        "network", "conv_rank", "conv_alpha", "lokr_factor", "save_diffusers", "class_prompt", "class_images", "prior_loss_weight", "ema", "ema_decay", "output",
        # optimisation (every method)
        "lr_scheduler", "lr_warmup", "optimizer", "max_grad_norm", "gradient_checkpointing", "min_snr_gamma",
        "noise_offset", "compile", "lr_cycles",
        # captions (kohya's caption options; every method: TI shapes its [filewords])
        "shuffle_tags", "keep_tokens", "caption_dropout", "tag_dropout", "caption_prefix", "caption_suffix",
        # masked training (every method)
        "masked_loss", "unmasked_weight",
        # validation
        "validation_split", "validate_every")
INT_FIELDS = {"vectors", "batch_size", "grad_accum", "max_steps", "resolution", "seed", "repeats", "heads",
              "experts", "top_k", "save_every", "preview_every", "rank", "class_images", "lr_cycles", "keep_tokens",
              "lokr_factor", "validate_every"}
TEXT_FIELDS = {"data", "name", "init_word", "template", "learning_rate", "image_encoder", "preview_prompt",
               "sample_prompts",
               "instance_prompt", "class_prompt", "output", "caption_prefix", "caption_suffix"}
FLOAT_FIELDS = {"aux_weight", "dropout", "prior_loss_weight", "ema_decay", "max_grad_norm", "min_snr_gamma",
                "noise_offset", "caption_dropout", "tag_dropout", "unmasked_weight", "validation_split"}
OPTIONAL_FLOATS = {"alpha": "LoRA alpha", "text_encoder_lr": "text encoder learning rate",
                   "conv_alpha": "conv alpha"}  # empty: None
OPTIONAL_INTS = {"conv_rank": "conv rank", "bucket_min_side": "bucket min side", "bucket_max_side": "bucket max side",
                 "bucket_step": "bucket step"}  # empty: None
BOOL_FIELDS = {"overwrite", "train_text_encoder", "save_diffusers", "ema", "gradient_checkpointing", "shuffle_tags",
               "masked_loss", "bucket_no_upscale"}
LORA_AND_FINETUNE = ("lora", "finetune")
# widgets that matter for some methods only (shown for those, ignored by the others); the rest matter for all
ONLY_FOR = {
    "init_word": ("ti",), "vectors": TI_METHODS, "template": TI_METHODS, "embedding_format": TI_METHODS,
    "image_encoder": ("ti-att", "ti-moe"), "heads": ("ti-att",), "experts": ("ti-moe",), "top_k": ("ti-moe",),
    "aux_weight": ("ti-moe",),
    **dict.fromkeys(("rank", "alpha", "dropout", "lora_targets", "train_text_encoder", "text_encoder_lr",
                     "network", "conv_rank", "conv_alpha", "lokr_factor", "save_diffusers"), ("lora",)),
    **dict.fromkeys(("instance_prompt", "class_prompt", "class_images", "prior_loss_weight"), LORA_AND_FINETUNE),
    **dict.fromkeys(("ema", "ema_decay", "output"), ("finetune",)),
}
# LoRA-method widgets that matter for some networks only (TrainJob.network)
ONLY_FOR_NETWORK = {"conv_rank": CONV_NETWORKS, "conv_alpha": CONV_NETWORKS, "lokr_factor": ("lokr",)}
NETWORK_CHOICES = [(NETWORK_LABELS[key], key) for key in NETWORKS]
# what switching the method resets: the fields whose usual value differs between methods (learning rate, ...)
METHOD_RESET = tuple(k for k in FORM if any(k in d for d in METHOD_DEFAULTS.values()))
NAME_LABELS = {"lora": "LoRA name (loras/NAME.safetensors, used as <lora:NAME:0.8>)",
               "finetune": "Model name (models/NAME.safetensors)"}
NAME_LABEL_TI = "Embedding name (the word for prompts)"
TERMINAL = ("finished", "stopped", "failed", "interrupted")
STATE_ICONS = {"idle": "○", "starting": "◌", "running": "●", "finished": "✓", "stopped": "■", "failed": "✗",
               "interrupted": "⚠"}
FLIP_DATASET = "dataset's"  # the flip widget's "use the dataset's setting"
# the buckets widget: (label, value); "auto" is TrainJob.buckets None (on for SDXL models, off for the others)
BUCKET_CHOICES = [("on for SDXL, off otherwise", "auto"), ("on", "on"), ("off (center-cropped squares)", "off")]
# the scheduler widget: (label in words, TrainJob.lr_scheduler)
SCHEDULER_CHOICES = [(kind.replace("_", " "), kind) for kind in LR_SCHEDULERS]
LOG_LINES = 80
SMOOTHING = 0.9  # EMA weight of the smoothed loss line (TensorBoard's slider, debiased)


# --- pure helpers: widgets <-> TrainJob ----------------------------------------------------------------


def shown_for(key: str, method: str, network: str = "lora") -> bool:
    """Whether widget `key` matters for `method` and (LoRA) `network` (is shown, and goes into the job)."""
    return method in ONLY_FOR.get(key, METHODS) and network in ONLY_FOR_NETWORK.get(key, NETWORKS)


def job_from_form(values: dict, model: str, extra: dict | None = None) -> TrainJob:
    """A TrainJob from the widget values (keys of FORM). `extra` holds settings without a widget that a preset
    or an earlier run brought (keep_checkpoints, preview_seed, ...). Repeats 0 and flip "dataset" mean the
    dataset's own setting; an empty alpha or text encoder rate means "the rank" / "the UNet's". Widgets of other
    methods (hidden) are ignored: the job holds what the page shows."""
    job = {**TrainJob().to_dict(), **(extra or {})}
    method = values.get("method") or job["method"]
    network = (values.get("network") or job["network"]) if shown_for("network", method) else "lora"
    for key, value in values.items():
        if not shown_for(key, method, network):
            continue
        if key in TEXT_FIELDS:
            value = str(value or "").strip()
        elif key == "repeats":
            value = _whole(value, key) if value not in (None, "") else 0
            value = value or None
        elif key == "flip_p":
            value = _flip(value)
        elif key == "buckets":
            value = _buckets(value)
        elif key in INT_FIELDS and value is not None:
            value = _whole(value, key)
        elif key in FLOAT_FIELDS and value is not None:
            value = real_number(key.replace("_", " "), value)
        elif key in OPTIONAL_FLOATS:
            value = _optional_float(value, OPTIONAL_FLOATS[key])
        elif key in OPTIONAL_INTS:
            value = _optional_float(value, OPTIONAL_INTS[key])
            value = value if value is None else _whole(value, key)
        elif key == "lr_warmup" and value is not None:
            value = real_number("lr warmup", value)
            value = int(value) if value >= 1 and value.is_integer() else value  # steps, or a fraction below 1
        elif key in BOOL_FIELDS:
            value = bool(value)
        elif key == "compile":
            value = value or "off"
        job[key] = value
    job["model"] = model
    return TrainJob.from_dict(job)


def method_defaults(method: str) -> dict:
    """The widget values switching to `method` sets (its learning rate, preview prompt: METHOD_DEFAULTS)."""
    job = TrainJob.for_method(method)
    return {key: getattr(job, key) for key in METHOD_RESET}


def form_from_settings(current: dict, settings: dict) -> tuple[dict, dict]:
    """Apply a preset's (or a run's) settings to the current widget values: (new widget values, settings
    without a widget). Keys the settings leave out keep their current value."""
    widget = {"repeats": lambda v: v or 0, "flip_p": lambda v: FLIP_DATASET if v is None else f"{float(v):g}",
              "buckets": lambda v: "auto" if v is None else ("on" if v else "off"),
              **dict.fromkeys((*OPTIONAL_FLOATS, *OPTIONAL_INTS), _optional_text)}
    form = {**current, **{k: widget.get(k, lambda v: v)(v) for k, v in settings.items() if k in FORM}}
    extra = {k: v for k, v in settings.items() if k not in FORM and k != "model"}
    return form, extra


def eight_bit_problem(cuda: bool) -> str | None:
    """Why 8-bit AdamW cannot run here (None: it can): it needs a CUDA GPU and bitsandbytes."""
    if not cuda:
        return "needs a CUDA GPU (bitsandbytes), and this studio trains on the CPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs the bitsandbytes package (pip install bitsandbytes)"
    return None


def fit_settings(settings: dict, model: str, cuda: bool) -> tuple[dict, list[str]]:
    """A preset's (or a run's) settings changed where this model or machine cannot run them, with a note per
    change that matters: a hub image encoder on demo-tiny or micro (it would be downloaded, and only fits real
    models; noted for TI-Att and TI-MoE, the methods that use it), fp16 and 8-bit AdamW without CUDA."""
    out, notes = dict(settings), []
    encoder = str(out.get("image_encoder") or "")
    if (model in (TINY_NAME, MICRO_NAME) and encoder and encoder != TINY_NAME
            and not Path(encoder).expanduser().exists()):
        out["image_encoder"] = TINY_NAME
        if out.get("method") in ("ti-att", "ti-moe"):  # the other methods read no images through it
            notes.append(f"The loaded model is {model}, so the image encoder is demo-tiny (the settings ask for "
                         f"`{encoder}`, a CLIP download that fits real models only). demo-tiny's encoder works "
                         "offline with random weights: the attention or experts see fixed random image features "
                         "rather than CLIP's, which is enough for micro's shapes and colours.")
    if out.get("mixed_precision") == "fp16" and not cuda:
        out["mixed_precision"] = "no"
        notes.append("fp16 mixed precision needs a CUDA GPU: mixed precision is `no` on this CPU.")
    problem = eight_bit_problem(cuda)
    if out.get("optimizer") == "adamw8bit" and problem:
        out["optimizer"] = "adamw"
        notes.append(f"8-bit AdamW {problem}: the optimizer is AdamW (it needs more memory).")
    if out.get("compile", "off") != "off" and not cuda:
        notes.append(f"Compiling the UNet needs a CUDA GPU: compile is `off` on this CPU (the settings ask for "
                     f"`{out['compile']}`).")
        out["compile"] = "off"
    return out, notes


def method_presets(presets_dir: Path, method: str, family: str | None = None) -> dict[str, TrainPreset]:
    """The training presets of one method (shipped ones and the user's presets/training/) that fit a model of
    `family` (SDXL presets only for SDXL models)."""
    return {name: p for name, p in list_train_presets(presets_dir).items()
            if p.settings.get("method", "ti") == method and p.fits(family)}


def _buckets(value) -> bool | None:
    """The buckets widget (or a job's value) as TrainJob.buckets: "auto" / None -> None, "on" -> True."""
    if value is None or isinstance(value, bool):
        return value
    choices = {"auto": None, "": None, "on": True, "off": False}
    if str(value) not in choices:
        raise ValueError(f"buckets must be auto, on or off, got {value!r}")
    return choices[str(value)]


def _flip(value) -> float | None:
    text = str(value if value is not None else "").strip()
    if text in ("", FLIP_DATASET):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"flip probability must be a number from 0 to 1 or {FLIP_DATASET!r}, "
                         f"got {value!r}") from None


def _optional_text(value) -> str:
    """An optional number as its textbox shows it: empty for None."""
    return "" if value is None else f"{float(value):g}"


def _optional_float(value, label: str) -> float | None:
    text = str(value if value is not None else "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{label} must be a number (or empty), got {value!r}") from None


def _whole(value, key: str) -> int:
    """A whole number from a widget (4.0 is 4); 2.5, a bool, NaN or text are refused, not rounded."""
    return whole_number(key.replace("_", " "), value)


# --- pure helpers: RunView -> what the tab shows --------------------------------------------------------


def loss_frame(losses: list[tuple[int, float]], max_points: int = 1500,
               val_losses: list[tuple[int, float]] | None = None) -> pd.DataFrame | None:
    """step / loss / series rows for the plot: every step's loss and a smoothed line (debiased EMA), and the
    held-out images' loss where the run validates; long runs are thinned to about `max_points` steps so the page
    stays light. None before the first step: a LinePlot given an empty frame draws no lines for the data that
    comes later (Gradio 6.31)."""
    if not losses:
        return None
    rows = []
    ema, weight = 0.0, 0.0
    stride = max(1, -(-len(losses) // max_points))
    for i, (step, loss) in enumerate(losses):
        ema = SMOOTHING * ema + (1 - SMOOTHING) * loss
        weight = SMOOTHING * weight + (1 - SMOOTHING)
        if i % stride == 0 or i == len(losses) - 1:
            rows.append((step, loss, "loss"))
            rows.append((step, ema / weight, "smoothed"))
    rows += [(step, loss, "validation") for step, loss in (val_losses or [])]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def preview_items(paths: list[str]) -> list[tuple[str, str]]:
    """Gallery items, oldest first, captioned with the training step (from previews/step-NNNNNNNN.png) and, for
    sample prompts after the first, the sample's number (step-NNNNNNNN-K.png)."""
    items = []
    for path in paths:
        m = re.search(r"step-(\d+)(?:-(\d+))?", Path(path).stem)
        label = Path(path).stem
        if m:
            label = f"step {int(m.group(1))}" + (f" · sample {int(m.group(2))}" if m.group(2) else "")
        items.append((str(path), label))
    return items


def status_text(view: RunView, models_dir: Path | None = None) -> str:
    if view.state == "idle":
        return "○ **No training run yet.** Pick a dataset, a method and a name, and press **Start**."
    label = METHOD_LABELS.get(view.method, view.method).split(" (")[0]  # "TI-MoE", not its explanation
    head = f"{STATE_ICONS.get(view.state, '')} **{view.state}** · `{view.name}` ({label})"
    detail = view.progress if view.active and view.progress else f"step {view.step}/{view.max_steps}"
    lines = [f"{head} · {detail}"]
    if view.message and view.message != "starting":
        lines.append(_plain(view.message))
    output = result_path(view)
    if output and view.state in ("finished", "stopped"):
        lines.append(usage_text(view.method, view.name, output, models_dir))
    if view.run_dir:
        lines.append(f"Run folder: `{view.run_dir}`")
    return "  \n".join(lines)  # Markdown line breaks: one compact block


def usage_text(method: str, name: str, output: str | Path, models_dir: Path | None = None) -> str:
    """How to use what a run wrote: the embedding's word, the LoRA tag, the model to pick."""
    if method == "lora":
        return f"Use it in a prompt: `<lora:{name}:0.8>` (Generate tab → LoRAs and embeddings)."
    if method == "finetune":
        path = Path(output)
        if models_dir is None:
            return f"Pick `{path.name}` in the model list at the top."
        try:
            listed = path.resolve().relative_to(Path(models_dir).resolve()).as_posix()
            return f"Pick `{listed}` in the model list at the top."
        except ValueError:
            return (f"Saved as `{path}`, outside {Path(models_dir).name}/: move it there to pick it in the model "
                    "list at the top.")
    return f"Use it in a prompt: `{name}` (Generate tab → LoRAs and embeddings)."


def result_path(view: RunView) -> str | None:
    """The file a run wrote. A run read back from its folder (after a reload) has it in status.json's
    `output`, which RunView.embedding does not pick up."""
    if view.embedding:
        return view.embedding
    if view.state in ("finished", "stopped") and view.run_dir:
        status = RunFolder(Path(view.run_dir)).status()
        return status.get("output") or status.get("embedding")
    return None


def _plain(text: str) -> str:
    """Text shown as is inside Markdown (an error naming `__init__` must not turn bold)."""
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", text)


def progress_html(view: RunView) -> str:
    fraction = min(1.0, view.step / view.max_steps) if view.max_steps else 0.0
    colour = {"failed": "#d64545", "stopped": "#c28a1e", "interrupted": "#c28a1e"}.get(view.state, "#3b82f6")
    text = html.escape(f"{view.step} / {view.max_steps} steps ({fraction:.0%})" if view.max_steps else "")
    return (f'<div class="tr-bar" style="border:1px solid #8886;border-radius:6px;height:22px;position:relative;'
            f'overflow:hidden"><div style="width:{fraction * 100:.1f}%;height:100%;background:{colour};'
            f'transition:width .5s"></div><span style="position:absolute;inset:0;text-align:center;'
            f'font-size:13px;line-height:22px">{text}</span></div>')


def log_text(view: RunView, lines: int = LOG_LINES) -> str:
    return "\n".join(view.log[-lines:])


def run_choices(runs: list[RunFolder]) -> list[tuple[str, str]]:
    """(label, folder) per run, newest first: 'my-style-20261122-101500 · stopped · step 300/1000'."""
    out = []
    for run in runs:
        status = run.status()
        state = status.get("state", "interrupted")
        out.append((f"{run.path.name} · {state} · step {status.get('step', 0)}/{status.get('max_steps', '?')}",
                    str(run.path)))
    return out


def dataset_choices(datasets_dir: Path) -> list[str]:
    folder = Path(datasets_dir)
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []


def dataset_info(spec: str, datasets_dir: Path) -> str:
    """How many images and captions a dataset has, and the repeats / flip it asks for (no image is decoded)."""
    if not spec or not str(spec).strip():
        return ""
    try:
        folder = resolve_data_dir(spec, datasets_dir)
        found = [src for src, reason in scan_inputs([folder], MAX_FILE_BYTES) if not reason]
    except (ValueError, OSError) as e:
        return f"⚠ {e}"
    captioned = sum(bool(src.caption) for src in found)
    text = f"**{len(found)}** image(s), {captioned} with a caption · `{folder}`"
    if (folder / MANIFEST).is_file():
        try:
            training = read_manifest(folder).get("training", {})
        except ValueError:
            training = {}
        flip = training.get("flip", "none")
        text += (f" · the dataset asks for {training.get('repeats', 1)} repeat(s) per epoch, flip: {flip}"
                 + (f" ({training.get('flip_p')})" if flip == "random" else ""))
    if found and captioned < len(found):
        text += "\n\n⚠ images without a caption train with the template alone ([filewords] stays empty)"
    return text


def template_info(name: str, cfg) -> str:
    try:
        templates = load_templates(name, cfg.assets_dir, cfg.presets_dir)
    except ValueError as e:
        return f"⚠ {e}"
    sample = "; ".join(f"`{line}`" for line in templates.lines[:3])
    more = f" … ({len(templates.lines)} lines)" if len(templates.lines) > 3 else ""
    return f"{sample}{more}"


def model_defaults(state: AppState) -> tuple[str, int, str]:
    """(model the tab trains on, its native resolution, image encoder) for the loaded model."""
    model = state.manager.current
    if model is None:
        return "demo-tiny", 64, "demo-tiny"
    offline_encoder = model.is_demo or model.source == "micro"  # a CLIP download fits real models only
    return model.name, model.native_size, TINY_NAME if offline_encoder else DEFAULT_IMAGE_ENCODER


def model_note(state: AppState) -> str:
    name, size, _ = model_defaults(state)
    return f"Trains on **{name}** (the model chosen at the top; {size} px native)."


# --- the tab ---------------------------------------------------------------------------------------------


def model_family(state: AppState) -> str | None:
    model = state.manager.current
    return model.family if model is not None else None


def preset_choices(presets_dir: Path, method: str, family: str | None = None) -> list[tuple[str, str]]:
    """(label, preset name): the shipped presets by what they do, the user's by their own names."""
    return [(PRESET_LABELS.get(name, name), name) for name in method_presets(presets_dir, method, family)]


def template_choices(templates: list[str]) -> list[tuple[str, str]]:
    """(label, template name): the shipped templates named after a paper shown by what they hold."""
    return [(TEMPLATE_LABELS.get(name, name), name) for name in templates]


def build(state: AppState, model_dropdown: gr.Dropdown, networks_refresh=None, networks_outputs=()):
    """Lay out the tab and wire it to the worker (studio.train.worker). Returns what the app wires to page load
    and model changes. `model_dropdown` is the model list at the top: a finished fine-tune refreshes its choices."""
    cfg, worker = state.cfg, state.trainer
    defaults = TrainJob()
    model_name, native, encoder = model_defaults(state)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    eight_bit = eight_bit_problem(cuda)
    templates = list_templates(cfg.assets_dir, cfg.presets_dir)
    gr.Markdown(INTRO)
    shown = gr.State(None)  # what this browser tab shows now: {"run", "state", "losses", "previews", "log"}
    extra = gr.State({})  # settings without a widget, from a preset or an earlier run
    timer = gr.Timer(1.0, active=False)
    method0 = defaults.method
    with gr.Row():
        with gr.Column(scale=5, elem_id="tr-form"):
            model_md = gr.Markdown(model_note(state), elem_id="tr-model")
            with gr.Row(equal_height=True):
                data = gr.Dropdown(dataset_choices(cfg.datasets_dir), value=None, allow_custom_value=True,
                                   scale=5, elem_id="tr-dataset",
                                   label=f"Dataset: a folder in {cfg.datasets_dir.name}/ or a path")
                data_refresh = gr.Button("↻", scale=0, min_width=40, elem_id="tr-dataset-refresh")
            data_md = gr.Markdown(elem_id="tr-dataset-info")
            method = gr.Radio([(METHOD_LABELS[key], key) for key in METHODS], value=method0, label="Method",
                              elem_id="tr-method", info="choosing a method sets its usual learning rate (TI 0.005, "
                              "LoRA 1e-4, fine-tune 1e-5) and preview prompt")
            preset = gr.Dropdown(preset_choices(cfg.presets_dir, method0, model_family(state)), value=None,
                                 elem_id="tr-preset",
                                 label="Preset for this method (fills the settings)")
            preset_md = gr.Markdown(elem_id="tr-preset-info")
            with gr.Row():
                name = gr.Textbox(label=NAME_LABEL_TI, placeholder="my-style", elem_id="tr-name", scale=2)
                init_word = gr.Textbox(defaults.init_word, label="Initializer word", elem_id="tr-init-word",
                                       placeholder="a word close to the concept, or *", min_width=120)
                vectors = gr.Number(defaults.vectors, minimum=1, maximum=75, min_width=100,
                                    label="Vectors per token", elem_id="tr-vectors")
            template = gr.Dropdown(template_choices(templates),
                                   value=defaults.template if defaults.template in templates else None,
                                   allow_custom_value=True, label="Prompt template", elem_id="tr-template",
                                   info="painting style: seed 000's list; short lists: seed 002's "
                                        "(painting_style_seed000, style_seed002, object_seed002)")
            template_md = gr.Markdown(template_info(defaults.template, cfg), elem_id="tr-template-info")
            instance_prompt = gr.Textbox(defaults.instance_prompt, elem_id="tr-instance-prompt", visible=False,
                                         label="Instance prompt (empty: each image's caption)",
                                         placeholder="one prompt for every image, e.g. a close shot of [filewords]",
                                         info="[filewords] is the image's caption")
            with gr.Row():
                lr = gr.Textbox(defaults.learning_rate, label="Learning rate", elem_id="tr-lr",
                                info="a number, or a schedule: 0.005:100, 1e-3:1000, 1e-5")
                batch = gr.Number(defaults.batch_size, minimum=1, label="Batch size", min_width=100,
                                  elem_id="tr-batch")
                accum = gr.Number(defaults.grad_accum, minimum=1, label="Gradient accumulation",
                                  min_width=100, elem_id="tr-accum")
            with gr.Row():
                steps = gr.Number(defaults.max_steps, minimum=1, label="Max steps", min_width=100,
                                  elem_id="tr-steps")
                resolution = gr.Number(native, minimum=64, step=8, label="Resolution (px)",
                                       min_width=100, elem_id="tr-resolution")
                buckets = gr.Dropdown(BUCKET_CHOICES, value="auto", label="Aspect-ratio buckets", min_width=140,
                                      elem_id="tr-buckets", info="SDXL's resolutions at this size, a batch per "
                                      "bucket; off: center-cropped squares")
                seed = gr.Number(defaults.seed, minimum=0, label="Seed", min_width=100, elem_id="tr-seed")
            with gr.Accordion("Bucket rules (kohya)", open=False, elem_id="tr-bucket-rules"):
                gr.Markdown("Leave the sides and step empty for SDXL's resolutions scaled to this size. Give any of "
                            "them for kohya's buckets: every width from the min side to the max side on the step, "
                            "each with the tallest height that keeps the training area (resolution²).")
                with gr.Row(equal_height=True):
                    bucket_min = gr.Textbox("", label="Min side (px; kohya 256)", elem_id="tr-bucket-min",
                                            min_width=100)
                    bucket_max = gr.Textbox("", label="Max side (px; kohya 1024)", elem_id="tr-bucket-max",
                                            min_width=100)
                    bucket_step = gr.Textbox("", label="Step (px; kohya 64)", elem_id="tr-bucket-step", min_width=100)
                    no_upscale = gr.Checkbox(defaults.bucket_no_upscale, label="No upscale", elem_id="tr-no-upscale",
                                             info="each image in a bucket of its own size, never enlarged")
            with gr.Row():
                repeats = gr.Number(0, minimum=0, label="Repeats per epoch (0: the dataset's)",
                                    elem_id="tr-repeats")
                flip_p = gr.Dropdown([FLIP_DATASET, "0", "0.5", "1"], value=FLIP_DATASET, allow_custom_value=True,
                                     label="Flip probability", elem_id="tr-flip")
                precision = gr.Dropdown(list(MIXED_PRECISION) if cuda else [p for p in MIXED_PRECISION if p != "fp16"],
                                        value="fp16" if cuda else "no", elem_id="tr-precision",
                                        label="Mixed precision" if cuda else "Mixed precision (fp16: CUDA only)")
            with gr.Accordion("LoRA network", open=True, visible=False, elem_id="tr-lora") as lora_acc:
                with gr.Row():
                    rank = gr.Number(defaults.rank, minimum=1, maximum=1024, min_width=100,
                                     label="Rank (network dim)", elem_id="tr-rank")
                    alpha = gr.Textbox(_optional_text(defaults.alpha), label="Alpha (empty: the rank)",
                                       placeholder="the rank", min_width=100, elem_id="tr-alpha")
                    dropout = gr.Number(defaults.dropout, minimum=0, maximum=0.99, step=0.05, min_width=100,
                                        label="Dropout", elem_id="tr-dropout")
                with gr.Row(equal_height=True):
                    network = gr.Dropdown(NETWORK_CHOICES, value=defaults.network, elem_id="tr-network",
                                          label="Network", min_width=160,
                                          info="LoRA: the usual · LoCon: + the ResNet convolutions · LoHa, LoKr: "
                                               "more detail for the same size · DoRA: LoRA that also learns each "
                                               "channel's strength")
                    conv_rank = gr.Textbox(_optional_text(defaults.conv_rank), elem_id="tr-conv-rank",
                                           label="Conv rank (empty: no convolutions; LoCon: the rank)",
                                           placeholder="none", min_width=100, visible=False)
                    conv_alpha = gr.Textbox(_optional_text(defaults.conv_alpha), elem_id="tr-conv-alpha",
                                            label="Conv alpha (empty: the conv rank)", placeholder="the conv rank",
                                            min_width=100, visible=False)
                    lokr_factor = gr.Number(defaults.lokr_factor, minimum=-1, precision=0, min_width=100,
                                            label="LoKr factor (-1: balanced)", elem_id="tr-lokr-factor",
                                            visible=False)
                with gr.Row(equal_height=True):
                    targets = gr.Dropdown(list(LORA_TARGETS), value=defaults.lora_targets, elem_id="tr-targets",
                                          label="UNet layers", min_width=120,
                                          info="attention: q/k/v/out · transformer: + feed-forward, proj · all: "
                                               "+ ResNet convolutions")
                    save_diffusers = gr.Checkbox(defaults.save_diffusers, elem_id="tr-save-diffusers",
                                                 label="Also save a diffusers copy", info="in the run folder")
                with gr.Row(equal_height=True):
                    train_te = gr.Checkbox(defaults.train_text_encoder, label="Train the text encoder too",
                                           elem_id="tr-train-te", info="its q/k/v/out projections")
                    te_lr = gr.Textbox(_optional_text(defaults.text_encoder_lr),
                                       label="Text encoder learning rate (empty: the UNet's)", elem_id="tr-te-lr",
                                       placeholder="e.g. 5e-5")
            with gr.Accordion("Full fine-tune", open=True, visible=False, elem_id="tr-finetune") as ft_acc:
                with gr.Row(equal_height=True):
                    ema = gr.Checkbox(defaults.ema, label="EMA of the weights", info="the average is what is saved",
                                      elem_id="tr-ema")
                    ema_decay = gr.Number(defaults.ema_decay, minimum=0, maximum=1, step=0.0001, min_width=100,
                                          label="EMA decay", elem_id="tr-ema-decay")
                output = gr.Textbox(defaults.output, label="Output file (empty: models/NAME.safetensors)",
                                    placeholder="a .safetensors path; outside models/ it is not in the model list",
                                    elem_id="tr-output")
            with gr.Accordion("DreamBooth prior preservation (optional)", open=False, visible=False,
                              elem_id="tr-dreambooth") as db_acc:
                gr.Markdown("Class images are generated once with the base model and trained alongside yours, "
                            "so the class (\"a photo of a dog\") keeps its look. Leave empty for none.")
                with gr.Row():
                    class_prompt = gr.Textbox(defaults.class_prompt, label="Class prompt", scale=3,
                                              placeholder="a photo of a room", elem_id="tr-class-prompt")
                    class_images = gr.Number(defaults.class_images, minimum=0, min_width=100,
                                             label="Class images", elem_id="tr-class-images")
                    prior_weight = gr.Number(defaults.prior_loss_weight, minimum=0, step=0.1, min_width=100,
                                             label="Prior loss weight", elem_id="tr-prior-weight")
            with gr.Accordion("Inversion module (TI-Att, TI-MoE)", open=True, visible=False,
                              elem_id="tr-module") as module_acc:
                image_encoder = gr.Textbox(encoder, elem_id="tr-image-encoder",
                                           label="CLIP image encoder (hub id, folder, or demo-tiny)")
                with gr.Row():
                    heads = gr.Number(defaults.heads, minimum=1, label="Heads (TI-Att)", min_width=100,
                                      elem_id="tr-heads")
                    experts = gr.Number(defaults.experts, minimum=1, label="Experts (TI-MoE)",
                                        min_width=100, elem_id="tr-experts")
                    top_k = gr.Number(defaults.top_k, minimum=1, label="Top-k (TI-MoE)", min_width=100,
                                      elem_id="tr-top-k")
                    aux = gr.Number(defaults.aux_weight, minimum=0, step=0.005, label="Aux loss weight (TI-MoE)",
                                    elem_id="tr-aux")
            with gr.Accordion("Optimisation", open=False, elem_id="tr-optimisation"):
                with gr.Row():
                    scheduler = gr.Dropdown(SCHEDULER_CHOICES, value=defaults.lr_scheduler, min_width=120,
                                            label="LR scheduler", elem_id="tr-scheduler")
                    warmup = gr.Number(defaults.lr_warmup, minimum=0, step=0.1, min_width=100, elem_id="tr-warmup",
                                       label="Warmup (steps, or a fraction < 1)")
                    cycles = gr.Number(defaults.lr_cycles, minimum=1, precision=0, min_width=100,
                                       elem_id="tr-lr-cycles", label="Restart cycles",
                                       info="cosine with restarts: the rate falls and jumps back this many times")
                    optimizer = gr.Dropdown(list(OPTIMIZERS) if not eight_bit else ["adamw"], min_width=120,
                                            value=defaults.optimizer, label="Optimizer", elem_id="tr-optimizer")
                if eight_bit:
                    gr.Markdown(f"ℹ 8-bit AdamW is not offered: it {eight_bit}.", elem_id="tr-optimizer-note")
                with gr.Row():
                    grad_norm = gr.Number(defaults.max_grad_norm, minimum=0, step=0.1, min_width=100,
                                          label="Max grad norm (0: off)", elem_id="tr-grad-norm")
                    snr = gr.Number(defaults.min_snr_gamma, minimum=0, step=0.5, min_width=100,
                                    label="Min-SNR γ (0: off, 5 usual)", elem_id="tr-snr")
                    noise_offset = gr.Number(defaults.noise_offset, minimum=0, maximum=1, step=0.01, min_width=100,
                                             label="Noise offset (0: off)", elem_id="tr-noise-offset")
                with gr.Row(equal_height=True):
                    checkpointing = gr.Checkbox(defaults.gradient_checkpointing, elem_id="tr-checkpointing",
                                                label="Gradient checkpointing (less memory, about 30 % slower)")
                    compile_mode = gr.Dropdown(
                        list(TRAIN_COMPILE_MODES) if cuda else ["off"], value=defaults.compile, min_width=120,
                        label="Compile UNet", elem_id="tr-compile",
                        info="torch.compile of the UNet, forward and backward: fused kernels; the first step waits "
                             "for the compiler" + ("" if cuda else " (CUDA only: not offered on this CPU)"))
            with gr.Accordion("Captions", open=False, elem_id="tr-captions"):
                gr.Markdown("Each image's caption (Textual Inversion: its `[filewords]`) can change every step, as "
                            "kohya_ss does it: tags are the comma-separated parts. Drawn from the seed, so a resumed "
                            "run sees the same captions.")
                with gr.Row(equal_height=True):
                    shuffle_tags = gr.Checkbox(defaults.shuffle_tags, label="Shuffle tags", elem_id="tr-shuffle-tags",
                                               info="a new order of the tags every step")
                    keep_tokens = gr.Number(defaults.keep_tokens, minimum=0, precision=0, min_width=100,
                                            label="Keep first N tags in place", elem_id="tr-keep-tokens",
                                            info="e.g. 1 keeps the trigger word first")
                with gr.Row():
                    caption_dropout = gr.Number(defaults.caption_dropout, minimum=0, maximum=1, step=0.05,
                                                min_width=100, label="Drop the whole caption (rate)",
                                                elem_id="tr-caption-dropout",
                                                info="train on an empty prompt this often (0: never)")
                    tag_dropout = gr.Number(defaults.tag_dropout, minimum=0, maximum=1, step=0.05, min_width=100,
                                            label="Drop each tag (rate)", elem_id="tr-tag-dropout",
                                            info="each tag after the kept ones (0: never)")
                with gr.Row():
                    caption_prefix = gr.Textbox(defaults.caption_prefix, label="Caption prefix",
                                                elem_id="tr-caption-prefix", placeholder="e.g. my-style",
                                                info="a tag before every caption, never shuffled")
                    caption_suffix = gr.Textbox(defaults.caption_suffix, label="Caption suffix",
                                                elem_id="tr-caption-suffix", placeholder="e.g. high quality",
                                                info="a tag after every caption, never shuffled")
            with gr.Accordion("Masked training", open=False, elem_id="tr-masks"):
                gr.Markdown("Teach only part of each picture: a mask beside an image (`cat.mask.png` for `cat.png`, "
                            "white where it counts) or the image's transparency weights the loss, as kohya's "
                            "masked loss and OneTrainer's masked training do. Images without a mask count "
                            "everywhere.")
                with gr.Row(equal_height=True):
                    masked_loss = gr.Checkbox(defaults.masked_loss, label="Masked training", elem_id="tr-masked",
                                              info="the loss counts inside the masks")
                    unmasked_weight = gr.Number(defaults.unmasked_weight, minimum=0, maximum=1, step=0.05,
                                                min_width=100, label="Weight outside the masks",
                                                elem_id="tr-unmasked-weight",
                                                info="0 ignores the rest of the picture; 0.1 keeps a little of it")
            with gr.Accordion("Run settings", open=False):
                with gr.Row():
                    save_every = gr.Number(defaults.save_every, minimum=1,
                                           label="Save a checkpoint every N steps", elem_id="tr-save-every")
                    preview_every = gr.Number(defaults.preview_every, minimum=0,
                                              label="Preview image every N steps (0: none)",
                                              elem_id="tr-preview-every")
                preview_prompt = gr.Textbox(defaults.preview_prompt, elem_id="tr-preview-prompt",
                                            label="Preview prompt ([name] is the name; empty: the first image's "
                                                  "prompt)")
                sample_prompts = gr.Textbox(defaults.sample_prompts, elem_id="tr-sample-prompts", lines=3,
                                            label="Sample prompts (instead of the preview prompt: one per line, each "
                                                  "a preview image)",
                                            placeholder="[name], a castle at dusk --n blurry --w 512 --h 768 --d 7 "
                                                        "--l 6 --s 25",
                                            info="kohya's sample-prompt lines: --n negative prompt, --w/--h size, "
                                                 "--d seed, --l CFG scale, --s steps; # starts a comment")
                with gr.Row():
                    validation_split = gr.Number(defaults.validation_split, minimum=0, maximum=0.5, step=0.05,
                                                 min_width=100, label="Validation split (0: none)",
                                                 elem_id="tr-validation-split",
                                                 info="this share of the images is kept out of training; their "
                                                      "loss is plotted beside the training loss")
                    validate_every = gr.Number(defaults.validate_every, minimum=1, precision=0, min_width=100,
                                               label="Validate every N steps", elem_id="tr-validate-every")
                with gr.Row():
                    fmt = gr.Dropdown(list(EMBEDDING_FORMATS), value=defaults.embedding_format,
                                      label="Embedding file format", elem_id="tr-format")
                    overwrite = gr.Checkbox(defaults.overwrite, label=OVERWRITE_LABEL,
                                            elem_id="tr-overwrite")
            with gr.Accordion("Resume an earlier run", open=False):
                with gr.Row(equal_height=True):
                    runs = gr.Dropdown(run_choices(worker.runs()), value=None, label="Run", scale=5,
                                       elem_id="tr-runs")
                    runs_refresh = gr.Button("↻", scale=0, min_width=40, elem_id="tr-runs-refresh")
                with gr.Row():
                    more_steps = gr.Number(0, precision=0, minimum=0, elem_id="tr-resume-steps",
                                           label="Continue up to N steps (0: the run's max steps)")
                    resume_btn = gr.Button("Resume", elem_id="tr-resume")
                    load_btn = gr.Button("Use its settings", elem_id="tr-use-settings")
        with gr.Column(scale=6):
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", elem_id="tr-start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="tr-stop")
            status = gr.Markdown(status_text(RunView()), elem_id="tr-status")
            progress = gr.HTML(progress_html(RunView()), elem_id="tr-progress")
            plot = gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss",
                               color_map={"loss": "#9ec5fe", "smoothed": "#1d4ed8", "validation": "#d97706"}, height=260,
                               elem_id="tr-loss-plot")
            previews = gr.Gallery(label="Previews (fixed prompt and seed; newest last)", columns=4, height=280,
                                  object_fit="contain", elem_id="tr-previews", format="png")
            log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, interactive=False,
                             elem_id="tr-log")

    form = {"data": data, "method": method, "name": name, "init_word": init_word, "vectors": vectors,
            "template": template, "learning_rate": lr, "batch_size": batch, "grad_accum": accum,
            "max_steps": steps, "resolution": resolution, "buckets": buckets, "bucket_min_side": bucket_min,
            "bucket_max_side": bucket_max, "bucket_step": bucket_step, "bucket_no_upscale": no_upscale, "seed": seed,
            "repeats": repeats, "flip_p": flip_p,
            "mixed_precision": precision, "image_encoder": image_encoder, "heads": heads, "experts": experts,
            "top_k": top_k, "aux_weight": aux, "save_every": save_every, "preview_every": preview_every,
            "preview_prompt": preview_prompt, "sample_prompts": sample_prompts, "embedding_format": fmt, "overwrite": overwrite,
            "rank": rank, "alpha": alpha, "dropout": dropout, "lora_targets": targets, "network": network,
            "conv_rank": conv_rank, "conv_alpha": conv_alpha, "lokr_factor": lokr_factor,
            "train_text_encoder": train_te, "text_encoder_lr": te_lr, "instance_prompt": instance_prompt,
            "save_diffusers": save_diffusers, "class_prompt": class_prompt, "class_images": class_images,
            "prior_loss_weight": prior_weight, "ema": ema, "ema_decay": ema_decay, "output": output,
            "lr_scheduler": scheduler, "lr_warmup": warmup, "optimizer": optimizer, "max_grad_norm": grad_norm,
            "gradient_checkpointing": checkpointing, "min_snr_gamma": snr, "noise_offset": noise_offset,
            "compile": compile_mode, "lr_cycles": cycles, "shuffle_tags": shuffle_tags, "keep_tokens": keep_tokens,
            "caption_dropout": caption_dropout, "tag_dropout": tag_dropout, "caption_prefix": caption_prefix,
            "caption_suffix": caption_suffix, "masked_loss": masked_loss, "unmasked_weight": unmasked_weight,
            "validation_split": validation_split, "validate_every": validate_every}
    widgets = [form[key] for key in FORM]
    networks_outputs = list(networks_outputs)
    view_outputs = [shown, timer, status, progress, plot, previews, log, runs, model_dropdown, *networks_outputs]

    # --- live view: one function renders a RunView, sending only what changed since this tab last looked
    def render(view: RunView, before: dict | None):
        """Outputs for view_outputs; `before` is what this browser tab last drew (None: draw everything)."""
        now = {"run": view.run_dir, "state": view.state, "losses": len(view.losses),
               "previews": len(view.previews), "log": len(view.log), "step": view.step, "message": view.message}
        before = before or {}
        changed = before.get("state") != view.state or before.get("run") != view.run_dir
        ended = changed and before.get("state") in ("starting", "running") and view.state in TERMINAL
        skip = gr.skip()
        wrote = ended and bool(view.embedding)
        # a new LoRA or embedding shows up in the Generate tab's cards, a new checkpoint in the model list
        refresh_cards = wrote and view.method != "finetune" and networks_refresh is not None
        refresh_models = (wrote and view.method == "finetune") or not before
        return (now,
                gr.Timer(active=view.active) if changed or not before else skip,
                status_text(view, cfg.models_dir) if now != before else skip,
                progress_html(view) if now != before else skip,
                loss_frame(view.losses, val_losses=view.val_losses)
                if changed or before.get("losses") != now["losses"] else skip,
                preview_items(view.previews) if changed or before.get("previews") != now["previews"] else skip,
                log_text(view) if changed or before.get("log") != now["log"] else skip,
                gr.update(choices=run_choices(worker.runs())) if ended or not before else skip,
                gr.update(choices=state.manager.choices()) if refresh_models else skip,
                *(networks_refresh() if refresh_cards else [skip] * len(networks_outputs)))

    def poll(before):
        return render(worker.view(), before)

    timer.tick(poll, shown, view_outputs, concurrency_limit=None, show_progress="hidden",
               api_visibility="private")

    # --- start, stop, resume (quick: the worker trains in its own thread, outside the "gpu" lane)
    def start(model_value, extra_settings, *values):
        try:
            job = job_from_form(dict(zip(FORM, values, strict=True)), model_value or model_defaults(state)[0],
                                extra_settings)
            if job.optimizer == "adamw8bit" and eight_bit:
                raise ValueError(f"8-bit AdamW {eight_bit}; choose adamw")
            view = worker.start(job)
        except OutputExistsError as e:
            raise gr.Error(f"Not started: {e}. Type another name, or tick '{OVERWRITE_LABEL}' (under Run "
                           "settings).") from e
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e)) from e
        return render(view, None)  # a new run: draw it all

    start_btn.click(start, [model_dropdown, extra, *widgets], view_outputs, concurrency_limit=None,
                    show_progress="hidden", api_name="train")

    def stop():
        gr.Info(worker.stop())

    stop_btn.click(stop, None, None, concurrency_limit=None, api_name="train_stop")

    def resume(run_dir, steps_value):
        if not run_dir:
            raise gr.Error("choose a run to resume")
        try:
            view = worker.resume(Path(run_dir), _whole(steps_value, "steps") if steps_value else None)
        except (ValueError, RuntimeError, OSError) as e:
            raise gr.Error(str(e)) from e
        return render(view, None)  # a new run: draw it all

    resume_btn.click(resume, [runs, more_steps], view_outputs, concurrency_limit=None,
                     show_progress="hidden", api_visibility="private")

    # --- filling the form: presets, an earlier run's settings (fitted to this model and machine, with notes)
    def fill(settings: dict, description: str, model_value, *values):
        settings, notes = fit_settings(settings, model_value or model_defaults(state)[0], cuda)
        form_values, extra_settings = form_from_settings(dict(zip(FORM, values, strict=True)), settings)
        info = "\n\n".join([description, *(f"⚠ {note}" for note in notes)])
        return (*[form_values[k] for k in FORM], extra_settings, info)

    def pick_preset(preset_name, model_value, *values):
        found = method_presets(cfg.presets_dir, values[FORM.index("method")], model_family(state))
        if preset_name not in found:
            return (*[gr.skip()] * len(FORM), gr.skip(), "")
        return fill(found[preset_name].settings, found[preset_name].description, model_value, *values)

    preset.input(pick_preset, [preset, model_dropdown, *widgets], [*widgets, extra, preset_md],
                 api_visibility="private")

    def use_run(run_dir, model_value, *values):
        if not run_dir:
            raise gr.Error("choose a run first")
        try:
            job = RunFolder.open(Path(run_dir)).job()
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from e
        settings = {k: v for k, v in job.to_dict().items() if k != "overwrite"}
        return fill(settings, f"settings of `{Path(run_dir).name}` (trained on {job.model})", model_value, *values)

    load_btn.click(use_run, [runs, model_dropdown, *widgets], [*widgets, extra, preset_md],
                   api_visibility="private")

    # --- the method: its widgets (on every change, also from a run's settings); its defaults (when clicked)
    groups = [(lora_acc, ("lora",)), (ft_acc, ("finetune",)), (db_acc, LORA_AND_FINETUNE),
              (module_acc, ("ti-att", "ti-moe")), (template_md, TI_METHODS)]
    by_method = [k for k in ONLY_FOR if k not in ONLY_FOR_NETWORK]  # the network's own: show_network
    method_outputs = [*[form[k] for k in by_method], *[box for box, _ in groups], name, preset]

    def show_method(m):
        return (*[gr.update(visible=shown_for(k, m)) for k in by_method],
                *[gr.update(visible=m in methods) for _, methods in groups],
                gr.update(label=NAME_LABELS.get(m, NAME_LABEL_TI)),
                gr.update(choices=preset_choices(cfg.presets_dir, m, model_family(state)), value=None))

    method.change(show_method, method, method_outputs, api_visibility="private")

    # --- the network: its own widgets (conv rank and alpha, LoKr factor), after the method's
    network_widgets = [form[k] for k in ONLY_FOR_NETWORK]

    def show_network(m, net):
        return tuple(gr.update(visible=shown_for(k, m, net or "lora")) for k in ONLY_FOR_NETWORK)

    method.change(show_network, [method, network], network_widgets, api_visibility="private")
    network.change(show_network, [method, network], network_widgets, api_visibility="private")

    def choose_method(m):
        reset = method_defaults(m)
        return (*[reset[k] for k in METHOD_RESET], "")

    method.input(choose_method, method, [*[form[k] for k in METHOD_RESET], preset_md], api_visibility="private")

    # --- small helpers around the form
    def lists():
        return (gr.update(choices=dataset_choices(cfg.datasets_dir)),
                gr.update(choices=run_choices(worker.runs())))

    data_refresh.click(lists, None, [data, runs], api_visibility="private")
    runs_refresh.click(lists, None, [data, runs], api_visibility="private")

    data.change(lambda spec: dataset_info(spec, cfg.datasets_dir), data, data_md, api_visibility="private")
    template.change(lambda t: template_info(t, cfg), template, template_md, api_visibility="private")

    def on_model_loaded():
        _, size, enc = model_defaults(state)
        return model_note(state), size, enc

    def last_run_form(view: RunView) -> tuple | None:
        """The form's values (then extra settings and the note) with the shown run's settings, so a reloaded page
        shows what that run was trained with; None when there is no run or its config cannot be read."""
        if not view.run_dir:
            return None
        try:
            job = RunFolder.open(Path(view.run_dir)).job()
        except (ValueError, OSError):
            return None
        settings = {k: v for k, v in job.to_dict().items() if k != "overwrite"}
        built = [form[k].value for k in FORM]  # what a fresh page shows, the base the settings go over
        return fill(settings, f"settings of the last run, `{Path(view.run_dir).name}` (trained on {job.model})",
                    None, *built)

    def on_page_load():
        view = worker.view()
        filled = last_run_form(view)
        values = list(filled) if filled is not None else [gr.skip()] * (len(FORM) + 2)
        at = FORM.index("data")  # the dataset list is read again, with the run's dataset picked
        picked = {"value": filled[at]} if filled is not None else {}
        values[at] = gr.update(choices=dataset_choices(cfg.datasets_dir), **picked)
        return (*render(view, None), *values)

    return {"on_page_load": on_page_load, "page_outputs": [*view_outputs, *widgets, extra, preset_md],
            "on_model_loaded": on_model_loaded, "model_outputs": [model_md, resolution, image_encoder],
            "lists": lists, "list_outputs": [data, runs]}
