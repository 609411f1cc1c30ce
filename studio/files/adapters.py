"""LoRAs on a loaded pipeline: plain kohya files converted to peft layout and loaded as diffusers adapters, LyCORIS
files (LoCon, LoHa, LoKr, full, DoRA) kept as their factors; the active ones merged into the base weights, weighted per
prompt (text encoder and UNet separately), and switched off completely when a prompt has none."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from studio.files import lycoris
from studio.files.networks import KOHYA_PREFIXES, KOHYA_TE_PREFIX, LoraFile, NetworkFileError, kohya_name

log = logging.getLogger(__name__)

_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
MAX_CACHED_ADAPTERS = 8


@dataclass(frozen=True)
class ActiveLora:
    file: LoraFile
    te: float
    unet: float


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _kohya_index(pipe) -> dict[str, tuple[str, str, nn.Module]]:
    """kohya layer name -> (component, module path, module) for every Linear/Conv2d of the UNet and text encoders.
    SDXL: the UNet under its original (SGM) names as kohya writes them, and under diffusers' names too (files
    converted from diffusers' layout); the text encoders as lora_te1_ / lora_te2_."""
    from studio.files.convert import original_unet_module_names

    xl = getattr(pipe, "text_encoder_2", None) is not None
    index = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        originals = original_unet_module_names(model) if xl and component == "unet" else {}
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and ".lora_" not in path:
                path = path.replace(".base_layer", "")  # a module already wrapped by peft keeps its kohya name
                if path in originals:
                    index.setdefault(kohya_name(component, originals[path], xl), (component, path, module))
                index.setdefault(kohya_name(component, path, xl), (component, path, module))
                if component != "unet":
                    # files written from transformers 5's module names lack text_model (lora_te_encoder_layers_*)
                    prefix = KOHYA_TE_PREFIX[f"xl:{component}" if xl else component]
                    short = path.removeprefix("text_model.")
                    index.setdefault(prefix + short.replace(".", "_"), (component, path, module))
    return index


