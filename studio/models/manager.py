"""The one owner of loaded models: resolve a source, load it offline, place it on a device, offload, swap the VAE.

Sources: `demo-tiny`, `demo-tiny-xl`, `micro` (shipped in assets/micro), a diffusers folder, a single SD 1.x /
SD 2.x / SDXL checkpoint in the original layout (configs from assets/, tokenizers from open_clip's BPE file), or a hub id.
VAEs: single files and diffusers folders in vae/, or a NAME.vae.safetensors beside checkpoint NAME (A1111's rules).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from studio.config import StudioConfig
from studio.files.adapters import LoraSlot
from studio.files.hashes import sha256_file, sha256_folder
from studio.files.names import safe_child
from studio.files.pickles import hostile_pickle_in, unpickling_refusal
from studio.models import cuda_graphs, speed
from studio.models.builtin import MICRO_NAME, micro_available, micro_dir
from studio.models.checkpoints import (
    XL_REFINER_MESSAGE,
    Family,
    ModelLoadError,
    check_shapes,
    detect_family,
    family_info,
    prediction_hint,
    probe_v_prediction,
    read_checkpoint_keys,
    unet_in_channels,
    zero_snr_hint,
)
from studio.models.hub import offline, offline_reason
from studio.models.listing import VAE_SIDECAR, list_models
from studio.models.tiny import TINY_NAME, TINY_NAMES, TINY_XL_NAME, build_tiny_pipeline
from studio.models.tokenizer import family_tokenizers

CONFIG_METADATA_KEY = "studio.diffusers_config"  # as studio.files.convert writes it

DEFAULT_DOWNLOAD = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# the VAE menu's fixed choices (A1111's): a NAME.vae.safetensors beside the checkpoint, else its own; its own
VAE_AUTOMATIC, VAE_NONE = "Automatic", "None"
# the VAE groups that share latents: SD 1.x and 2.x use one VAE (scaling 0.18215), SDXL its own (0.13025)
VAE_GROUPS = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}
VAE_GROUP_LABELS = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
VAE_SCALING = {0.18215: "sd", 0.13025: "sdxl"}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# the files of a hub SD repo that the studio needs (fp32 safetensors weights, configs, tokenizer)
HUB_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*",
                "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]
# the pipeline class of each family, and what it is built with besides its components
PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PIPELINE_KWARGS = {
    StableDiffusionPipeline: dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
    StableDiffusionXLPipeline: dict(add_watermarker=False),  # invisible-watermark is not a dependency
}


@dataclass(frozen=True)
class VaeChoice:
    """A VAE in use instead of the checkpoint's own: its name as infotext writes it (`VAE:`) and its file."""

    name: str
    path: Path
    hash: str  # SHA-256 of the file (A1111's `VAE hash` is the first 10 hex digits)


@dataclass
class LoadedModel:
    name: str  # what the UI and infotext call it
    source: str  # "demo", "micro", "diffusers", "single-file", "hub"
    family: str  # "sd1", "sd2" or "sdxl"; its facts: family_info
    prediction_type: str  # "epsilon" or "v_prediction"
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    path: Path | None = None
    hash_: str | None = field(default=None, repr=False)
    lora_slot: LoraSlot | None = field(default=None, repr=False)  # LoRA adapters loaded into this pipe
    # clip skip -> (tokenizer, text encoder, embeddings, PromptEncoder): studio.generation.generate.Generator.prompt_encoder's
    # cache, kept with the model so that it goes when the model goes
    prompt_encoders: dict = field(default_factory=dict, repr=False, compare=False)
    vae_choice: VaeChoice | None = None  # the VAE swapped in (ModelManager.set_vae); None: the checkpoint's own
    own_vae: object | None = field(default=None, repr=False, compare=False)  # the checkpoint's VAE while swapped out

    def loras(self) -> LoraSlot:
        if self.lora_slot is None:
            self.lora_slot = LoraSlot(self.pipe)
        return self.lora_slot

    def without_loras(self) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """The pipe with every LoRA removed: what saving or converting must see."""
        if self.lora_slot is not None:
            self.lora_slot.clear()
        return self.pipe

    @property
    def is_demo(self) -> bool:
        return self.source == "demo"

    @property
    def family_info(self) -> Family:
        """The family's facts (label, text encoders, tokenizers, ...): what code asks instead of branching on names."""
        return family_info(self.family)

    @property
    def is_xl(self) -> bool:
        return self.family_info.is_xl

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if precision != "auto":
        if precision not in table:
            raise ValueError(f"precision must be auto, fp16, bf16 or fp32, got {precision!r}")
        if device.type == "cpu" and precision == "fp16":
            raise ValueError("fp16 is not supported on the CPU; use fp32 or bf16")
        return table[precision]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


