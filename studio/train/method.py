"""What every training method gives the shared loop: its trainable parameter groups (each with its own rate),
the text conditioning of a batch (SDXL: with the pooled embedding), the denoiser to call, its checkpoint state and
its output files."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from studio.config import StudioConfig
from studio.generation.conditioning import PromptEncoder, XLPromptEncoder
from studio.train.captions import STREAM_CAPTIONS, CaptionOptions, caption_dropped, frame_caption
from studio.train.data import rng_seed
from studio.train.job import OutputExistsError, TrainJob
from studio.train.schedule import lr_factor, parse_schedule, warmup_steps


@dataclass
class TrainContext:
    """Everything a method is built from; the loop owns it."""

    job: TrainJob
    cfg: StudioConfig
    model: object  # studio.models.manager.LoadedModel
    device: torch.device
    weight_dtype: torch.dtype
    run_path: Path | None
    model_hash: str
    log: Callable[[str], None] = field(default=lambda text: None)
    bucketed: bool = False  # the batches come from aspect-ratio buckets

    @property
    def pipe(self):
        return self.model.pipe


def text_encoders(pipe) -> list[nn.Module]:
    """The pipeline's text encoders: one (SD 1.x, 2.x) or two (SDXL: CLIP ViT-L, then OpenCLIP bigG)."""
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


def base_prompt_encoder(pipe) -> PromptEncoder | XLPromptEncoder:
    """The model's own prompt encoder without embeddings (SDXL: both text encoders, as generation encodes)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return XLPromptEncoder(pipe)
    return PromptEncoder(pipe.tokenizer, pipe.text_encoder)


class CachedText:
    """SDXL conditioning of frozen text encoders, (embeds, pooled) per prompt, computed once: both encoders then
    run once per caption instead of every step. One prompt at a time, so it never depends on the batch. Keyed by
    the prompt itself; with `keep` False (captions that change every step: shuffled or dropped tags) nothing is
    kept, each prompt is encoded when it comes, the same way, so the results equal the cached ones."""

    def __init__(self, encoder: XLPromptEncoder, keep: bool = True):
        self.encoder = encoder
        self.keep = keep
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        found = {}
        for prompt in prompts:
            if prompt not in found:
                found[prompt] = self.cache.get(prompt) or self.encoder.encode_batch([prompt])
        if self.keep:
            self.cache.update(found)
        return (torch.cat([found[p][0] for p in prompts]), torch.cat([found[p][1] for p in prompts]))


@dataclass
class ParamGroup:
    name: str  # "embedding", "unet", "text_encoder"
    params: list[nn.Parameter]
    rate: Callable[[int], float]  # learning rate at optimizer step n (1-based)


def first_rate(text: str | float) -> float:
    """The first rate of an A1111 schedule (what file metadata records as "the" learning rate)."""
    return parse_schedule(text).pieces[0][0]


def rate_function(job: TrainJob, base: str | float) -> Callable[[int], float]:
    """A1111 schedule text (or a number) times the warmup/decay factor of the job's scheduler."""
    schedule = parse_schedule(base)
    warm = warmup_steps(job.lr_warmup, job.max_steps)
    return lambda step: schedule.rate_at(step) * lr_factor(job.lr_scheduler, step, job.max_steps, warm,
                                                           job.lr_cycles)


def caption_rng(seed: int, micro_batch: int, position: int, image: int) -> random.Random:
    """The generator of one caption's draws (shuffle, tag and caption dropout): from the run's seed, the
    micro-batch, the item's place in it and the image, so a resumed run draws what an uninterrupted one drew."""
    return random.Random(rng_seed(seed, STREAM_CAPTIONS, micro_batch, position, image))