def kohya_to_peft(state_dict: Mapping[str, torch.Tensor], pipe, name: str = "LoRA"
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A kohya LoRA as a diffusers/peft state dict (`unet.<module>.lora_A.weight`, …), alpha/rank folded into
    lora_B so no per-layer alpha needs to travel. Returns (state dict, kohya layer names that match nothing)."""
    if lycoris.is_lycoris(state_dict):
        raise NetworkFileError(f"{name} is a LyCORIS network, which has no peft form: LoraSlot merges its layers "
                               "from their factors (lycoris_layers)")
    index = _kohya_index(pipe)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        base = next((key[: -len(s)] for s in _SUFFIXES if key.endswith(s)), None)
        if base is None or not base.startswith(KOHYA_PREFIXES):
            raise NetworkFileError(f"{name}: unexpected key {key!r} in a kohya LoRA")
        layers.setdefault(base, {})[key[len(base):]] = tensor
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for base, parts in layers.items():
        if base not in index:
            unmatched.append(base)
            continue
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise NetworkFileError(f"{name}: layer {base} lacks lora_down or lora_up")
        component, path, module = index[base]
        down, up = parts[".lora_down.weight"].float(), parts[".lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(parts[".alpha"]) if ".alpha" in parts else float(rank)
        up = up * (alpha / rank)
        if isinstance(module, nn.Conv2d):
            down = down.reshape(*down.shape, 1, 1) if down.ndim == 2 else down
            up = up.reshape(*up.shape, 1, 1) if up.ndim == 2 else up
        else:
            down, up = down.flatten(1), up.flatten(1)  # 1x1 conv kernels on a Linear layer
        want_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        want_out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if down.shape[1] != want_in or up.shape[0] != want_out:
            raise NetworkFileError(
                f"{name}: layer {base} is {down.shape[1]}→{up.shape[0]} but the model's is {want_in}→{want_out}; "
                "the LoRA was made for another model family")
        out[f"{component}.{path}.lora_A.weight"] = down.contiguous()
        out[f"{component}.{path}.lora_B.weight"] = up.contiguous()
    if not out:
        raise NetworkFileError(f"{name}: none of its {len(layers)} layers matches this model "
                               f"(e.g. {next(iter(layers), '?')}); it was made for another model family")
    return out, unmatched


@dataclass
class LycorisLayer:
    """One layer of a LyCORIS file matched to the model's module. Its tensors stay as the file has them (CPU, the
    file's dtype) until a merge computes ΔW from them: a full ΔW per layer would take gigabytes for SDXL."""

    component: str
    path: str
    module: nn.Module
    parts: dict[str, torch.Tensor]  # suffix (`hada_w1_a`, `alpha`, …) -> tensor

    def delta(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, bias delta or None) in float32 on `weight`'s device; `weight` is the original weight (for DoRA)."""
        parts = {k: v if k == "alpha" else v.to(weight.device, torch.float32) for k, v in self.parts.items()}
        return lycoris.layer_delta(parts, weight)


def _check_layer(parts: Mapping[str, torch.Tensor], module: nn.Module, name: str, base: str) -> None:
    """Refuse a layer whose factors do not make the module's weight (and bias) shape, computing ΔW on the meta device:
    shapes only, no memory and no arithmetic."""
    meta = {k: v if k == "alpha" else torch.empty(v.shape, device="meta") for k, v in parts.items()}
    try:
        _, bias = lycoris.layer_delta(meta, torch.empty(module.weight.shape, device="meta"))
    except lycoris.ShapeMismatchError as e:
        raise NetworkFileError(f"{name}: layer {base} {e}; the LoRA was made for another model family") from e
    except ValueError as e:
        raise NetworkFileError(f"{name}: layer {base} {e}") from e
    if bias is not None and (module.bias is None or bias.numel() != module.bias.numel()):
        have = "no bias" if module.bias is None else f"a bias of {module.bias.numel()}"
        raise NetworkFileError(f"{name}: layer {base} changes a bias of {bias.numel()} values but the model's layer "
                               f"has {have}; the LoRA was made for another model family")


def lycoris_layers(state_dict: Mapping[str, torch.Tensor], pipe, name: str = "LoRA"
                   ) -> tuple[list[LycorisLayer], list[str]]:
    """A kohya-named LyCORIS file's layers matched to the model's modules by kohya name and checked against their
    shapes. Returns (layers, kohya layer names that match nothing or are not applied: LyCORIS' norm layers)."""
    index = _kohya_index(pipe)
    grouped = lycoris.group_layers(state_dict)
    layers, unmatched = [], []
    for base, parts in grouped.items():
        unknown = [s for s in parts if s not in lycoris.SUFFIXES]
        if unknown:
            raise NetworkFileError(f"{name}: unexpected key {base}.{unknown[0]} in a LyCORIS network")
        if base not in index or set(parts) <= lycoris.NORM_SUFFIXES | {"alpha"}:
            unmatched.append(base)
            continue
        component, path, module = index[base]
        _check_layer(parts, module, name, base)
        layers.append(LycorisLayer(component, path, module, dict(parts)))
    if not layers:
        raise NetworkFileError(f"{name}: none of its {len(grouped)} layers matches this model "
                               f"(e.g. {next(iter(grouped), '?')}); it was made for another model family")
    return layers, unmatched


def _peft_delta(layer, key: str, weight: torch.Tensor) -> tuple[torch.Tensor, None]:
    """A peft adapter's ΔW (alpha/rank included) in float32 and the weight's shape, like a LyCORIS layer's delta."""
    return layer.get_delta_weight(key).float().reshape(weight.shape), None


def _is_kohya(state_dict: Mapping) -> bool:
    return all(k.startswith(KOHYA_PREFIXES) for k in state_dict)


@contextmanager
def _quiet_transformers():
    # transformers prints a "LOAD REPORT" listing the new adapter's keys as MISSING although diffusers then
    # fills them in; that table would only alarm users
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # peft warns about a second adapter in one model; several adapters is what we want
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        hf_logging.set_verbosity(level)


def adapter_id(lora: LoraFile) -> str:
    # content-addressed: the same file under two names is loaded once; a changed file gets a new adapter
    return f"lora_{lora.hash}"


class LoraSlot:
    """The LoRAs loaded into one pipeline (owned by its LoadedModel) and which are active: plain LoRAs as peft
    adapters, LyCORIS files as their matched layers (`lycoris`)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded: dict[str, LoraFile] = {}  # adapter id -> file, oldest first (peft adapters and LyCORIS alike)
        self.lycoris: dict[str, list[LycorisLayer]] = {}  # adapter id -> its layers, for the LyCORIS files
        self.warnings: dict[str, list[str]] = {}
        self.merged: dict[str, dict[str, float]] = {}  # adapter id -> weights now merged into the base weights
        # (component, module) -> (module, weight before merging, bias before merging or None)
        self._originals: dict[tuple[str, str], tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = {}

    def _peft_ids(self) -> list[str]:
        return [k for k in self.loaded if k not in self.lycoris]

    def _load(self, lora: LoraFile) -> str:
        key = adapter_id(lora)
        if key in self.loaded:
            self.loaded[key] = self.loaded.pop(key)  # most recently used last
            return key
        state = lora.state_dict()
        unmatched = []
        if _is_kohya(state) and lycoris.is_lycoris(state):
            self.lycoris[key], unmatched = lycoris_layers(state, self.pipe, lora.path.name)
        else:
            if _is_kohya(state):
                state, unmatched = kohya_to_peft(state, self.pipe, lora.path.name)
            try:
                with _quiet_transformers():
                    self.pipe.load_lora_weights(state, adapter_name=key)
            except Exception as e:
                self._forget(key)
                raise NetworkFileError(f"could not apply LoRA {lora.name}: {type(e).__name__}: {e}") from e
        if unmatched:
            self.warnings[key] = unmatched
            log.warning("%s: %d layers match nothing in this model: %s", lora.name, len(unmatched),
                        ", ".join(unmatched[:5]))
        self.loaded[key] = lora
        return key

    def unmatched_notes(self, active: list[ActiveLora]) -> list[str]:
        """A line for the user per active LoRA with layers that match nothing in this model (not applied)."""
        notes = []
        for lora in active:
            missed = self.warnings.get(adapter_id(lora.file), [])
            if missed:
                notes.append(f"LoRA {lora.file.name}: {len(missed)} of its layers match nothing in this model and "
                             f"were not applied (e.g. {missed[0]}); it may be for another model family")
        return notes

    def _forget(self, key: str) -> None:
        if key in self.merged:
            self._restore()
        if self.lycoris.pop(key, None) is None:
            try:
                self.pipe.delete_adapters([key])
            except Exception:  # the adapter may be half-loaded; nothing else to undo
                pass
        self.loaded.pop(key, None)

    def apply(self, active: list[ActiveLora]) -> None:
        """Make exactly these LoRAs active with their weights; with none, the model is the base model again.

        The weighted deltas of all active LoRAs are merged into the base weights (their originals kept aside and
        put back bit for bit before the next change), so generating costs what the base model costs: no extra
        low-rank matmuls per layer and step, unlike diffusers' `set_adapters`."""
        weights: dict[str, dict[str, float]] = {}
        for item in active:
            key = self._load(item.file)
            w = weights.setdefault(key, {"text_encoder": 0.0, "text_encoder_2": 0.0, "unet": 0.0})
            w["text_encoder"] += item.te  # the same LoRA twice adds up, as two deltas would
            w["text_encoder_2"] += item.te  # SDXL's second text encoder takes the text-encoder weight too
            w["unet"] += item.unet
        # evict least recently used adapters that this prompt does not need
        for key in [k for k in self.loaded if k not in weights][: max(0, len(self.loaded) - MAX_CACHED_ADAPTERS)]:
            self._forget(key)
        if weights == self.merged:
            return
        self._restore()
        if self._peft_ids():
            self.pipe.disable_lora()  # the peft layers pass through to their (merged) base layers
        self._merge(weights)

    def _lora_layers(self, component: str):
        from peft.tuners.lora import LoraLayer

        model = getattr(self.pipe, component, None)
        if model is None:
            return []
        return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]

    @torch.no_grad()
    def _merge(self, weights: dict[str, dict[str, float]]) -> None:
        """W = W0 + Σ s·ΔW over the active networks, added in float32. Every ΔW is computed from the original W0, so a
        DoRA layer decomposes the base weight whatever other LoRAs are active (as A1111 does)."""
        # (component, module path) -> (module, [(user weight, ΔW from W0)]), peft adapters and LyCORIS layers alike
        targets: dict[tuple[str, str], tuple[nn.Module, list]] = {}
        for component in COMPONENTS:
            for name, layer in self._lora_layers(component):
                for key, w in weights.items():
                    if w[component] != 0 and key in layer.lora_A:
                        targets.setdefault((component, name), (layer.get_base_layer(), []))[1].append(
                            (w[component], partial(_peft_delta, layer, key)))
        for key, w in weights.items():
            for item in self.lycoris.get(key, ()):
                if w[item.component] != 0:
                    targets.setdefault((item.component, item.path), (item.module, []))[1].append(
                        (w[item.component], item.delta))
        for target, (module, deltas) in targets.items():
            weight, bias = module.weight, module.bias
            original = weight.float()
            delta, bias_delta = None, None
            for scale, delta_of in deltas:
                dw, db = delta_of(original)
                delta = dw * scale if delta is None else delta + dw * scale
                if db is not None:
                    db = db.to(bias.device, torch.float32).reshape(bias.shape) * scale
                    bias_delta = db if bias_delta is None else bias_delta + db
            self._originals[target] = (module, weight.detach().clone(),
                                       None if bias_delta is None else bias.detach().clone())
            weight.copy_((original + delta).to(weight.dtype))
            if bias_delta is not None:
                bias.copy_((bias.float() + bias_delta).to(bias.dtype))
        self.merged = weights

    @torch.no_grad()
    def _restore(self) -> None:
        """Put the saved base weights back: the model is bit-identical to the one that was loaded."""
        for module, weight, bias in self._originals.values():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        self._originals.clear()
        self.merged = {}

    def clear(self) -> None:
        """Remove every adapter and the peft wrappers, leaving the plain model (before saving or converting)."""
        self._restore()
        if self._peft_ids():
            self.pipe.unload_lora_weights()
        self.loaded.clear()
        self.lycoris.clear()
        self.warnings.clear()
