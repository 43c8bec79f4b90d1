"""``prx env``: what this machine gives prx (torch, CUDA, GPUs, compiler, cached weights) and what a config would
use."""

from __future__ import annotations

import argparse
import json

from prx.envinfo import collect, format_report


def run(args: argparse.Namespace) -> int:
    info = collect(args.config)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0
