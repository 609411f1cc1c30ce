"""`python -m studio generate`: text to image (or image to image with --init-image) from the command line; prints
the PNGs' paths."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.progress import cli_progress
from studio.generation import samplers
from studio.generation.job import RESIZE_MODES

RESIZE_FLAGS = dict(zip(("just", "crop", "fill"), RESIZE_MODES, strict=True))


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate images and print the paths of the PNGs")
    g.add_argument("--model", help="name in models/, a path, a hub id, micro or demo-tiny "
                   "(default: the first in models/, else micro)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--sampler", default="DPM++ 2M", help=f"one of: {', '.join(samplers.SAMPLERS)}")
    g.add_argument("--schedule", default=None,
                   help=f"one of: {', '.join(samplers.SCHEDULE_TYPES)} (default: taken from the sampler "
                        "name, e.g. 'DPM++ 2M Karras', else Automatic)")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    g.add_argument("--seed", type=int, default=-1, help="-1 for random")
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--batch-count", type=int, default=1)
    g.add_argument("--clip-skip", type=int, default=1, help="1 = last text-encoder layer, 2 = penultimate")
    g.add_argument("--init-image", default=None, metavar="FILE",
                   help="image to image: start from this picture instead of noise")
    g.add_argument("--denoise", type=float, default=0.75,
                   help="denoising strength for --init-image, 0..1 (0 keeps it, 1 redraws it all; default 0.75)")
    g.add_argument("--resize-mode", default="just", choices=list(RESIZE_FLAGS),
                   help="how --init-image is fitted to the size: just (stretch), crop (cover and crop the centre), "
                        "fill (fit inside and stretch its edges outwards)")
    g.add_argument("--vae", default=None, help="Automatic, None, or a VAE's name in vae/ (default: Automatic)")
    g.add_argument("--out", default=None, help="output folder (default: outputs/<date>/)")
    g.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    g.add_argument("--precision", default=None, help="auto, fp16, bf16 or fp32")
    g.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    sampler, schedule = samplers.sampler_and_schedule(args.sampler, args.schedule)
    job = GenerateJob(prompt=args.prompt, negative_prompt=args.negative, sampler=sampler, schedule=schedule,
                      steps=args.steps, cfg_scale=args.cfg, seed=args.seed, width=args.width, height=args.height,
                      batch_size=args.batch_size, batch_count=args.batch_count, clip_skip=args.clip_skip,
                      init_image=args.init_image, denoising_strength=args.denoise,
                      resize_mode=RESIZE_FLAGS[args.resize_mode])
    job.validate()  # before loading a model: bad input fails fast
    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    manager = ModelManager(cfg)
    manager.load(args.model or manager.default_choice())
    if args.vae is not None:
        print(manager.set_vae(args.vae), file=sys.stderr)
    elif manager.vae_note:
        print(f"note: {manager.vae_note}", file=sys.stderr)
    if manager.current.is_demo:
        print("note: demo-tiny has random weights; its images are noise", file=sys.stderr)
    out = Path(args.out) if args.out else cfg.outputs_dir
    with cli_progress("generate") as (progress, cancel):
        result = Generator(manager).run(job, out, on_progress=progress, cancel=cancel)
    for image in result.images:
        print(image.path)
    return 0