class ModelManager:
    """Loads one pipeline at a time and hands it out; every GPU user goes through here."""

    def __init__(self, cfg: StudioConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(self.device, cfg.precision)
        self.current: LoadedModel | None = None
        self.memory = {"attention_slicing": cfg.attention_slicing, "vae_tiling": cfg.vae_tiling,
                       "cpu_offload": cfg.cpu_offload, "compile": speed.check_compile_mode(cfg.compile)}
        self.lock = threading.RLock()
        self.vae_setting = VAE_AUTOMATIC  # the VAE menu's choice, applied to every model loaded
        self.vae_note = ""  # why the choice did not apply to the last model loaded ("" when it did)

    # 1. what can be loaded

    def choices(self) -> list[str]:
        return [e.name for e in list_models(self.cfg.models_dir)] + self.built_in()

    def built_in(self) -> list[str]:
        """The models that ship with the studio: demo-tiny-xl, micro (when its folder is in assets/), demo-tiny."""
        return [TINY_XL_NAME] + ([MICRO_NAME] if micro_available(self.cfg.assets_dir) else []) + [TINY_NAME]

    def default_choice(self) -> str:
        """What to open when nothing was asked for: the first model in models/, else micro, else demo-tiny."""
        local = [e.name for e in list_models(self.cfg.models_dir)]
        return (local + ([MICRO_NAME] if micro_available(self.cfg.assets_dir) else []) + [TINY_NAME])[0]

    def has_real_model(self) -> bool:
        return bool(list_models(self.cfg.models_dir))

    def resolve(self, spec: str) -> tuple[str, Path | None]:
        """(kind, path) for a model spec: demo-tiny, a name in models/, a path, or a hub id."""
        spec = (spec or "").strip()
        if not spec:
            raise ModelLoadError(f"no model given; choose one of: {', '.join(self.choices())}")
        if spec in TINY_NAMES:
            return "demo", None
        if spec == MICRO_NAME and micro_available(self.cfg.assets_dir):
            return "micro", micro_dir(self.cfg.assets_dir)
        candidates = []
        if not Path(spec).is_absolute():
            try:  # a name in models/ first, so a file of the same name in the working folder never stands in
                candidates.append(safe_child(self.cfg.models_dir, spec))
            except ValueError:
                pass
        candidates.append(Path(spec).expanduser())  # a path given on the command line
        for path in candidates:
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    raise ModelLoadError(f"{spec} is a folder without model_index.json, so not a diffusers model")
                return "diffusers", path
            if path.is_file():
                if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".bin"):
                    raise ModelLoadError(f"{spec}: unsupported file type {path.suffix!r}; use .safetensors or .ckpt")
                return "single-file", path
        if HUB_ID.match(spec) and not spec.endswith((".safetensors", ".ckpt")):
            return "hub", None
        raise ModelLoadError(
            f"model {spec!r} not found. Local models: {', '.join(self.choices())}. "
            f"Put a .safetensors/.ckpt file or a diffusers folder in {self.cfg.models_dir}."
        )

    # 2. load

    def open(self, spec: str, on_progress: Callable | None = None) -> LoadedModel:
        """Load a model without making it the current one (training runs hold their own copy), on the CPU."""
        kind, path = self.resolve(spec)
        if on_progress:
            on_progress(0, 1, f"loading {spec}")
        if kind == "demo":
            spec = spec.strip()
            model = LoadedModel(spec, "demo", TINY_NAMES[spec], "epsilon", build_tiny_pipeline(TINY_NAMES[spec]))
        elif kind == "micro":
            model = self._load_diffusers(path, MICRO_NAME, source="micro")
        elif kind == "diffusers":
            model = self._load_diffusers(path, spec)
        elif kind == "single-file":
            model = self._load_single_file(path, spec)
        else:
            model = self._load_diffusers(self.download(spec, on_progress), spec, source="hub")
        if model.is_demo:
            model.hash_ = weights_hash(model.pipe.unet)  # before any cast: the same on every device
        return model

    def load(self, spec: str, on_progress: Callable | None = None) -> LoadedModel:
        with self.lock:
            model = self.open(spec, on_progress)
            self.unload()
            self._place(model.pipe)
            model.pipe.set_progress_bar_config(disable=True)
            self.current = model
            self.vae_note = ""
            try:  # the VAE menu's choice carries over to the new model, as in A1111
                self._apply_vae(model, self.vae_setting)
            except ModelLoadError as e:
                self.vae_note = f"{e}; {model.name} uses its own VAE"
            if on_progress:
                on_progress(1, 1, f"loaded {model.name}")
            return model

    def unload(self) -> None:
        if self.current is not None:
            self.current = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _load_diffusers(self, path: Path, spec: str, source: str = "diffusers") -> LoadedModel:
        family_hint = _folder_family(path, spec)
        cls = PIPELINES[family_hint]
        try:
            pipe = cls.from_pretrained(path, dtype=self.dtype, local_files_only=True, **PIPELINE_KWARGS[cls])
        except Exception as e:
            hostile = hostile_pickle_in(path)  # diffusers reads .bin weights with weights_only=True: name the file
            if hostile is not None:
                rel = hostile.relative_to(path).as_posix()
                raise ModelLoadError(f"could not load the diffusers folder {spec}: "
                                     + unpickling_refusal(hostile, e).replace(hostile.name, rel, 1)) from e
            raise ModelLoadError(f"could not load the diffusers folder {spec}: {type(e).__name__}: {e}") from e
        if family_hint == "sdxl":
            family = "sdxl"
        else:
            family = "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"
        pred = pipe.scheduler.config.get("prediction_type", "epsilon")
        return LoadedModel(Path(spec).name if source != "hub" else spec, source, family, pred, pipe, path)

    def _load_single_file(self, path: Path, spec: str) -> LoadedModel:
        shapes, meta = read_checkpoint_keys(path)
        if _is_vae(shapes):
            where = (f"it is used with checkpoint {path.name[:-len(VAE_SIDECAR)]} when the VAE menu is Automatic"
                     if path.name.lower().endswith(VAE_SIDECAR) else
                     "choose it in the VAE menu (or name it <checkpoint>.vae.safetensors beside its checkpoint)")
            raise ModelLoadError(f"{path.name} is a VAE, not a checkpoint: put it in {self.cfg.vae_dir.name}/ and "
                                 f"{where}")
        family = detect_family(shapes, path.name)
        pred = prediction_hint(path, meta, shapes)
        zero_snr = family == "sdxl" and zero_snr_hint(path, meta, shapes)
        label = family_info(family).label
        cls = PIPELINES[family]
        with tempfile.TemporaryDirectory(prefix="studio-config-") as tmp:
            config_dir = self._config_dir_for(family, pred, meta, Path(tmp), path.name)
            if unet_in_channels(shapes) != 4 and not meta.get(CONFIG_METADATA_KEY):
                # an inpainting checkpoint (sd-v1-5-inpainting, SDXL inpainting): the family's config, 9 channels in
                config_dir = inpainting_config_dir(config_dir, Path(tmp) / "inpainting", unet_in_channels(shapes))
            if family == "sdxl":  # name a missing or misshapen weight before diffusers builds anything
                what = "SDXL base" if not meta.get(CONFIG_METADATA_KEY) else "the SDXL model its metadata describes"
                check_shapes(shapes, expected_shapes(config_dir), path.name, what)
            try:
                pipe = cls.from_single_file(
                    str(path), config=str(config_dir), local_files_only=True, dtype=self.dtype,
                    **family_tokenizers(family), **PIPELINE_KWARGS[cls])
            except ModelLoadError:
                raise
            except Exception as e:
                raise ModelLoadError(
                    f"could not load {path.name} as an {label} checkpoint: {type(e).__name__}: {e}") from e
        _check_complete(pipe, path.name, family)
        if pred is None and family == "sd2":
            # no hint travelled with the file: ask the weights (SD 2.x comes in both kinds)
            pred = "v_prediction" if probe_v_prediction(pipe.unet) else "epsilon"
            if pred == "epsilon":
                pipe.unet.register_to_config(sample_size=64)
        pred = pred or "epsilon"
        overrides = {"prediction_type": pred} if pipe.scheduler.config.get("prediction_type") != pred else {}
        if zero_snr:  # zero terminal SNR: the schedule reaches pure noise, sampled from the last timestep
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if overrides:
            pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, **overrides)
        return LoadedModel(path.stem, "single-file", family, pred, pipe, path)

    def _config_dir_for(self, family: str, pred: str | None, meta: dict, tmp: Path, name: str = "the file") -> Path:
        """The diffusers config folder for a checkpoint: its own (files we wrote) or one from assets/."""
        embedded = meta.get(CONFIG_METADATA_KEY)
        if embedded:
            try:
                return write_config_dir(json.loads(embedded), tmp)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                raise ModelLoadError(f"{name}: its {CONFIG_METADATA_KEY} metadata is damaged "
                                     f"({type(e).__name__}: {e}); remove that key to load it as a standard "
                                     f"{family_info(family).label} checkpoint") from e
        if family in ("sd1", "sdxl"):
            return self.cfg.assets_dir / "configs" / family
        return self.cfg.assets_dir / "configs" / ("sd2-base" if pred == "epsilon" else "sd2-v")

    def download(self, repo_id: str, on_progress: Callable | None = None) -> Path:
        """Fetch a hub SD repo into models/<name>; offline, an error that names the local choices."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        target = safe_child(self.cfg.models_dir, repo_id.split("/")[-1])
        if (target / "model_index.json").is_file():
            return target
        if offline():
            raise ModelLoadError(self._offline_message(repo_id))
        try:
            snapshot_download(repo_id, local_dir=target, allow_patterns=HUB_PATTERNS)
        except LocalEntryNotFoundError as e:
            raise ModelLoadError(self._offline_message(repo_id)) from e
        except Exception as e:
            raise ModelLoadError(f"download of {repo_id} failed: {type(e).__name__}: {e}") from e
        return target

    def _offline_message(self, repo_id: str) -> str:
        local = [c for c in self.choices()]
        return (f"cannot download {repo_id}: {offline_reason()}. "
                f"Local choices: {', '.join(local)}. Or copy a .safetensors checkpoint into {self.cfg.models_dir}.")

    # 3. place and memory options

    def _place(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> None:
        if self.memory["cpu_offload"] and self.device.type == "cuda":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
            if pipe.unet.dtype != self.dtype:  # demo-tiny is built in fp32
                pipe.to(dtype=self.dtype)
        if pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            # a VAE that overflows in fp16 (SDXL's) stays in fp32: diffusers casts it up and back for every image
            pipe.vae.float()
        if self.memory["attention_slicing"]:
            pipe.enable_attention_slicing()
        else:
            pipe.disable_attention_slicing()
        if self.memory["vae_tiling"]:
            pipe.vae.enable_tiling()
        else:
            pipe.vae.disable_tiling()
        # compiling is for CUDA (elsewhere inductor needs a C++ toolchain and gains little); offloaded modules move
        # between devices every call, which compiled graphs do not follow
        if self.device.type == "cuda" and not self.memory["cpu_offload"] and not speed.is_compiled(pipe.unet):
            if self.memory["compile"] != "off":
                speed.use_compile_cache(self.cfg.cache_dir / "torch-compile")
            speed.compile_unet(pipe.unet, self.memory["compile"])
        for part in pipe.components.values():  # inference (models built in code start in training mode)
            if isinstance(part, torch.nn.Module):
                part.eval()
        # eager passes replay the UNet as CUDA graphs (studio.models.cuda_graphs) where nothing else moves it
        cuda_graphs.enable(pipe.unet, self.cfg.cuda_graphs and self.device.type == "cuda"
                           and not self.memory["cpu_offload"] and not speed.is_compiled(pipe.unet))

    def set_memory_options(self, attention_slicing: bool, vae_tiling: bool, cpu_offload: bool,
                           compile: str | None = None) -> str:
        with self.lock:
            compile = speed.check_compile_mode(compile or self.memory["compile"])
            offload_changed = cpu_offload != self.memory["cpu_offload"]
            compile_changed = compile != self.memory["compile"]
            self.memory = {"attention_slicing": bool(attention_slicing), "vae_tiling": bool(vae_tiling),
                           "cpu_offload": bool(cpu_offload), "compile": compile}
            note = ""
            if cpu_offload and self.device.type != "cuda":
                note = " (model CPU offload only applies on CUDA; ignored here)"
            if compile != "off" and self.device.type != "cuda":
                note += " (compiling the UNet only applies on CUDA; ignored here)"
            if self.current is not None:
                reload = (offload_changed and self.current.source != "demo") or (
                    compile_changed and self.device.type == "cuda")
                if reload:
                    # offload hooks and compiled modules cannot be undone cleanly: reload so the setting takes effect
                    self.load(str(self.current.path) if self.current.path else self.current.name)
                else:
                    self._place(self.current.pipe)
            return "memory options applied" + note

    # 4. the VAE

    def vae_choices(self) -> list[str]:
        """The VAE menu: Automatic, None, then every .safetensors file and diffusers VAE folder in vae/."""
        return [VAE_AUTOMATIC, VAE_NONE, *list_vaes(self.cfg.vae_dir)]

    def set_vae(self, name: str) -> str:
        """Use VAE `name` (a choice of vae_choices) with the current model and every model loaded after; "None" and
        an Automatic with no sidecar file put the checkpoint's own VAE back. A VAE of another family, or whose
        weights do not fit the model's VAE, is refused naming both. Returns what is now in use."""
        name = (name or VAE_AUTOMATIC).strip()
        with self.lock:
            if self.current is None:
                raise ModelLoadError("no model is loaded; load one first")
            self._apply_vae(self.current, name)
            self.vae_setting = name
            self.vae_note = ""
            choice = self.current.vae_choice
            return f"VAE: {choice.name}" if choice else f"VAE: {self.current.name}'s own"

    def _apply_vae(self, model: LoadedModel, name: str) -> None:
        """Swap `model`'s VAE for `name`'s (resolved, checked and loaded first: a refused one changes nothing)."""
        path = self._vae_path(model, name)
        if path is None:
            self._swap_vae(model, None, None)
            return
        if model.vae_choice is not None and model.vae_choice.path == path:
            return
        own = model.own_vae if model.own_vae is not None else model.pipe.vae
        vae = self._load_vae(path, model, own)
        digest = sha256_folder(path, self.cfg.cache_dir / "hashes.json") if path.is_dir() else sha256_file(
            path, self.cfg.cache_dir / "hashes.json")
        self._swap_vae(model, vae, VaeChoice(path.name, path, digest))

    def _vae_path(self, model: LoadedModel, name: str) -> Path | None:
        """The VAE file or folder a menu choice means for `model` (None: the checkpoint's own)."""
        if name == VAE_NONE:
            return None
        if name == VAE_AUTOMATIC:
            if model.path is None:
                return None
            sidecar = model.path.parent / f"{model.path.stem if model.path.is_file() else model.path.name}{VAE_SIDECAR}"
            return sidecar if sidecar.is_file() else None
        try:
            path = safe_child(self.cfg.vae_dir, name)
        except ValueError as e:
            raise ModelLoadError(f"VAE {name!r}: {e}") from None
        if not path.exists():
            known = ", ".join(list_vaes(self.cfg.vae_dir)) or "none"
            raise ModelLoadError(f"there is no VAE {name!r} in {self.cfg.vae_dir.name}/ (found: {known}); choose "
                                 f"{VAE_AUTOMATIC}, {VAE_NONE} or one of those")
        return path

    def _load_vae(self, path: Path, model: LoadedModel, own):
        """An AutoencoderKL from a vae/ file or folder, checked against `model`'s family and its own VAE `own`."""
        from diffusers import AutoencoderKL

        group = VAE_GROUPS[model.family]
        if path.is_dir():
            config = _read_json(path / "config.json", path.name)
            found = VAE_SCALING.get(config.get("scaling_factor"))
            _check_vae_group(path.name, found, group, model)
            _check_vae_config(path.name, config, dict(own.config))
            try:
                vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=own.dtype)
            except Exception as e:
                raise ModelLoadError(f"could not load the VAE folder {path.name}: {type(e).__name__}: {e}") from e
        else:
            if path.suffix.lower() != ".safetensors":
                raise ModelLoadError(f"VAE {path.name}: only .safetensors VAE files are read; convert it first")
            shapes, meta = read_checkpoint_keys(path)
            if not _is_vae(shapes):
                what = "a checkpoint: put it in models/" if _has_unet(shapes) else "not a VAE (no encoder.*/decoder.*)"
                raise ModelLoadError(f"{path.name} in {self.cfg.vae_dir.name}/ is {what}")
            _check_vae_group(path.name, _vae_group_of_file(path.name, meta), group, model)
            _check_vae_shapes(path.name, shapes, own)
            with tempfile.TemporaryDirectory(prefix="studio-vae-") as tmp:
                config_dir = self._vae_config_dir(model, own, Path(tmp))
                try:
                    vae = AutoencoderKL.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                         torch_dtype=own.dtype)
                except Exception as e:
                    raise ModelLoadError(f"could not load the VAE {path.name}: {type(e).__name__}: {e}") from e
        return vae

    def _vae_config_dir(self, model: LoadedModel, own, tmp: Path) -> Path:
        """The config a single-file VAE is built with: the bundled one of the model's family (assets/configs/<family>/
        vae) when the model's VAE has its shape, else the model's own VAE config (demo-tiny, custom models)."""
        family_dir = self._config_dir_for(model.family, model.prediction_type, {}, tmp) / "vae"
        own_config = dict(own.config)
        if (family_dir / "config.json").is_file():
            bundled = _read_json(family_dir / "config.json", str(family_dir))
            if all(bundled.get(k) == _listed(own_config.get(k)) for k in _VAE_SHAPE_KEYS):
                return family_dir
        (tmp / "config.json").write_text(json.dumps(_jsonable_config(own_config)), encoding="utf-8")
        return tmp

    def _swap_vae(self, model: LoadedModel, vae, choice: VaeChoice | None) -> None:
        """Put `vae` (None: the checkpoint's own, kept since the first swap) into the model's pipe and place it."""
        pipe = model.pipe
        if vae is None:
            if model.own_vae is None:
                return
            vae, model.own_vae = model.own_vae, None
        elif model.own_vae is None:
            model.own_vae = pipe.vae
        pipe.register_modules(vae=vae)
        model.vae_choice = choice
        if self.current is model:
            self._place_vae(pipe)

    def _place_vae(self, pipe) -> None:
        """A swapped-in VAE on the model's device, dtype and memory options (offload hooks set again)."""
        if self.memory["cpu_offload"] and self.device.type == "cuda":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.vae.to(self.device)
            if pipe.vae.dtype != pipe.unet.dtype and not getattr(pipe.vae.config, "force_upcast", False):
                pipe.vae.to(dtype=pipe.unet.dtype)
        if pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.float()
        if self.memory["vae_tiling"]:
            pipe.vae.enable_tiling()
        else:
            pipe.vae.disable_tiling()

    # 5. identity

    def model_hash(self, model: LoadedModel | None = None) -> str:
        """Full SHA-256 of the checkpoint (A1111 shows the first 10 hex digits as 'Model hash')."""
        model = model or self.current
        if model is None:
            raise ModelLoadError("no model is loaded")
        if model.hash_ is None:
            cache = self.cfg.cache_dir / "hashes.json"
            if model.source == "single-file":
                model.hash_ = sha256_file(model.path, cache)
            elif model.path is not None:
                model.hash_ = sha256_folder(model.path, cache)
            else:
                model.hash_ = weights_hash(model.pipe.unet)
        return model.hash_


