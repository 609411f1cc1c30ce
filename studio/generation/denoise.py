"""One batched denoising pass (StableDiffusionPipeline's loop, step for step) over items that share model,
LoRAs, sampler, steps and size, each with its own conditioning, CFG scale and seed. Generate, the explorer and
storyboards all denoise here; results do not depend on which items share a pass (docs/architecture.md).
Image to image is the same loop started from an encoded init image (StableDiffusionImg2ImgPipeline's start)."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from studio.generation import samplers
from studio.models import speed

StepFn = Callable[[int, int], None]  # (timestep index done, number of timesteps)


@dataclass
class DenoiseItem:
    cond: torch.Tensor  # [1, tokens, dim] prompt conditioning
    uncond: torch.Tensor  # [1, tokens, dim] negative prompt conditioning (same token count as cond)
    cfg_scale: float
    seed: int  # draws the initial latent and the sampler noise of this item
    # prompt editing / alternation: (last step, cond, uncond, pooled, uncond pooled) spans, each as long as cond;
    # the span used at UNet call i is the first whose last step >= i (A1111's rule); empty = the fields below
    schedule: tuple = ()
    pooled: torch.Tensor | None = None  # SDXL: [1, dim] pooled text embedding of the prompt
    uncond_pooled: torch.Tensor | None = None  # and of the negative prompt

    def span(self, i: int) -> int:
        """Which schedule entry UNet call `i` uses (-1: no schedule)."""
        if not self.schedule:
            return -1
        return next((k for k, span in enumerate(self.schedule) if i <= span[0]), len(self.schedule) - 1)

    def at_step(self, i: int) -> tuple:
        """(cond, uncond, pooled, uncond pooled) at UNet call `i`."""
        k = self.span(i)
        return (self.cond, self.uncond, self.pooled, self.uncond_pooled) if k < 0 else tuple(self.schedule[k][1:])


@dataclass
class Control:
    """A ControlNet steering every item of a pass (storyboards): its model, the conditioning image as a
    [1, 3, H, W] float tensor in 0..1 (the frame's size), the scale, and the fraction of steps it acts in."""

    model: object  # diffusers ControlNetModel, on the pipe's device and dtype
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def scale_at(self, i: int, n: int) -> float:
        """StableDiffusionControlNetPipeline's rule: off before `start` and after `end` (fractions of the steps)."""
        off = i / n < self.start or (i + 1) / n > self.end
        return 0.0 if off else self.scale


@dataclass
class DenoiseResult:
    images: list[Image.Image]
    interrupted: bool  # stopped before the last step: the images are unfinished


def initial_latents(pipe, seeds: list[int], width: int, height: int) -> torch.Tensor:
    """One latent per seed, drawn on the CPU so a seed gives the same image on any device."""
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(pipe._execution_device, pipe.unet.dtype)


@torch.no_grad()
def encode_init(pipe, image: Image.Image) -> torch.Tensor:
    """The init image's latents ([1, C, h, w], times the VAE's scaling factor): the mean of the VAE's posterior.

    diffusers' img2img pipelines take a sample of the posterior from the seed's generator and then draw the noise
    from that same generator, so their noise is not the noise text to image draws for the seed; A1111 adds the
    seed's text-to-image noise. The mean keeps that noise (and makes strength 0 the plain VAE round trip); the
    posterior's spread is about 1e-3 of the latents' in SD's VAEs."""
    device = pipe._execution_device
    pixels = pipe.image_processor.preprocess(image).to(device)
    upcast = pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)
    if upcast:
        pipe.vae.to(dtype=torch.float32)
    try:
        latents = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mode()
    finally:
        if upcast:
            pipe.vae.to(dtype=torch.float16)
    return (latents * pipe.vae.config.scaling_factor).to(device, pipe.unet.dtype)


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps an image-to-image pass runs (diffusers' get_timesteps): the last steps x strength of the
    schedule, the sampler told where it starts."""
    kept = min(int(steps * strength), steps)
    start = max(steps - kept, 0)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :]


def _first_row(module, args):
    # denoise() calls the UNet with one scalar timestep, so every row is the same; one row keeps the MLP
    # batch-invariant. (No torch.equal check here: on a GPU it would sync every step and stall the launch queue.)
    return (args[0][:1], *args[1:])


@contextmanager
def batch_invariant_time_embedding(unet):
    """While active, the UNet's timestep embedding is computed on one row and broadcast over the batch.

    Only for UNet calls with one timestep for the whole batch (denoise's). A plain SD UNet adds the embedding to
    each ResNet block's features by broadcasting, so the images are the same; the small matmuls of the MLP are the
    part of the UNet whose CPU kernels change with the batch size."""
    if unet is None:
        yield
        return
    config = getattr(unet, "config", {})
    plain = (getattr(unet, "time_embedding", None) is not None and config.get("class_embed_type") is None
             and config.get("addition_embed_type") is None and config.get("time_cond_proj_dim") is None)
    handle = unet.time_embedding.register_forward_pre_hook(_first_row) if plain else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _step_kwargs(scheduler, seeds: list[int]) -> dict:
    """The pipeline's extra step arguments: eta 0 for DDIM, and one CPU generator per item for samplers that
    add noise at each step, so item i's noise depends on its own seed only."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return kwargs


def pass_noise_is_shared(sampler: str) -> bool:
    """True for samplers whose noise is drawn once for the whole pass (DPM++ SDE's Brownian tree, seeded with the
    pass's first seed): an item's image then depends on the pass it is in, so such items run one per pass."""
    return samplers.SAMPLERS[sampler].seed_kwarg is not None


def _noised_init(pipe, scheduler, init_latents: torch.Tensor, seeds: list[int], width: int, height: int,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """The start of an image-to-image pass: the init latents noised to its first timestep with each seed's noise
    (the init as it is when no timestep is kept)."""
    device, dtype = pipe._execution_device, pipe.unet.dtype
    init = init_latents.to(device, dtype)
    if init.shape[0] == 1 and len(seeds) > 1:
        init = init.expand(len(seeds), -1, -1, -1)
    expected = (len(seeds), pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
                width // pipe.vae_scale_factor)
    if tuple(init.shape) != expected:
        raise ValueError(f"init latents of shape {tuple(init.shape)} do not fit {width}x{height} images "
                         f"(expected {expected})")
    if len(timesteps) == 0:
        return init.clone()
    noise = initial_latents(pipe, seeds, width, height)
    return scheduler.add_noise(init, noise, timesteps[:1].repeat(len(seeds)))


def _guided(noise_pred: torch.Tensor, items: list[DenoiseItem], any_cfg: bool) -> torch.Tensor:
    if not any_cfg:
        return noise_pred
    uncond, cond = noise_pred.chunk(2)
    rows = []
    for i, item in enumerate(items):
        if item.cfg_scale > 1:
            # the pipeline's expression with a Python float, per item, so it rounds the same way in fp16/fp32
            rows.append(uncond[i : i + 1] + item.cfg_scale * (cond[i : i + 1] - uncond[i : i + 1]))
        else:
            rows.append(cond[i : i + 1])
    return torch.cat(rows)


@torch.no_grad()
def denoise(pipe, items: list[DenoiseItem], sampler: str, schedule: str, steps: int, width: int, height: int,
            on_step: StepFn | None = None, cancel: threading.Event | None = None,
            control: Control | None = None, init_latents: torch.Tensor | None = None,
            strength: float = 1.0) -> DenoiseResult:
    """Denoise `items` in one pass and decode them. On cancel it stops after the current step and returns the
    unfinished images with `interrupted` set. With `control`, a ControlNet's residuals are added to the UNet's
    blocks at every step where it is active (the rest of the loop is unchanged).

    With `init_latents` (encode_init's, one row for every item or one per item), image to image: the last
    steps x `strength` timesteps run from the init noised to the first of them with each seed's text-to-image
    noise (StableDiffusionImg2ImgPipeline's start). Strength 1 starts from that noise alone, so it is text to
    image; a strength that keeps no step returns the init through the VAE."""
    # 1. noise and sampler (a fresh scheduler per pass: stochastic samplers are seeded per pass)
    seeds = [item.seed for item in items]
    device = pipe._execution_device
    scheduler = samplers.make_scheduler(sampler, schedule, dict(pipe.scheduler.config), seed=seeds[0])
    pipe.scheduler = scheduler
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if init_latents is None or strength >= 1:
        latents = initial_latents(pipe, seeds, width, height) * scheduler.init_noise_sigma
    else:
        timesteps = img2img_timesteps(scheduler, steps, strength)
        latents = _noised_init(pipe, scheduler, init_latents, seeds, width, height, timesteps)
    step_kwargs = _step_kwargs(scheduler, seeds)
    # 2. conditioning: [uncond; cond] when any item is guided; rebuilt only at the steps where a prompt edit
    # or alternation switches it
    dtype = pipe.unet.dtype
    any_cfg = any(item.cfg_scale > 1 for item in items)
    pad = len(items) == 1 and not any_cfg  # a UNet batch of one takes other CPU kernels: pad it to two

    def stacked(rows: list[torch.Tensor], uncond_rows: list[torch.Tensor]) -> torch.Tensor:
        out = torch.cat(rows).to(device, dtype)
        out = torch.cat([torch.cat(uncond_rows).to(device, dtype), out]) if any_cfg else out
        return torch.cat([out, out]) if pad else out

    def conditioning(i: int) -> tuple[torch.Tensor, dict | None]:
        picks = [item.at_step(i) for item in items]
        embeds = stacked([c for c, _, _, _ in picks], [u for _, u, _, _ in picks])
        if picks[0][2] is None:
            return embeds, None
        # SDXL: the pooled text embedding and the size / crop conditioning, as A1111 sets them (original size =
        # target size = the image's, no crop)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
        added = {"text_embeds": stacked([p for _, _, p, _ in picks], [q for _, _, _, q in picks]),
                 "time_ids": stacked([time_ids] * len(items), [time_ids] * len(items))}
        return embeds, added

    scheduled = any(item.schedule for item in items)
    embeds, added = conditioning(0)
    picks = None
    # 3. denoise
    interrupted = False
    # CUDA graph trees: one step = [ControlNet graph ->] UNet graph; the step starts before the ControlNet, whose
    # outputs the UNet's graph then reads
    compiled = speed.is_compiled(pipe.unet) or (control is not None and speed.is_compiled(control.model))
    control_image = None
    if control is not None:
        control_image = control.image.to(device, control.model.dtype).expand(embeds.shape[0], -1, -1, -1)
    with batch_invariant_time_embedding(pipe.unet), \
            batch_invariant_time_embedding(control.model if control is not None else None):
        for i, t in enumerate(timesteps):
            if scheduled:
                now = tuple(item.span(i) for item in items)
                if picks is not None and now != picks:
                    embeds, added = conditioning(i)
                picks = now
            model_input = torch.cat([latents] * 2) if any_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if pad:
                model_input = torch.cat([model_input, model_input])
            if compiled:
                speed.mark_step()
            residuals = {}
            if control is not None:
                extra = {"added_cond_kwargs": added} if added is not None else {}
                down, mid = control.model(model_input, t, encoder_hidden_states=embeds, controlnet_cond=control_image,
                                          conditioning_scale=control.scale_at(i, len(timesteps)), return_dict=False,
                                          **extra)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds, timestep_cond=None,
                                   cross_attention_kwargs=None, added_cond_kwargs=added, return_dict=False,
                                   **residuals)[0]
            if pad:
                noise_pred = noise_pred[:1]
            latents = scheduler.step(_guided(noise_pred, items, any_cfg), t, latents, **step_kwargs,
                                     return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(timesteps))
            if cancel is not None and cancel.is_set() and i + 1 < len(timesteps):
                interrupted = True
                break
    # 4. decode one image at a time (the VAE's kernels are not batch-invariant either); a VAE that overflows in
    # fp16 (SDXL's: force_upcast in its config) decodes in fp32, as diffusers' pipelines do
    images = []
    upcast = pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)
    if upcast:
        pipe.vae.to(dtype=torch.float32)
    try:
        for i in range(latents.shape[0]):
            z = latents[i : i + 1].to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
            decoded = pipe.vae.decode(z, return_dict=False)[0]
            images += pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True])
    finally:
        if upcast:
            pipe.vae.to(dtype=torch.float16)
    pipe.maybe_free_model_hooks()
    return DenoiseResult(images, interrupted)
