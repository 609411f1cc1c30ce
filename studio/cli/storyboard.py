"""`python -m studio storyboard`: a storyboard from a CSV shot list, exported as a PDF and a contact sheet."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.progress import cli_progress
from studio.generation import samplers


def add_parser(sub) -> None:
    sb = sub.add_parser("storyboard", help="generate a storyboard from a CSV shot list; writes a PDF and a contact "
                                           "sheet", description="CSV columns: shot,type,description[,notes,reference,"
                        "seed,candidates,canny_low,canny_high,control_scale,control_start,control_end]. A reference "
                        "(a picture or sketch, relative to the CSV) makes its shot follow the picture's canny edges "
                        "through the ControlNet. The project is kept as storyboards/NAME/project.json.")
    sb.add_argument("--model", default="demo-tiny", help="name in models/, a path, a hub id, micro or demo-tiny")
    sb.add_argument("--shots", required=True, metavar="FILE.csv", help="the shot list")
    sb.add_argument("--controlnet", default=None,
                    help="canny ControlNet: a name in controlnet/, micro-canny (built in, for micro), a diffusers "
                         "folder, a .safetensors file or a hub id (default: micro-canny for the micro model, else "
                         "lllyasviel/control_v11p_sd15_canny)")
    sb.add_argument("--candidates", type=int, default=1, help="candidates per shot (the first is the one exported)")
    sb.add_argument("--preset", default=None, help="storyboard preset (name or file stem in presets/storyboard/): "
                                                   "shot types, templates, LoRAs and settings, e.g. dreamshot")
    sb.add_argument("--out", default=None, metavar="FILE.pdf",
                    help="the PDF (FILE-contact.png and FILE-frames/ go beside it; default "
                         "storyboards/NAME/export/NAME.pdf)")
    sb.add_argument("--name", default=None, help="project name (default: the CSV's file name)")
    sb.add_argument("--template", default=None,
                    help="prompt template of every shot type (default 'a high-quality [shot type] picture of "
                         "[description]')")
    sb.add_argument("--negative", default=None, help="negative prompt")
    sb.add_argument("--sampler", default=None, help=f"one of: {', '.join(samplers.SAMPLERS)} (default DPM++ 2M)")
    sb.add_argument("--schedule", default=None, help="schedule type (default: from the sampler name, else Karras)")
    sb.add_argument("--steps", type=int, default=None, help="default 20")
    sb.add_argument("--cfg", type=float, default=None, help="CFG scale (default 7)")
    sb.add_argument("--width", type=int, default=None, help="frame width (default: the model's native size)")
    sb.add_argument("--height", type=int, default=None, help="frame height (default: the model's native size)")
    sb.add_argument("--clip-skip", type=int, default=None)
    sb.add_argument("--aspect", default=None, help="the board's aspect, e.g. 16:9 or 2.39:1 (the export's frame "
                                                    "boxes; default: width:height)")
    sb.add_argument("--hires", action="store_true", default=None,
                    help="hires fix for every frame: drawn at the size, then again at --hires-scale x it")
    sb.add_argument("--hires-scale", type=float, default=None, help="hires fix upscale (default 2)")
    sb.add_argument("--hires-upscaler", default=None,
                    help="hires fix upscaler: Latent (default), another latent upscaler, Lanczos, Nearest or a file "
                         "in upscalers/")
    sb.add_argument("--hires-steps", type=int, default=None, help="hires fix steps (default 0: as --steps)")
    sb.add_argument("--hires-denoising", type=float, default=None, help="hires fix denoising strength (default 0.7)")
    sb.add_argument("--overwrite", action="store_true",
                    help="replace an earlier storyboard of that name (and an existing --out file); without it the "
                         "command refuses before loading a model")
    sb.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    sb.add_argument("--precision", default=None, help="auto, fp16, bf16 or fp32")
    sb.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.control.controlnet import default_controlnet
    from studio.models.manager import ModelManager
    from studio.storyboard.board import (
        StoryboardExistsError,
        StoryboardStore,
        apply_board_preset,
        list_board_presets,
        new_board,
        shots_from_csv,
    )
    from studio.storyboard.export import export_board
    from studio.storyboard.runner import StoryboardRunner

    csv_path = Path(args.shots)
    if not csv_path.is_file():
        raise ValueError(f"--shots: no file {csv_path}")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".pdf":
        raise ValueError(f"--out must be a .pdf file, got {out.name}")
    if out is not None and out.exists() and not args.overwrite:
        raise StoryboardExistsError(f"--out: {out} already exists; choose another file, or add --overwrite")
    shots_from_csv(csv_path.read_text(encoding="utf-8-sig"), csv_path.name)  # before loading a model
    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    cfg.ensure_dirs()
    preset = None
    if args.preset:
        presets = list_board_presets(cfg.presets_dir)
        by_stem = {p.path.stem: p for p in presets.values()}
        preset = presets.get(args.preset) or by_stem.get(args.preset)
        if preset is None:
            raise ValueError(f"no storyboard preset {args.preset!r}; presets: "
                             f"{', '.join(sorted(by_stem)) or 'none'}")
    store = StoryboardStore(cfg.storyboards_dir)
    name = args.name or csv_path.stem
    try:
        store.check_new(name, args.overwrite)  # before loading a model
    except StoryboardExistsError as e:
        raise StoryboardExistsError(f"{e} (add --overwrite to replace it)") from None
    manager = ModelManager(cfg)
    manager.load(args.model)
    if manager.current.is_demo:
        print("note: demo-tiny has random weights; its images are noise", file=sys.stderr)
    size = manager.current.native_size
    board = new_board(name)
    board.settings.width = board.settings.height = size
    board.settings.controlnet = default_controlnet(manager.current, cfg.assets_dir)  # micro-canny for micro
    if preset is not None:
        apply_board_preset(board, preset)
    # flags given on the command line win over the preset
    if args.sampler is not None:
        board.settings.sampler, board.settings.schedule = samplers.sampler_and_schedule(args.sampler, args.schedule)
    elif args.schedule is not None:
        board.settings.schedule = args.schedule
    for flag, name in (("negative", "negative_prompt"), ("steps", "steps"), ("cfg", "cfg_scale"), ("width", "width"),
                       ("height", "height"), ("clip_skip", "clip_skip"), ("candidates", "candidates"),
                       ("controlnet", "controlnet"), ("aspect", "aspect"), ("hires", "hires_fix"),
                       ("hires_scale", "hires_scale"), ("hires_upscaler", "hires_upscaler"),
                       ("hires_steps", "hires_steps"), ("hires_denoising", "hires_denoising")):
        if getattr(args, flag) is not None:
            setattr(board.settings, name, getattr(args, flag))
    if args.template:
        for shot_type in board.shot_types:
            shot_type.template = args.template
    for note in store.import_csv(board, csv_path, confine=False):
        print(f"note: {note}", file=sys.stderr)
    store.create(board, replace=args.overwrite)
    # a path given on the command line is the user's own choice; the UI only takes names in controlnet/
    runner = StoryboardRunner(manager, store, cfg.controlnet_dir, allow_paths=True)
    with cli_progress("storyboard") as (progress, cancel):
        result = runner.run(board, on_progress=progress, cancel=cancel)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    exported = export_board(store, board, pdf_path=out)
    for note in exported.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"project: {store.path(board.name) / 'project.json'}")
    print(f"pdf: {exported.pdf}")
    print(f"contact sheet: {exported.sheet}")
    return 0
