"""Single-file checkpoints: their keys and metadata read without running code, the family (SD 1.x, SD 2.x,
SDXL) told from the keys, the prediction type (epsilon or v) and zero terminal SNR from metadata, a sidecar .yaml
or the UNet; and the facts of each family (`Family`, `family_info`, `require_family`) that later code asks."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.files.pickles import unpickling_refusal


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class Family:
    """What code that handles several model families asks, instead of branching on names."""

    name: str  # "sd1", "sd2", "sdxl": LoadedModel.family
    label: str  # how the UI and messages name it
    is_xl: bool
    pipeline_class: str  # the diffusers pipeline class
    text_encoders: tuple[str, ...]  # the pipeline's text encoder attributes, in prompt-encoding order
    tokenizers: tuple[str, ...]  # the matching tokenizer attributes
    text_widths: tuple[int, ...]  # hidden width of each text encoder in the released models (embedding sizes)


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD 1.x", False, "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), (768,)),
    "sd2": Family("sd2", "SD 2.x", False, "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), (1024,)),
    "sdxl": Family("sdxl", "SDXL", True, "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"),
                   ("tokenizer", "tokenizer_2"), (768, 1280)),
}


def family_info(family: str) -> Family:
    """The facts of a family by its name ("sd1", "sd2", "sdxl")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def require_family(model, supported: tuple[str, ...], what: str) -> None:
    """Raise ValueError when `model` (a LoadedModel or a family name) is not of a `supported` family."""
    family = model if isinstance(model, str) else model.family
    if family in supported:
        return
    label = FAMILIES[family].label if family in FAMILIES else family
    choices = " or ".join(FAMILIES[f].label if f in FAMILIES else f for f in supported)
    name = "" if isinstance(model, str) else f" ({model.name} is {label})"
    raise ValueError(f"{what} with {label} models is not supported yet{name}; load an {choices} model for this")


def read_checkpoint_keys(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape of a single-file checkpoint, plus safetensors metadata, without running pickles."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path.name} is empty (0 bytes); the download or copy did not finish")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ModelLoadError(f"{path.name} is not a valid safetensors file ({e}); it may be truncated") from e
        return shapes, meta
    state = load_pickle_checkpoint(path)
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, {}


