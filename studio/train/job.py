"""The training job: one typed dataclass for every method, validated up front, saved as a run's config.yaml,
filled from presets (presets/training/*.yaml)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from studio.config import ROOT, Limits, check_known_keys, check_settings, real_number, text, whole_number
from studio.files.names import check_name
from studio.generation.prompt_syntax import check_prompt_limits
from studio.train.schedule import LR_SCHEDULERS, parse_schedule

TI_METHODS = ("ti", "ti-att", "ti-moe")
METHODS = (*TI_METHODS, "lora", "finetune")
METHOD_LABELS = {"ti": "Textual Inversion", "ti-att": "TI-Att (attention inversion module)",
                 "ti-moe": "TI-MoE (Mixture-of-Experts inversion module)", "lora": "LoRA (DreamBooth-LoRA)",
                 "finetune": "Full UNet fine-tune"}
LORA_TARGETS = {
    # UNet modules LoRA wraps: the attention projections (kohya's and seed 004's default), plus the
    # transformer blocks' feed-forward and projection layers, plus the ResNet convolutions
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
            "conv2", "conv_shortcut", "time_emb_proj"],
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# what a LoRA-method run trains (studio.train.lora): plain LoRA, or a LyCORIS network written in LyCORIS' keys
NETWORKS = ("lora", "locon", "loha", "lokr", "dora")
NETWORK_LABELS = {"lora": "LoRA", "locon": "LoCon (LoRA + convolutions)", "loha": "LoHa", "lokr": "LoKr",
                  "dora": "DoRA"}
CONV_NETWORKS = ("locon", "loha", "lokr", "dora")  # the ones that take a conv rank (LyCORIS' conv_dim)
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
# where a method's usual value differs from the TI defaults of TrainJob (the UI and the command line start here)
METHOD_DEFAULTS = {"lora": {"learning_rate": "1e-4", "preview_prompt": ""},
                   "finetune": {"learning_rate": "1e-5", "preview_prompt": ""}}
MIXED_PRECISION = ("no", "fp16", "bf16")
EMBEDDING_FORMATS = ("a1111", "diffusers", "a1111-pt")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHIPPED_PRESETS = ROOT / "presets" / "training"
MAX_VECTORS = 75


class OutputExistsError(ValueError):
    """A training run would replace an earlier output (embedding, LoRA, checkpoint) of the same name, and the job
    does not say `overwrite`."""


@dataclass
class TrainJob:
    """Everything one training run needs; the UI, the command line and a run's config.yaml fill the same fields."""

    method: str = "ti"  # ti | ti-att | ti-moe | lora | finetune
    model: str = "demo-tiny"  # name in models/, a path, a hub id, or demo-tiny
    data: str = ""  # dataset: a name in datasets/ or a folder of images (+ .txt captions)
    name: str = ""  # the output's name: embeddings/NAME, loras/NAME or models/NAME; for TI also the prompt word
    # --- the embedding ---
    init_word: str = "*"  # standard TI starts from this word's token embeddings (A1111's default "*")
    vectors: int = 1  # vectors per token (1..75); each takes one of the prompt's 75 positions
    template: str = "style_filewords"  # prompt template file (assets/templates/) by name, or a .txt path
    # --- the data ---
    resolution: int = 512  # images are center-cropped and resized to this square (or to its aspect-ratio buckets)
    # aspect-ratio buckets: each image goes to the bucket of SDXL's resolutions (scaled to `resolution`) nearest its
    # aspect ratio, scaled to cover and centre-cropped; a batch holds one bucket. None: on for SDXL, off otherwise
    buckets: bool | None = None
    # kohya's bucket rules (studio.train.data.BucketRule): with any of these set, the buckets are kohya's (every width
    # from the min side to the max side on the step, the tallest height within resolution²), not SDXL's list; None:
    # kohya's 256 / 1024 / 64 once one is given. No upscale: each image in a bucket of its own size, never enlarged
    bucket_min_side: int | None = None
    bucket_max_side: int | None = None
    bucket_step: int | None = None
    bucket_no_upscale: bool = False
    repeats: int | None = None  # times each image is seen per epoch; None: the dataset's (dataset.json), else 1
    flip_p: float | None = None  # probability of a horizontal flip; None: the dataset's setting, else 0
    # --- the captions (kohya's caption options, studio.train.captions; all off by default). They shape each
    # image's caption wherever it becomes a prompt: LoRA's and the fine-tune's captions, TI's [filewords]. Every draw
    # comes from the seed, the micro-batch and the image, so a resumed run sees the same captions ---
    shuffle_tags: bool = False  # shuffle the comma-separated tags every step (kohya shuffle_caption)
    keep_tokens: int = 0  # the first N tags stay in place, in order (kohya keep_tokens)
    caption_dropout: float = 0.0  # train on an empty prompt at this rate (kohya caption_dropout_rate)
    tag_dropout: float = 0.0  # drop each tag after the kept ones at this rate (kohya caption_tag_dropout_rate)
    caption_prefix: str = ""  # a tag put before every caption, never shuffled (kohya caption_prefix)
    caption_suffix: str = ""  # a tag put after every caption, never shuffled (kohya caption_suffix)
    # --- masked training (studio.train.masks): each image's NAME.mask.png, or its alpha channel, weights the loss:
    # 1 where the mask is white, `unmasked_weight` where it is black (kohya --masked_loss; OneTrainer's unmasked
    # weight). Images without a mask count everywhere ---
    masked_loss: bool = False
    unmasked_weight: float = 0.0
    # --- validation (kohya's validation_split): this fraction of the images is held out of training, and every
    # `validate_every` steps their loss at fixed noise and timesteps is logged and plotted beside the training loss
    validation_split: float = 0.0
    validate_every: int = 50
    # --- optimisation ---
    learning_rate: str = "0.005"  # a number or an A1111 schedule "0.005:100, 1e-3:1000" (LoRA: the UNet's)
    text_encoder_lr: float | None = None  # LoRA with the text encoder: its rate (None: the same as the UNet's)
    # constant | constant_with_warmup | linear | cosine | cosine_with_restarts (multiplies the rate)
    lr_scheduler: str = "constant"
    lr_warmup: float = 0  # warmup steps, or a fraction of max_steps when below 1 (seed 004: 0.1)
    lr_cycles: int = 1  # cosine_with_restarts: cosine cycles after the warmup (kohya lr_scheduler_num_cycles)
    # adamw | adamw8bit (bitsandbytes, CUDA only) | prodigy (prodigyopt: finds its own step size; the learning rate
    # is a multiplier, usually 1) | adafactor (transformers, fixed learning rate as kohya sets it)
    optimizer: str = "adamw"
    prodigy_d_coef: float = 1.0  # Prodigy's d_coef: scales the step size it finds
    prodigy_safeguard_warmup: bool = False  # Prodigy's safeguard_warmup (kohya's advice with a warmup)
    prodigy_bias_correction: bool = False  # Prodigy's use_bias_correction
    batch_size: int = 1
    grad_accum: int = 1  # gradient accumulation steps (effective batch = batch_size * grad_accum)
    max_steps: int = 1000  # optimizer steps
    seed: int = 0  # the same seed and settings give the same embedding, also across a stop and resume
    mixed_precision: str = "no"  # no | fp16 | bf16 (the frozen UNet and VAE run in it; the trained part stays fp32)
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # clip the gradient norm to this (0: no clipping; seed 003: 1)
    gradient_checkpointing: bool = False  # less memory, about 30 % slower
    # torch.compile the UNet, forward and backward (TI's frozen one, LoRA's peft-wrapped one, a fine-tune's):
    # off | default | max-autotune (studio.models.speed.TRAIN_COMPILE_MODES; no CUDA graphs). CUDA only; the first step
    # waits for the compiler. Results and files are the same as eager (up to float rounding)
    compile: str = "off"
    min_snr_gamma: float = 0.0  # Min-SNR loss weighting (Hang et al.; 5 is usual); 0: off
    noise_offset: float = 0.0  # adds offset * N(0, 1) per image and channel to the noise (darker darks); 0: off
    overfit_batches: int = 0  # >0: train on only this many fixed batches (same noise, timesteps, prompts): a check
    # that learning works, as in Lightning's overfit_batches; 0 for real training
    # --- LoRA (peft) ---
    rank: int = 4
    alpha: float | None = None  # None: the rank (scale 1)
    dropout: float = 0.0
    lora_targets: str = "attention"  # attention | transformer | all (see LORA_TARGETS)
    # lora | locon | loha | lokr | dora (NETWORKS): plain LoRA (kohya's networks.lora), or a LyCORIS network written
    # in LyCORIS' keys: LoCon (LoRA with the ResNet 3x3 convolutions too), LoHa (Hadamard product), LoKr (Kronecker
    # product), DoRA (LoRA with a trained magnitude per output channel)
    network: str = "lora"
    conv_rank: int | None = None  # the 3x3 convolutions' rank (LyCORIS conv_dim); None: none (LoCon: the rank)
    conv_alpha: float | None = None  # their alpha (LyCORIS conv_alpha); None: the conv rank (scale 1)
    lokr_factor: int = -1  # LoKr's Kronecker factor (LyCORIS factor); -1: as balanced as possible
    train_text_encoder: bool = False  # LoRA on the text encoder's q/k/v/out projections too
    instance_prompt: str = ""  # one prompt for every image instead of the captions ([filewords] = the caption)
    save_diffusers: bool = False  # also write a diffusers-format copy (pytorch_lora_weights.safetensors)
    # --- DreamBooth prior preservation ---
    class_prompt: str = ""  # e.g. "a photo of a dog"; empty: no prior preservation
    class_images: int = 0  # class images generated with the base model (cached in the run folder)
    prior_loss_weight: float = 1.0
    # --- full fine-tune ---
    ema: bool = False  # keep an exponential moving average of the UNet weights and save it
    ema_decay: float = 0.9999
    output: str = ""  # fine-tune: the single file to write (default models/NAME.safetensors)
    # --- inversion modules (seed 000 §6.2, §6.3) ---
    image_encoder: str = "openai/clip-vit-large-patch14"  # CLIP vision tower (hub id or folder), or demo-tiny
    heads: int = 8  # attention heads of TI-Att (must divide the image-embedding width)
    experts: int = 4  # TI-MoE: number of experts E
    top_k: int = 2  # TI-MoE: experts per image k
    aux_weight: float = 0.01  # TI-MoE: lambda, weight of 0.5 L_importance + 0.5 L_load
    max_images: int = 16  # the modules read at most this many training images (their CLIP embeddings)
    # --- the run ---
    save_every: int = 250  # checkpoint (and an embedding copy in the run folder) every N steps
    keep_checkpoints: int = 3  # older checkpoints are deleted
    preview_every: int = 250  # 0: no previews
    preview_prompt: str = "a painting in the style of [name]"  # [name]: the name; empty: the first image's prompt
    preview_seed: int = 1
    preview_steps: int = 20
    # kohya-style sample prompts (studio.train.samples): one per line, with --n negative, --w/--h size, --d seed,
    # --l CFG, --s steps; each line is a preview image at every preview step. Empty: the preview prompt alone
    sample_prompts: str = ""
    embedding_format: str = "a1111"  # a1111 (.safetensors emb_params) | diffusers | a1111-pt (.pt)
    overwrite: bool = False  # replace an existing output (embedding, LoRA, checkpoint) of the same name

    # 1. building

    @classmethod
    def from_dict(cls, values: dict) -> TrainJob:
        """A job from a preset, a config.yaml or an API dict; unknown keys are an error, not silently dropped."""
        check_known_keys(cls, values, "training")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_method(cls, method: str, **values) -> TrainJob:
        """A job with the method's usual defaults (LoRA lr 1e-4, fine-tune 1e-5), then `values`."""
        return cls.from_dict({"method": method, **METHOD_DEFAULTS.get(method, {}), **values})

    def replace(self, **changes) -> TrainJob:
        return TrainJob.from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})

    def samples(self) -> list:
        """The previews' prompts (studio.train.samples.SamplePrompt): each sample line, or the preview prompt at
        the training resolution, preview seed and steps ([name] becomes the name in both)."""
        from studio.train.samples import SamplePrompt, parse_sample_prompts

        defaults = SamplePrompt(self.preview_prompt, "", self.resolution, self.resolution, self.preview_seed, 7.0,
                                self.preview_steps)
        lines = parse_sample_prompts(self.sample_prompts.replace("[name]", self.name), defaults)
        return lines or [SamplePrompt(self.preview_prompt.replace("[name]", self.name), "", self.resolution,
                                      self.resolution, self.preview_seed, 7.0, self.preview_steps)]

    # 2. checking

    def validate(self, limits: Limits | None = None) -> None:
        """Raise ValueError naming the bad value and what would be right. Nothing is corrected (4.0 becomes 4, the
        same number). `limits` (default: Limits.from_env()) bounds the preview, instance and class prompts."""
        limits = limits or Limits.from_env()
        for name in ("method", "model", "name", "init_word", "template", "lr_scheduler", "optimizer",
                     "mixed_precision", "compile", "lora_targets", "network", "instance_prompt", "class_prompt", "output",
                     "image_encoder", "preview_prompt", "embedding_format", "caption_prefix", "caption_suffix",
                     "sample_prompts"):
            text(name.replace("_", " "), getattr(self, name))
        for name in ("preview_prompt", "instance_prompt", "class_prompt", "caption_prefix", "caption_suffix"):
            check_prompt_limits(getattr(self, name), name.replace("_", " "), limits)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.name or not NAME_RE.match(self.name):
            raise ValueError(f"name must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit "
                             f"(it becomes the file name and the prompt word), got {self.name!r}")
        check_name(self.name, "training output")  # also: a trailing newline, a dot at the end, CON, aux, lpt1
        if not str(self.data).strip():
            raise ValueError("choose a dataset: a name in datasets/ or a folder of images")
        ints = {"vectors": (1, MAX_VECTORS), "resolution": (64, 2048), "batch_size": (1, 64),
                "grad_accum": (1, 128), "max_steps": (1, 1_000_000), "seed": (0, 2**32 - 1),
                "heads": (1, 64), "experts": (1, 64), "top_k": (1, 64), "max_images": (1, 256),
                "save_every": (1, 1_000_000), "keep_checkpoints": (1, 1000), "preview_every": (0, 1_000_000),
                "preview_seed": (0, 2**32 - 1), "preview_steps": (1, 150),
                "overfit_batches": (0, 1000), "rank": (1, 1024), "class_images": (0, 100_000),
                "keep_tokens": (0, 1000), "lr_cycles": (1, 100_000), "validate_every": (1, 1_000_000)}
        for name, (lo, hi) in ints.items():
            setattr(self, name, whole_number(name.replace("_", " "), getattr(self, name), lo, hi))  # 4.0 is 4
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution} "
                             f"(try {self.resolution - self.resolution % 8})")
        if self.buckets is not None and not isinstance(self.buckets, bool):
            raise ValueError(f"buckets must be true, false or empty (on for SDXL models), got {self.buckets!r}")
        for name in ("bucket_min_side", "bucket_max_side", "bucket_step"):
            if getattr(self, name) is not None:
                setattr(self, name, whole_number(name.replace("_", " "), getattr(self, name), 8, 8192))
        if self.bucket_step is not None and self.bucket_step % 8:
            raise ValueError(f"bucket step must be a multiple of 8 (64 as kohya), got {self.bucket_step}")
        rule = self.bucket_rule()
        low, high = rule.min_side or 256, rule.max_side or 1024
        if rule.kohya and low > high:
            raise ValueError(f"bucket min side ({low}) must not be above the max side ({high})")
        if rule.kohya and high * high < self.resolution * self.resolution // 4:
            raise ValueError(f"bucket max side {high} is far below the resolution {self.resolution}: no bucket would "
                             "hold the training area")
        if self.repeats is not None:
            self.repeats = whole_number("repeats (or empty for the dataset's)", self.repeats, 1, 10_000)
        if self.flip_p is not None:
            real_number("flip probability", self.flip_p, 0, 1)
        parse_schedule(self.learning_rate)  # raises with the bad piece quoted
        from studio.models.speed import check_train_compile_mode

        check_train_compile_mode(self.compile)  # raises naming the modes (and why not reduce-overhead)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed precision must be one of {', '.join(MIXED_PRECISION)}, "
                             f"got {self.mixed_precision!r}")
        if not 0 <= real_number("weight decay", self.weight_decay) < 1:
            raise ValueError(f"weight decay must be in [0, 1), got {self.weight_decay!r}")
        if self.method == "ti-moe" and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top-k must be between 1 and the number of experts ({self.experts}), got {self.top_k}")
        real_number("auxiliary loss weight", self.aux_weight, 0)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 < real_number("Prodigy d_coef", self.prodigy_d_coef) <= 100:
            raise ValueError(f"Prodigy d_coef must be in (0, 100], got {self.prodigy_d_coef!r}")
        for name in ("prodigy_safeguard_warmup", "prodigy_bias_correction", "shuffle_tags", "masked_loss",
                     "bucket_no_upscale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name.replace('_', ' ')} must be true or false, got {getattr(self, name)!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"learning-rate scheduler must be one of {', '.join(LR_SCHEDULERS)}, "
                             f"got {self.lr_scheduler!r}")
        floats = {"lr_warmup": (0, 1e9), "max_grad_norm": (0, 1e9), "min_snr_gamma": (0, 1e6),
                  "noise_offset": (0, 1), "dropout": (0, 0.99), "prior_loss_weight": (0, 1e6),
                  "ema_decay": (0, 1), "caption_dropout": (0, 1), "tag_dropout": (0, 1),
                  "unmasked_weight": (0, 1), "validation_split": (0, 0.5)}
        for name, (lo, hi) in floats.items():
            real_number(name.replace("_", " "), getattr(self, name), lo, hi)
        if self.alpha is not None and real_number("LoRA alpha (or empty for the rank)", self.alpha) <= 0:
            raise ValueError(f"LoRA alpha must be a positive number (or empty for the rank), got {self.alpha!r}")
        if self.text_encoder_lr is not None and not real_number("text encoder learning rate",
                                                                self.text_encoder_lr) > 0:
            raise ValueError(f"text encoder learning rate must be positive, got {self.text_encoder_lr!r}")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"LoRA targets must be one of {', '.join(LORA_TARGETS)}, got {self.lora_targets!r}")
        if self.validation_split and self.method in ("ti-att", "ti-moe"):
            raise ValueError("a validation split is for LoRA, fine-tune and standard Textual Inversion runs: the "
                             "TI-Att and TI-MoE modules read every training image's features")
        for sample in self.samples():  # raises naming the line
            check_prompt_limits(sample.prompt, "sample prompt", limits)
            check_prompt_limits(sample.negative, "sample negative prompt", limits)
        self._check_network()
        if bool(self.class_prompt.strip()) != (self.class_images > 0):
            raise ValueError("prior preservation needs both a class prompt and a number of class images "
                             f"(got class prompt {self.class_prompt!r}, {self.class_images} class images)")
        if self.class_images and self.method not in ("lora", "finetune"):
            raise ValueError("prior preservation (class images) is for LoRA and fine-tuning, not Textual Inversion")
        if self.embedding_format not in EMBEDDING_FORMATS:
            raise ValueError(f"embedding format must be one of {', '.join(EMBEDDING_FORMATS)}, "
                             f"got {self.embedding_format!r}")
        if self.method == "ti" and not str(self.init_word).strip():
            raise ValueError("initializer word is empty; use a word close to the concept (e.g. 'painting') or '*'")

    def _check_network(self) -> None:
        """The network (LoRA, LoCon, LoHa, LoKr, DoRA) and its conv rank, conv alpha and LoKr factor."""
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.method != "lora" and (self.network != "lora" or self.conv_rank is not None or self.lokr_factor != -1):
            raise ValueError(f"network {self.network!r}, conv rank and LoKr factor are for the LoRA method (LoRA, "
                             f"LoCon, LoHa, LoKr, DoRA); {METHOD_LABELS.get(self.method, self.method)} trains "
                             "no network: leave network lora and conv rank empty")
        if self.conv_rank is not None:
            if self.network not in CONV_NETWORKS:
                raise ValueError("a conv rank trains the 3x3 convolutions: that is LoCon (network locon), or LoHa, "
                                 f"LoKr, DoRA; got network {self.network!r}")
            self.conv_rank = whole_number("conv rank (or empty for none)", self.conv_rank, 1, 1024)
        if self.conv_alpha is not None:
            if self.conv_rank is None and self.network != "locon":
                raise ValueError("conv alpha needs a conv rank (the 3x3 convolutions it scales)")
            if real_number("conv alpha (or empty for the conv rank)", self.conv_alpha) <= 0:
                raise ValueError(f"conv alpha must be a positive number (or empty for the conv rank), "
                                 f"got {self.conv_alpha!r}")
        self.lokr_factor = whole_number("LoKr factor", self.lokr_factor, -1, 1_000_000)
        if self.lokr_factor in (0, 1):
            raise ValueError(f"LoKr factor must be -1 (as balanced as possible) or 2 and above, got {self.lokr_factor}")
        if self.lokr_factor != -1 and self.network != "lokr":
            raise ValueError(f"the LoKr factor is for network lokr, got network {self.network!r}")
        if self.save_diffusers and self.network in ("loha", "lokr"):
            raise ValueError(f"diffusers' LoRA layout has no {NETWORK_LABELS[self.network]}: untick 'save a "
                             "diffusers copy' (the kohya/LyCORIS file is what A1111, ComfyUI and the studio load)")

    @property
    def conv_dims(self) -> tuple[int, float] | None:
        """(rank, alpha) of the 3x3 convolutions a LyCORIS network trains at their own rank, None when it trains
        none that way: the conv rank (LoCon: the rank when empty), alpha the conv alpha or that rank."""
        rank = self.conv_rank if self.conv_rank is not None else (self.rank if self.network == "locon" else None)
        if rank is None:
            return None
        return rank, float(self.conv_alpha if self.conv_alpha is not None else rank)

    def optimizer_label(self) -> str:
        """The optimizer as kohya writes `ss_optimizer`: its class path, with Prodigy's and Adafactor's arguments."""
        if self.optimizer == "prodigy":
            return (f"prodigyopt.prodigy.Prodigy(d_coef={self.prodigy_d_coef:g},weight_decay={self.weight_decay:g},"
                    f"safeguard_warmup={self.prodigy_safeguard_warmup},"
                    f"use_bias_correction={self.prodigy_bias_correction})")
        return {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                "adafactor": "transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,"
                             "warmup_init=False)"}.get(self.optimizer, self.optimizer)

    def bucket_rule(self):
        """The job's studio.train.data.BucketRule."""
        from studio.train.data import BucketRule

        return BucketRule(self.bucket_min_side, self.bucket_max_side, self.bucket_step, self.bucket_no_upscale)

    def uses_buckets(self, family: str, dataset_buckets: bool = False) -> bool:
        """Whether this job trains on aspect-ratio buckets with a model of `family`: as set, else on for SDXL and for
        datasets the Dataset tab made with buckets (their crops keep their aspect ratios)."""
        return self.buckets if self.buckets is not None else (family == "sdxl" or dataset_buckets)

    @property
    def trains_module(self) -> bool:
        return self.method in ("ti-att", "ti-moe")

    @property
    def is_ti(self) -> bool:
        return self.method in TI_METHODS

    def schedule_text(self) -> str:
        return str(parse_schedule(self.learning_rate))


