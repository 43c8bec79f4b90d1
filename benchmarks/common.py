"""What the benchmark scripts share: the model options and building the model from them."""

import argparse
import statistics
import time

from prx.config import MODEL_PRESETS, ModelConfig
from prx.model import build_model


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="seed", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--patch-size", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--text-dim", type=int, default=2304, help="2304 = T5Gemma-2B's width")


def build_bench_model(args: argparse.Namespace):
    preset = dict(MODEL_PRESETS[args.preset])
    if args.patch_size:
        preset["patch_size"] = args.patch_size
    cfg = ModelConfig(preset=args.preset, text_dim=args.text_dim, **preset)
    return cfg, build_model(cfg)


def median_seconds(fn, repeats: int) -> float:
    """The median wall-clock time of ``fn()`` over ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
