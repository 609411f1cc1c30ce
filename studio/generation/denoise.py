"""One batched denoising pass (StableDiffusionPipeline's loop, step for step) over items that share model,
LoRAs, sampler, steps and size, each with its own conditioning, CFG scale and seed. Generate, the explorer and
storyboards all denoise here; results do not depend on which items share a pass (docs/architecture.md).
Image to image is the same loop started from an encoded init image (StableDiffusionImg2ImgPipeline's start);
inpainting adds a mask (StableDiffusionInpaintPipeline's: latents blended with the noised init outside it at every
step, or the mask and masked picture handed to a 9-channel inpainting UNet)."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from studio.generation import samplers
from studio.generation.preview import Preview, approximate, latent_to_rgb
from studio.models import cuda_graphs, speed

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
    # regional prompts: (latent mask [1, 1, h, w], cond, pooled) per region, the masks summing to 1; the prompt's
    # noise prediction is each region's prediction where its mask is (empty: `cond` everywhere)
    regions: tuple = ()

    def span(self, i: int) -> int:
        """Which schedule entry UNet call `i` uses (-1: no schedule)."""
        if not self.schedule:
            return -1
        return next((k for k, span in enumerate(self.schedule) if i <= span[0]), len(self.schedule) - 1)

    def at_step(self, i: int) -> tuple:
        """(cond, uncond, pooled, uncond pooled) at UNet call `i`."""
        k = self.span(i)
        return (self.cond, self.uncond, self.pooled, self.uncond_pooled) if k < 0 else tuple(self.schedule[k][1:])


# A1111's ControlNet "Control Mode"s: the prompt and the ControlNet balanced (diffusers' plain ControlNet), the
# prompt more important (the residuals weighted down towards the UNet's outer blocks), the ControlNet more important
# (those weights, and the residuals added to the prompt's half of the CFG batch only)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
SOFT_DECAY = 0.825  # sd-webui-controlnet's soft injection: residual k of n weighted 0.825 ** (n - 1 - k)


@dataclass
class Control:
    """A ControlNet steering every item of a pass: its model, the conditioning image as a [1, 3, H, W] float tensor
    in 0..1 (the frame's size), the scale, the fraction of steps it acts in and A1111's control mode. Several
    Controls add their residuals, as diffusers' MultiControlNetModel does."""

    model: object  # diffusers ControlNetModel, on the pipe's device and dtype
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = CONTROL_MODES[0]

    def scale_at(self, i: int, n: int) -> float:
        """StableDiffusionControlNetPipeline's rule: off before `start` and after `end` (fractions of the steps)."""
        off = i / n < self.start or (i + 1) / n > self.end
        return 0.0 if off else self.scale

    def residuals(self, model_input: torch.Tensor, t, embeds: torch.Tensor, added: dict | None, scale: float,
                  uncond_rows: int, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """This ControlNet's (down, mid) residuals at `scale` (scale_at's for the step) for the pass's UNet input
        (its first `uncond_rows` rows are the negative prompt's)."""
        extra = {"added_cond_kwargs": added} if added is not None else {}
        cond_only = self.mode == CONTROL_MODES[2] and uncond_rows > 0
        if cond_only:  # the prompt's rows only: the negative prompt's rows get no control
            half = uncond_rows
            model_input, embeds, image = model_input[half:], embeds[half:], image[half:]
            if added is not None:
                extra = {"added_cond_kwargs": {k: v[half:] for k, v in added.items()}}
        down, mid = self.model(model_input, t, encoder_hidden_states=embeds, controlnet_cond=image,
                               conditioning_scale=scale, return_dict=False, **extra)
        if self.mode != CONTROL_MODES[0]:
            last = len(down)
            down = [d * SOFT_DECAY ** (last - k) for k, d in enumerate(down)]
        if cond_only:
            down = [torch.cat([d.new_zeros((half, *d.shape[1:])), d]) for d in down]
            mid = torch.cat([mid.new_zeros((half, *mid.shape[1:])), mid])
        return list(down), mid


@dataclass
class Inpaint:
    """What inpainting adds to a pass. `mask` ([1, 1, h, w] at latent size, 1 = redraw) keeps the init's latents
    outside it at every step; `conditioning` ([1, 5, h, w]: mask and masked picture's latents) is what a 9-channel
    inpainting UNet reads beside the latents (then nothing is blended, as in diffusers); `content` is A1111's
    "Masked content" for the init's latents under the mask ("latent noise": the seed's noise, "latent nothing":
    zeros; otherwise as encoded)."""

    mask: torch.Tensor | None = None
    conditioning: torch.Tensor | None = None
    content: str = "original"

    @property
    def blends(self) -> bool:
        return self.mask is not None and self.conditioning is None


@dataclass
class DenoiseResult:
    images: list[Image.Image]
    interrupted: bool  # stopped before the last step: the images are unfinished
    latents: torch.Tensor | None = None  # the final latents (what was decoded; hires fix upscales them)


def initial_latents(pipe, seeds: list[int], width: int, height: int) -> torch.Tensor:
    """One latent per seed, drawn on the CPU so a seed gives the same image on any device."""
    shape = (latent_channels(pipe), height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(pipe._execution_device, pipe.unet.dtype)


def latent_channels(pipe) -> int:
    """The latents' channels: the UNet's output (an inpainting UNet takes 9 in, mask and masked picture included)."""
    return int(pipe.unet.config.out_channels)


def is_inpainting_unet(unet) -> bool:
    """A 9-channel inpainting UNet (sd-v1-5-inpainting, SDXL inpainting): latents, mask and masked picture in."""
    return int(unet.config.in_channels) == int(unet.config.out_channels) + 5


@torch.no_grad()
def inpaint_conditioning(pipe, picture: Image.Image | None, mask: Image.Image | None, width: int,
                         height: int) -> torch.Tensor:
    """What a 9-channel UNet reads beside the latents ([1, 5, h, w]): the mask made binary and scaled to latent size
    (nearest, as diffusers), then the latents of the picture with the masked pixels set to grey. Without a picture
    (text to image on an inpainting model) the whole frame is masked and the picture is all grey, as A1111 does."""
    device = pipe._execution_device
    if picture is None:
        pixels = torch.zeros(1, 3, height, width)
        binary = torch.ones(1, 1, height, width)
    else:
        pixels = pipe.image_processor.preprocess(picture)
        binary = (torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None] >= 0.5)
        binary = binary.to(pixels.dtype)
        pixels = pixels * (binary < 0.5)
    latents = _encode_pixels(pipe, pixels.to(device))
    small = torch.nn.functional.interpolate(binary, size=latents.shape[-2:]).to(device, latents.dtype)
    return torch.cat([small, latents], dim=1)


def latent_mask(mask: Image.Image, width: int, height: int, scale: int) -> torch.Tensor:
    """The pixel mask at latent size ([1, 1, h, w], 0 or 1): scaled down and rounded, as A1111 blends latents."""
    small = mask.convert("L").resize((width // scale, height // scale), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.around(np.asarray(small, dtype=np.float32) / 255.0))[None, None]


def _encode_pixels(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's mean of [-1, 1] pixels, times the scaling factor, on the UNet's device and dtype (an
    fp16 VAE that asks for it encodes in fp32)."""
    device = pipe._execution_device
    upcast = pipe.vae.dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False)
    if upcast:
        pipe.vae.to(dtype=torch.float32)
    try:
        latents = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist.mode()
    finally:
        if upcast:
            pipe.vae.to(dtype=torch.float16)
    return (latents * pipe.vae.config.scaling_factor).to(device, pipe.unet.dtype)


@torch.no_grad()
def encode_init(pipe, image: Image.Image) -> torch.Tensor:
    """The init image's latents ([1, C, h, w], times the VAE's scaling factor): the mean of the VAE's posterior.

    diffusers' img2img pipelines take a sample of the posterior from the seed's generator and then draw the noise
    from that same generator, so their noise is not the noise text to image draws for the seed; A1111 adds the
    seed's text-to-image noise. The mean keeps that noise (and makes strength 0 the plain VAE round trip); the
    posterior's spread is about 1e-3 of the latents' in SD's VAEs."""
    return _encode_pixels(pipe, pipe.image_processor.preprocess(image))


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
def regional_attention(unet, regions: tuple):
    """While active, the UNet's cross-attention layers draw each region from its own prompt (Regional Prompter's
    Attention mode, studio.generation.regions); its own processors are put back afterwards."""
    from studio.generation.regions import regional_processors

    masks = torch.cat([mask for mask, _, _ in regions])
    original = dict(unet.attn_processors)
    unet.set_attn_processor(regional_processors(unet, masks, regions[0][1].shape[1]))
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def _each_row(module, args, output):
    # SDXL's text-time MLP gets a different row per image (pooled text, sizes): run it one row at a time, so
    # its matmuls take the kernels of a batch of one whatever the pass's batch (the batched output is dropped)
    sample = args[0]
    if sample.shape[0] == 1:
        return output
    return torch.cat([type(module).forward(module, sample[i : i + 1]) for i in range(sample.shape[0])])


@contextmanager
def batch_invariant_time_embedding(unet):
    """While active, the UNet's timestep embedding is computed on one row and broadcast over the batch, and SDXL's
    text-time embedding row by row.

    Only for UNet calls with one timestep for the whole batch (denoise's). A plain SD UNet adds the embedding to
    each ResNet block's features by broadcasting, so the images are the same; the small matmuls of these MLPs are
    the part of the UNet whose kernels change with the batch size."""
    if unet is None:
        yield
        return
    config = getattr(unet, "config", {})
    plain = (getattr(unet, "time_embedding", None) is not None and config.get("class_embed_type") is None
             and config.get("time_cond_proj_dim") is None)
    handles = []
    if plain and config.get("addition_embed_type") in (None, "text_time"):
        handles.append(unet.time_embedding.register_forward_pre_hook(_first_row))
    if plain and config.get("addition_embed_type") == "text_time" and getattr(unet, "add_embedding", None) is not None:
        handles.append(unet.add_embedding.register_forward_hook(_each_row))
    try:
        yield
    finally:
        for handle in handles:
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


def _init_rows(pipe, init_latents: torch.Tensor, noise: torch.Tensor, width: int, height: int,
               inpaint: Inpaint | None) -> torch.Tensor:
    """The init latents, one row per item, with A1111's latent masked content put under the mask."""
    init = init_latents.to(noise.device, noise.dtype)
    if init.shape[0] == 1 and noise.shape[0] > 1:
        init = init.expand(noise.shape[0], -1, -1, -1)
    if tuple(init.shape) != tuple(noise.shape):
        raise ValueError(f"init latents of shape {tuple(init.shape)} do not fit {width}x{height} images "
                         f"(expected {tuple(noise.shape)})")
    if inpaint is not None and inpaint.mask is not None and inpaint.content in ("latent noise", "latent nothing"):
        mask = inpaint.mask.to(init.device, init.dtype)
        init = init * (1 - mask) + (noise * mask if inpaint.content == "latent noise" else 0)
    return init


def _noised_init(scheduler, init: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The start of an image-to-image pass: the init latents noised to its first timestep with each seed's noise
    (the init as it is when no timestep is kept)."""
    if len(timesteps) == 0:
        return init.clone()
    return scheduler.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))


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
            control: Control | list[Control] | None = None, init_latents: torch.Tensor | None = None,
            strength: float = 1.0, inpaint: Inpaint | None = None, decode: bool = True,
            region_mode: str = "Attention", image_prompts: list | None = None,
            preview: Preview | None = None) -> DenoiseResult:
    """Denoise `items` in one pass and decode them. On cancel it stops after the current step and returns the
    unfinished images with `interrupted` set. With `control` (one or several), the ControlNets' residuals, summed,
    are added to the UNet's blocks at every step where they are active (the rest of the loop is unchanged).

    With `init_latents` (encode_init's, one row for every item or one per item), image to image: the last
    steps x `strength` timesteps run from the init noised to the first of them with each seed's text-to-image
    noise (StableDiffusionImg2ImgPipeline's start). Strength 1 starts from that noise alone, so it is text to
    image; a strength that keeps no step returns the init through the VAE.

    With `inpaint` (and the init's latents), the latents outside its mask are set back to the init noised to the
    next timestep after every step (the init itself after the last), or a 9-channel UNet gets its conditioning.
    `decode` False skips the VAE (the result's latents are what hires fix needs).

    With `image_prompts` (studio.generation.ip_adapter.ImagePrompt, one per IP-Adapter already put on the UNet by
    ip_adapter.adapters_on), their image embeds go to the UNet as added_cond_kwargs["image_embeds"], stacked like
    the text ([negative; prompt] rows), and each adapter's scale is set per step (0 outside its start/end).

    With `preview` (studio.generation.preview), every `preview.every` steps the latents go to `preview.show` as
    approximate pictures (a linear map, no VAE decode; decoded for a VAE the map does not fit); without it the loop
    is unchanged."""
    # 1. noise and sampler (a fresh scheduler per pass: stochastic samplers are seeded per pass)
    seeds = [item.seed for item in items]
    device = pipe._execution_device
    scheduler = samplers.make_scheduler(sampler, schedule, dict(pipe.scheduler.config), seed=seeds[0])
    pipe.scheduler = scheduler
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    noise = initial_latents(pipe, seeds, width, height)
    preview_map = latent_to_rgb(pipe.vae) if preview is not None else None  # fitted once per VAE, before step 1
    init = None if init_latents is None else _init_rows(pipe, init_latents, noise, width, height, inpaint)
    if init is None or strength >= 1:
        latents = noise * scheduler.init_noise_sigma
    else:
        timesteps = img2img_timesteps(scheduler, steps, strength)
        latents = _noised_init(scheduler, init, noise, timesteps)
    blend = inpaint is not None and inpaint.blends
    if blend and init is None:
        raise ValueError("inpainting needs the init image's latents")
    if blend and strength >= 1 and hasattr(scheduler, "set_begin_index"):
        # add_noise then reads the step index instead of searching the timestep on the GPU (a sync every step)
        scheduler.set_begin_index(0)
    keep = None if not blend else 1 - inpaint.mask.to(device, latents.dtype)
    extra_in = None
    if inpaint is not None and inpaint.conditioning is not None:
        extra_in = inpaint.conditioning.to(device, pipe.unet.dtype)
    step_kwargs = _step_kwargs(scheduler, seeds)
    # 2. conditioning: [uncond; cond] when any item is guided; rebuilt only at the steps where a prompt edit
    # or alternation switches it
    dtype = pipe.unet.dtype
    any_cfg = any(item.cfg_scale > 1 for item in items)
    n_regions = len(items[0].regions)
    if any(len(item.regions) != n_regions for item in items):
        raise ValueError("items of one pass must have the same number of regions")
    if n_regions and any(item.schedule for item in items):
        raise ValueError("regional prompts cannot be combined with prompt editing ([from:to:when]) yet")
    attention_regions = n_regions > 0 and region_mode == "Attention"
    if n_regions and region_mode not in ("Attention", "Latent"):
        raise ValueError(f"region mode must be Attention or Latent, got {region_mode!r}")
    # the prompt's rows: one group, or one per region (Latent mode: a noise prediction per region)
    copies = n_regions if n_regions and not attention_regions else 1
    pad = len(items) == 1 and not any_cfg and copies == 1  # a UNet batch of one takes other CPU kernels: pad it

    def stacked(rows: list[torch.Tensor], uncond_rows: list[torch.Tensor]) -> torch.Tensor:
        out = torch.cat(rows).to(device, dtype)
        out = torch.cat([torch.cat(uncond_rows).to(device, dtype), out]) if any_cfg else out
        return torch.cat([out, out]) if pad else out

    def conditioning(i: int) -> tuple[torch.Tensor, dict | None]:
        picks = [item.at_step(i) for item in items]
        if attention_regions:  # each row's text: every region's prompt one after another (the negative repeated)
            embeds = stacked([torch.cat([r[1] for r in item.regions], dim=1) for item in items],
                             [u.repeat(1, n_regions, 1) for _, u, _, _ in picks])
            if picks[0][2] is None:
                return embeds, None
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
            # SDXL's pooled text: the mean of the regions' (one pooled vector speaks for the whole frame)
            pooled = [torch.stack([r[2] for r in item.regions]).mean(dim=0) for item in items]
            return embeds, {"text_embeds": stacked(pooled, [q for _, _, _, q in picks]),
                            "time_ids": stacked([time_ids] * len(items), [time_ids] * len(items))}
        if n_regions:  # region-major: region 0's rows for every item, then region 1's, ...
            conds = [item.regions[r][1] for r in range(n_regions) for item in items]
            pooled = [item.regions[r][2] for r in range(n_regions) for item in items]
        else:
            conds, pooled = [c for c, _, _, _ in picks], [p for _, _, p, _ in picks]
        embeds = stacked(conds, [u for _, u, _, _ in picks])
        if picks[0][2] is None:
            return embeds, None
        # SDXL: the pooled text embedding and the size / crop conditioning, as A1111 sets them (original size =
        # target size = the image's, no crop)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
        added = {"text_embeds": stacked(pooled, [q for _, _, _, q in picks]),
                 "time_ids": stacked([time_ids] * len(conds), [time_ids] * len(items))}
        return embeds, added

    # IP-Adapter image prompts (studio.generation.ip_adapter): the image embeds in the text's row order, for the
    # UNet only (a ControlNet reads the text alone, as in diffusers' ControlNet pipelines)
    image_prompts = list(image_prompts or [])
    image_embeds = None
    if image_prompts:
        if getattr(pipe.unet.config, "encoder_hid_dim_type", None) != "ip_image_proj":
            raise ValueError("image prompts need their IP-Adapters on the UNet (studio.generation.ip_adapter)")
        if attention_regions:
            raise ValueError("IP-Adapter image prompts cannot be combined with regional prompts in Attention mode "
                             "yet; use the Latent region mode")
        image_embeds = [stacked([p.embeds] * (copies * len(items)), [p.negative] * len(items))
                        for p in image_prompts]
    ip_scales = None

    region_masks = None
    if n_regions and not attention_regions:  # [regions, batch, 1, h, w]
        region_masks = torch.stack([torch.cat([item.regions[r][0] for item in items]) for r in range(n_regions)])
        region_masks = region_masks.to(device, dtype)

    scheduled = any(item.schedule for item in items)
    embeds, added = conditioning(0)
    picks = None
    # 3. denoise
    interrupted = False
    # CUDA graph trees: one step = [ControlNet graph ->] UNet graph; the step starts before the ControlNet, whose
    # outputs the UNet's graph then reads
    controls = [] if control is None else [control] if isinstance(control, Control) else list(control)
    for c in controls:
        if c.mode not in CONTROL_MODES:
            raise ValueError(f"control mode must be one of {', '.join(CONTROL_MODES)}, got {c.mode!r}")
    compiled = speed.is_compiled(pipe.unet) or any(speed.is_compiled(c.model) for c in controls)
    uncond_rows = len(items) if any_cfg else 0

    def predict(unet_input, model_input, t, embeds, added, images, scales) -> torch.Tensor:
        """The UNet's noise prediction, with the ControlNets' residuals (summed, as MultiControlNetModel sums
        them) at their `scales` for this step."""
        down = mid = None
        for c, image, scale in zip(controls, images, scales, strict=True):
            image = image.expand(model_input.shape[0], -1, -1, -1)  # inside a recording too: the same strides
            d, m = c.residuals(model_input, t, embeds, added, scale, uncond_rows, image)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d, strict=True)], mid + m)
        residuals = {}
        if down is not None:
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return pipe.unet(unet_input, t, encoder_hidden_states=embeds, timestep_cond=None, cross_attention_kwargs=None,
                         added_cond_kwargs=added, return_dict=False, **residuals)[0]
    control_images = [c.image.to(device, c.model.dtype) for c in controls]  # [1, 3, H, W], expanded per call
    with ExitStack() as hooks:
        hooks.enter_context(batch_invariant_time_embedding(pipe.unet))
        if attention_regions:
            hooks.enter_context(regional_attention(pipe.unet, items[0].regions))
        for c in controls:
            hooks.enter_context(batch_invariant_time_embedding(c.model))
        # the step's UNet call (and ControlNets'), replayed from CUDA graphs where the pass adds nothing else to
        # it (studio.models.cuda_graphs); taken after the hooks are on, so recordings include them
        replay = None
        models = [c.model for c in controls]
        if image_embeds is None and not attention_regions and cuda_graphs.usable(pipe.unet, *models):
            replay = cuda_graphs.recorder(pipe.unet, *models)
        modes = tuple(c.mode for c in controls)
        for i, t in enumerate(timesteps):
            if scheduled:
                now = tuple(item.span(i) for item in items)
                if picks is not None and now != picks:
                    embeds, added = conditioning(i)
                picks = now
            repeats = copies + 1 if any_cfg else copies
            model_input = torch.cat([latents] * repeats) if repeats > 1 else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if pad:
                model_input = torch.cat([model_input, model_input])
            if compiled:
                speed.mark_step()
            unet_input = model_input
            if extra_in is not None:  # a 9-channel inpainting UNet: latents, mask, masked picture's latents
                unet_input = torch.cat([model_input, extra_in.expand(model_input.shape[0], -1, -1, -1)], dim=1)
            scales = tuple(c.scale_at(i, len(timesteps)) for c in controls)
            unet_added = added
            if image_embeds is not None:  # IP-Adapters: their scales at this step, their embeds beside the text
                ip_now = [p.scale_at(i, len(timesteps)) for p in image_prompts]
                if ip_now != ip_scales:
                    pipe.set_ip_adapter_scale(ip_now)
                    ip_scales = ip_now
                unet_added = {**(added or {}), "image_embeds": image_embeds}
            if replay is None:
                noise_pred = predict(unet_input, model_input, t, embeds, unet_added, control_images, scales)
            else:  # the same call, replayed from a recording (its Python values in the key)
                names = tuple(sorted(added or {}))
                timestep = t if torch.is_tensor(t) else torch.tensor(t, device=device)

                def step(unet_input, model_input, t, embeds, *rest, names=names, scales=scales):
                    added = dict(zip(names, rest[: len(names)], strict=True)) or None
                    return predict(unet_input, model_input, t, embeds, added, rest[len(names):], scales)

                noise_pred = replay(step, (unet_input, model_input, timestep, embeds, *[added[k] for k in names],
                                           *control_images), (names, scales, modes, uncond_rows))
            if pad:
                noise_pred = noise_pred[:1]
            if region_masks is not None:  # each region's prediction where its mask is
                b = len(items)
                start = b if any_cfg else 0
                by_region = noise_pred[start:].reshape(n_regions, b, *noise_pred.shape[1:])
                combined = (by_region * region_masks).sum(dim=0)
                noise_pred = torch.cat([noise_pred[:b], combined]) if any_cfg else combined
            latents = scheduler.step(_guided(noise_pred, items, any_cfg), t, latents, **step_kwargs,
                                     return_dict=False)[0]
            if blend:  # the init outside the mask, at the noise level the next step expects
                proper = init if i + 1 == len(timesteps) else scheduler.add_noise(
                    init, noise, timesteps[i + 1 : i + 2].repeat(init.shape[0]))
                latents = keep * proper + (1 - keep) * latents
            if on_step is not None:
                on_step(i + 1, len(timesteps))
            if preview is not None and preview.due(i + 1, len(timesteps)):
                preview.show(approximate(latents, preview_map) if preview_map is not None
                             else decode_latents(pipe, latents))
            if cancel is not None and cancel.is_set() and i + 1 < len(timesteps):
                interrupted = True
                break
    # 4. decode (decode_latents)
    images = decode_latents(pipe, latents) if decode else []
    pipe.maybe_free_model_hooks()
    return DenoiseResult(images, interrupted, latents)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents to pictures, one at a time (the VAE's kernels are not batch-invariant either); a VAE that overflows
    in fp16 (SDXL's: force_upcast in its config) decodes in fp32, as diffusers' pipelines do."""
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
    return images
