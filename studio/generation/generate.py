"""Text to image, image to image, inpainting and outpainting: a typed job, validated up front, run with progress
and Stop, saved as PNGs."""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from studio import __version__
from studio.control.controlnet import ControlNetLoader
from studio.files.adapters import ActiveLora
from studio.files.atomic import atomic_path
from studio.files.networks import FAMILY_LABELS, EmbeddingFile, NetworkFileError, NetworkLibrary
from studio.generation import hires, ip_adapter, regions, samplers
from studio.generation.conditioning import (
    PromptEncoder,
    TextualInversion,
    XLPromptEncoder,
    encode_pair,
    encode_spans,
)
from studio.generation.controls import MAX_UNITS, ControlUnit
from studio.generation.controls import infotext_fields as control_fields
from studio.generation.denoise import (
    Control,
    DenoiseItem,
    DenoiseResult,
    Inpaint,
    decode_latents,
    denoise,
    encode_init,
    inpaint_conditioning,
    is_inpainting_unet,
    latent_mask,
)
from studio.generation.infotext import format_infotext, png_info
from studio.generation.job import GenerateJob, resolve_seed
from studio.generation.masking import InpaintPlan
from studio.generation.oom import generation_advice, run_with_advice
from studio.generation.preview import Preview
from studio.generation.prompt_schedule import merge_schedules, prompt_schedule
from studio.generation.prompt_syntax import extract_network_tags
from studio.models import speed
from studio.models.manager import LoadedModel, ModelManager

ProgressFn = Callable[[int, int, str], None]


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    path: Path | None = None


@dataclass
class GenerateResult:
    images: list[GeneratedImage] = field(default_factory=list)
    interrupted: bool = False
    message: str = ""
    notes: list[str] = field(default_factory=list)  # things the user should know (ignored tags, ...)

    @property
    def first_seed(self) -> int | None:
        return self.images[0].seed if self.images else None


def build_infotext(job: GenerateJob, seed: int, model: LoadedModel, model_hash: str,
                   networks: PromptNetworks | None = None, extra: dict | None = None) -> str:
    params = {
        "Steps": job.steps,
        **samplers.infotext_names(job.sampler, job.schedule),
        "CFG scale": job.cfg_scale,
        "Seed": seed,
        "Size": "{}x{}".format(*job.frame_size()),
        "Model hash": model_hash[:10],
        "Model": model.name,
    }
    if model.vae_choice is not None:  # a VAE other than the checkpoint's own, as A1111 names it
        params["VAE hash"] = model.vae_choice.hash[:10]
        params["VAE"] = model.vae_choice.name
    if job.is_img2img:
        params["Denoising strength"] = job.denoising_strength
    params.update(inpaint_fields(job))
    second = job.hires_pass()
    if second is not None:
        params["Denoising strength"] = second.denoising_strength
        params.update(hires.infotext_fields(job.hires_scale, second, bool(job.hires_width or job.hires_height),
                                            job.sampler))
    if job.clip_skip > 1:
        params["Clip skip"] = job.clip_skip
    params["RNG"] = "CPU"  # the noise is drawn on the CPU generator; without the field A1111 assumes GPU
    if networks is not None:
        if networks.lora_hashes:
            params["Lora hashes"] = ", ".join(f"{n}: {h}" for n, h in networks.lora_hashes.items())
        if networks.ti_hashes:
            params["TI hashes"] = ", ".join(f"{n}: {h}" for n, h in networks.ti_hashes.items())
    if job.regions:  # regional prompts: the layout and each region's prompt
        params["Regions"] = job.regions
        params["Region mode"] = job.region_mode
        params.update({f"Region {k} prompt": p for k, p in enumerate(job.region_prompts, 1)})
    params.update(extra or {})  # e.g. the ControlNet units
    params["Version"] = f"studio {__version__}"
    return format_infotext(job.prompt, job.negative_prompt, params)


def size_note(width: int, height: int, model: LoadedModel) -> str | None:
    """A warning when a side is far from the model's native size (over 2x or under half): such images take
    longer per step and the model composes them badly (repeated subjects when large, mush when small)."""
    native = model.native_size
    if all(native / 2 <= side <= 2 * native for side in (width, height)):
        return None
    what = ("larger: each step costs more and subjects tend to repeat" if max(width, height) > 2 * native
            else "smaller: the model has too few pixels to draw with")
    return (f"{width}x{height} is far from {model.name}'s native {native}x{native} ({what}); "
            f"try {native}x{native}, or a hires fix for a larger picture")