class TrainMethod:
    """Base of the methods. Subclasses set `self.modules` (what accelerate prepares) and fill the hooks."""

    label = "training"
    # a dropped caption (caption dropout) empties the whole prompt, instance prompt included: the unconditional
    # case, as kohya trains it. Textual Inversion empties only the caption ([filewords]); its template keeps [name]
    drops_prompt = True

    def __init__(self, ctx: TrainContext):
        self.ctx = ctx
        self.job = ctx.job
        self.caption_options = CaptionOptions.from_job(ctx.job)
        pipe = ctx.pipe
        self.tokenizer, self.text_encoder, self.unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)  # SDXL's second text encoder, else None
        self.xl = self.text_encoder_2 is not None
        self.modules: dict[str, nn.Module] = {}  # name -> module holding trainable parameters

    # 1. before the model loads

    @staticmethod
    def check_output(cfg: StudioConfig, job: TrainJob) -> None:
        """Raise OutputExistsError (a ValueError) when the output would replace a file and the job does not
        say `overwrite`; ValueError for other problems with the output."""

    @staticmethod
    def check_model(pipe, job: TrainJob) -> None:
        """Raise ValueError when the job does not fit the loaded model (before a run folder is made)."""

    # 2. training

    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def prepare(self, accelerator) -> None:
        """Wrap the trainable modules for devices and several GPUs; the forward passes use the wrapped ones."""
        names = list(self.modules)
        prepared = accelerator.prepare(*self.modules.values()) if names else []
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        self.prepared = dict(zip(names, prepared, strict=True))

    def trainable(self, name: str) -> nn.Module:
        return getattr(self, "prepared", {}).get(name, self.modules.get(name))

    def prompts(self, captions: list[str], rng) -> list[str]:
        """The training prompts of a batch of images (their captions, templates, an instance prompt)."""
        raise NotImplementedError

    def batch_prompts(self, captions: list[str], rng, micro_batch: int, indices: list[int]) -> list[str]:
        """The prompts of micro-batch `micro_batch` (images `indices`): each caption shaped by the job's caption
        options (studio.train.captions) with a generator of its own (caption_rng), then made a prompt (prompts()).
        With every option off this is prompts() itself: the same prompts and draws as before the options."""
        options = self.caption_options
        if not options.active:
            return self.prompts(captions, rng)
        shaped, dropped = [], []
        for position, (caption, image) in enumerate(zip(captions, indices, strict=True)):
            draws = caption_rng(self.job.seed, micro_batch, position, image)
            drop = caption_dropped(draws, options.caption_dropout)  # the first draw, as in shape_caption
            dropped.append(drop)
            shaped.append("" if drop else options.arrange(caption, draws))
        prompts = self.prompts(shaped, rng)
        return ["" if drop and self.drops_prompt else prompt for prompt, drop in zip(prompts, dropped, strict=True)]

    def first_prompt(self, caption: str) -> str:
        """The prompt of a caption without the random options (prefix and suffix only; templates drawn from a
        fixed generator): what previews use when the preview prompt is empty."""
        options = self.caption_options
        return self.prompts([frame_caption(caption, options.prefix, options.suffix)], random.Random(0))[0]

    def encode(self, prompts: list[str], generator: torch.Generator | None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, 77, dim] conditioning, with gradients where the method trains the text side; SDXL: (that, the
        [B, projection] pooled embedding)."""
        raise NotImplementedError

    def denoiser(self) -> nn.Module:
        return self.unet

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        """After each optimizer step (EMA)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups() for p in group.params]

    # 3. checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def extra_state(self) -> dict | None:
        """Anything else a checkpoint must hold (an EMA), saved with torch.save."""
        return None

    def load_extra_state(self, state: dict) -> None:
        pass

    # 4. results

    def preview_encoder(self) -> PromptEncoder | XLPromptEncoder:
        """The prompt encoder previews use (it sees what the method has learned so far)."""
        return base_prompt_encoder(self.ctx.pipe)

    def save(self, step: int, final: bool, run_path: Path | None) -> Path:
        """The result as a shareable file: at checkpoints a copy in the run folder, at the end the real one."""
        raise NotImplementedError


def check_output_free(folder: Path, job, exts: tuple[str, ...]) -> None:
    """Refuse to overwrite someone's file named like the job's output (any of `exts`) unless the job says so."""
    if job.overwrite:
        return
    clash = [p for p in (Path(folder) / f"{job.name}{ext}" for ext in exts) if p.exists()]
    if clash:
        raise OutputExistsError(f"{clash[0].name} already exists in {Path(folder).name}/; choose another name "
                                "or ask to replace it")