# --- config.yaml -------------------------------------------------------------------------------


def job_to_yaml(job: TrainJob) -> str:
    header = ("# Studio training run: enough to repeat it.\n"
              f"#   python -m studio train {job.method if job.method in ('lora', 'finetune') else 'ti'} "
              "--config config.yaml   (or --resume <this folder> to continue)\n")
    return header + yaml.safe_dump({"studio_train": 1, "job": job.to_dict()}, sort_keys=False, allow_unicode=True)


def job_from_yaml(text: str, source: str = "config.yaml") -> TrainJob:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("job"), dict):
        raise ValueError(f"{source} is not a studio training config (no 'job' section)")
    return TrainJob.from_dict(data["job"])


def check_train_settings(settings: dict, source: str) -> None:
    """The values of a preset or config.yaml validated as a job (a placeholder name and dataset where it has none):
    a bad value is an error naming `source`, the key and the value."""
    method = settings.get("method", "ti")

    def make(values: dict) -> TrainJob:
        values = {"name": "preset-check", "data": "preset-check", **values}
        values.setdefault("method", method if method in METHODS else "ti")
        return TrainJob.for_method(**values)

    check_settings(make, settings, source)


# --- presets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPreset:
    name: str
    description: str
    settings: dict
    path: Path
    family: str | None = None  # "sdxl": made for that model family (the Train tab offers it for those); None: any

    def fits(self, family: str | None) -> bool:
        """Whether to offer this preset for a model of `family` (None: no model or an SD 1.x/2.x one)."""
        return self.family is None or self.family == family