def inpaint_fields(job: GenerateJob) -> dict:
    """A1111's inpainting fields, each written only when it is not the default (as A1111 does); outpainting as
    `Outpaint: left 64, right 64`."""
    if not job.is_inpaint:
        return {}
    out = {"Mask blur": job.mask_blur} if job.mask_blur > 0 else {}
    if job.outpaint:
        out["Outpaint"] = ", ".join(f"{side} {pixels}" for side, pixels in job.outpaint.items())
        return out
    if job.mask_mode != "Inpaint masked":
        out["Mask mode"] = job.mask_mode
    if job.masked_content != "original":
        out["Masked content"] = job.masked_content
    if job.inpaint_area == "Only masked":
        out["Inpaint area"] = "Only masked"
        out["Masked area padding"] = job.inpaint_padding
    return out


def output_path(outputs_dir: Path, seed: int, when: dt.datetime | None = None) -> Path:
    """outputs/<YYYY-MM-DD>/<NNNNN>-<seed>.png, numbered after the files already there."""
    when = when or dt.datetime.now()
    folder = Path(outputs_dir) / when.strftime("%Y-%m-%d")
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name.split("-")[0]) for p in folder.glob("*.png") if p.name.split("-")[0].isdigit()]
    return folder / f"{max(numbers, default=-1) + 1:05d}-{seed}.png"


def latest_output(outputs_dir: Path) -> Path | None:
    """The image Generate wrote last: the highest number in the newest outputs/<YYYY-MM-DD>/ folder."""
    days = sorted((d for d in Path(outputs_dir).glob("????-??-??") if d.is_dir()), reverse=True)
    for day in days:
        numbered = [p for p in day.glob("*.png") if p.name.split("-")[0].isdigit()]
        if numbered:
            return max(numbered, key=lambda p: int(p.name.split("-")[0]))
    return None


def save_png(image: Image.Image, infotext: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(infotext))
    return path


@dataclass
class PromptNetworks:
    """What a job's prompts use from loras/ and embeddings/, resolved against the loaded model."""

    prompt: str  # the prompt without its <lora:...> tags: what the text encoder sees
    negative_prompt: str
    loras: list[ActiveLora] = field(default_factory=list)
    embeddings: dict[str, TextualInversion] = field(default_factory=dict)  # every usable one, by name
    embeddings_g: dict[str, TextualInversion] = field(default_factory=dict)  # SDXL: their clip_g vectors
    embedding_files: dict[str, EmbeddingFile] = field(default_factory=dict)
    skipped_embeddings: dict[str, str] = field(default_factory=dict)
    lora_hashes: dict[str, str] = field(default_factory=dict)  # filled in as A1111 writes them
    ti_hashes: dict[str, str] = field(default_factory=dict)
    schedule: tuple = ()  # DenoiseItem.schedule when the prompts edit or alternate during sampling
    cond: torch.Tensor | None = None  # the encoded prompts, when kept with them (hires fix's second pass)
    uncond: torch.Tensor | None = None
    region_conds: list = field(default_factory=list)  # regional prompts: (cond, pooled) per region
    regions: tuple = ()  # DenoiseItem.regions at the pass's size (masks, conds)
    pooled: torch.Tensor | None = None  # SDXL's pooled text embeddings of the prompt and the negative prompt
    uncond_pooled: torch.Tensor | None = None

    def item(self, cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, seed: int) -> DenoiseItem:
        """One image's DenoiseItem with these prompts' conditioning."""
        return DenoiseItem(cond, uncond, cfg_scale, seed, self.schedule, self.pooled, self.uncond_pooled,
                           self.regions)

    def at_size(self, layout: str, width: int, height: int, scale: int) -> PromptNetworks:
        """These prompts with their regions' masks for a width x height pass (hires fix's second pass)."""
        from dataclasses import replace

        if not self.region_conds:
            return self
        masks = regions.latent_masks(layout, width, height, scale)
        return replace(self, regions=tuple((m, c, p) for m, (c, p) in zip(masks, self.region_conds, strict=True)))
    notes: list[str] = field(default_factory=list)


