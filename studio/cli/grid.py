"""`python -m studio grid`: an X/Y/Z plot (A1111 syntax) run as batched passes; prints the grid's path."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.progress import cli_progress
from studio.generation import samplers


def add_parser(sub) -> None:
    from studio.explorer.syntax import AXIS_TYPES, NOTHING

    axis_names = [n for n in AXIS_TYPES if n != NOTHING]
    xyz = sub.add_parser("grid", help="an X/Y/Z plot (A1111 syntax) run as batched passes; prints the grid's path",
                         description="Axes: " + ", ".join(axis_names) + ". Values: '3,7,11', '1-5', '1-5 (+2)', "
                                     "'10-30 [5]', '0.5-1.5 (+0.25)'; Prompt S/R: the first value is replaced by each. "
                                     "LoRA weight of a named LoRA: 'LoRA weight (NAME): 0,0.5,1'.")
    xyz.add_argument("--model", help="name in models/, a path, a hub id, micro or demo-tiny "
                     "(default: the first in models/, else micro)")
    xyz.add_argument("--prompt", required=True)
    xyz.add_argument("--negative", default="", help="negative prompt")
    xyz.add_argument("--x", required=True, metavar="'AXIS: VALUES'", help="e.g. 'CFG Scale: 3,7,11'")
    xyz.add_argument("--y", default=None, metavar="'AXIS: VALUES'", help="e.g. 'Steps: 10,20'")
    xyz.add_argument("--z", default=None, metavar="'AXIS: VALUES'", help="one grid per value, e.g. 'Sampler: Euler a, "
                                                                           "DPM++ 2M'")
    xyz.add_argument("--sampler", default="DPM++ 2M", help=f"one of: {', '.join(samplers.SAMPLERS)}")
    xyz.add_argument("--schedule", default=None, help=f"one of: {', '.join(samplers.SCHEDULE_TYPES)} (default: from "
                                                      "the sampler name, else Automatic)")
    xyz.add_argument("--steps", type=int, default=20)
    xyz.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    xyz.add_argument("--seed", type=int, default=-1, help="-1: one random seed for every cell")
    xyz.add_argument("--keep-random-seeds", action="store_true", help="A1111's 'keep -1 for seeds': each cell its own")
    xyz.add_argument("--width", type=int, default=512)
    xyz.add_argument("--height", type=int, default=512)
    xyz.add_argument("--clip-skip", type=int, default=1)
    xyz.add_argument("--init-image", default=None, metavar="FILE",
                     help="image to image: every cell starts from this picture (a Denoising axis varies the strength)")
    xyz.add_argument("--denoise", type=float, default=0.75, help="denoising strength for --init-image (default 0.75)")
    xyz.add_argument("--hires-scale", type=float, default=None, help="hires fix on, at this scale (e.g. 2)")
    xyz.add_argument("--hires-upscaler", default="Latent", help="the hires fix's upscaler (default: Latent)")
    xyz.add_argument("--hires-steps", type=int, default=0, help="the hires fix's steps (0: --steps)")
    xyz.add_argument("--hires-denoise", type=float, default=0.7, help="the hires fix's denoising strength")
    xyz.add_argument("--cells-per-pass", type=int, default=8, help="the largest denoising batch (memory)")
    xyz.add_argument("--out", default=None, metavar="FILE.png",
                     help="the grid image; FILE.json, FILE.csv and FILE-cells/ go beside it "
                          "(default: outputs/grids/<date>/NNNNN-grid.png)")
    xyz.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    xyz.add_argument("--precision", default=None, help="auto, fp16, bf16 or fp32")
    xyz.set_defaults(func=run)


def folder_choices(cfg):
    """The names the Hires upscaler and VAE axes may take, from the studio's folders (no model loaded yet)."""
    from studio.explorer.grid import default_choices, hires_upscaler_choices
    from studio.models.manager import VAE_AUTOMATIC, VAE_NONE, list_vaes

    def choices(kind: str) -> list[str]:
        if kind == "hires_upscaler":
            return hires_upscaler_choices(cfg.upscalers_dir)
        if kind == "vae":
            return [VAE_AUTOMATIC, VAE_NONE, *list_vaes(cfg.vae_dir)]
        return default_choices(kind)

    return choices


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.explorer.grid import AxisSpec, GridJob, GridRunner, plan_grid
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    sampler, schedule = samplers.sampler_and_schedule(args.sampler, args.schedule)
    base = GenerateJob(prompt=args.prompt, negative_prompt=args.negative, sampler=sampler, schedule=schedule,
                       steps=args.steps, cfg_scale=args.cfg, seed=args.seed, width=args.width, height=args.height,
                       clip_skip=args.clip_skip, init_image=args.init_image, denoising_strength=args.denoise,
                       hires_fix=args.hires_scale is not None, hires_scale=args.hires_scale or 2.0,
                       hires_upscaler=args.hires_upscaler, hires_steps=args.hires_steps,
                       hires_denoising=args.hires_denoise)
    job = GridJob(base, x=AxisSpec.parse(args.x), y=AxisSpec.parse(args.y), z=AxisSpec.parse(args.z),
                  checkpoint="", keep_random_seeds=args.keep_random_seeds, cells_per_pass=args.cells_per_pass)
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out.name}")
    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    plan_grid(job, choices=folder_choices(cfg))  # before loading a model: bad axes fail fast
    manager = ModelManager(cfg)
    manager.load(args.model or manager.default_choice())
    if manager.current.is_demo:
        print("note: demo-tiny has random weights; its images are noise", file=sys.stderr)
    runner = GridRunner(manager)
    plan = runner.plan(job)
    print(plan.summary(), file=sys.stderr)
    with cli_progress("grid") as (progress, cancel):
        result = runner.run(plan, outputs_dir=cfg.outputs_dir, grid_path=out, on_progress=progress, cancel=cancel)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.grid_path)
    return 0
