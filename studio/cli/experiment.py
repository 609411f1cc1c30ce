"""`python -m studio experiment`: train, generate and score the cells of an experiment file."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.cli.progress import cli_progress


def add_parser(sub) -> None:
    ex = sub.add_parser("experiment", help="train, generate and score the cells of an experiment file; writes "
                                           "tables 1 and 2 (CSV, Markdown) and a plot. Several GPUs: "
                                           "accelerate launch -m studio experiment FILE.yaml")
    ex.add_argument("file", metavar="FILE.yaml", help="experiment file (e.g. presets/experiments/seed000.yaml)")
    ex.add_argument("--out", metavar="DIR", help="results folder (default outputs/experiments/NAME); a stopped run "
                                                 "continues there")
    ex.add_argument("--overwrite", action="store_true",
                    help="redo (and replace) finished cells whose settings changed since they ran; without it the "
                         "command refuses before anything runs")
    ex.add_argument("--device", default=None, help="auto, cuda, mps or cpu")
    ex.set_defaults(func=run)


def run(args) -> int:
    from studio.config import StudioConfig
    from studio.evaluate.experiment import (
        ExperimentChangedError,
        ExperimentRunner,
        load_experiment,
        process_rank,
    )

    cfg = StudioConfig.from_env(device=args.device)
    cfg.ensure_dirs()
    exp = load_experiment(Path(args.file), cfg)  # every cell's settings are checked before anything runs
    with cli_progress("experiment") as (progress, cancel):
        main_process = process_rank()[0] == 0
        runner = ExperimentRunner(cfg, on_progress=progress if main_process else None,
                                  on_log=(lambda text: print(text, file=sys.stderr)) if main_process else None,
                                  cancel=cancel)
        try:
            result = runner.run(exp, Path(args.out) if args.out else None, replace=args.overwrite)
        except ExperimentChangedError as e:
            raise ExperimentChangedError(f"{e} (add --overwrite to replace them)") from None
    if main_process:
        print(f"results: {result.out_dir}")
        for name, path in result.files.items():
            print(f"{name}: {path}")
        if result.files.get("table1.md"):
            print(result.files["table1.md"].read_text(encoding="utf-8"))
    return 130 if result.stopped else 0
