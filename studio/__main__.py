"""Command line: `python -m studio generate|info|convert|models ...` (same engine and files as the UI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from studio import samplers


def _progress_printer(label: str):
    """A one-line progress bar with ETA on stderr (tqdm), closed when the work ends."""
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int, info: str = "") -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=label, unit="step", file=sys.stderr, leave=False)
        bar["bar"].total = total
        bar["bar"].n = done
        bar["bar"].set_postfix_str(info, refresh=False)
        bar["bar"].refresh()

    def close() -> None:
        if bar["bar"] is not None:
            bar["bar"].close()

    update.close = close
    return update


def cmd_generate(args) -> int:
    from studio.config import StudioConfig
    from studio.generate import GenerateJob, Generator
    from studio.models import ModelManager

    sampler, schedule = args.sampler, args.schedule
    if schedule is None:
        # "DPM++ 2M Karras" (older A1111 naming) carries its schedule inside the name
        sampler, schedule = samplers.split_legacy_name(sampler)
    job = GenerateJob(prompt=args.prompt, negative_prompt=args.negative, sampler=sampler, schedule=schedule,
                      steps=args.steps, cfg_scale=args.cfg, seed=args.seed, width=args.width, height=args.height,
                      batch_size=args.batch_size, batch_count=args.batch_count, clip_skip=args.clip_skip)
    job.validate()  # before loading a model: bad input fails fast
    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    manager = ModelManager(cfg)
    manager.load(args.model)
    if manager.current.is_demo:
        print("note: demo-tiny has random weights; its images are noise", file=sys.stderr)
    out = Path(args.out) if args.out else cfg.outputs_dir
    progress = _progress_printer("generate")
    cancel = threading.Event()
    try:
        result = Generator(manager).run(job, out, on_progress=progress, cancel=cancel)
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        progress.close()
    for image in result.images:
        print(image.path)
    return 0


def cmd_info(args) -> int:
    from studio.infotext import parse_infotext, read_image_infotext, to_fields

    text = read_image_infotext(args.image)
    if text is None:
        raise ValueError(f"{args.image} carries no generation parameters")
    print(json.dumps(to_fields(parse_infotext(text)), indent=2, ensure_ascii=False))
    return 0


def cmd_convert(args) -> int:
    from studio.config import StudioConfig
    from studio.convert import save_diffusers_folder, save_single_file
    from studio.models import ModelManager

    cfg = StudioConfig.from_env(device="cpu", precision="fp32")
    manager = ModelManager(cfg)
    model = manager.load(args.model)
    out = Path(args.out)
    if args.to == "diffusers":
        path = save_diffusers_folder(model.without_loras(), out)
    else:
        if out.suffix.lower() != ".safetensors":
            raise ValueError(f"--out must end in .safetensors for a single file, got {out.name}")
        dtype = {"fp16": "float16", "fp32": None}[args.dtype]
        import torch

        path = save_single_file(model.without_loras(), out, model.family, dtype=getattr(torch, dtype) if dtype else None,
                                metadata={"modelspec.title": model.name})
    print(path)
    return 0


def cmd_models(args) -> int:
    from studio.config import StudioConfig
    from studio.library import list_models

    cfg = StudioConfig.from_env()
    for entry in list_models(cfg.models_dir):
        print(f"{entry.name}\t{entry.kind}")
    print("demo-tiny\tbuilt-in (random weights)")
    return 0


def cmd_networks(args) -> int:
    from studio.config import StudioConfig
    from studio.networks import NetworkLibrary, embedding_card, lora_card

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


def cmd_curate(args) -> int:
    from studio.captioning import DEFAULT_CAPTIONER
    from studio.config import StudioConfig
    from studio.dataset import CurateJob, curate

    aliases = {"blip": DEFAULT_CAPTIONER, "blip2": "Salesforce/blip2-opt-2.7b"}
    flip = "stored" if args.flip_copies else ("random" if args.flip else "none")
    job = CurateJob(inputs=[Path(p) for p in args.input], output=Path(args.output), name=args.name or "",
                    size=args.size, crop=args.crop, min_side=args.min_side,
                    max_pixels=int(args.max_megapixels * 1_000_000),
                    non_rgb="prune" if args.prune_gray else "convert", near_duplicates=args.near_dup,
                    caption_model=aliases.get(args.caption, args.caption), caption_prefix=args.prefix,
                    caption_suffix=args.suffix, keep_captions=not args.replace_captions,
                    caption_batch=args.caption_batch, clip_model=args.clip_model,
                    clip_threshold=args.clip_filter, flip=flip, flip_p=args.flip_p, repeats=args.repeats)
    job.validate()  # before any model loads
    cfg = StudioConfig.from_env(device=args.device)
    progress = _progress_printer("curate")
    cancel = threading.Event()
    try:
        result = curate(job, cfg.cache_dir, cfg.device, on_progress=progress, cancel=cancel,
                        kohya_parent=Path(args.kohya) if args.kohya else None)
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        progress.close()
    counts = result.report["counts"]
    print(f"kept {counts['kept']} of {counts['inputs']} ({counts['converted']} converted), "
          f"removed {counts['removed']}, skipped {counts['skipped']}")
    for entry in result.report["removed"]:
        print(f"  removed {entry['source']}: {entry['reason']}")
    for entry in result.report["skipped"]:
        print(f"  skipped {entry['source']}: {entry['reason']}")
    print(f"dataset: {result.output}")
    print(f"report: {result.output / 'report.json'}")
    if result.kohya:
        print(f"kohya: {result.kohya}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images and print the paths of the PNGs")
    g.add_argument("--model", default="demo-tiny", help="name in models/, a path, a hub id, or demo-tiny")
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
    g.add_argument("--out", default=None, help="output folder (default: outputs/<date>/)")
    g.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    g.add_argument("--precision", default=None, help="auto, fp16, bf16 or fp32")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="print an image's generation parameters as JSON")
    i.add_argument("image")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="save a model as a diffusers folder or a single .safetensors file")
    c.add_argument("--model", required=True)
    c.add_argument("--to", choices=["diffusers", "single-file"], required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=["fp16", "fp32"], default="fp32", help="single-file weights precision")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("models", help="list the models the studio can load")
    m.set_defaults(func=cmd_models)

    n = sub.add_parser("networks", help="list LoRAs and embeddings (with what was skipped and why) as JSON")
    n.add_argument("--width", type=int, default=None,
                   help="text-encoder width of the model to check embeddings against (768 SD 1.x, 1024 SD 2.x)")
    n.set_defaults(func=cmd_networks)

    d = sub.add_parser("curate", help="turn folders, zips or images into a training dataset "
                                      "(writes report.json)")
    d.add_argument("--input", action="append", required=True, metavar="DIR_OR_ZIP",
                   help="a folder, a .zip or an image; repeat for several. Never modified")
    d.add_argument("--output", required=True, metavar="DIR",
                   help="dataset folder to write (new, empty, or an earlier studio dataset: replaced)")
    d.add_argument("--name", default=None, help="dataset name (default: the output folder's name)")
    d.add_argument("--size", type=int, default=512,
                   help="training resolution: 512 (SD 1.x), 768 (SD 2.x 768-v)")
    d.add_argument("--crop", choices=["center", "smart", "entropy", "bucket"], default="center",
                   help="smart: content-aware (saliency); entropy: most detail; bucket: keep aspect ratio "
                        "(kohya-style buckets)")
    d.add_argument("--min-side", type=int, default=256, help="skip images whose shorter side is below this")
    d.add_argument("--max-megapixels", type=float, default=64.0,
                   help="skip larger images (decompression-bomb guard)")
    d.add_argument("--prune-gray", action="store_true",
                   help="skip grayscale images instead of converting them to RGB (seed 004)")
    d.add_argument("--caption", default="none", metavar="none|blip|blip2|MODEL",
                   help="captioner: a BLIP/BLIP-2 hub id or local folder, demo-tiny, or none")
    d.add_argument("--prefix", default="",
                   help="text put before every caption (a trigger word, 'a painting of')")
    d.add_argument("--suffix", default="", help="text put after every caption")
    d.add_argument("--replace-captions", action="store_true",
                   help="caption images that came with a caption (.txt, .caption, metadata.jsonl) too")
    d.add_argument("--caption-batch", type=int, default=8)
    d.add_argument("--clip-filter", type=float, nargs="?", const=0.2, default=None, metavar="THRESHOLD",
                   help="remove image-caption pairs scoring below THRESHOLD (default 0.2, seed 001)")
    d.add_argument("--clip-model", default="ViT-L-14",
                   help="open_clip model: ViT-L-14 (openai weights), ARCH:TAG, ARCH:/weights/file, "
                        "local-dir:/folder, hf-hub:org/repo, or demo-tiny")
    d.add_argument("--near-dup", type=float, nargs="?", const=0.95, default=None, metavar="COSINE",
                   help="also drop near-duplicates: CLIP image cosine at or above COSINE (default 0.95); "
                        "the larger image is kept")
    d.add_argument("--flip", action="store_true", help="trainers flip images horizontally with --flip-p")
    d.add_argument("--flip-p", type=float, default=0.5)
    d.add_argument("--flip-copies", action="store_true", help="write a mirrored copy of every image instead")
    d.add_argument("--repeats", type=int, default=None,
                   help="repeats per epoch (default: from kohya <repeats>_<name> folders, else 1)")
    d.add_argument("--kohya", default=None, metavar="DIR",
                   help="also export to DIR/<repeats>_<name>/ for kohya's scripts")
    d.add_argument("--device", default=None, help="auto, cuda, mps or cpu (captioning and CLIP)")
    d.set_defaults(func=cmd_curate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        # the engine's errors already say what is wrong and what would be right
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
