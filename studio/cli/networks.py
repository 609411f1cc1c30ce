"""`python -m studio networks`: the LoRAs and embeddings found, and what was skipped and why, as JSON."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    n = sub.add_parser("networks", help="list LoRAs and embeddings (with what was skipped and why) as JSON")
    n.add_argument("--width", type=int, default=None,
                   help="text-encoder width of the model to check embeddings against (768 SD 1.x, 1024 SD 2.x)")
    n.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.files.networks import NetworkLibrary, embedding_card, lora_card

    cfg = StudioConfig.from_env()
    lib = NetworkLibrary(cfg.loras_dir, cfg.embeddings_dir)
    loras, embs = lib.loras(), lib.embeddings(args.width)
    out = {
        "loras": [{**lora_card(lf), "hash": lf.hash} for lf in loras.found.values()],
        "embeddings": [{**embedding_card(e), "hash": e.hash} for e in embs.found.values()],
        "skipped": {**{f"loras/{k}": v for k, v in loras.skipped.items()},
                    **{f"embeddings/{k}": v for k, v in embs.skipped.items()}},
    }
    print(json.dumps(out, indent=2, default=str))
    return 0