def list_vaes(vae_dir: Path) -> list[str]:
    """The VAEs in vae/: .safetensors files and diffusers VAE folders (a config.json of an AutoencoderKL), by their
    path in the folder (posix separators), as the VAE menu and infotext's `VAE:` name them."""
    vae_dir = Path(vae_dir)
    if not vae_dir.is_dir():
        return []
    root, names, folders = vae_dir.resolve(), [], []
    for path in sorted(vae_dir.rglob("*")):
        rel = path.relative_to(vae_dir)
        if any(part.startswith(".") for part in rel.parts) or root not in path.resolve().parents:
            continue
        if any(f in path.parents for f in folders):
            continue  # the weights inside a diffusers folder
        if path.is_dir() and (path / "config.json").is_file():
            folders.append(path)
            names.append(rel.as_posix())
        elif path.is_file() and path.suffix.lower() == ".safetensors":
            names.append(rel.as_posix())
    return names


_VAE_SHAPE_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels",
                   "norm_num_groups", "down_block_types", "up_block_types")


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


def _jsonable_config(config: dict) -> dict:
    return {k: _listed(v) for k, v in config.items() if isinstance(v, (str, int, float, bool, list, tuple))
            or v is None}


def _strip_vae_prefix(key: str) -> str:
    return key.removeprefix("first_stage_model.")


