"""``prx bench CONFIG``: throughput, the step's time by phase, peak memory and MFU of a config's training step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prx.config import load_config


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    # torch loads here, after the config is known to be good
    import torch.distributed as dist

    from prx.bench import format_bench, largest_micro_batch, run_bench

    if args.largest_micro_batch:
        result = largest_micro_batch(config, args.largest_micro_batch)
        best = result["largest_micro_batch"]
        print(f"{config.name} at {result['resolution']} px: " + (f"the largest micro-batch that fits is {best} of "
              f"{', '.join(str(c) for c in sorted(args.largest_micro_batch, reverse=True))}" if best else
              "none of the micro-batches tried fits: try smaller ones or train.activation_checkpointing=true"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    result = run_bench(config, steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops,
                       warm_text=not args.encode_text, profile=args.profile)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(format_bench(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
