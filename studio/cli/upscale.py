"""`python -m studio upscale`: upscale image files with a built-in resize or a model in upscalers/, as A1111's
Extras does; prints the PNGs' paths (they keep the source's parameters and add the postprocess note)."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.progress import cli_progress
from studio.upscale.tiling import DEFAULT_OVERLAP, DEFAULT_TILE


def add_parser(sub) -> None:
    u = sub.add_parser("upscale", help="upscale images (Lanczos, Nearest, or an ESRGAN/SwinIR/... model in "
                                       "upscalers/) and print the paths of the PNGs")
    u.add_argument("files", nargs="+", metavar="FILE", help="images to upscale (PNG, JPEG, WebP, ...)")
    u.add_argument("--upscaler", required=True,
                   help="Lanczos, Nearest, or a model file's name in upscalers/ without its extension "
                        "(an unknown name lists the choices)")
    u.add_argument("--scale", type=float, default=4.0, help="upscale by this factor (default 4)")
    u.add_argument("--size", default=None, metavar="WxH", help="upscale to this size instead of --scale")
    u.add_argument("--out", default=None, help="output folder (default: outputs/extras-images/)")
    u.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help=f"tile size in px for models, 0 = whole image at once (default {DEFAULT_TILE})")
    u.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP,
                   help=f"tile overlap in px (default {DEFAULT_OVERLAP})")
    u.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    u.add_argument("--precision", default="auto", help="auto, fp16, bf16 or fp32 (auto: fp16 on a GPU when the "
                                                       "model supports it, fp32 on the CPU)")
    u.set_defaults(func=run)


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"1024x768" -> (1024, 768); None stays None."""
    if text is None:
        return None
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise ValueError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 1024x768, got {text!r}")
    return int(w), int(h)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.models.manager import pick_device
    from studio.upscale.library import NONE, load_upscaler, resolve_upscaler
    from studio.upscale.output import output_path, postprocess_note, read_source, save_png
    from studio.upscale.run import target_size, upscale
    from studio.upscale.tiling import check_tiling

    cfg = StudioConfig.from_env(device=args.device)
    size = parse_size(args.size)
    target_size(64, 64, scale=args.scale, size=size)  # bad --scale / --size fail before any file is read
    check_tiling(args.tile, args.overlap)
    entry = resolve_upscaler(args.upscaler, cfg.upscalers_dir)
    if entry.name == NONE:
        raise ValueError("the None upscaler leaves images as they are; choose Lanczos, Nearest or a model")
    device = pick_device(cfg.device)
    if not entry.built_in:
        loaded = load_upscaler(entry, device, args.precision)  # a wrong or refused file fails here, once
        print(f"{entry.name}: {loaded.architecture} {loaded.scale}x, {str(loaded.dtype).removeprefix('torch.')} "
              f"on {device}", file=sys.stderr)
    out_dir = Path(args.out) if args.out else cfg.outputs_dir / "extras-images"
    failed = 0
    for file in args.files:
        try:
            source = read_source(file)
            with cli_progress(f"upscale {Path(file).name}") as (progress, cancel):
                result = upscale(source.image, entry.name, args.scale, folder=cfg.upscalers_dir, size=size,
                                 tile=args.tile, overlap=args.overlap, device=device, precision=args.precision,
                                 on_progress=progress, cancel=cancel)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        note = postprocess_note(entry.name, None if size else args.scale, size)
        path = save_png(result.image, output_path(out_dir, file, entry.name, args.scale, size), source.text, note)
        print(path)
    return 2 if failed else 0
