"""`python -m studio preprocess`: a picture's ControlNet control map (canny, openpose, depth_midas, ...) as a PNG."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="make a ControlNet control map (canny, openpose, depth, ...) of a picture")
    p.add_argument("image")
    p.add_argument("--module", default="canny", help="A1111's preprocessor name (canny, openpose_full, depth_midas, "
                                                     "lineart_standard, ...)")
    p.add_argument("--out", required=True, help="the map's file (.png)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=NUMBER",
                   help="a parameter of the preprocessor, e.g. low=100 (repeatable)")
    p.add_argument("--annotators-dir", default=None, help="folder with annotator weight files "
                                                          "(default: the studio's .cache/annotators)")
    p.add_argument("--device", default="cpu", help="where weight-needing detectors run (cpu, cuda)")
    p.set_defaults(func=run)


def run(args) -> int:
    from studio.control.preprocess import read_reference
    from studio.control.preprocessors import check_params, parse_param, preview

    params = dict(parse_param(text) for text in args.param)
    check_params(args.module, params)  # before reading the picture or loading a detector
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must end in .png, got {out.name}")
    reference = read_reference(Path(args.image))
    annotators = Path(args.annotators_dir) if args.annotators_dir else None
    preview(args.module, reference.image, params, annotators_dir=annotators, device=args.device).save(out)
    print(out)
    return 0
