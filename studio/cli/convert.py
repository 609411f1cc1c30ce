"""`python -m studio convert`: save a model as a diffusers folder or one original-layout .safetensors file."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="save a model as a diffusers folder or a single .safetensors file")
    c.add_argument("--model", required=True)
    c.add_argument("--to", choices=["diffusers", "single-file"], required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", choices=["fp16", "fp32"], default="fp32", help="single-file weights precision")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out; without it the command refuses before loading the model")
    c.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.files.convert import ModelExistsError, save_diffusers_folder, save_single_file
    from studio.models.manager import ModelManager

    out = Path(args.out)
    if args.to == "single-file" and out.suffix.lower() != ".safetensors":
        raise ValueError(f"--out must end in .safetensors for a single file, got {out.name}")
    if (out.exists() or out.is_symlink()) and not args.overwrite:  # before the model loads
        raise ModelExistsError(f"--out: {out} already exists; choose another name, or add --overwrite")
    cfg = StudioConfig.from_env(device="cpu", precision="fp32")
    manager = ModelManager(cfg)
    model = manager.load(args.model)
    if args.to == "diffusers":
        path = save_diffusers_folder(model.without_loras(), out, overwrite=args.overwrite)
    else:
        dtype = {"fp16": "float16", "fp32": None}[args.dtype]
        import torch

        path = save_single_file(model.without_loras(), out, model.family, dtype=getattr(torch, dtype) if dtype else None,
                                metadata={"modelspec.title": model.name}, overwrite=args.overwrite)
    print(path)
    return 0