def load_train_preset(path: Path) -> TrainPreset:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        settings = dict(data["settings"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"training preset {path.name} is not valid: {e}") from e
    known = {f.name for f in fields(TrainJob)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"training preset {path.name} has unknown settings {unknown}")
    check_train_settings(settings, f"training preset {path.name}")
    family = data.get("family")
    if family not in (None, "sd1", "sd2", "sdxl"):
        raise ValueError(f"training preset {path.name}: family must be sd1, sd2 or sdxl, got {family!r}")
    return TrainPreset(str(data.get("name") or path.stem), str(data.get("description", "")), settings, path,
                       family)


def list_train_presets(presets_dir: Path | None = None) -> dict[str, TrainPreset]:
    """Name -> preset, shipped ones first, then the user's presets/training/; a broken file is skipped."""
    folders = [SHIPPED_PRESETS]
    if presets_dir is not None and (Path(presets_dir) / "training").resolve() != SHIPPED_PRESETS.resolve():
        folders.append(Path(presets_dir) / "training")
    found: dict[str, TrainPreset] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")):
            try:
                preset = load_train_preset(path)
            except ValueError:
                continue
            found[preset.name] = preset
    return found


def find_train_preset(spec: str, presets_dir: Path | None = None) -> TrainPreset:
    """A preset by its name, its file stem, or a path to a .yaml file."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load_train_preset(path)
    presets = list_train_presets(presets_dir)
    for preset in presets.values():
        if spec in (preset.name, preset.path.stem):
            return preset
    raise ValueError(f"unknown training preset {spec!r}; known: {', '.join(sorted(presets))}")
