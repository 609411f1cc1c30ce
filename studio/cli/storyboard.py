"""`python -m studio storyboard`: a storyboard from a CSV shot list, exported as a PDF and a contact sheet; its
cast (characters drawn from their reference pictures through IP-Adapters) from --character flags or a board file."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from studio.cli.progress import cli_progress
from studio.generation import samplers


def add_parser(sub) -> None:
    sb = sub.add_parser("storyboard", help="generate a storyboard from a CSV shot list; writes a PDF and a contact "
                                           "sheet", description="CSV columns: shot,type,description[,notes,reference,"
                        "seed,candidates,canny_low,canny_high,control_scale,control_start,control_end]. A reference "
                        "(a picture or sketch, relative to the CSV) makes its shot follow the picture's canny edges "
                        "through the ControlNet. The project is kept as storyboards/NAME/project.json. A cast "
                        "(--character, --cast) gives every shot that names a character (a whole word of its "
                        "description or notes, any case) that character's reference pictures as an IP-Adapter "
                        "image prompt (files in ipadapter/ with image_encoder/).")
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
    sb.add_argument("--character", action="append", default=[], metavar="NAME:PICTURE[:ADAPTER[:SCALE]]",
                    help="a character of the cast: a reference picture of them, the IP-Adapter in ipadapter/ "
                         "(default: the only one there) and its scale (default 0.6); repeat the flag for more "
                         "pictures (the same NAME) or more characters, e.g. --character Sarah:sarah.png:"
                         "ip-adapter_sd15:0.6")
    sb.add_argument("--character-words", action="append", default=[], metavar="NAME=WORDS",
                    help="prompt words added to every shot the character is in, e.g. 'Sarah=red coat, short grey "
                         "hair' (repeatable)")
    sb.add_argument("--cast", default=None, metavar="FILE.json",
                    help="the cast of another storyboard: its project.json (pictures relative to its folder), or "
                         "a JSON list of characters (name, pictures, ip_adapter, scale, prompt); --character adds "
                         "to it")
    sb.add_argument("--overwrite", action="store_true",
                    help="replace an earlier storyboard of that name (and an existing --out file); without it the "
                         "command refuses before loading a model")
    sb.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    sb.add_argument("--precision", default=None, help="auto, fp16, bf16 or fp32")
    sb.set_defaults(func=run)


def parse_character(value: str) -> tuple[str, str, str, float | None]:
    """NAME:PICTURE[:ADAPTER[:SCALE]] -> (name, picture, adapter or "", scale or None); a Windows drive letter in
    PICTURE (C:\\x.png) is kept."""
    name, sep, rest = value.partition(":")
    parts = rest.split(":") if sep else []
    if len(parts) > 1 and re.fullmatch(r"[A-Za-z]", parts[0]) and parts[1][:1] in ("\\", "/"):
        parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]
    if not name.strip() or not parts or not parts[0].strip() or len(parts) > 3:
        raise ValueError(f"--character must be NAME:PICTURE[:ADAPTER[:SCALE]], got {value!r}")
    scale = None
    if len(parts) == 3 and parts[2].strip():
        try:
            scale = float(parts[2])
        except ValueError:
            raise ValueError(f"--character {value!r}: the scale must be a number, got {parts[2]!r}") from None
    return name.strip(), parts[0].strip(), parts[1].strip() if len(parts) > 1 else "", scale


def read_cast(args) -> list[tuple]:
    """The cast the flags ask for, as (Character without pictures, [picture files]); every picture must exist.
    Checked before any model loads."""
    from studio.storyboard.board import Character, Storyboard

    cast: dict[str, tuple] = {}  # lower name -> (Character, pictures)
    if args.cast:
        file = Path(args.cast)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--cast: {file} is not readable JSON: {e}") from None
        if isinstance(data, dict) and "format" in data:
            entries = [dict(vars(c)) for c in Storyboard.from_dict(data).cast]
        else:
            entries = data.get("cast") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"--cast: {file.name} holds no cast (a project.json, or a list of characters)")
        for entry in entries:
            entry = dict(entry)
            pictures = entry.pop("pictures", [])
            try:
                character = Character(**entry)
            except TypeError as e:
                raise ValueError(f"--cast: {file.name}: a character is not valid: {e}") from None
            if not isinstance(pictures, list):
                raise ValueError(f"--cast: character {character.name!r}: pictures must be a list of files")
            cast[str(character.name).lower()] = (character, [file.parent / str(p) for p in pictures])
    for value in args.character:
        name, picture, adapter, scale = parse_character(value)
        character, pictures = cast.setdefault(name.lower(), (Character(name), []))
        pictures.append(Path(picture).expanduser())
        if adapter:
            character.ip_adapter = adapter
        if scale is not None:
            character.scale = scale
    for value in args.character_words:
        name, sep, words = value.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--character-words must be NAME=WORDS, got {value!r}")
        if name.strip().lower() not in cast:
            raise ValueError(f"--character-words {name.strip()!r}: no such character (give it with --character "
                             "NAME:PICTURE or --cast)")
        cast[name.strip().lower()][0].prompt = words.strip()
    for character, pictures in cast.values():
        character.validate()
        for picture in pictures:
            if not picture.is_file():
                raise ValueError(f"character {character.name!r}: picture {picture} does not exist")
    return list(cast.values())


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
    from studio.storyboard.runner import StoryboardRunner, cast_adapter

    csv_path = Path(args.shots)
    if not csv_path.is_file():
        raise ValueError(f"--shots: no file {csv_path}")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".pdf":
        raise ValueError(f"--out must be a .pdf file, got {out.name}")
    if out is not None and out.exists() and not args.overwrite:
        raise StoryboardExistsError(f"--out: {out} already exists; choose another file, or add --overwrite")
    shots_from_csv(csv_path.read_text(encoding="utf-8-sig"), csv_path.name)  # before loading a model
    cast = read_cast(args)
    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    cfg.ensure_dirs()
    for character, pictures in cast:
        if pictures:
            character.ip_adapter = cast_adapter(character, cfg.ipadapter_dir)  # its file and image encoder are there
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
    for character, pictures in cast:
        board.cast.append(character)
        for note in store.add_character_pictures(board, character, pictures):  # into references/cast/
            print(f"note: {note}", file=sys.stderr)
    store.create(board, replace=args.overwrite)
    for character in board.cast:
        shots = [s.shot for s in board.shots if character in board.shot_cast(s)]
        print(f"note: cast: {character.name} in shot{'s' if len(shots) != 1 else ''} {', '.join(shots) or 'none'}",
              file=sys.stderr)
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
