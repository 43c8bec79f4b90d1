"""Training-step time and peak memory of a PRX model on this machine (a benchmark, not a test).

Default: the seed config (24 blocks, hidden 1024, patch 32) at 512 px, batch 1, with 256 text
tokens of T5Gemma-2B width (2304), AdamW, fp32 on CPU. Text embeddings are random (the recipe
precomputes them), so the number is the denoiser's own step: forward, backward, optimizer.

    python benchmarks/step_time.py                      # seed @ 512 px, batch 1
    python benchmarks/step_time.py --preset demo --resolution 64 --patch-size 16 --batch 64 --text-tokens 32 --text-dim 384
"""

import argparse
import json
import resource
import time

import torch

from common import add_model_args, build_bench_model
from prx.flops import training_step_flops
from prx.flow import add_noise, flow_loss


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rss_start = peak_rss_gib()
    cfg, model = build_bench_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    b, r = args.batch, args.resolution
    x0 = torch.rand(b, 3, r, r, generator=g) * 2 - 1
    text = torch.randn(b, args.text_tokens, args.text_dim, generator=g)
    mask = torch.ones(b, args.text_tokens, dtype=torch.bool)

    def step():
        t = torch.rand(b, generator=g)
        x_t = add_noise(x0, torch.randn(x0.shape, generator=g), t)
        loss = flow_loss(model(x_t, t, text, mask).x0, x0, x_t, t, 0.05)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates optimizer state
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    mean = sum(times) / len(times)
    flops = training_step_flops(cfg, r, r, args.text_tokens, b)
    result = {
        "preset": args.preset, "resolution": r, "batch": b, "patch_size": cfg.patch_size,
        "image_tokens": (r // cfg.patch_size) ** 2, "text_tokens": args.text_tokens,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "threads": torch.get_num_threads(),
        "step_s": round(mean, 3), "step_s_min": round(min(times), 3),
        "images_per_s": round(b / mean, 2), "train_GFLOP_per_step": round(flops / 1e9, 1),
        "achieved_GFLOPs": round(flops / mean / 1e9, 1), "peak_rss_GiB": round(peak_rss_gib(), 2),
        "peak_rss_over_start_GiB": round(peak_rss_gib() - rss_start, 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