def _is_vae(shapes: dict) -> bool:
    """Original-layout VAE weights only (encoder.* and decoder.*, maybe under first_stage_model.)."""
    keys = [_strip_vae_prefix(k) for k in shapes]
    return not _has_unet(shapes) and any(k.startswith(("encoder.", "decoder.")) for k in keys)


def _has_unet(shapes: dict) -> bool:
    return any(k.startswith("model.diffusion_model.") for k in shapes)


def _vae_group_of_file(name: str, meta: dict) -> str | None:
    """A single-file VAE's family from its metadata (ModelSpec's architecture, a diffusers config) or its name
    ("sdxl_vae.safetensors"); None when neither tells (its weights look the same for both families)."""
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if arch:
        return "sdxl" if "xl" in arch else "sd"
    try:
        config = json.loads(meta.get(CONFIG_METADATA_KEY, "{}"))
        scaling = (config.get("vae", config) or {}).get("scaling_factor")
    except (ValueError, AttributeError):
        scaling = None
    if scaling in VAE_SCALING:
        return VAE_SCALING[scaling]
    words = re.split(r"[^a-z0-9]+", Path(name).name.lower())
    return "sdxl" if any(w in ("xl", "sdxl") or w.startswith("sdxl") for w in words) else None


def _check_vae_group(name: str, found: str | None, group: str, model: LoadedModel) -> None:
    if found is not None and found != group:
        raise ModelLoadError(f"VAE {name} is made for {VAE_GROUP_LABELS[found]} models; the loaded model "
                             f"{model.name} is {model.family_info.label}: choose a VAE made for "
                             f"{VAE_GROUP_LABELS[group]}")


