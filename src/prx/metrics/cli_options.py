"""The options of ``prx eval`` for real data (kept here so the CLI module only adds one call)."""

from __future__ import annotations

import argparse

from prx.metrics import CLIP_ID, DINOV2_ID, FID_WEIGHTS_FILE, METRICS


def add_real_eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real data (with --data: FID, FD-DINOv2, CMMD, CLIP score, validation loss)")
    g.add_argument("--data", nargs="+", metavar="SHARDS", help="held-out prx shards: directories, files or globs")
    g.add_argument("--metrics", default=None, metavar="A,B,…",
                   help=f"comma-separated, from {','.join(METRICS)} (default: all)")
    g.add_argument("--num-samples", type=int, default=1000, metavar="N",
                   help="held-out images to compare, each caption sampled once (default 1000; FID wants ≥ 2048)")
    g.add_argument("--batch-size", type=int, default=16, metavar="B", help="samples per batch (default 16)")
    g.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="square size of generated and (centre-cropped) real images (default: the last stage's)")
    g.add_argument("--caption-column", default=None, metavar="NAME",
                   help="the caption column to sample (default: the shards' first)")
    g.add_argument("--inception-weights", default=None, metavar="FILE",
                   help=f"FID Inception weights (default $TORCH_HOME/hub/checkpoints/{FID_WEIGHTS_FILE})")
    g.add_argument("--clip-model", default=CLIP_ID, metavar="ID|DIR", help=f"CLIP for CMMD and CLIP score (default "
                                                                           f"{CLIP_ID})")
    g.add_argument("--dino-model", default=DINOV2_ID, metavar="ID|DIR", help=f"DINOv2 for FD-DINOv2 (default "
                                                                             f"{DINOV2_ID})")