def text_widths(model: LoadedModel) -> tuple[int, ...]:
    """Each text encoder's width: what an embedding must match to fit this model ((768, 1280) for SDXL)."""
    pipe = model.pipe
    encoders = (pipe.text_encoder, pipe.text_encoder_2) if model.is_xl else (pipe.text_encoder,)
    return tuple(int(e.config.hidden_size) for e in encoders)


def resolve_networks(job: GenerateJob, library: NetworkLibrary, widths: tuple[int, ...],
                     family: str | None = None) -> PromptNetworks:
    """Read the `<lora:...>` tags and find their files (a LoRA known to be for another family than `family` is
    refused, naming it); gather the embeddings that fit the text encoders' `widths`."""
    prompt, tags = extract_network_tags(job.prompt)
    negative, negative_tags = extract_network_tags(job.negative_prompt)
    out = PromptNetworks(prompt, negative)
    if negative_tags:
        out.notes.append("network tags in the negative prompt are ignored (A1111 does the same): "
                         + " ".join(t.text for t in negative_tags))
    scan = library.loras() if tags else None
    for tag in tags:
        if tag.kind != "lora":
            raise ValueError(f"{tag.text}: '{tag.kind}' networks are not supported; use <lora:name:weight>")
        lora = library.find_lora(tag.name, scan)
        if family is not None and lora.family not in (None, family):
            raise NetworkFileError(f"LoRA {lora.name} is made for {lora.family_label} models; the loaded model is "
                                   f"{FAMILY_LABELS.get(family, family)}: load a model of its family or remove "
                                   f"{tag.text}")
        out.loras.append(ActiveLora(lora, tag.te, tag.unet))
        out.lora_hashes[tag.name] = lora.hash
    found = library.embeddings(widths)
    out.skipped_embeddings = found.skipped
    words = set(re.findall(r"[\w.-]+", f"{prompt} {negative}"))
    for rel, why in found.skipped.items():  # a name in the prompt whose file does not fit: say so, not silence
        if Path(rel).stem in words:
            out.notes.append(f"embedding {Path(rel).stem} was not used: {why}")
    out.embedding_files = found.found
    out.embeddings = {name: TextualInversion(name, emb.vectors) for name, emb in found.found.items()}
    out.embeddings_g = {name: TextualInversion(name, emb.vectors_g) for name, emb in found.found.items()
                        if emb.vectors_g is not None}
    return out


