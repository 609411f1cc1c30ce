"""`python -m studio info`: an image's generation parameters (A1111's `parameters` chunk) as JSON."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="print an image's generation parameters as JSON")
    i.add_argument("image")
    i.set_defaults(func=run)


def run(args) -> int:
    from studio.generation.infotext import parse_infotext, read_image_infotext, to_fields

    text = read_image_infotext(args.image)
    if text is None:
        raise ValueError(f"{args.image} carries no generation parameters")
    print(json.dumps(to_fields(parse_infotext(text)), indent=2, ensure_ascii=False))
    return 0
