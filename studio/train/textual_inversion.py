"""The three Textual Inversion methods on the shared loop: standard TI (the token's vectors are the trained
parameters), TI-Att and TI-MoE (an inversion module computes the vectors from CLIP image embeddings of the
training images). The text encoder, UNet and VAE stay frozen and untouched; the vectors reach the text encoder
through the same embedding hook that generation uses. On SDXL every vector is a clip_l part and a clip_g part (one
row of both widths, split for the two encoders)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from studio.files.networks import EMBEDDING_EXTS, save_embedding
from studio.generation.conditioning import PromptEncoder, TextualInversion, XLPromptEncoder
from studio.train.data import STREAM_INIT, rng_seed
from studio.train.inversion_modules import build_module
from studio.train.job import METHOD_LABELS, TrainJob
from studio.train.method import ParamGroup, TrainContext, TrainMethod, check_output_free, rate_function
from studio.train.templates import Templates, load_templates


class EmbeddingVectors(nn.Module):
    """Standard TI: the vectors themselves are the parameter (inputs are ignored)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(init.detach().clone().float())

    def forward(self, images: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.vectors

    def aux_loss(self) -> torch.Tensor | None:
        return None


def check_token_name(tokenizer, name: str) -> None:
    """The embedding's name must not already be one token the model knows ("cat", "painting"): prompts using
    that word would all get the embedding. Several tokens ("monet-style", "mj_toy") are fine."""
    ids = tokenizer(name, add_special_tokens=False).input_ids
    if len(ids) == 1:
        raise ValueError(f"{name!r} is already a word the model knows (token {ids[0]}); every prompt with that "
                         f"word would use the embedding. Pick a made-up name such as {name}-style or {name}_tok")


def embedding_path(embeddings_dir: Path, job: TrainJob) -> Path:
    ext = ".pt" if job.embedding_format == "a1111-pt" else ".safetensors"
    return Path(embeddings_dir) / f"{job.name}{ext}"


def initial_vectors(tokenizer, text_encoder, init_word: str, n_vectors: int) -> torch.Tensor:
    """[n, dim] from the initializer word's token embeddings, spread over the vectors as A1111 does
    (vector i takes token i * n_tokens // n_vectors); zeros when the word is empty."""
    weight = text_encoder.get_input_embeddings().weight
    vectors = torch.zeros(n_vectors, weight.shape[1])
    ids = tokenizer(init_word or "", add_special_tokens=False).input_ids if init_word else []
    if ids:
        rows = weight[torch.tensor(ids, device=weight.device)].detach().float().cpu()
        for i in range(n_vectors):
            vectors[i] = rows[i * len(ids) // n_vectors]
    return vectors


def embedding_width(text_encoder) -> int:
    return text_encoder.get_input_embeddings().embedding_dim


class InversionMethod(TrainMethod):
    """TI, TI-Att and TI-MoE: the trained module returns the token's vectors; prompts come from templates."""

    drops_prompt = False  # caption dropout empties [filewords] only: the template keeps [name], which trains

    def __init__(self, ctx: TrainContext, image_features: torch.Tensor | None = None,
                 templates: Templates | None = None):
        super().__init__(ctx)
        job = ctx.job
        check_token_name(self.tokenizer, job.name)
        self.name = job.name
        self.label = METHOD_LABELS[job.method]
        self.templates = templates or load_templates(job.template, ctx.cfg.assets_dir, ctx.cfg.presets_dir)
        if not any("[name]" in line for line in self.templates.lines):
            raise ValueError(f"template {self.templates.name} never uses [name]: the embedding would not be trained")
        self.width_l = embedding_width(self.text_encoder)
        if self.xl:  # one row per vector: its clip_l part, then its clip_g part
            self.encoder = XLPromptEncoder(ctx.pipe)
            width = self.width_l + embedding_width(self.text_encoder_2)
        else:
            self.encoder = PromptEncoder(self.tokenizer, self.text_encoder, {})
            width = self.width_l
        if job.method == "ti":
            self.module: nn.Module = EmbeddingVectors(self.initial_vectors(ctx.pipe))
            self.features = None
        else:
            if image_features is None:
                raise ValueError(f"{self.label} needs CLIP image embeddings of the training images")
            self.features = image_features.to(ctx.device)
            # the module's initial weights come from the run's seed: the same seed, the same run
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng_seed(job.seed, STREAM_INIT))
                self.module = build_module(job.method, image_features.shape[1], width, image_features.shape[0],
                                           job.vectors, job.heads, job.experts, job.top_k)
        self.module.to(ctx.device)
        self.modules = {"embedding": self.module}
        if job.gradient_checkpointing:
            # the gradient reaches the prompt through the frozen UNet, whose activations the backward keeps;
            # checkpointing recomputes them instead (diffusers checkpoints whenever grad is on, eval mode or not)
            self.unet.enable_gradient_checkpointing()

    def initial_vectors(self, pipe) -> torch.Tensor:
        """The initializer word's vectors [n, width] (SDXL: each encoder's, side by side)."""
        job = self.job
        parts = [initial_vectors(pipe.tokenizer, pipe.text_encoder, job.init_word, job.vectors)]
        if self.xl:
            parts.append(initial_vectors(pipe.tokenizer_2, pipe.text_encoder_2, job.init_word, job.vectors))
        return torch.cat(parts, dim=1)

    def split(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: [n, width_l + width_g] -> (clip_l [n, width_l], clip_g [n, width_g])."""
        return vectors[:, :self.width_l], vectors[:, self.width_l:]

    @staticmethod
    def check_output(cfg, job: TrainJob) -> None:
        check_output_free(cfg.embeddings_dir, job, EMBEDDING_EXTS)

    @staticmethod
    def check_model(pipe, job: TrainJob) -> None:
        check_token_name(pipe.tokenizer, job.name)
        if getattr(pipe, "text_encoder_2", None) is not None and job.embedding_format == "a1111-pt":
            raise ValueError("SDXL embeddings have no .pt form (A1111's .pt holds one text encoder's vectors): "
                             "choose the a1111 or diffusers format, which write clip_l and clip_g")

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("embedding", list(self.module.parameters()), rate_function(self.job, self.job.learning_rate))]

    def prompts(self, captions: list[str], rng: random.Random) -> list[str]:
        return [self.templates.fill(rng, self.name, caption) for caption in captions]

    def encode(self, prompts: list[str], generator: torch.Generator | None):
        """[B, 77, dim] text conditioning of a batch (SDXL: and the pooled embedding), with gradients into the
        trainable module."""
        vectors = self.trainable("embedding")(self.features, generator)
        if self.xl:
            self.encoder.set_embedding(self.name, *self.split(vectors))
        else:
            self.encoder.set_embedding(TextualInversion(self.name, vectors))
        return self.encoder.encode_batch(prompts)

    def aux_loss(self) -> torch.Tensor | None:
        aux = self.module.aux_loss()
        return None if aux is None else self.job.aux_weight * aux

    @torch.no_grad()
    def vectors(self) -> torch.Tensor:
        """The learned embedding [n, dim] (modules run without routing noise), float32 on the CPU."""
        return self.module(self.features, None).detach().float().cpu()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def preview_encoder(self) -> PromptEncoder | XLPromptEncoder:
        if self.xl:
            clip_l, clip_g = self.split(self.vectors())
            return XLPromptEncoder(self.ctx.pipe, 1, {self.name: TextualInversion(self.name, clip_l)},
                                   {self.name: TextualInversion(self.name, clip_g)})
        return PromptEncoder(self.tokenizer, self.text_encoder, {self.name: TextualInversion(self.name,
                                                                                             self.vectors())})

    def save(self, step: int, final: bool, run_path: Path | None) -> Path:
        job, ctx = self.job, self.ctx
        if final:
            path = embedding_path(ctx.cfg.embeddings_dir, job)
        else:
            path = embedding_path(run_path / "embeddings", job)
            path = path.with_name(f"{job.name}-{step}{path.suffix}")
        meta = {"studio.method": job.method, "studio.run": run_path.name if run_path else "",
                "modelspec.trigger_phrase": self.name, "studio.learning_rate": job.learning_rate}
        vectors, vectors_g = self.split(self.vectors()) if self.xl else (self.vectors(), None)
        return save_embedding(path, vectors, self.name, job.embedding_format, step=step,
                              checkpoint_hash=ctx.model_hash[:10], checkpoint_name=ctx.model.name, metadata=meta,
                              vectors_g=vectors_g)