def _check_vae_config(name: str, config: dict, own: dict) -> None:
    for key in _VAE_SHAPE_KEYS:
        if _listed(config.get(key)) != _listed(own.get(key)):
            raise ModelLoadError(f"VAE {name} does not fit this model's VAE: its {key} is {config.get(key)}, the "
                                 f"model's is {_listed(own.get(key))}")


def _check_vae_shapes(name: str, shapes: dict, own) -> None:
    """Refuse a VAE file whose weights do not have the shapes of the model's VAE (before diffusers builds it)."""
    from studio.files.convert import vae_to_original

    expected = {k: tuple(v.shape) for k, v in vae_to_original(own.state_dict(), dict(own.config)).items()}
    got = {_strip_vae_prefix(k): v for k, v in shapes.items()}
    channels = got.get("encoder.conv_out.weight", (0,))[0] // 2
    want = int(own.config.latent_channels)
    if channels and channels != want:
        raise ModelLoadError(f"VAE {name} has {channels} latent channels (an SD3 or Flux VAE?); this model's VAE has "
                             f"{want}")
    for key, shape in expected.items():
        if key not in got:
            raise ModelLoadError(f"VAE {name} lacks weight {key}; it does not fit this model's VAE")
        squeeze = [d for d in got[key] if d != 1] == [d for d in shape if d != 1]
        if got[key] != shape and not squeeze:
            raise ModelLoadError(f"VAE {name} does not fit this model's VAE: {key} is {got[key]} in the file, "
                                 f"{shape} in the model")


