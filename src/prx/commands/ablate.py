"""``prx ablate CONFIG --out DIR``: the recipe and its ablations at equal steps, FLOPs or minutes, as ordinary run
directories, then one table and plots (:mod:`prx.ablate`; docs/ablations.md)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from prx.ablate.arms import parse_arms, parse_seeds
from prx.ablate.budget import parse_budget
from prx.ablate.runner import run_ablation
from prx.ablate.runs import Settings
from prx.errors import PrxError

NOT_IN_THE_REPORT = ("--report-only", "--dry-run")  # the report shows the command that trains the arms


def run(args: argparse.Namespace) -> int:
    if args.points < 1 or args.eval_samples < 1 or args.judge_prompts < 0:
        raise PrxError("--points and --eval-samples must be ≥ 1, --judge-prompts ≥ 0 (0: every prompt)")
    argv = getattr(args, "argv", None) or []
    settings = Settings(config=args.config, out=Path(args.out), arms=parse_arms(args.arms),
                        seeds=parse_seeds(args.seeds),
                        budget=parse_budget(args.budget_steps, args.budget_flops, args.budget_minutes),
                        overrides=args.overrides, points=args.points, eval_samples=args.eval_samples,
                        judge_prompts=args.judge_prompts, image_metrics=not args.no_image_metrics,
                        heldout=args.heldout, parallel_arms=args.parallel_arms, report_only=args.report_only,
                        dry_run=args.dry_run,
                        command="prx ablate " + shlex.join(a for a in argv if a not in NOT_IN_THE_REPORT))
    return run_ablation(settings)
