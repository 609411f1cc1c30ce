"""`python -m studio train ti|lora|finetune`: a training run from flags, a preset or a run's config.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from studio.cli.progress import cli_progress
from studio.train.schedule import LR_SCHEDULERS


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train an embedding (TI, TI-Att, TI-MoE), a LoRA, or fine-tune the UNet")
    tsub = t.add_subparsers(dest="kind", required=True)
    ti = _kind_parser(tsub, "ti", "Textual Inversion: writes embeddings/NAME.safetensors and runs/NAME-<time>/")
    ti.add_argument("--method", choices=["ti", "ti-att", "ti-moe"], help="default ti")
    ti.add_argument("--lr", help="learning rate or A1111 schedule, e.g. '0.005:100, 1e-3:1000'")
    ti.add_argument("--vectors", type=int, help="vectors per token (1-75)")
    ti.add_argument("--init-word", help="initializer word (standard TI)")
    ti.add_argument("--template", help="prompt template name in assets/templates/ or a .txt path")
    ti.add_argument("--image-encoder", help="CLIP image tower for ti-att/ti-moe (hub id, folder, demo-tiny)")
    ti.add_argument("--experts", type=int, help="TI-MoE experts E")
    ti.add_argument("--top-k", type=int, help="TI-MoE experts per image k")
    ti.add_argument("--aux-weight", type=float, help="TI-MoE auxiliary loss weight lambda")
    ti.add_argument("--format", choices=["a1111", "diffusers", "a1111-pt"], help="embedding file format")
    lo = _kind_parser(tsub, "lora", "LoRA / DreamBooth-LoRA: writes loras/NAME.safetensors (kohya format)")
    _add_diffusion_flags(lo)
    lo.add_argument("--rank", type=int, help="LoRA rank (network dim), default 4")
    lo.add_argument("--alpha", type=float, help="LoRA alpha (network alpha), default: the rank")
    lo.add_argument("--dropout", type=float, help="LoRA dropout")
    lo.add_argument("--targets", choices=["attention", "transformer", "all"], help="UNet layers (default attention)")
    lo.add_argument("--network", choices=["lora", "locon", "loha", "lokr", "dora"],
                    help="lora (default, kohya's networks.lora) or a LyCORIS network written in LyCORIS' keys: locon "
                         "(LoRA + the 3x3 convolutions), loha (Hadamard product), lokr (Kronecker product), dora "
                         "(LoRA + a trained magnitude per output channel)")
    lo.add_argument("--conv-rank", type=int, metavar="N",
                    help="rank of the ResNet 3x3 convolutions (LyCORIS conv_dim) for locon, loha, lokr, dora; "
                         "default: none (locon: the rank)")
    lo.add_argument("--conv-alpha", type=float, metavar="A", help="their alpha (LyCORIS conv_alpha; default: the "
                                                                  "conv rank)")
    lo.add_argument("--lokr-factor", type=int, metavar="F",
                    help="LoKr's Kronecker factor (LyCORIS factor; default -1: as balanced as possible)")
    lo.add_argument("--unet-lr", help="UNet learning rate (default 1e-4)")
    lo.add_argument("--te-lr", type=float, help="text-encoder learning rate; giving it trains the text encoder")
    lo.add_argument("--text-encoder", action="store_true", help="train a LoRA on the text encoder too")
    lo.add_argument("--save-diffusers", action="store_true", help="also write a diffusers-format copy")
    ft = _kind_parser(tsub, "finetune", "full UNet fine-tune: writes models/NAME.safetensors (or --out)")
    _add_diffusion_flags(ft)
    ft.add_argument("--ema", action="store_true", help="keep and save an EMA of the weights")
    ft.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999)")
    ft.add_argument("--out", help="the .safetensors file to write (default models/NAME.safetensors)")


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.train.loop import Trainer

    cfg = StudioConfig.from_env(device=args.device)
    cfg.ensure_dirs()
    with cli_progress(f"train {args.kind}") as (progress, cancel):

        def on_event(kind: str, info: dict) -> None:
            if kind == "log":
                print(info["text"], file=sys.stderr)
            elif kind == "preview":
                print(f"preview: {info['path']}", file=sys.stderr)

        trainer = Trainer(cfg, on_progress=progress, on_event=on_event, cancel=cancel)
        if args.resume:
            result = trainer.resume(Path(args.resume), max_steps=args.steps, compile=args.compile)
        else:
            job = train_job_from_args(args)
            job.validate()
            result = trainer.start(job)
    print(f"run: {result.run_dir}")
    if result.output:
        print(f"{'embedding' if args.kind == 'ti' else 'output'}: {result.output}")
    if result.state == "failed":
        raise RuntimeError(result.message)
    return 0 if result.state == "finished" else 130

# flag -> TrainJob field for `train ti|lora|finetune` (flags left out keep the preset's / config's / default value)
TRAIN_FLAGS = {"model": "model", "data": "data", "name": "name", "method": "method", "steps": "max_steps",
               "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "learning_rate", "vectors": "vectors",
               "init_word": "init_word", "template": "template", "resolution": "resolution", "repeats": "repeats",
               "flip_p": "flip_p", "seed": "seed", "mixed_precision": "mixed_precision",
               "image_encoder": "image_encoder", "experts": "experts", "top_k": "top_k", "aux_weight": "aux_weight",
               "save_every": "save_every", "preview_every": "preview_every", "preview_prompt": "preview_prompt",
               "format": "embedding_format", "overwrite": "overwrite", "rank": "rank", "alpha": "alpha",
               "dropout": "dropout", "targets": "lora_targets", "network": "network", "conv_rank": "conv_rank",
               "conv_alpha": "conv_alpha", "lokr_factor": "lokr_factor", "unet_lr": "learning_rate",
               "te_lr": "text_encoder_lr", "text_encoder": "train_text_encoder", "instance_prompt": "instance_prompt",
               "class_prompt": "class_prompt", "class_images": "class_images", "prior_weight": "prior_loss_weight",
               "lr_scheduler": "lr_scheduler", "warmup": "lr_warmup", "optimizer": "optimizer",
               "gradient_checkpointing": "gradient_checkpointing", "min_snr": "min_snr_gamma",
               "noise_offset": "noise_offset", "max_grad_norm": "max_grad_norm", "save_diffusers": "save_diffusers",
               "ema": "ema", "ema_decay": "ema_decay", "out": "output", "compile": "compile",
               "keep_tokens": "keep_tokens", "caption_dropout": "caption_dropout", "tag_dropout": "tag_dropout",
               "caption_prefix": "caption_prefix", "caption_suffix": "caption_suffix", "lr_cycles": "lr_cycles",
               "masked_loss": "masked_loss", "unmasked_weight": "unmasked_weight",
               "bucket_min_side": "bucket_min_side", "bucket_max_side": "bucket_max_side", "bucket_step": "bucket_step",
               "bucket_no_upscale": "bucket_no_upscale", "validation_split": "validation_split",
               "validate_every": "validate_every"}


def train_job_from_args(args):
    """Defaults, then --preset, then --config, then the flags given on the command line."""
    from studio.config import StudioConfig
    from studio.train.job import TrainJob, find_train_preset, job_from_yaml

    values = TrainJob.for_method("ti" if args.kind == "ti" else args.kind).to_dict()
    if args.preset:
        values.update(find_train_preset(args.preset, StudioConfig.from_env().presets_dir).settings)
    if args.config:
        values.update(job_from_yaml(Path(args.config).read_text(encoding="utf-8"), args.config).to_dict())
    # `is not`, not `in (None, False)`: 0 == False, and `--preview-every 0`, `--seed 0`, `--dropout 0` are values
    values.update({field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()
                   if getattr(args, flag, None) is not None and getattr(args, flag) is not False})
    for flag, field in (("buckets", "buckets"), ("shuffle_tags", "shuffle_tags"), ("masked_loss", "masked_loss")):
        if getattr(args, flag, None) is not None:
            values[field] = getattr(args, flag)  # --no-buckets is a value too (False), which the loop above skips
    if getattr(args, "sample_prompts", None):  # kohya's --sample_prompts: a text file, one prompt per line
        values["sample_prompts"] = Path(args.sample_prompts).read_text(encoding="utf-8")
    if getattr(args, "te_lr", None) is not None:
        values["train_text_encoder"] = True  # a text-encoder rate means: train it
    if args.kind != "ti" and values["method"] != args.kind:
        raise ValueError(f"`train {args.kind}` got a {values['method']} preset or config; use `train "
                         f"{values['method'] if values['method'] in ('lora', 'finetune') else 'ti'}`")
    return TrainJob.from_dict(values)


def _kind_parser(tsub, kind: str, help_text: str) -> argparse.ArgumentParser:
    """The flags every `train` command shares."""
    p = tsub.add_parser(kind, help=help_text, description="Flags left out keep the value of --preset / --config, "
                        "else the default. Several GPUs: accelerate launch -m studio train ...")
    p.add_argument("--model", help="name in models/, a path, a hub id, or demo-tiny (default demo-tiny)")
    p.add_argument("--data", help="a dataset name in datasets/ or a folder of images with .txt captions")
    p.add_argument("--name", help="output name (embeddings/, loras/ or models/NAME)")
    p.add_argument("--steps", type=int, help="optimizer steps (with --resume: continue up to this many)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--resolution", type=int)
    p.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=None,
                   help="aspect-ratio buckets at SDXL's resolutions scaled to --resolution (default: on for SDXL "
                        "models, off for the others, whose images are center-cropped squares)")
    p.add_argument("--bucket-min-side", type=int, metavar="PX",
                   help="kohya's buckets: the shortest bucket side (kohya --min_bucket_reso, 256)")
    p.add_argument("--bucket-max-side", type=int, metavar="PX",
                   help="kohya's buckets: the longest bucket side (kohya --max_bucket_reso, 1024)")
    p.add_argument("--bucket-step", type=int, metavar="PX", help="kohya's buckets: the side step (kohya "
                   "--bucket_reso_steps, 64)")
    p.add_argument("--bucket-no-upscale", action="store_true",
                   help="each image in a bucket of its own size, never enlarged (kohya --bucket_no_upscale)")
    p.add_argument("--repeats", type=int, help="repeats per epoch (default: the dataset's)")
    p.add_argument("--flip-p", type=float, help="horizontal flip probability (default: the dataset's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--compile", metavar="MODE",
                   help="torch.compile the UNet, forward and backward (CUDA only): off (default), default or "
                        "max-autotune (no CUDA graphs in training); the first step waits for the compiler. With "
                        "--resume: switch it for the rest of the run")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"])
    p.add_argument("--lr-scheduler", choices=list(LR_SCHEDULERS))
    p.add_argument("--warmup", type=float, help="warmup steps, or a fraction of the steps below 1 (0.1 = 10%%)")
    p.add_argument("--lr-cycles", type=int, metavar="N", help="cosine_with_restarts: the number of cosine cycles "
                                                              "(default 1)")
    # kohya's caption options: each image's caption (TI: [filewords]) shaped every step, from the seed
    p.add_argument("--shuffle-tags", action=argparse.BooleanOptionalAction, default=None,
                   help="shuffle the comma-separated tags of each caption every step (kohya --shuffle_caption)")
    p.add_argument("--keep-tokens", type=int, metavar="N", help="the first N tags stay in place (kohya --keep_tokens)")
    p.add_argument("--caption-dropout", type=float, metavar="R",
                   help="train on an empty prompt at this rate (kohya --caption_dropout_rate)")
    p.add_argument("--tag-dropout", type=float, metavar="R",
                   help="drop each tag (after the kept ones) at this rate (kohya --caption_tag_dropout_rate)")
    p.add_argument("--caption-prefix", metavar="TEXT", help="a tag before every caption, never shuffled")
    p.add_argument("--caption-suffix", metavar="TEXT", help="a tag after every caption, never shuffled")
    p.add_argument("--masked-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="weight the loss by each image's NAME.mask.png or alpha channel (kohya --masked_loss)")
    p.add_argument("--unmasked-weight", type=float, metavar="W",
                   help="with --masked-loss: the loss's weight outside the masks (0..1, default 0)")
    p.add_argument("--validation-split", type=float, metavar="F",
                   help="hold out this share of the images (0..0.5) and log their loss (kohya --validation_split)")
    p.add_argument("--validate-every", type=int, metavar="N", help="with --validation-split: every N steps (50)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--preview-every", type=int, help="preview image every N steps (0: none)")
    p.add_argument("--preview-prompt", help="preview prompt; [name] is the output's name")
    p.add_argument("--sample-prompts", metavar="FILE",
                   help="a text file of preview prompts, one per line with kohya's options (--n negative, --w/--h "
                        "size, --d seed, --l CFG, --s steps); each is a preview image")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output of that name")
    p.add_argument("--preset", help="a training preset (name, file stem or .yaml path) from presets/training/")
    p.add_argument("--config", help="a run's config.yaml: repeat that run")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    p.set_defaults(func=run)
    return p


def _add_diffusion_flags(p: argparse.ArgumentParser) -> None:
    """LoRA and fine-tune: captions, DreamBooth, loss options."""
    p.add_argument("--lr", help="learning rate (or an A1111 schedule)")
    p.add_argument("--instance-prompt", help="one prompt for every image instead of its caption "
                                             "([filewords] = the caption)")
    p.add_argument("--class-prompt", help="DreamBooth prior preservation: prompt of the class images")
    p.add_argument("--class-images", type=int, help="number of class images (made once with the base model)")
    p.add_argument("--prior-weight", type=float, help="weight of the class (prior) loss (default 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    p.add_argument("--min-snr", type=float, help="Min-SNR weighting gamma (5 is usual; default off)")
    p.add_argument("--noise-offset", type=float, help="noise offset (e.g. 0.05; default off)")
    p.add_argument("--max-grad-norm", type=float, help="clip gradients to this norm (default: no clipping)")