def load_pickle_checkpoint(path: Path) -> dict:
    """A .ckpt/.pt state dict through torch.load(weights_only=True): tensors only, never code."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise ModelLoadError(unpickling_refusal(Path(path), e)) from e
    except Exception as e:
        raise ModelLoadError(f"{Path(path).name} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{Path(path).name} holds a {type(state).__name__}, not a state dict")
    return state


# SDXL's original (SGM) layout: OpenAI CLIP ViT-L and OpenCLIP ViT-bigG under conditioner.embedders
XL_TEXT_L = "conditioner.embedders.0.transformer."
XL_TEXT_G = "conditioner.embedders.1.model."
XL_REFINER_TEXT_G = "conditioner.embedders.0.model."
XL_REFINER_MESSAGE = "SDXL refiner checkpoints are not supported yet; load an SDXL base model"
XL_ADM_KEY = "model.diffusion_model.label_emb.0.0.weight"  # the size-and-pooled-text embedding: 2816 base, 2560 refiner
UNET_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


INPAINT_IN_CHANNELS = 9  # latents 4 + mask 1 + masked picture's latents 4


def unet_in_channels(shapes: dict[str, tuple[int, ...]]) -> int:
    """The UNet's input channels from an original-layout checkpoint's keys (4 when the key is missing)."""
    shape = shapes.get(UNET_IN_KEY, (0, 4))
    return int(shape[1]) if len(shape) > 1 else 4


def _has(keys, prefix: str | tuple[str, ...]) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family(shapes: dict[str, tuple[int, ...]], name: str = "checkpoint") -> str:
    """'sd1', 'sd2' or 'sdxl' from the keys of an original-layout checkpoint; a clear error otherwise."""
    keys = shapes.keys()
    if _has(keys, ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        raise ModelLoadError(f"{name} is a LoRA, not a checkpoint: put it in loras/ and use <lora:name:1> in a prompt")
    if not _has(keys, "model.diffusion_model."):
        hint = " (it looks like a VAE)" if _has(keys, ("encoder.", "decoder.")) else ""
        raise ModelLoadError(f"{name} has no Stable Diffusion UNet (model.diffusion_model.*){hint}")
    in_channels = unet_in_channels(shapes)
    if in_channels not in (4, INPAINT_IN_CHANNELS):
        raise ModelLoadError(f"{name}'s UNet takes {in_channels} input channels (an instruct-pix2pix or other "
                             "edit model); the studio loads text-to-image models (4) and inpainting models (9)")
    if _has(keys, "conditioner.embedders."):
        adm = shapes.get(XL_ADM_KEY, (0, 0))
        if (_has(keys, XL_REFINER_TEXT_G) and not _has(keys, XL_TEXT_G)) or adm[1:] == (2560,):
            raise ModelLoadError(f"{name}: {XL_REFINER_MESSAGE}")
        missing = [f"{what} ({prefix}*)" for prefix, what in ((XL_TEXT_L, "CLIP ViT-L"),
                                                              (XL_TEXT_G, "OpenCLIP ViT-bigG")) if not _has(keys, prefix)]
        if missing:
            raise ModelLoadError(f"{name} looks like an SDXL checkpoint but lacks the {' and '.join(missing)} text "
                                 "encoder weights; the file is incomplete")
        return "sdxl"
    if _has(keys, "cond_stage_model.model."):
        return "sd2"
    if _has(keys, "cond_stage_model.transformer."):
        return "sd1"
    raise ModelLoadError(f"{name}: the text encoder weights (cond_stage_model.*) are missing or of an unknown kind")


def _squeezed(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[-1] == 1:  # 1x1 convolutions and Linear layers hold the same weights
        shape = shape[:-1]
    return shape


def check_shapes(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], name: str,
                 what: str) -> None:
    """Refuse a file holding a weight of another shape than `what`, or lacking one, naming it; extra keys pass."""
    for key, shape in expected.items():
        if key in shapes and _squeezed(shapes[key]) != _squeezed(shape):
            raise ModelLoadError(f"{name}: {key} has shape {tuple(shapes[key])}, but {what} has {tuple(shape)}; "
                                 "the file is damaged or of another architecture")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise ModelLoadError(f"{name} lacks {len(missing)} weight(s) that {what} has, e.g. {missing[0]}; the file "
                             "is incomplete or of another architecture")


_V_NAMES = {"v", "v_prediction", "v-prediction", "vpred", "v-pred", "v_pred"}
_SIDECAR_V = re.compile(r"parameterization:\s*['\"]?v['\"]?|\bVScaling\b")  # LDM configs; SGM's denoiser scaling
_SIDECAR_ZSNR = re.compile(r"(zero_terminal_snr|ztsnr|zsnr|rescale_betas_zero_snr)['\"]?\s*:\s*['\"]?(true|yes|1)\b",
                           re.IGNORECASE)


def _sidecar(path: Path) -> str | None:
    sidecar = Path(path).with_suffix(".yaml")
    return sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.is_file() else None


def prediction_hint(path: Path, metadata: dict[str, str], keys=()) -> str | None:
    """v-prediction or epsilon from what travels with the file (A1111's sidecar .yaml, ModelSpec, ComfyUI's key)."""
    text = _sidecar(path)
    if text is not None:
        return "v_prediction" if _SIDECAR_V.search(text) else "epsilon"
    if "v_pred" in keys:  # ComfyUI's marker: an empty tensor named v_pred
        return "v_prediction"
    arch = metadata.get("modelspec.architecture", "")
    pred = metadata.get("modelspec.prediction_type", "").strip().lower()
    if arch.endswith("-v") or pred in _V_NAMES or "v-prediction" in pred:
        return "v_prediction"
    if arch or pred:
        return "epsilon"
    return None


def zero_snr_hint(path: Path, metadata: dict[str, str], keys=()) -> bool:
    """True when the file says it was trained with zero terminal SNR (sidecar .yaml, metadata, ComfyUI's key)."""
    text = _sidecar(path)
    if text is not None and _SIDECAR_ZSNR.search(text):
        return True
    if "ztsnr" in keys:  # ComfyUI's marker
        return True
    return any(k.lower().endswith(("zero_terminal_snr", "ztsnr", "zsnr")) and str(v).strip().lower() in
               ("true", "1", "yes") for k, v in metadata.items())


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """True when a UNet predicts v rather than noise.

    At the last timestep a noise predictor returns roughly the input noise, while a v predictor
    returns about minus the input; so feeding a constant latent shows which one the weights learned.
    """
    param = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.zeros((1, 77, unet.config.cross_attention_dim), device=param.device, dtype=param.dtype)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return bool((out - x).float().mean() < -1)
