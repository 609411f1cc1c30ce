"""Command line: `python -m studio generate|info|convert|models ...` (same engine and files as the UI)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from studio.generation import samplers


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


@contextmanager
def _cli_progress(label: str):
    """(on_progress, cancel) for one long command: a progress bar with ETA on stderr; Ctrl+C also sets `cancel`, so
    work running on other threads stops at its next step."""
    progress = _progress_printer(label)
    cancel = threading.Event()
    try:
        yield progress, cancel
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        progress.close()


def cmd_generate(args) -> int:
    from studio.config import StudioConfig
    from studio.generation.generate import Generator
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

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
    manager.load(args.model or manager.default_choice())
    if manager.current.is_demo:
        print("note: demo-tiny has random weights; its images are noise", file=sys.stderr)
    out = Path(args.out) if args.out else cfg.outputs_dir
    with _cli_progress("generate") as (progress, cancel):
        result = Generator(manager).run(job, out, on_progress=progress, cancel=cancel)
    for image in result.images:
        print(image.path)
    return 0


def cmd_grid(args) -> int:
    from studio.config import StudioConfig
    from studio.explorer.grid import AxisSpec, GridJob, GridRunner, plan_grid
    from studio.generation.job import GenerateJob
    from studio.models.manager import ModelManager

    sampler, schedule = args.sampler, args.schedule
    if schedule is None:
        sampler, schedule = samplers.split_legacy_name(sampler)
    base = GenerateJob(prompt=args.prompt, negative_prompt=args.negative, sampler=sampler, schedule=schedule,
                       steps=args.steps, cfg_scale=args.cfg, seed=args.seed, width=args.width, height=args.height,
                       clip_skip=args.clip_skip)
    job = GridJob(base, x=AxisSpec.parse(args.x), y=AxisSpec.parse(args.y), z=AxisSpec.parse(args.z),
                  checkpoint="", keep_random_seeds=args.keep_random_seeds, cells_per_pass=args.cells_per_pass)
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out.name}")
    plan_grid(job)  # before loading a model: bad axes fail fast
    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    manager = ModelManager(cfg)
    manager.load(args.model or manager.default_choice())
    if manager.current.is_demo:
        print("note: demo-tiny has random weights; its images are noise", file=sys.stderr)
    runner = GridRunner(manager)
    plan = runner.plan(job)
    print(plan.summary(), file=sys.stderr)
    with _cli_progress("grid") as (progress, cancel):
        result = runner.run(plan, outputs_dir=cfg.outputs_dir, grid_path=out, on_progress=progress, cancel=cancel)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.grid_path)
    return 0


def cmd_info(args) -> int:
    from studio.generation.infotext import parse_infotext, read_image_infotext, to_fields

    text = read_image_infotext(args.image)
    if text is None:
        raise ValueError(f"{args.image} carries no generation parameters")
    print(json.dumps(to_fields(parse_infotext(text)), indent=2, ensure_ascii=False))
    return 0


def cmd_convert(args) -> int:
    from studio.config import StudioConfig
    from studio.files.convert import save_diffusers_folder, save_single_file
    from studio.models.manager import ModelManager

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
    from studio.models.builtin import micro_available
    from studio.models.listing import list_models

    cfg = StudioConfig.from_env()
    for entry in list_models(cfg.models_dir):
        print(f"{entry.name}\t{entry.kind}")
    if micro_available(cfg.assets_dir):
        print("micro\tbuilt-in (pretrained on the micro world of shapes, assets/micro)")
    print("demo-tiny\tbuilt-in (random weights)")
    return 0


def cmd_networks(args) -> int:
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


def cmd_curate(args) -> int:
    from studio.config import StudioConfig
    from studio.dataset.captioning import DEFAULT_CAPTIONER
    from studio.dataset.curate import CurateJob, curate

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
    with _cli_progress("curate") as (progress, cancel):
        result = curate(job, cfg.cache_dir, cfg.device, on_progress=progress, cancel=cancel,
                        kohya_parent=Path(args.kohya) if args.kohya else None)
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


# flag -> TrainJob field for `train ti|lora|finetune` (flags left out keep the preset's / config's / default value)
TRAIN_FLAGS = {"model": "model", "data": "data", "name": "name", "method": "method", "steps": "max_steps",
               "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "learning_rate", "vectors": "vectors",
               "init_word": "init_word", "template": "template", "resolution": "resolution", "repeats": "repeats",
               "flip_p": "flip_p", "seed": "seed", "mixed_precision": "mixed_precision",
               "image_encoder": "image_encoder", "experts": "experts", "top_k": "top_k", "aux_weight": "aux_weight",
               "save_every": "save_every", "preview_every": "preview_every", "preview_prompt": "preview_prompt",
               "format": "embedding_format", "overwrite": "overwrite", "rank": "rank", "alpha": "alpha",
               "dropout": "dropout", "targets": "lora_targets", "unet_lr": "learning_rate",
               "te_lr": "text_encoder_lr", "text_encoder": "train_text_encoder", "instance_prompt": "instance_prompt",
               "class_prompt": "class_prompt", "class_images": "class_images", "prior_weight": "prior_loss_weight",
               "lr_scheduler": "lr_scheduler", "warmup": "lr_warmup", "optimizer": "optimizer",
               "gradient_checkpointing": "gradient_checkpointing", "min_snr": "min_snr_gamma",
               "noise_offset": "noise_offset", "max_grad_norm": "max_grad_norm", "save_diffusers": "save_diffusers",
               "ema": "ema", "ema_decay": "ema_decay", "out": "output", "compile": "compile"}


def train_job_from_args(args):
    """Defaults, then --preset, then --config, then the flags given on the command line."""
    from studio.config import StudioConfig
    from studio.train.job import TrainJob, find_train_preset, job_from_yaml

    values = TrainJob.for_method("ti" if args.kind == "ti" else args.kind).to_dict()
    if args.preset:
        values.update(find_train_preset(args.preset, StudioConfig.from_env().presets_dir).settings)
    if args.config:
        values.update(job_from_yaml(Path(args.config).read_text(encoding="utf-8"), args.config).to_dict())
    # `is not`, not `in (None, False)`: 0 == False, and `--preview-every 0`, `--seed 0`, `--dropout 0` are values
    values.update({field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items()
                   if getattr(args, flag, None) is not None and getattr(args, flag) is not False})
    if getattr(args, "te_lr", None) is not None:
        values["train_text_encoder"] = True  # a text-encoder rate means: train it
    if args.kind != "ti" and values["method"] != args.kind:
        raise ValueError(f"`train {args.kind}` got a {values['method']} preset or config; use `train "
                         f"{values['method'] if values['method'] in ('lora', 'finetune') else 'ti'}`")
    return TrainJob.from_dict(values)


def cmd_train(args) -> int:
    from studio.config import StudioConfig
    from studio.train.loop import Trainer

    cfg = StudioConfig.from_env(device=args.device)
    cfg.ensure_dirs()
    with _cli_progress(f"train {args.kind}") as (progress, cancel):

        def on_event(kind: str, info: dict) -> None:
            if kind == "log":
                print(info["text"], file=sys.stderr)
            elif kind == "preview":
                print(f"preview: {info['path']}", file=sys.stderr)

        trainer = Trainer(cfg, on_progress=progress, on_event=on_event, cancel=cancel)
        if args.resume:
            result = trainer.resume(Path(args.resume), max_steps=args.steps, compile=args.compile)
        else:
            job = train_job_from_args(args)
            job.validate()
            result = trainer.start(job)
    print(f"run: {result.run_dir}")
    if result.output:
        print(f"{'embedding' if args.kind == 'ti' else 'output'}: {result.output}")
    if result.state == "failed":
        raise RuntimeError(result.message)
    return 0 if result.state == "finished" else 130


def _train_parser(tsub, kind: str, help_text: str) -> argparse.ArgumentParser:
    """The flags every `train` command shares."""
    p = tsub.add_parser(kind, help=help_text, description="Flags left out keep the value of --preset / --config, "
                        "else the default. Several GPUs: accelerate launch -m studio train ...")
    p.add_argument("--model", help="name in models/, a path, a hub id, or demo-tiny (default demo-tiny)")
    p.add_argument("--data", help="a dataset name in datasets/ or a folder of images with .txt captions")
    p.add_argument("--name", help="output name (embeddings/, loras/ or models/NAME)")
    p.add_argument("--steps", type=int, help="optimizer steps (with --resume: continue up to this many)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    p.add_argument("--resolution", type=int)
    p.add_argument("--repeats", type=int, help="repeats per epoch (default: the dataset's)")
    p.add_argument("--flip-p", type=float, help="horizontal flip probability (default: the dataset's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--compile", metavar="MODE",
                   help="torch.compile the UNet, forward and backward (CUDA only): off (default), default or "
                        "max-autotune (no CUDA graphs in training); the first step waits for the compiler. With "
                        "--resume: switch it for the rest of the run")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"])
    p.add_argument("--lr-scheduler", choices=["constant", "constant_with_warmup", "linear", "cosine"])
    p.add_argument("--warmup", type=float, help="warmup steps, or a fraction of the steps below 1 (0.1 = 10%%)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--preview-every", type=int, help="preview image every N steps (0: none)")
    p.add_argument("--preview-prompt", help="preview prompt; [name] is the output's name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output of that name")
    p.add_argument("--preset", help="a training preset (name, file stem or .yaml path) from presets/training/")
    p.add_argument("--config", help="a run's config.yaml: repeat that run")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    p.set_defaults(func=cmd_train)
    return p


def _add_diffusion_flags(p: argparse.ArgumentParser) -> None:
    """LoRA and fine-tune: captions, DreamBooth, loss options."""
    p.add_argument("--lr", help="learning rate (or an A1111 schedule)")
    p.add_argument("--instance-prompt", help="one prompt for every image instead of its caption "
                                             "([filewords] = the caption)")
    p.add_argument("--class-prompt", help="DreamBooth prior preservation: prompt of the class images")
    p.add_argument("--class-images", type=int, help="number of class images (made once with the base model)")
    p.add_argument("--prior-weight", type=float, help="weight of the class (prior) loss (default 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower")
    p.add_argument("--min-snr", type=float, help="Min-SNR weighting gamma (5 is usual; default off)")
    p.add_argument("--noise-offset", type=float, help="noise offset (e.g. 0.05; default off)")
    p.add_argument("--max-grad-norm", type=float, help="clip gradients to this norm (default: no clipping)")


def cmd_evaluate(args) -> int:
    from studio.config import StudioConfig
    from studio.evaluate.folders import EvaluateJob, evaluate_folders, write_report

    job = EvaluateJob(generated=args.generated, references=args.references or "", prompts=args.prompts or "",
                      metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], clip_model=args.clip_model,
                      dino_model=args.dino_model, fid_features=args.fid_features, caption_model=args.caption_model,
                      style_phrases=list(args.style_phrase or []), device=args.device or "auto")
    job.validate()  # before any model loads
    cfg = StudioConfig.from_env(device=args.device)
    progress = _progress_printer("evaluate")
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


def cmd_experiment(args) -> int:
    from studio.config import StudioConfig
    from studio.evaluate.experiment import ExperimentRunner, load_experiment, process_rank

    cfg = StudioConfig.from_env(device=args.device)
    cfg.ensure_dirs()
    exp = load_experiment(Path(args.file), cfg)  # every cell's settings are checked before anything runs
    with _cli_progress("experiment") as (progress, cancel):
        main_process = process_rank()[0] == 0
        runner = ExperimentRunner(cfg, on_progress=progress if main_process else None,
                                  on_log=(lambda text: print(text, file=sys.stderr)) if main_process else None,
                                  cancel=cancel)
        result = runner.run(exp, Path(args.out) if args.out else None)
    if main_process:
        print(f"results: {result.out_dir}")
        for name, path in result.files.items():
            print(f"{name}: {path}")
        if result.files.get("table1.md"):
            print(result.files["table1.md"].read_text(encoding="utf-8"))
    return 130 if result.stopped else 0


def cmd_survey(args) -> int:
    from studio.config import StudioConfig
    from studio.evaluate import survey as sv

    folder = Path(StudioConfig.from_env().outputs_dir) / "surveys"
    if args.action == "build":
        if args.experiment:
            methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
            if len(methods) != 2:
                raise ValueError("--experiment needs --methods BASELINE,CANDIDATE (e.g. pe,lora)")
            pairs, unmatched = sv.experiment_pairs(Path(args.experiment), *methods), []
        elif args.baseline and args.candidate:
            pairs, unmatched = sv.match_pairs(Path(args.baseline), Path(args.candidate), args.category or "")
        else:
            raise ValueError("give --baseline DIR --candidate DIR, or --experiment DIR --methods pe,lora")
        path = sv.create_survey(folder, args.name, pairs, args.title or "", args.per_respondent)
        for name in unmatched:
            print(f"note: {name} has no partner image", file=sys.stderr)
        print(f"survey: {path} ({len(pairs)} pairs); respondents open /survey?survey={args.name} in the studio")
        return 0
    report = sv.open_survey(folder, args.name).report()
    print(json.dumps(report, indent=2) if args.json else sv.report_markdown(report))
    return 0


def cmd_storyboard(args) -> int:
    from studio.config import StudioConfig
    from studio.control.controlnet import default_controlnet
    from studio.models.manager import ModelManager
    from studio.storyboard.board import (
        StoryboardStore,
        apply_board_preset,
        list_board_presets,
        new_board,
        shots_from_csv,
    )
    from studio.storyboard.export import export_board
    from studio.storyboard.runner import StoryboardRunner

    csv_path = Path(args.shots)
    if not csv_path.is_file():
        raise ValueError(f"--shots: no file {csv_path}")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".pdf":
        raise ValueError(f"--out must be a .pdf file, got {out.name}")
    shots_from_csv(csv_path.read_text(encoding="utf-8-sig"), csv_path.name)  # before loading a model
    cfg = StudioConfig.from_env(device=args.device, precision=args.precision)
    cfg.ensure_dirs()
    preset = None
    if args.preset:
        presets = list_board_presets(cfg.presets_dir)
        by_stem = {p.path.stem: p for p in presets.values()}
        preset = presets.get(args.preset) or by_stem.get(args.preset)
        if preset is None:
            raise ValueError(f"no storyboard preset {args.preset!r}; presets: "
                             f"{', '.join(sorted(by_stem)) or 'none'}")
    manager = ModelManager(cfg)
    manager.load(args.model)
    if manager.current.is_demo:
        print("note: demo-tiny has random weights; its images are noise", file=sys.stderr)
    size = manager.current.native_size
    store = StoryboardStore(cfg.storyboards_dir)
    board = new_board(args.name or csv_path.stem)
    board.settings.width = board.settings.height = size
    board.settings.controlnet = default_controlnet(manager.current, cfg.assets_dir)  # micro-canny for micro
    if preset is not None:
        apply_board_preset(board, preset)
    # flags given on the command line win over the preset
    if args.sampler is not None:
        sampler, schedule = args.sampler, args.schedule
        if schedule is None:
            sampler, schedule = samplers.split_legacy_name(sampler)
        board.settings.sampler, board.settings.schedule = sampler, schedule
    elif args.schedule is not None:
        board.settings.schedule = args.schedule
    for flag, name in (("negative", "negative_prompt"), ("steps", "steps"), ("cfg", "cfg_scale"), ("width", "width"),
                       ("height", "height"), ("clip_skip", "clip_skip"), ("candidates", "candidates"),
                       ("controlnet", "controlnet")):
        if getattr(args, flag) is not None:
            setattr(board.settings, name, getattr(args, flag))
    if args.template:
        for shot_type in board.shot_types:
            shot_type.template = args.template
    for note in store.import_csv(board, csv_path, confine=False):
        print(f"note: {note}", file=sys.stderr)
    store.save(board)
    # a path given on the command line is the user's own choice; the UI only takes names in controlnet/
    runner = StoryboardRunner(manager, store, cfg.controlnet_dir, allow_paths=True)
    with _cli_progress("storyboard") as (progress, cancel):
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


def build_parser() -> argparse.ArgumentParser:
    from studio.explorer.syntax import AXIS_TYPES, NOTHING

    axis_names = [n for n in AXIS_TYPES if n != NOTHING]
    parser = argparse.ArgumentParser(prog="python -m studio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images and print the paths of the PNGs")
    g.add_argument("--model", help="name in models/, a path, a hub id, micro or demo-tiny "
                   "(default: the first in models/, else micro)")
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

    xyz = sub.add_parser("grid", help="an X/Y/Z plot (A1111 syntax) run as batched passes; prints the grid's path",
                         description="Axes: " + ", ".join(axis_names) + ". Values: '3,7,11', '1-5', '1-5 (+2)', "
                                     "'10-30 [5]', '0.5-1.5 (+0.25)'; Prompt S/R: the first value is replaced by each. "
                                     "LoRA weight of a named LoRA: 'LoRA weight (NAME): 0,0.5,1'.")
    xyz.add_argument("--model", help="name in models/, a path, a hub id, micro or demo-tiny "
                     "(default: the first in models/, else micro)")
    xyz.add_argument("--prompt", required=True)
    xyz.add_argument("--negative", default="", help="negative prompt")
    xyz.add_argument("--x", required=True, metavar="'AXIS: VALUES'", help="e.g. 'CFG Scale: 3,7,11'")
    xyz.add_argument("--y", default=None, metavar="'AXIS: VALUES'", help="e.g. 'Steps: 10,20'")
    xyz.add_argument("--z", default=None, metavar="'AXIS: VALUES'", help="one grid per value, e.g. 'Sampler: Euler a, "
                                                                           "DPM++ 2M'")
    xyz.add_argument("--sampler", default="DPM++ 2M", help=f"one of: {', '.join(samplers.SAMPLERS)}")
    xyz.add_argument("--schedule", default=None, help=f"one of: {', '.join(samplers.SCHEDULE_TYPES)} (default: from "
                                                      "the sampler name, else Automatic)")
    xyz.add_argument("--steps", type=int, default=20)
    xyz.add_argument("--cfg", type=float, default=7.0, help="CFG scale")
    xyz.add_argument("--seed", type=int, default=-1, help="-1: one random seed for every cell")
    xyz.add_argument("--keep-random-seeds", action="store_true", help="A1111's 'keep -1 for seeds': each cell its own")
    xyz.add_argument("--width", type=int, default=512)
    xyz.add_argument("--height", type=int, default=512)
    xyz.add_argument("--clip-skip", type=int, default=1)
    xyz.add_argument("--cells-per-pass", type=int, default=8, help="the largest denoising batch (memory)")
    xyz.add_argument("--out", default=None, metavar="FILE.png",
                     help="the grid image; FILE.json, FILE.csv and FILE-cells/ go beside it "
                          "(default: outputs/grids/<date>/NNNNN-grid.png)")
    xyz.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    xyz.add_argument("--precision", default=None, help="auto, fp16, bf16 or fp32")
    xyz.set_defaults(func=cmd_grid)

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

    t = sub.add_parser("train", help="train an embedding (TI, TI-Att, TI-MoE), a LoRA, or fine-tune the UNet")
    tsub = t.add_subparsers(dest="kind", required=True)
    ti = _train_parser(tsub, "ti", "Textual Inversion: writes embeddings/NAME.safetensors and runs/NAME-<time>/")
    ti.add_argument("--method", choices=["ti", "ti-att", "ti-moe"], help="default ti")
    ti.add_argument("--lr", help="learning rate or A1111 schedule, e.g. '0.005:100, 1e-3:1000'")
    ti.add_argument("--vectors", type=int, help="vectors per token (1-75)")
    ti.add_argument("--init-word", help="initializer word (standard TI)")
    ti.add_argument("--template", help="prompt template name in assets/templates/ or a .txt path")
    ti.add_argument("--image-encoder", help="CLIP image tower for ti-att/ti-moe (hub id, folder, demo-tiny)")
    ti.add_argument("--experts", type=int, help="TI-MoE experts E")
    ti.add_argument("--top-k", type=int, help="TI-MoE experts per image k")
    ti.add_argument("--aux-weight", type=float, help="TI-MoE auxiliary loss weight lambda")
    ti.add_argument("--format", choices=["a1111", "diffusers", "a1111-pt"], help="embedding file format")
    lo = _train_parser(tsub, "lora", "LoRA / DreamBooth-LoRA: writes loras/NAME.safetensors (kohya format)")
    _add_diffusion_flags(lo)
    lo.add_argument("--rank", type=int, help="LoRA rank (network dim), default 4")
    lo.add_argument("--alpha", type=float, help="LoRA alpha (network alpha), default: the rank")
    lo.add_argument("--dropout", type=float, help="LoRA dropout")
    lo.add_argument("--targets", choices=["attention", "transformer", "all"], help="UNet layers (default attention)")
    lo.add_argument("--unet-lr", help="UNet learning rate (default 1e-4)")
    lo.add_argument("--te-lr", type=float, help="text-encoder learning rate; giving it trains the text encoder")
    lo.add_argument("--text-encoder", action="store_true", help="train a LoRA on the text encoder too")
    lo.add_argument("--save-diffusers", action="store_true", help="also write a diffusers-format copy")
    ft = _train_parser(tsub, "finetune", "full UNet fine-tune: writes models/NAME.safetensors (or --out)")
    _add_diffusion_flags(ft)
    ft.add_argument("--ema", action="store_true", help="keep and save an EMA of the weights")
    ft.add_argument("--ema-decay", type=float, help="EMA decay (default 0.9999)")
    ft.add_argument("--out", help="the .safetensors file to write (default models/NAME.safetensors)")

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
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("experiment", help="train, generate and score the cells of an experiment file; writes "
                                           "tables 1 and 2 (CSV, Markdown) and a plot. Several GPUs: "
                                           "accelerate launch -m studio experiment FILE.yaml")
    ex.add_argument("file", metavar="FILE.yaml", help="experiment file (e.g. presets/experiments/seed000.yaml)")
    ex.add_argument("--out", metavar="DIR", help="results folder (default outputs/experiments/NAME)")
    ex.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    ex.set_defaults(func=cmd_experiment)

    sv = sub.add_parser("survey", help="build a blind A/B survey or print its report")
    sv.add_argument("action", choices=["build", "report"])
    sv.add_argument("name", help="survey name (outputs/surveys/NAME)")
    sv.add_argument("--baseline", metavar="DIR", help="baseline images")
    sv.add_argument("--candidate", metavar="DIR",
                    help="fine-tuned images (paired by file name, else by seed and prompt)")
    sv.add_argument("--category", help="shot type or style of these pairs")
    sv.add_argument("--experiment", metavar="DIR", help="pairs from an experiment's results folder instead")
    sv.add_argument("--methods", metavar="BASELINE,CANDIDATE", help="with --experiment, e.g. pe,lora")
    sv.add_argument("--title", help="title shown to respondents")
    sv.add_argument("--per-respondent", type=int, default=0, help="pairs shown to each respondent (0: all)")
    sv.add_argument("--json", action="store_true", help="report as JSON")
    sv.set_defaults(func=cmd_survey)

    sb = sub.add_parser("storyboard", help="generate a storyboard from a CSV shot list; writes a PDF and a contact "
                                           "sheet", description="CSV columns: shot,type,description[,notes,reference,"
                        "seed,candidates,canny_low,canny_high,control_scale,control_start,control_end]. A reference "
                        "(a picture or sketch, relative to the CSV) makes its shot follow the picture's canny edges "
                        "through the ControlNet. The project is kept as storyboards/NAME/project.json.")
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
    sb.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    sb.add_argument("--precision", default=None, help="auto, fp16, bf16 or fp32")
    sb.set_defaults(func=cmd_storyboard)
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
