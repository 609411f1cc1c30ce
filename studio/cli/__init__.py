"""The command line, `python -m studio <command> ...`: one module per command, each owning its arguments
(`add_parser`) and its work (`run`). Top layer, beside ui/: it may import every engine package, and none imports it."""

from __future__ import annotations

import argparse
import sys

from studio.cli import (
    convert,
    curate,
    evaluate,
    experiment,
    generate,
    grid,
    info,
    models,
    networks,
    preprocess,
    storyboard,
    survey,
    train,
    upscale,
)

# in the order `--help` lists them
COMMANDS = (generate, grid, info, preprocess, upscale, convert, models, networks, curate, train, evaluate, experiment, survey, storyboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m studio",
        description="Command line: `python -m studio generate|info|convert|models ...` (same engine and files as the UI).")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