class Generator:
    """Runs GenerateJobs on the manager's current model."""

    _save_lock = threading.Lock()

    def __init__(self, manager: ModelManager, networks: NetworkLibrary | None = None,
                 ipadapter_dir: Path | None = None):
        self.manager = manager
        self.networks = networks or NetworkLibrary(manager.cfg.loras_dir, manager.cfg.embeddings_dir)
        cfg = manager.cfg
        self.controlnets = ControlNetLoader(cfg.controlnet_dir, cfg.cache_dir, cfg.assets_dir, keep=MAX_UNITS)
        # IP-Adapters (studio.generation.ip_adapter): in `ipadapter_dir`, else the studio's ipadapter/
        self.ip_adapters = ip_adapter.IPAdapterLoader(ipadapter_dir or cfg.ipadapter_dir, cfg.cache_dir)

    def encode(self, job: GenerateJob, model: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, PromptNetworks]:
        """Apply the job's LoRAs to the model and encode its prompts the A1111 way (weights, long prompts,
        embeddings). Call with the manager's lock held."""
        nets, spans = self._prompts(job, model)  # the chunk limit is checked here, before any model work
        model.loras().apply(nets.loras)  # before encoding: a LoRA may change the text encoder
        nets.notes += model.loras().unmatched_notes(nets.loras)
        encoder = self.prompt_encoder(model, nets.embeddings, job.clip_skip, nets.embeddings_g,
                                      self.manager.cfg.sdxl_clip_l_skip)
        if job.regions:  # the prompt and each region's, padded to one length with the negative prompt
            if len(spans) != 1:
                raise ValueError("regional prompts cannot be combined with prompt editing ([from:to:when]) yet")
            texts = [regions.region_text(nets.prompt, r) for r in job.region_prompts]
            encoded, used = encode_spans(encoder, [(0, nets.prompt, nets.negative_prompt)]
                                         + [(0, t, nets.negative_prompt) for t in texts])
            _, cond, uncond, nets.pooled, nets.uncond_pooled = encoded[0]
            nets.region_conds = [(c, p) for _, c, _, p, _ in encoded[1:]]
            width, height = job.frame_size()
            nets.regions = nets.at_size(job.regions, width, height, model.pipe.vae_scale_factor).regions
        elif len(spans) == 1:  # nothing switches (`[a:b:0]` is b throughout)
            c, u, used = encode_pair(encoder, spans[0][1], spans[0][2])
            cond, uncond, nets.pooled, nets.uncond_pooled = c.embeds, u.embeds, c.pooled, u.pooled
        else:
            nets.schedule, used = encode_spans(encoder, spans)
            _, cond, uncond, nets.pooled, nets.uncond_pooled = nets.schedule[0]
        nets.ti_hashes = {name: nets.embedding_files[name].hash for name in used}
        return cond, uncond, nets

    def _prompts(self, job: GenerateJob, model: LoadedModel) -> tuple[PromptNetworks, list[tuple[int, str, str]]]:
        """The job's networks and its prompt-editing spans, each distinct text within max_prompt_chunks (counted
        with the tokenizer; no LoRA is applied and the text encoder does not run)."""
        nets = resolve_networks(job, self.networks, text_widths(model), model.family)
        # A1111's prompt editing and alternation: the conditioning at each step ([from:to:when], [a|b])
        spans = merge_schedules(prompt_schedule(nets.prompt, job.steps), prompt_schedule(nets.negative_prompt, job.steps))
        encoder = self.prompt_encoder(model, nets.embeddings, job.clip_skip, nets.embeddings_g,
                                      self.manager.cfg.sdxl_clip_l_skip)
        limits = self.manager.cfg.limits
        seen: set[str] = set()
        checked = [*spans, *((0, regions.region_text(nets.prompt, r), nets.negative_prompt)
                             for r in job.region_prompts)]
        for _, prompt, negative in checked:
            for label, text in (("prompt", prompt), ("negative prompt", negative)):
                if text not in seen:
                    seen.add(text)
                    n = encoder.count_chunks(text)
                    limits.check("max_prompt_chunks", n, f"{label} is {n:,} chunks of 75 tokens (after BREAKs)")
        return nets, spans

    def check_chunks(self, job: GenerateJob, model: LoadedModel) -> None:
        """Refuse the job's prompts above max_prompt_chunks before any model work (grids and storyboards check every
        cell up front). Call with the manager's lock held."""
        self._prompts(job, model)

    @staticmethod
    def prompt_encoder(model: LoadedModel, embeddings: dict[str, TextualInversion], clip_skip: int,
                       embeddings_g: dict[str, TextualInversion] | None = None,
                       clip_l_skip: bool = False) -> PromptEncoder | XLPromptEncoder:
        """The model's prompt encoder for these embeddings and clip skip (SDXL: `embeddings` are the clip_l vectors,
        `embeddings_g` the clip_g ones), built once and reused while the model's tokenizers and text encoders and the
        embeddings (names and vector tensors: the network library hands out the same tensor while a file's size and
        mtime stay) are the same ones. A new, changed or removed embedding file builds a new one, so embeddings
        still load without a restart. `clip_l_skip`: StudioConfig.sdxl_clip_l_skip. Call with the manager's lock
        held."""
        pipe = model.pipe
        wanted = [(name, e.vectors) for name, e in embeddings.items()]
        wanted += [(name, e.vectors) for name, e in (embeddings_g or {}).items()]
        encoders = (pipe.text_encoder, pipe.text_encoder_2) if model.is_xl else (pipe.text_encoder,)
        key = ("xl", clip_skip, clip_l_skip) if model.is_xl else clip_skip
        cached = model.prompt_encoders.get(key)
        if cached is not None:
            modules, had, encoder = cached
            if (len(modules) == len(encoders) + 1 and modules[0] is pipe.tokenizer
                    and all(a is b for a, b in zip(modules[1:], encoders, strict=True)) and len(had) == len(wanted)
                    and all(a == b and u is v for (a, u), (b, v) in zip(had, wanted, strict=True))):
                return encoder
        if model.is_xl:
            encoder = XLPromptEncoder(pipe, clip_skip, embeddings, embeddings_g or {}, clip_l_skip)
        else:
            encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, embeddings, clip_skip=clip_skip)
        model.prompt_encoders[key] = ((pipe.tokenizer, *encoders), wanted, encoder)
        return encoder

    def hires_prompts(self, job: GenerateJob, model: LoadedModel, nets: PromptNetworks, cond: torch.Tensor,
                       uncond: torch.Tensor) -> PromptNetworks:
        """The second pass's prompts: the first pass's, or the hires prompts encoded (with the same LoRAs: the
        model is not switched between the passes). `cond`/`uncond` are kept on the returned networks."""
        second = job.hires_pass()
        scale = model.pipe.vae_scale_factor
        if not (second.prompt or second.negative_prompt):
            nets.cond, nets.uncond = cond, uncond
            return nets.at_size(job.regions, second.width, second.height, scale)
        from dataclasses import replace

        hjob = replace(job, prompt=second.prompt or job.prompt, negative_prompt=second.negative_prompt or job.negative_prompt,
                       hires_fix=False)
        wanted = [(t.name, t.te, t.unet) for t in extract_network_tags(hjob.prompt)[1]]
        if wanted != [(t.name, t.te, t.unet) for t in extract_network_tags(job.prompt)[1]]:
            raise ValueError("the hires prompt must use the same <lora:...> tags as the prompt (the LoRAs stay "
                             "applied between the passes); leave the hires prompt empty or copy the tags")
        hcond, huncond, hnets = self.encode(hjob, model)
        hnets.cond, hnets.uncond = hcond, huncond
        return hnets.at_size(job.regions, second.width, second.height, scale)

    def run_hires_pass(self, job: GenerateJob, pipe, second: hires.HiresPass, first: DenoiseResult,
                    items: list[DenoiseItem], on_step, cancel: threading.Event | None,
                    control: list[Control] | None = None, image_prompts: list | None = None,
                    preview: Preview | None = None) -> DenoiseResult:
        """The hires fix's second pass over a finished first pass: its latents upscaled (latent upscalers) or its
        pictures upscaled and encoded again (pixel upscalers), then image to image at the target size (with
        `control`, its ControlNets, their maps at that size). A stopped first pass is returned as it is."""
        if first.interrupted:
            return first if first.images else DenoiseResult(decode_latents(pipe, first.latents), True, first.latents)
        if second.in_latent_space:
            init = hires.upscale_latents(first.latents, second.upscaler, second.width, second.height,
                                         pipe.vae_scale_factor)
        else:
            from studio.upscale.run import upscale
            from studio.upscale.tiling import UpscaleCancelled

            try:
                name = "Lanczos" if second.upscaler == "None" else second.upscaler  # A1111's hires "None" resizes
                pictures = [upscale(image, name, size=(second.width, second.height),
                                    folder=self.manager.cfg.upscalers_dir, device=pipe._execution_device,
                                    cancel=cancel).image for image in first.images]
            except UpscaleCancelled:
                return DenoiseResult(first.images, True, first.latents)
            init = torch.cat([encode_init(pipe, picture) for picture in pictures])
        inpaint = self.inpaint_for(job, pipe, None, second.width, second.height)
        return denoise(pipe, items, second.sampler or job.sampler, job.schedule, second.steps or job.steps,
                       second.width, second.height, on_step=on_step, cancel=cancel, init_latents=init,
                       strength=second.denoising_strength, inpaint=inpaint, control=control,
                       region_mode=job.region_mode, image_prompts=image_prompts, preview=preview)

    def load_controlnet(self, unit: ControlUnit, model: LoadedModel):
        """The unit's ControlNet on the pipe's device and dtype, compiled as the UNet is; one of another family is
        refused naming it (studio.control.controlnet)."""
        pipe = model.pipe
        return self.controlnets.load(unit.model, pipe._execution_device, pipe.unet.dtype,
                                     pipe.unet.config.cross_attention_dim, compile_as=speed.compiled_as(pipe.unet),
                                     xl=model.is_xl)

    @staticmethod
    def controls_for(units: list[ControlUnit], loaded: list, maps: list[Image.Image], width: int, height: int,
                     pipe) -> list[Control]:
        """The denoise loop's Controls: each unit's map at width x height as a 0..1 tensor, its weight, start/end
        and control mode."""
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        out = []
        for unit, net, image in zip(units, loaded, maps, strict=True):
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            out.append(Control(net.model, processor.preprocess(image, height=height, width=width), unit.weight,
                               unit.start, unit.end, unit.mode))
        return out

    @staticmethod
    def inpaint_for(job: GenerateJob, pipe, plan: InpaintPlan | None, width: int, height: int) -> Inpaint | None:
        """The pass's inpainting inputs: the latent mask from the plan, and for a 9-channel inpainting UNet its
        mask-and-picture conditioning (the whole frame masked, grey, when there is no plan: text to image or image
        to image on an inpainting model, as A1111 does)."""
        nine = is_inpainting_unet(pipe.unet)
        if plan is None:
            return Inpaint(conditioning=inpaint_conditioning(pipe, None, None, width, height)) if nine else None
        content = "original" if job.outpaint else job.masked_content
        inpaint = Inpaint(latent_mask(plan.mask, width, height, pipe.vae_scale_factor), content=content)
        if nine:
            inpaint.conditioning = inpaint_conditioning(pipe, plan.picture, plan.mask, width, height)
        return inpaint

    def run(self, job: GenerateJob, outputs_dir: Path | None = None, on_progress: ProgressFn | None = None,
            cancel: threading.Event | None = None, preview: Preview | None = None) -> GenerateResult:
        """Run the job (every batch, both hires passes), saving PNGs to `outputs_dir`; `on_progress` per step,
        `cancel` stops at the next step, `preview` gets approximate pictures every few steps (a UI setting, not a
        job parameter: it changes no image)."""
        # 1. validate (the prompts' chunks are counted with the tokenizer in encode, before the text encoder runs)
        job.validate(self.manager.cfg.limits)
        if self.manager.current is None:
            raise RuntimeError("no model is loaded; load one first")
        # image to image: the init read (checked before decoding) and fitted to the size, before any model work;
        # inpainting and outpainting: the mask too, and the picture the sampler sees
        plan = job.inpaint_plan()
        init = plan.picture if plan is not None else job.init_picture() if job.is_img2img else None
        second = job.hires_pass()
        if second is not None and not second.in_latent_space:  # a name not in upscalers/ fails now, not after pass 1
            from studio.upscale.library import resolve_upscaler

            resolve_upscaler(second.upscaler, self.manager.cfg.upscalers_dir)
        # ControlNet maps: pictures read (checked), fitted and preprocessed before any model work
        width, height = job.frame_size()
        maps = [unit.make_map(width, height, self.manager.cfg.cache_dir / "annotators") for unit in job.controls]
        pictures = [unit.pictures() for unit in job.ip_adapters]  # IP-Adapter pictures: read (checked) up front
        # out of GPU memory: memory freed, a message with what to change (studio.oom), the studio keeps serving
        return run_with_advice(lambda: self._run(job, outputs_dir, on_progress, cancel, init, plan, maps, pictures,
                                                 preview),
                               "generation",
                               lambda: generation_advice(job.batch_size, job.width, job.height,
                                                         self.manager.memory))

    def _run(self, job: GenerateJob, outputs_dir: Path | None, on_progress: ProgressFn | None,
             cancel: threading.Event | None, init: Image.Image | None = None,
             plan: InpaintPlan | None = None, maps: list[Image.Image] | None = None,
             pictures: list | None = None, preview: Preview | None = None) -> GenerateResult:
        with self.manager.lock, ExitStack() as adapters:  # `adapters`: the IP-Adapters, off the UNet at the end
            # the model is taken under the lock, so a model switch cannot come between reading it and using it
            model = self.manager.current
            if model is None:
                raise RuntimeError("no model is loaded; load one first")
            pipe = model.pipe
            model_hash = self.manager.model_hash(model)
            cond, uncond, nets = self.encode(job, model)
            second = job.hires_pass()
            hires_nets = self.hires_prompts(job, model, nets, cond, uncond) if second is not None else None
            base_seed = resolve_seed(job.seed)
            # the latents of the init (once: every image of the run starts from it), with the VAE now in the model
            init_latents = encode_init(pipe, init) if init is not None else None
            width, height = job.frame_size()
            inpaint = self.inpaint_for(job, pipe, plan, width, height)
            loaded = [self.load_controlnet(unit, model) for unit in job.controls]
            controls = self.controls_for(job.controls, loaded, maps or [], width, height, pipe)
            extra = control_fields(job.controls, loaded, width, height)
            # IP-Adapters: checked against the model, their pictures encoded once, on the UNet for this run only
            ip_loaded, image_prompts = self.ip_adapters.prompts(job.ip_adapters, pipe, pictures)
            adapters.enter_context(ip_adapter.adapters_on(pipe, ip_loaded))
            extra.update(ip_adapter.infotext_fields(job.ip_adapters, ip_loaded))
            run_steps = job.denoise_steps()  # image to image runs steps x strength of them
            hires_steps = 0
            if second is not None:  # the second pass is image to image: its steps x its strength run
                hires_steps = min(int((second.steps or job.steps) * second.denoising_strength), second.steps or job.steps)
            total = (run_steps + hires_steps) * job.batch_count
            result = GenerateResult(notes=nets.notes)
            note = size_note(width, height, model)
            if note:
                result.notes.append(note)
            for batch in range(job.batch_count):
                # 2. seeds and noise: image i of the whole run uses seed + i, as in A1111
                seeds = [base_seed + batch * job.batch_size + i for i in range(job.batch_size)]
                # 3. denoise in one pass (studio.generation.denoise, shared with the parameter explorer), reporting each step
                # and stopping at the next step on cancel
                done_before = batch * (run_steps + hires_steps)

                def on_step(done, n_timesteps, done_before=done_before, batch=batch, steps=run_steps, what=""):
                    if on_progress:
                        step = -(-done * steps // n_timesteps)  # 2nd-order samplers take more timesteps
                        on_progress(done_before + step, total,
                                    f"batch {batch + 1}/{job.batch_count}, {what}step {step}/{steps}")

                items = [nets.item(cond, uncond, job.cfg_scale, seed) for seed in seeds]
                note = speed.compile_note(pipe.unet, (len(items), width, height, False))
                if note and on_progress:
                    on_progress(done_before, total, note)
                out = denoise(pipe, items, job.sampler, job.schedule, job.steps, width, height,
                              on_step=on_step, cancel=cancel, init_latents=init_latents,
                              strength=job.denoising_strength, inpaint=inpaint, control=controls or None,
                              region_mode=job.region_mode, image_prompts=image_prompts or None,
                              decode=second is None or not second.in_latent_space, preview=preview)
                if second is not None:
                    def hires_step(done, n, done_before=done_before + run_steps, batch=batch):
                        on_step(done, n, done_before, batch, hires_steps, "hires fix, ")

                    hires_items = [hires_nets.item(hires_nets.cond, hires_nets.uncond, job.cfg_scale, seed)
                                   for seed in seeds]
                    hires_controls = self.controls_for(job.controls, loaded, maps or [], second.width, second.height,
                                                       pipe)
                    out = self.run_hires_pass(job, pipe, second, out, hires_items, hires_step, cancel,
                                              hires_controls or None, image_prompts or None, preview)
                images, interrupted = out.images, out.interrupted
                if plan is not None:  # the original's pixels back outside the mask (A1111's overlay)
                    images = [plan.finish(image) for image in images]
                # 4. save (a stopped pass is shown but not saved: it is unfinished)
                for image, seed in zip(images, seeds, strict=True):
                    info = build_infotext(job, seed, model, model_hash, nets, extra)
                    item = GeneratedImage(image, seed, info)
                    if outputs_dir is not None and not interrupted:
                        with self._save_lock:
                            item.path = save_png(image, info, output_path(outputs_dir, seed))
                    result.images.append(item)
                if interrupted:
                    result.interrupted = True
                    result.message = (f"stopped during batch {batch + 1}/{job.batch_count}; "
                                      "its unfinished images are shown but not saved")
                    break
            return result
