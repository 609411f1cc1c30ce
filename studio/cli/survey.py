"""`python -m studio survey build|report`: a blind A/B survey, or its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
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
    sv.add_argument("--overwrite", action="store_true",
                    help="build: replace an earlier survey of that name, losing its answers")
    sv.set_defaults(func=run)


def run(args) -> int:
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
        try:
            path = sv.create_survey(folder, args.name, pairs, args.title or "", args.per_respondent,
                                    replace=args.overwrite)
        except sv.SurveyExistsError as e:
            raise sv.SurveyExistsError(f"{e} (add --overwrite to replace it)") from None
        for name in unmatched:
            print(f"note: {name} has no partner image", file=sys.stderr)
        print(f"survey: {path} ({len(pairs)} pairs); respondents open /survey?survey={args.name} in the studio")
        return 0
    report = sv.open_survey(folder, args.name).report()
    print(json.dumps(report, indent=2) if args.json else sv.report_markdown(report))
    return 0
