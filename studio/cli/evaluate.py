"""`python -m studio evaluate`: CLIP, DINO, FID/KID and caption metrics of a folder of images; a JSON report."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.progress import progress_printer


def add_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="CLIP-I, CLIP-T, DINO, FID, KID and BLIP captions of a folder of generated "
                                         "images against reference images; writes a JSON report")
    ev.add_argument("--generated", required=True, metavar="DIR", help="folder of generated images")
    ev.add_argument("--references", metavar="DIR", help="folder of reference images (CLIP-I, DINO, FID, KID)")
    ev.add_argument("--prompts", metavar="FILE", help="each image's prompt: .txt (one line for all, or one per image "
                                                     "in name order) or .json {file: prompt}; default: the PNG's "
                                                     "parameters, else a .txt beside the image")
    ev.add_argument("--metrics", default="clip-i,clip-t", help="comma separated: clip-i, clip-t, dino, fid, kid, "
                                                              "captions (default clip-i,clip-t)")
    ev.add_argument("--clip-model", default="ViT-L-14", help="open_clip model: ViT-L-14, ViT-B-32 (openai weights), "
                                                             "ARCH:/weights, local-dir:/folder, demo-tiny")
    ev.add_argument("--dino-model", default="facebook/dino-vits16", help="DINO: hub id, local folder, demo-tiny")
    ev.add_argument("--fid-features", default="inception", help="FID/KID features: inception (local weights: "
                                                                "inception:/path.pth), clip, dino, demo-tiny")
    ev.add_argument("--caption-model", default="Salesforce/blip-image-captioning-base",
                    help="BLIP/BLIP-2 for 'captions': hub id, local folder, demo-tiny")
    ev.add_argument("--style-phrase", action="append", metavar="TEXT",
                    help="also remove TEXT from prompts for CLIP-T (repeatable; 'in the style of ...' always goes)")
    ev.add_argument("--out", required=True, metavar="FILE.json", help="the report to write")
    ev.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    ev.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.evaluate.folders import EvaluateJob, evaluate_folders, write_report

    job = EvaluateJob(generated=args.generated, references=args.references or "", prompts=args.prompts or "",
                      metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], clip_model=args.clip_model,
                      dino_model=args.dino_model, fid_features=args.fid_features, caption_model=args.caption_model,
                      style_phrases=list(args.style_phrase or []), device=args.device or "auto")
    job.validate()  # before any model loads
    cfg = StudioConfig.from_env(device=args.device)
    progress = progress_printer("evaluate")
    try:
        report = evaluate_folders(job, cfg.cache_dir, on_progress=progress)
    finally:
        progress.close()
    write_report(report, Path(args.out))
    for key, value in report["metrics"].items():
        print(f"{key}\t{value:.4f}")
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report: {args.out}")
    return 0
