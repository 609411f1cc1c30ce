"""Save a Stable Diffusion pipeline as a diffusers folder, or as one .safetensors file in the original key layout
(what AUTOMATIC1111, ComfyUI and diffusers' `from_single_file` read): CompVis/LDM for SD 1.x and 2.x, SGM for SDXL."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from studio.files.atomic import atomic_dir, atomic_path

FAMILIES = ("sd1", "sd2", "sdxl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SD2_TEXT_PREFIX = "cond_stage_model.model."
# SDXL (SGM): OpenAI CLIP ViT-L as in SD 1.x, OpenCLIP ViT-bigG (with its text projection) as in SD 2.x
XL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
# ComfyUI's markers of a v-prediction / zero-terminal-SNR SDXL file: empty tensors under these names
XL_MARKERS = ("v_pred", "ztsnr")
# the metadata key holding the diffusers configs, so files whose shapes are not a standard SD can be rebuilt
CONFIG_METADATA_KEY = "studio.diffusers_config"

# diffusers sub-module name -> original name, applied to the part of a key after its block prefix
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # names of diffusers' deprecated attention block, still found in old in-memory state dicts
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_VAE_ATTN_WEIGHT = re.compile(r"(?:encoder|decoder)\.mid\.attn_1\.(?:q|k|v|proj_out)\.weight")
_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_CLIP_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")

# A prefix map: diffusers module path -> (original module path, renames for the rest of the key or None)
PrefixMap = dict[str, tuple[str, Mapping[str, str] | None]]


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def _rename_head(rest: str, renames: Mapping[str, str] | None) -> str | None:
    """`rest` with its leading sub-module renamed by `renames`; None when no rename applies."""
    if renames is None:
        return rest
    for src, dst in renames.items():
        if rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return None


def _map_key(key: str, prefix_map: PrefixMap) -> str | None:
    parts = key.split(".")
    # the map's prefixes are never prefixes of each other, so the first (shortest) hit is the only one
    for i in range(1, len(parts)):
        entry = prefix_map.get(".".join(parts[:i]))
        if entry is not None:
            dst, renames = entry
            rest = _rename_head(".".join(parts[i:]), renames)
            return None if rest is None else f"{dst}.{rest}"
    return None


def _remap(state_dict: Mapping[str, torch.Tensor], prefix_map: PrefixMap, what: str) -> dict:
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        new = _map_key(key, prefix_map)
        if new is None:
            unmapped.append(key)
        elif new in out:
            raise ValueError(f"{what}: two weights map to the same original key {new!r}")
        else:
            out[new] = tensor
    if unmapped:
        raise ValueError(
            f"{what}: {len(unmapped)} weight(s) have no place in the original layout, e.g. {unmapped[:5]}"
        )
    return out


def _per_block(value, n: int, name: str) -> list[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise ValueError(f"{name}={value!r} does not give one value per block ({n} blocks)")
    return values


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _unet_prefix_map(keys: list[str], config: Mapping) -> PrefixMap:
    n = len(config["down_block_types"])
    if len(config["up_block_types"]) != n or len(config["block_out_channels"]) != n:
        raise ValueError(
            "UNet config: down_block_types, up_block_types and block_out_channels differ in length: "
            f"{config['down_block_types']!r}, {config['up_block_types']!r}, {config['block_out_channels']!r}"
        )
    layers = _per_block(config["layers_per_block"], n, "layers_per_block")
    m: PrefixMap = {
        "conv_in": ("input_blocks.0.0", None),
        "time_embedding.linear_1": ("time_embed.0", None),
        "time_embedding.linear_2": ("time_embed.2", None),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: the size-and-pooled-text embedding
        m["add_embedding.linear_1"] = ("label_emb.0.0", None)
        m["add_embedding.linear_2"] = ("label_emb.0.2", None)
    # input_blocks is one flat list: each resnet(+attention) layer, then the level's downsampler as a block of its own
    idx = 0
    for b in range(n):
        for j in range(layers[b]):
            idx += 1
            m[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{idx}.0", _UNET_RESNET)
            m[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{idx}.1", None)
        if _has(keys, f"down_blocks.{b}.downsamplers."):
            idx += 1
            m[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", None)

    # middle_block alternates resnet, attention, resnet
    mid_attention = _has(keys, "mid_block.attentions.")
    mid_resnets = {int(hit.group(1)) for k in keys if (hit := re.match(r"mid_block\.resnets\.(\d+)\.", k))}
    for k in sorted(mid_resnets):
        m[f"mid_block.resnets.{k}"] = (f"middle_block.{2 * k if mid_attention else k}", _UNET_RESNET)
        if mid_attention:
            m[f"mid_block.attentions.{k}"] = (f"middle_block.{2 * k + 1}", None)

    # output_blocks: layers_per_block + 1 layers per level; the upsampler sits in the level's last block,
    # after the attention when there is one
    idx = -1
    for b, n_layers in enumerate(reversed(layers)):
        for j in range(n_layers + 1):
            idx += 1
            m[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{idx}.0", _UNET_RESNET)
            m[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{idx}.1", None)
        if _has(keys, f"up_blocks.{b}.upsamplers."):
            slot = 2 if _has(keys, f"up_blocks.{b}.attentions.") else 1
            m[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{idx}.{slot}.conv", None)
    return m


def unet_to_original(unet_state_dict: dict, unet_config: dict) -> dict:
    """diffusers UNet2DConditionModel weights -> LDM keys (without the "model.diffusion_model." prefix)."""
    keys = list(unet_state_dict)
    return _remap(unet_state_dict, _unet_prefix_map(keys, unet_config), "UNet")


def original_unet_module_names(unet) -> dict[str, str]:
    """diffusers module path -> original (LDM/SGM) module path for every Linear and Conv2d of `unet`: the names
    kohya's SDXL LoRAs use (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`, …). Paths inside peft wrappers are
    given without their `.base_layer`."""
    from torch import nn

    paths = [path.replace(".base_layer", "") for path, module in unet.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d)) and ".lora_" not in path]
    prefix_map = _unet_prefix_map([p + ".weight" for p in paths], unet.config)
    out = {}
    for path in paths:
        original = _map_key(path + ".weight", prefix_map)
        if original is not None:
            out[path] = original.removesuffix(".weight")
    return out


def _vae_prefix_map(config: Mapping) -> PrefixMap:
    m: PrefixMap = {"quant_conv": ("quant_conv", None), "post_quant_conv": ("post_quant_conv", None)}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        for k in range(2):
            m[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", _VAE_RESNET)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    n_down = len(config["down_block_types"])
    n_up = len(config["up_block_types"])
    # decoder blocks are one more than the encoder's; the index range only bounds what may be mapped
    layers = max(_per_block(config["layers_per_block"], n_down, "layers_per_block")) + 1
    for i in range(n_down):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
    for i in range(n_up):
        # the LDM decoder numbers its levels from the highest resolution: reversed against diffusers
        level = n_up - 1 - i
        for j in range(layers):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", None)
    return m


def vae_to_original(vae_state_dict: dict, vae_config: dict) -> dict:
    """diffusers AutoencoderKL weights -> LDM keys (without the "first_stage_model." prefix)."""
    out = _remap(vae_state_dict, _vae_prefix_map(vae_config), "VAE")
    for key, tensor in out.items():
        # the LDM mid-block attention projects with 1x1 convolutions where diffusers uses Linear layers
        if _VAE_ATTN_WEIGHT.fullmatch(key) and tensor.ndim == 2:
            out[key] = tensor.reshape(*tensor.shape, 1, 1)
    return out


def _clip_text_encoder(state_dict: Mapping[str, torch.Tensor], prefix: str, what: str) -> dict:
    """OpenAI CLIP: the transformers names under `prefix`."""
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        if key.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")):
            out[prefix + key] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"text encoder ({what}): {len(unmapped)} weight(s) have no original key, e.g. {unmapped[:5]}")
    return out


def _open_clip_text_encoder(state_dict: Mapping[str, torch.Tensor], p: str, what: str) -> dict:
    """OpenCLIP under `p`: fused in_proj, bare positional_embedding, ln_final, text_projection as x @ P."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        if key == "embeddings.token_embedding.weight":
            out[p + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out[p + "positional_embedding"] = tensor  # a bare parameter in OpenCLIP, not an Embedding
        elif key == "embeddings.position_ids":
            continue  # a constant arange buffer, not a weight; OpenCLIP has no such key
        elif key.startswith("final_layer_norm."):
            out[p + "ln_final." + key.removeprefix("final_layer_norm.")] = tensor
        elif key == "text_projection.weight":
            # OpenCLIP computes x @ text_projection, a Linear computes x @ weight.T
            out[p + "text_projection"] = tensor.T
        elif match := _CLIP_QKV.fullmatch(key):
            layer, which, kind = match.groups()
            qkv.setdefault((int(layer), kind), {})[which] = tensor
        elif (match := _CLIP_LAYER_KEY.fullmatch(key)) and (
            rest := _rename_head(match.group(2), _CLIP_LAYER)
        ) is not None:
            out[f"{p}transformer.resblocks.{match.group(1)}.{rest}"] = tensor
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"text encoder ({what}): {len(unmapped)} weight(s) have no original key, e.g. {unmapped[:5]}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"text encoder layer {layer}: {kind} of q/k/v incomplete, found only {sorted(parts)}"
            )
        # OpenCLIP's nn.MultiheadAttention keeps q, k, v stacked in this order in one in_proj
        out[f"{p}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


def _sd2_text_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict:
    p = SD2_TEXT_PREFIX
    out = _open_clip_text_encoder(state_dict, p, "sd2")
    token = out.get(p + "token_embedding.weight")
    if p + "text_projection" not in out and token is not None:
        # CLIPTextModel has no projection, yet real SD 2.x files carry one and some loaders expect the key.
        # SD 2.x never uses it (it conditions on hidden states); diffusers' loader ignores its values but reads
        # its first dimension as the width for splitting in_proj, so it must be hidden x hidden: an identity is.
        width = token.shape[1]
        out[p + "text_projection"] = torch.eye(width, dtype=token.dtype, device=token.device)
    layers = {int(k.split(".")[4]) for k in out if k.startswith(p + "transformer.resblocks.")}
    if layers and max(layers) >= 23:
        warnings.warn(
            "text encoder has 24+ layers: diffusers' single-file loader skips resblocks.23 (real SD 2.x files have "
            "24 layers and run 23) and AUTOMATIC1111 stops at the penultimate layer, so the last layer is unused",
            stacklevel=3,
        )
    return out


def text_encoder_to_original(te_state_dict: dict, family: str, index: int = 0) -> dict:
    """Text encoder weights -> full original keys: OpenAI CLIP (sd1, sdxl index 0), OpenCLIP (sd2, sdxl index 1)."""
    _check_family(family)
    if index not in ((0, 1) if family == "sdxl" else (0,)):
        raise ValueError(f"{family} has no text encoder number {index}")
    # transformers < 5.6 nested CLIPTextModel's weights under "text_model."; newer ones do not (but still nest
    # CLIPTextModelWithProjection's, beside its text_projection)
    state_dict = {k.removeprefix("text_model."): v for k, v in te_state_dict.items()}
    if family == "sd1":
        return _clip_text_encoder(state_dict, SD1_TEXT_PREFIX, "sd1")
    if family == "sd2":
        return _sd2_text_encoder(state_dict)
    if index == 0:
        return _clip_text_encoder(state_dict, XL_TEXT_PREFIXES[0], "sdxl, CLIP ViT-L")
    out = _open_clip_text_encoder(state_dict, XL_TEXT_PREFIXES[1], "sdxl, OpenCLIP ViT-bigG")
    if XL_TEXT_PREFIXES[1] + "text_projection" not in out:
        raise ValueError("text encoder 2 (sdxl) has no text_projection: SDXL's second encoder is a "
                         "CLIPTextModelWithProjection, whose pooled output conditions the UNet")
    return out


def _family_of_text_encoder(text_encoder) -> str | None:
    act = getattr(text_encoder.config, "hidden_act", None)
    return {"quick_gelu": "sd1", "gelu": "sd2"}.get(act)


def family_of(pipe) -> str:
    """ "sdxl" for a pipeline with two text encoders, else "sd1" (OpenAI CLIP, quick_gelu) or "sd2" (OpenCLIP, gelu)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    family = _family_of_text_encoder(pipe.text_encoder)
    if family is None:
        act = getattr(pipe.text_encoder.config, "hidden_act", None)
        raise ValueError(
            f"cannot tell the family of a text encoder with hidden_act={act!r}; "
            "expected 'quick_gelu' (SD 1.x) or 'gelu' (SD 2.x)"
        )
    return family


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wraps modules and prefixes their keys


def pipeline_to_original(pipe, family: str) -> dict[str, torch.Tensor]:
    """The whole pipeline as one original-layout checkpoint (UNet, VAE, text encoder), contiguous tensors."""
    _check_family(family)
    has_second = getattr(pipe, "text_encoder_2", None) is not None
    detected = "sdxl" if has_second else _family_of_text_encoder(pipe.text_encoder)
    if detected is not None and detected != family:
        # the other layout would make AUTOMATIC1111 and diffusers build the wrong text encoder
        raise ValueError(
            f"family {family!r} does not match the pipeline's text encoder, which is {detected!r} "
            f"(hidden_act={pipe.text_encoder.config.hidden_act!r}, "
            f"{'two text encoders' if has_second else 'one text encoder'})"
        )
    if family == "sdxl" and not has_second:
        raise ValueError("family 'sdxl' needs a pipeline with text_encoder_2 (StableDiffusionXLPipeline)")
    unet, vae = _unwrap(pipe.unet), _unwrap(pipe.vae)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    parts = [
        (UNET_PREFIX, unet_to_original(unet.state_dict(), dict(unet.config))),
        (VAE_PREFIX, vae_to_original(vae.state_dict(), dict(vae.config))),
    ] + [("", text_encoder_to_original(_unwrap(te).state_dict(), family, i)) for i, te in enumerate(encoders)]
    return {prefix + key: t.detach().contiguous() for prefix, part in parts for key, t in part.items()}


_DROP = object()


def _jsonable(value):
    """`value` as plain JSON types; _DROP when it (or something inside a list) cannot be written."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Mapping):
        items = {str(k): _jsonable(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    return _DROP


def diffusers_config(pipe) -> dict:
    """The configs needed to rebuild the pipeline's models from an original-layout file."""
    configs = {
        "unet": dict(_unwrap(pipe.unet).config),
        "vae": dict(_unwrap(pipe.vae).config),
        "text_encoder": _unwrap(pipe.text_encoder).config.to_dict(),
        "scheduler": {"_class_name": type(pipe.scheduler).__name__, **pipe.scheduler.config},
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        configs["text_encoder_2"] = _unwrap(pipe.text_encoder_2).config.to_dict()
    return _jsonable(configs)


def modelspec_architecture(family: str, prediction_type: str | None = None) -> str:
    _check_family(family)
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base"  # v-prediction goes in modelspec.prediction_type
    if family == "sd1":
        return "stable-diffusion-v1"
    return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"


class ModelExistsError(ValueError):
    """A conversion would replace a model file or folder that exists, and the caller said `overwrite=False`."""


def _check_free(path: Path, overwrite: bool) -> None:
    if not overwrite and (path.exists() or path.is_symlink()):
        raise ModelExistsError(f"a model named {path.name!r} already exists in {path.parent.name}/; choose another "
                               "name, or ask to replace it")


def save_single_file(
    pipe, path, family: str, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the pipeline as one original-layout .safetensors file, atomically; returns its path. With
    `overwrite=False` an existing `path` raises ModelExistsError before any work (the UI and the command line ask
    for that; the trainer checks its output itself)."""
    path = Path(path)
    _check_free(path, overwrite)
    _check_family(family)
    extra = dict(metadata or {})
    bad = {k: v for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"safetensors metadata must map strings to strings; not: {bad!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, not {dtype!r}")

    tensors = {}
    for key, tensor in pipeline_to_original(pipe, family).items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.to("cpu").contiguous()

    prediction = pipe.scheduler.config.get("prediction_type")
    header = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(family, prediction),
        "modelspec.title": path.stem,
        CONFIG_METADATA_KEY: json.dumps(diffusers_config(pipe)),
    }
    if family == "sdxl":
        header["modelspec.prediction_type"] = "v" if prediction == "v_prediction" else "epsilon"
        marked = (prediction == "v_prediction", bool(pipe.scheduler.config.get("rescale_betas_zero_snr")))
        for marker, on in zip(XL_MARKERS, marked, strict=True):
            if on:
                tensors[marker] = torch.zeros(0, dtype=dtype or torch.float32)
    header.update(extra)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def save_diffusers_folder(pipe, path, overwrite: bool = True) -> Path:
    """Write the pipeline as a diffusers folder (safetensors weights), replacing `path` in one step; with
    `overwrite=False` an existing `path` raises ModelExistsError instead."""
    path = Path(path)
    _check_free(path, overwrite)
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return path
