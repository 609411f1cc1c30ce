"""`python -m studio models`: the models the studio can load (models/ and the built-in ones)."""

from __future__ import annotations


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list the models the studio can load")
    m.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.models.builtin import micro_available
    from studio.models.listing import list_models

    cfg = StudioConfig.from_env()
    for entry in list_models(cfg.models_dir):
        print(f"{entry.name}\t{entry.kind}")
    if micro_available(cfg.assets_dir):
        print("micro\tbuilt-in (pretrained on the micro world of shapes, assets/micro)")
    print("demo-tiny\tbuilt-in (random weights)")
    print("demo-tiny-xl\tbuilt-in (SDXL classes, random weights)")
    return 0
