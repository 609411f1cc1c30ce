"""Single-file checkpoints: their keys and metadata read without running code, the family (SD 1.x, SD 2.x,
SDXL) told from the keys, and the prediction type (epsilon or v) from metadata, a sidecar .yaml or the UNet."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from studio.files.pickles import unpickling_refusal


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says why and what to do."""


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


def detect_family(shapes: dict[str, tuple[int, ...]], name: str = "checkpoint") -> str:
    """'sd1' or 'sd2' from the keys of an original-layout checkpoint; a clear error otherwise."""
    keys = shapes.keys()
    if any(k.startswith("conditioner.embedders") for k in keys):
        raise ModelLoadError(f"{name} is an SDXL checkpoint; the studio supports SD 1.x and SD 2.x for now")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        raise ModelLoadError(f"{name} is a LoRA, not a checkpoint: put it in loras/ and use <lora:name:1> in a prompt")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        hint = " (it looks like a VAE)" if any(k.startswith(("encoder.", "decoder.")) for k in keys) else ""
        raise ModelLoadError(f"{name} has no Stable Diffusion UNet (model.diffusion_model.*){hint}")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ModelLoadError(f"{name}: the text encoder weights (cond_stage_model.*) are missing or of an unknown kind")


def prediction_hint(path: Path, metadata: dict[str, str]) -> str | None:
    """v-prediction or epsilon from what travels with the file (A1111's sidecar .yaml, our metadata)."""
    sidecar = Path(path).with_suffix(".yaml")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace")
        return "v_prediction" if re.search(r"parameterization:\s*['\"]?v['\"]?", text) else "epsilon"
    arch = metadata.get("modelspec.architecture", "")
    if arch.endswith("-v") or "v-prediction" in metadata.get("modelspec.prediction_type", ""):
        return "v_prediction"
    if arch:
        return "epsilon"
    return None


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