def _read_json(path: Path, name: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{name}: {Path(path).name} is not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{name}: {Path(path).name} does not hold a config")
    return data


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 over a module's weights, for models that have no file (demo-tiny)."""
    digest = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def _folder_family(path: Path, spec: str) -> str:
    """A diffusers folder's family from model_index.json: "sdxl", or "sd1" for SD 1.x/2.x (told apart once loaded)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{spec}: model_index.json is not readable JSON ({e}); the folder is damaged") from e
    name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    if not name.startswith("StableDiffusionXL"):
        return "sd1"
    if (index.get("text_encoder") or [None])[0] is None:  # the refiner has only the OpenCLIP bigG encoder
        raise ModelLoadError(f"{spec}: {XL_REFINER_MESSAGE}")
    return "sdxl"


def expected_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape of the SDXL pipeline a config folder describes (built on the meta device)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.files.convert import pipeline_to_original

    def config(part: str) -> dict:
        return json.loads((Path(config_dir) / part / "config.json").read_text(encoding="utf-8"))

    try:
        with init_empty_weights():
            pipe = SimpleNamespace(
                unet=UNet2DConditionModel.from_config(config("unet")),
                vae=AutoencoderKL.from_config(config("vae")),
                text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config("text_encoder_2"))))
        return {k: tuple(v.shape) for k, v in pipeline_to_original(pipe, "sdxl").items()}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"the SDXL configs in {config_dir} do not describe a model ({type(e).__name__}: {e}); "
                             "a file written by the studio may have damaged metadata: convert it again") from e


def _check_complete(pipe, name: str, family: str) -> None:
    """Refuse a loaded pipeline whose file lacked weights (diffusers leaves those on the meta device)."""
    for part in ("unet", "vae", *family_info(family).text_encoders):
        module = getattr(pipe, part, None)
        missing = [k for k, v in module.state_dict().items() if v.is_meta] if module is not None else ["(all)"]
        if missing:
            raise ModelLoadError(f"{name} lacks {len(missing)} {part} weight(s), e.g. {missing[0]}; the file is "
                                 "incomplete or of another architecture")


def inpainting_config_dir(config_dir: Path, out: Path, in_channels: int) -> Path:
    """A copy of a family's config folder whose UNet takes `in_channels` (an inpainting model's 9)."""
    shutil.copytree(config_dir, out)
    unet_config = out / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    config["in_channels"] = in_channels
    unet_config.write_text(json.dumps(config, indent=2))
    return out


def write_config_dir(configs: dict, out: Path) -> Path:
    """A diffusers config folder (model_index.json + component configs) from a dict of configs."""
    out = Path(out)
    xl = "text_encoder_2" in configs
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "feature_extractor": [None, None],
             # files written before the class name was stored: the studio's SD models sampled with PNDM
             "scheduler": ["diffusers", configs["scheduler"].get(
                 "_class_name", "EulerDiscreteScheduler" if xl else "PNDMScheduler")],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], image_encoder=[None, None],
                     force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    files = {"model_index.json": index, "unet/config.json": configs["unet"], "vae/config.json": configs["vae"],
             "text_encoder/config.json": configs["text_encoder"],
             "scheduler/scheduler_config.json": configs["scheduler"]}
    if xl:
        files["text_encoder_2/config.json"] = configs["text_encoder_2"]
    for rel, obj in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(obj), encoding="utf-8")
    return out
