"""`python -m studio networks`: the LoRAs and embeddings found, and what was skipped and why, as JSON."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    n = sub.add_parser("networks", help="list LoRAs and embeddings (with what was skipped and why) as JSON")
    n.add_argument("--width", default=None,
                   help="text-encoder width(s) of the model to check embeddings against: 768 SD 1.x, 1024 SD 2.x, "
                        "768,1280 SDXL")
    n.add_argument("--family", default=None, choices=("sd1", "sd2", "sdxl"),
                   help="list only the LoRAs for this model family (the others show as skipped, with theirs)")
    n.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.files.networks import NetworkLibrary, embedding_card, lora_card

    cfg = StudioConfig.from_env()
    lib = NetworkLibrary(cfg.loras_dir, cfg.embeddings_dir)
    try:
        widths = tuple(int(w) for w in args.width.split(",")) if args.width else None
    except ValueError:
        raise SystemExit(f"--width: expected numbers such as 768 or 768,1280, got {args.width!r}") from None
    loras, embs = lib.loras(args.family), lib.embeddings(widths)
    out = {
        "loras": [{**lora_card(lf), "hash": lf.hash} for lf in loras.found.values()],
        "embeddings": [{**embedding_card(e), "hash": e.hash} for e in embs.found.values()],
        "skipped": {**{f"loras/{k}": v for k, v in loras.skipped.items()},
                    **{f"embeddings/{k}": v for k, v in embs.skipped.items()}},
    }
    print(json.dumps(out, indent=2, default=str))
    return 0
