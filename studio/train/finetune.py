"""Full UNet fine-tuning on the shared loop (seeds 001 and 003): every UNet weight trains, optionally with an EMA
copy, gradient checkpointing and 8-bit Adam; the result is a single-file checkpoint (A1111 layout; SDXL: SGM
layout) in models/ and a diffusers folder in the run folder."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from studio.generation.conditioning import PromptEncoder, XLPromptEncoder
from studio.train.job import OutputExistsError, TrainJob
from studio.train.lora import caption_prompt
from studio.train.method import (
    CachedText,
    ParamGroup,
    TrainContext,
    TrainMethod,
    base_prompt_encoder,
    rate_function,
)


def finetune_output(cfg, job: TrainJob) -> Path:
    return Path(job.output).expanduser() if job.output else Path(cfg.models_dir) / f"{job.name}.safetensors"


class FinetuneMethod(TrainMethod):
    label = "fine-tune"

    def __init__(self, ctx: TrainContext):
        super().__init__(ctx)
        job = ctx.job
        # the trained UNet keeps fp32 master weights; mixed precision runs its forward pass in fp16/bf16
        self.unet.to(ctx.device, torch.float32)
        self.unet.requires_grad_(True).train()
        if job.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.modules = {"unet": self.unet}
        self.ema = None
        if job.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.unet.parameters(), decay=job.ema_decay, model_cls=type(self.unet),
                                model_config=self.unet.config)
        self.encoder = base_prompt_encoder(ctx.pipe)
        # SDXL: both encoders once per caption (per step when the caption options shuffle or drop tags)
        self.cached = CachedText(self.encoder, keep=not self.caption_options.random) if self.xl else None

    @staticmethod
    def check_output(cfg, job: TrainJob) -> None:
        path = finetune_output(cfg, job)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"the fine-tuned checkpoint is written as .safetensors, got {path.name}")
        if path.exists() and not job.overwrite:
            raise OutputExistsError(f"{path.name} already exists in {path.parent.name}/; choose another name or "
                                    "ask to replace it")

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("unet", list(self.unet.parameters()), rate_function(self.job, self.job.learning_rate))]

    def prompts(self, captions: list[str], rng: random.Random) -> list[str]:
        return [caption_prompt(self.job, caption) for caption in captions]

    def encode(self, prompts: list[str], generator: torch.Generator | None):
        if self.cached is not None:
            return self.cached(prompts)
        with torch.no_grad():
            return self.encoder.encode_batch(prompts)

    def denoiser(self):
        return self.trainable("unet")

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.unet.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.unet.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.unet.load_state_dict(state)

    def extra_state(self) -> dict | None:
        return {"ema": self.ema.state_dict()} if self.ema is not None else None

    def load_extra_state(self, state: dict) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])

    def preview_encoder(self) -> PromptEncoder | XLPromptEncoder:
        return self.encoder

    def save(self, step: int, final: bool, run_path: Path | None) -> Path:
        """Final: models/NAME.safetensors (original layout, fp16) and runs/RUN/diffusers/. Checkpoints keep the
        weights in the run folder only (no extra copy: a UNet is gigabytes)."""
        from studio.files.convert import save_diffusers_folder, save_single_file

        if not final:
            return run_path / "checkpoints"
        pipe, job, ctx = self.ctx.pipe, self.job, self.ctx
        if self.ema is not None:
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())  # the averaged weights are the result
        try:
            path = save_single_file(pipe, finetune_output(ctx.cfg, job), ctx.model.family, dtype=torch.float16,
                                    metadata={"modelspec.title": job.name, "studio.method": "finetune",
                                              "studio.base_model": ctx.model.name,
                                              "studio.base_model_hash": ctx.model_hash[:10],
                                              "studio.steps": str(step), "studio.ema": str(bool(self.ema))})
            if run_path is not None:
                save_diffusers_folder(pipe, run_path / "diffusers")
        finally:
            if self.ema is not None:
                self.ema.restore(self.unet.parameters())
        return path
