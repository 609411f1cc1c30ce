"""`python -m studio generate`: text to image (image to image with --init-image, inpainting with --mask,
outpainting with --outpaint, hires fix with --hires-scale) from the command line; prints the PNGs' paths."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.progress import cli_progress
from studio.generation import masking, samplers
from studio.generation.controls import parse_control_flag
from studio.generation.hires import DEFAULT_UPSCALER, LATENT_UPSCALERS
from studio.generation.ip_adapter import parse_ip_flags
from studio.generation.job import RESIZE_MODES

RESIZE_FLAGS = dict(zip(("just", "crop", "fill"), RESIZE_MODES, strict=True))
AREA_FLAGS = {"whole": "Whole picture", "masked": "Only masked"}


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
    g.add_argument("--mask", default=None, metavar="FILE",
                   help="inpainting: white (or painted, opaque) pixels of this picture are redrawn in --init-image")
    g.add_argument("--mask-blur", type=int, default=4, help="mask blur in pixels (default 4)")
    g.add_argument("--invert-mask", action="store_true", help="redraw what is not masked (Inpaint not masked)")
    g.add_argument("--masked-content", default="original", choices=list(masking.MASKED_CONTENT),
                   help="what the masked area starts from (default: original)")
    g.add_argument("--inpaint-area", default="whole", choices=list(AREA_FLAGS),
                   help="whole: the whole picture at the size; masked: only the mask's area, drawn at the full size "
                        "and pasted back")
    g.add_argument("--padding", type=int, default=32, help="pixels around the mask for --inpaint-area masked")
    g.add_argument("--outpaint", default=None, metavar="SIDES",
                   help="outpainting: pixels added per side of --init-image, e.g. left=64,right=64 (multiples of 8)")
    g.add_argument("--hires-scale", type=float, default=None,
                   help="hires fix: a second pass at this times the size (e.g. 2)")
    g.add_argument("--hires-upscaler", default=DEFAULT_UPSCALER,
                   help=f"{', '.join(LATENT_UPSCALERS)}, Lanczos, Nearest, or a file's name in upscalers/ "
                        f"(default: {DEFAULT_UPSCALER})")
    g.add_argument("--hires-steps", type=int, default=0, help="steps of the second pass (0: --steps)")
    g.add_argument("--hires-denoise", type=float, default=0.7, help="denoising strength of the second pass")
    g.add_argument("--hires-prompt", default="", help="the second pass's prompt (default: --prompt)")
    g.add_argument("--control", action="append", default=[], metavar="TYPE:MODEL:IMAGE[:WEIGHT[:START:END]]",
                   help="a ControlNet (repeat for several): TYPE a preprocessor (canny, lineart_standard, openpose, "
                        "depth_midas, ... see `python -m studio preprocess --help`) or none for a finished map, MODEL "
                        "a ControlNet in controlnet/ (or micro-canny, or a hub id), IMAGE the picture")
    g.add_argument("--control-mode", default="Balanced",
                   choices=["Balanced", "My prompt is more important", "ControlNet is more important"],
                   help="A1111's control mode for every --control (default Balanced)")
    g.add_argument("--regions", default="", metavar="LAYOUT",
                   help="regional prompts: 'cols 1,1' (two columns) or 'rows 2,1' (ratios), one --region-prompt "
                        "each, in order; --prompt is what the regions share")
    g.add_argument("--region-prompt", action="append", default=[], metavar="TEXT", help="a region's prompt (repeat)")
    # IP-Adapter image prompts (studio.generation.ip_adapter)
    g.add_argument("--ip-adapter", action="append", default=[], metavar="NAME",
                   help="an IP-Adapter in ipadapter/ (its image encoder in ipadapter/image_encoder/ or "
                        "ipadapter/NAME/image_encoder/); repeat for several")
    g.add_argument("--ip-image", action="append", default=[], metavar="FILE",
                   help="the IP-Adapter's picture (repeat: with one --ip-adapter, all are its pictures; with "
                        "several, one each in order)")
    g.add_argument("--ip-scale", action="append", type=float, default=[], metavar="S",
                   help="IP-Adapter scale 0..2 (default 1; one for all, or one per --ip-adapter)")
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
                      resize_mode=RESIZE_FLAGS[args.resize_mode], mask=args.mask, mask_blur=args.mask_blur,
                      mask_mode=masking.MASK_MODES[1 if args.invert_mask else 0], masked_content=args.masked_content,
                      inpaint_area=AREA_FLAGS[args.inpaint_area], inpaint_padding=args.padding,
                      outpaint=args.outpaint, hires_fix=args.hires_scale is not None,
                      hires_scale=args.hires_scale or 2.0, hires_upscaler=args.hires_upscaler,
                      hires_steps=args.hires_steps, hires_denoising=args.hires_denoise,
                      hires_prompt=args.hires_prompt, controls=[parse_control_flag(v) for v in args.control],
                      regions=args.regions, region_prompts=args.region_prompt,
                      ip_adapters=parse_ip_flags(args.ip_adapter, args.ip_image, args.ip_scale))
    for unit in job.controls:
        unit.mode = args.control_mode
    job.validate()  # before loading a model: bad input fails fast
    job.inpaint_plan()  # the mask read and checked too
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
