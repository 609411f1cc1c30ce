"""`python -m studio curate`: turn folders, zips or images into a training dataset."""

from __future__ import annotations

from pathlib import Path

from studio.cli.progress import cli_progress


def add_parser(sub) -> None:
    d = sub.add_parser("curate", help="turn folders, zips or images into a training dataset "
                                      "(writes report.json)")
    d.add_argument("--input", action="append", required=True, metavar="DIR_OR_ZIP",
                   help="a folder, a .zip or an image; repeat for several. Never modified")
    d.add_argument("--output", required=True, metavar="DIR",
                   help="dataset folder to write (new or empty; an earlier studio dataset only with --overwrite)")
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
                   help="leave grayscale images out instead of converting them to RGB (as seed 004 did)")
    d.add_argument("--caption", default="none", metavar="none|blip|blip2|MODEL",
                   help="captioner: a BLIP/BLIP-2 hub id or local folder, demo-tiny, or none")
    d.add_argument("--prefix", default="",
                   help="text put before every caption (a trigger word, 'a painting of')")
    d.add_argument("--suffix", default="", help="text put after every caption")
    d.add_argument("--replace-captions", action="store_true",
                   help="caption images that came with a caption (.txt, .caption, metadata.jsonl) too")
    d.add_argument("--caption-batch", type=int, default=8)
    d.add_argument("--clip-filter", type=float, nargs="?", const=0.2, default=None, metavar="THRESHOLD",
                   help="drop image-caption pairs whose caption does not match: CLIP score below THRESHOLD "
                        "(default 0.2, as in seed 001)")
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
    d.add_argument("--overwrite", action="store_true",
                   help="replace an earlier studio dataset (and kohya export) of that name; without it the "
                        "command refuses before any work")
    d.add_argument("--device", default=None, help="auto, cuda, mps or cpu (captioning and CLIP)")
    d.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.dataset.captioning import DEFAULT_CAPTIONER
    from studio.dataset.curate import CurateJob, DatasetExistsError, curate

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
    with cli_progress("curate") as (progress, cancel):
        try:
            result = curate(job, cfg.cache_dir, cfg.device, on_progress=progress, cancel=cancel,
                            kohya_parent=Path(args.kohya) if args.kohya else None, replace=args.overwrite)
        except DatasetExistsError as e:
            raise DatasetExistsError(f"{e} (add --overwrite to replace it)") from None
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
