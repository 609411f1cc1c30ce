"""Shared pieces of the GPU benchmarks: SD 1.5 and SDXL models with random weights, timers, reports."""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SD1_CONFIGS = ROOT / "assets" / "configs" / "sd1"
SDXL_CONFIGS = ROOT / "assets" / "configs" / "sdxl"


def build_sd15_folder(folder: Path, seed: int = 0) -> Path:
    """An SD 1.5-architecture diffusers folder with random weights (speed does not depend on their values)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.models.tokenizer import clip_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD1_CONFIGS / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD1_CONFIGS / "text_encoder"))
    scheduler = PNDMScheduler.from_pretrained(SD1_CONFIGS / "scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer("sd1"), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder)
    return folder


def build_sdxl_folder(folder: Path, seed: int = 0, device: str = "cpu") -> Path:
    """An SDXL 1.0 base-architecture diffusers folder with random weights in fp16, from the bundled configs in
    assets/configs/sdxl (UNet, VAE with `force_upcast`, CLIPTextModel + CLIPTextModelWithProjection, Euler
    scheduler) and both tokenizers built offline as the studio builds them for SDXL (studio.models.tokenizer:
    CLIP ViT-L's, and OpenCLIP bigG's that pads with "!"). Default (PyTorch) initialisation, as build_sd15_folder;
    speed does not depend on the weights' values. `device`: where the 3.5 B weights are drawn ("cuda" takes
    seconds where a CPU takes minutes; the values then differ from a CPU build's). Written to a side folder and
    renamed, so an interrupted build is never taken for a finished one."""
    import shutil

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models.tokenizer import family_tokenizers

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    device = torch.device(device)
    makers = {
        "unet": lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS / "unet")),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_CONFIGS / "vae")),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(SDXL_CONFIGS / "text_encoder_2")),
    }
    gen = torch.Generator().manual_seed(seed)
    seeds = {name: int(torch.randint(0, 2**31, (1,), generator=gen)) for name in makers}
    parts = {}
    # only the RNGs of the devices drawn on, restored afterwards (torch.manual_seed would reseed every CUDA device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        for name, make in makers.items():
            torch.default_generator.manual_seed(seeds[name])
            if device.type == "cuda":
                torch.cuda.manual_seed(seeds[name])
            with torch.device(device):
                module = make()
            parts[name] = module.to("cpu", torch.float16).eval()  # one fp32 part alive at a time
            del module
    scheduler = EulerDiscreteScheduler.from_pretrained(SDXL_CONFIGS / "scheduler")
    pipe = StableDiffusionXLPipeline(**parts, **family_tokenizers("sdxl"), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    partial.rename(folder)
    return folder


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def peak_memory():
    """Yields a dict that holds `peak_gib` (GPU memory high-water mark inside the block) afterwards."""
    out = {}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        sync()
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return times


def round_robin(runs: dict, repeats: int, cuda: bool = True) -> tuple[dict, dict]:
    """Seconds per call of each of `runs` (name -> fn), in `repeats` rounds of one call each after a warm-up call
    each: every contender stays resident and they are interleaved, because these runs are launch-bound and the
    machine drifts by tens of percent within a minute. Also each run's peak GPU memory above what was resident
    before it (GiB, from one more untimed call; 0 without `cuda`)."""
    times = {k: [] for k in runs}
    activation_peak = {k: 0.0 for k in runs}
    for key, fn in runs.items():
        fn()
        sync()
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync()
            activation_peak[key] = (torch.cuda.max_memory_allocated() - base) / 2**30
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key] += timed(fn, 1, warmup=0)
    return times, activation_peak


def cfg_step_flops(unet, controlnet=None, latent: int = 64) -> float:
    """FLOPs of one CFG step (batch 2, latent² of 4 channels, 77 text tokens) from torch's flop counter: the UNet
    forward, and with `controlnet` also its forward (conditioning image 8·latent²) and the residuals it adds."""
    from torch.utils.flop_counter import FlopCounterMode

    like = {"device": unet.device, "dtype": unet.dtype}
    x = torch.randn(2, unet.config.in_channels, latent, latent, **like)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, **like)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        residuals = {}
        if controlnet is not None:
            image = torch.rand(2, 3, 8 * latent, 8 * latent, **like)
            down, mid = controlnet(x, 999, encoder_hidden_states=text, controlnet_cond=image, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        unet(x, 999, encoder_hidden_states=text, **residuals)
    return counter.get_total_flops()


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def environment() -> dict:
    import diffusers
    import transformers

    return {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_report(name: str, results: dict) -> Path:
    out = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
