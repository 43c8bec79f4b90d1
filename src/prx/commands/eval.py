"""``prx eval``: the shapes world's exact judge of prompt adherence, or (``--data``) FID, FD-DINOv2, CMMD, CLIP score
and the validation loss on held-out real images."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prx.commands.common import check_sampling_args, sampling_from_args
from prx.device import resolve_device
from prx.distributed import init_distributed
from prx.errors import PrxError
from prx.evaluate import evaluate, format_table, write_json
from prx.files import make_writable_dir
from prx.metrics import METRICS, parse_metrics
from prx.metrics.evaluate_real import HeldOutSet, build_extractors, check_sample_count, evaluate_real
from prx.metrics.evaluate_real import format_table as format_real_table
from prx.pipeline import Pipeline
from prx.rundir import RunDir


def run(args: argparse.Namespace) -> int:
    if str(args.checkpoint).endswith(".safetensors"):
        raise PrxError(f"--checkpoint {args.checkpoint}: prx eval takes a checkpoint or run directory (its results go "
                       f"beside the run), not an exported weights file")
    if args.data:
        return run_real(args)
    if args.metrics:
        raise PrxError("--metrics needs --data (held-out shards); without --data, prx eval judges the shapes world")
    check_sampling_args(args, 400_000)  # four prompt sets, seeds seed + 100000·k + i
    pipe = Pipeline.from_checkpoint(args.checkpoint, weights=args.weights, device=args.device)
    ckpt, step = pipe.checkpoint, pipe.step
    check_shapes_run(pipe.config, args.checkpoint)
    out = make_writable_dir(Path(args.out) if args.out else RunDir.of_checkpoint(ckpt).eval_dir(step))
    print(f"evaluating {ckpt} (step {step}, {args.weights} weights) …", flush=True)
    results = evaluate(pipe, out, sampling_from_args(args, pipe.config.sampling))
    results.update(checkpoint=str(ckpt), step=step, weights=args.weights)
    print(format_table(results))
    write_json(results, out / "results.json")
    print(f"results: {out / 'results.json'} (sample grids beside it, took {results['settings']['seconds']}s)")
    return 0


def check_shapes_run(config, checkpoint: str) -> None:
    """Without --data prx eval judges the shapes world's prompts: a run trained on other data is told what to pass."""
    if config.data.dataset == "shapes":
        return
    data = config.eval.data[0] if config.eval.data else "HELDOUT"
    where = "its eval.data" if config.eval.data else "held-out prx shards, e.g. `prx data split --out-heldout HELDOUT`"
    raise PrxError(f"{checkpoint} was trained on {config.data.dataset} ({', '.join(config.data.shards[:2])}), not the "
                   f"shapes world that prx eval judges without --data: evaluate on {where} with `prx eval --checkpoint "
                   f"{checkpoint} --data {data} --metrics val_loss` (FID, CMMD, ... need their weights: "
                   f"docs/evaluation.md)")


def run_real(args: argparse.Namespace) -> int:
    """``prx eval --checkpoint RUN --data SHARDS [--metrics …]``: every check that can fail (metric names, data, sample
    count, extractor weights, checkpoint) runs before any sampling."""
    names = parse_metrics(args.metrics or ",".join(METRICS))
    if args.batch_size < 1:
        raise PrxError(f"--batch-size {args.batch_size} must be at least 1")
    if args.resolution is not None and args.resolution < 1:
        raise PrxError(f"--resolution {args.resolution} must be positive")
    heldout = HeldOutSet.open(args.data, args.num_samples, args.seed, args.caption_column)
    check_sample_count(names, len(heldout))
    info = init_distributed(resolve_device(args.device))
    extractors = build_extractors(names, args.inception_weights, args.clip_model, args.dino_model, info.device)
    pipe = Pipeline.from_checkpoint(args.checkpoint, weights=args.weights, device=str(info.device))
    ckpt, step = pipe.checkpoint, pipe.step
    out = make_writable_dir(Path(args.out) if args.out else RunDir.of_checkpoint(ckpt).real_eval_dir(step))
    main = info.rank == 0
    if main:
        print(f"evaluating {ckpt} (step {step}, {args.weights} weights) on {len(heldout)} held-out samples "
              f"of {len(heldout.paths)} shard(s), {info.world} process(es): {', '.join(names)} …", flush=True)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if main and (done == total or time.monotonic() - last[0] > 30):
            last[0] = time.monotonic()
            print(f"  rank 0: batch {done}/{total}", flush=True)

    results = evaluate_real(pipe, None, names, len(heldout), seed=args.seed, batch_size=args.batch_size,
                            resolution=args.resolution, sampling=sampling_from_args(args, pipe.config.sampling),
                            extractors=extractors, heldout=heldout, progress=progress)
    results.update(checkpoint=str(ckpt), step=step, weights=args.weights)
    if main:
        print(format_real_table(results))
        for warning in results["warnings"]:
            print(f"warning: {warning}")
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"results: {out / 'results.json'} (took {results['settings']['seconds']}s)")
    return 0
