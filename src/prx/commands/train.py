"""``prx train [CONFIG] [key=value ...]``: train, resume, or print the plan (``--dry-run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prx.config import load_config
from prx.config.parse import split_config_args


def run(args: argparse.Namespace) -> int:
    config = load_config(*split_config_args(args.items))
    # torch loads here, after the config is known to be good: a bad one answers at once
    if args.dry_run:
        from prx.dry_run import describe_run

        print(describe_run(config))
        return 0
    from prx.train import Trainer

    trainer = Trainer(config, Path(args.out) if args.out else Path("runs") / config.name,
                      resume=True if args.resume else None)
    trainer.run()
    return trainer.exit_code  # 0, or 128 + the signal that stopped the run (130 Ctrl-C, 143 SIGTERM)
