"""What the quality metrics cost: feature extraction per 1,000 samples, and in-training eval as a
share of a training hour at the reference's cadence.

1. The three feature extractors at full size with random weights (the same FLOPs as the real
   ones; nothing to download): the FID Inception-v3 (299 px), CLIP ViT-L/14-336 (image tower, for
   CMMD and the CLIP score, plus its text tower for the CLIP score) and DINOv2 ViT-L/14 (224 px,
   FD-DINOv2). Each runs on random images of the eval resolution, side by side in one run: one
   warm-up batch, then ``--batches`` timed batches, extrapolated to 1,000 samples (a sample is one
   real and one generated image: 2,000 forward passes). FLOPs per image come from PyTorch's FLOP
   counter. The statistics (Fréchet distances at 2048-d and 1024-d, CMMD's kernel sums) are timed
   too, CMMD at ``--mmd-samples`` and scaled by n² to ``--eval-samples``.
2. In-training eval at the reference's cadence (``--eval-samples`` samples every ``--eval-every``
   steps) as a share of training, by FLOP accounting per stage of a config (default speedrun):
   sampling each caption once (``steps`` × the guidance's denoiser passes), the validation loss
   (one dense forward per sample) and the extractors, against ``eval-every`` training steps
   (the ``--dry-run`` FLOPs). At equal hardware efficiency (MFU) the FLOP share is the time share.
   The wall-clock line assumes the reference's published pace: 120k steps in 24 h on 32 H200s.

    python benchmarks/metrics_cost.py                          # CPU, eval images at 512 px
    python benchmarks/metrics_cost.py --batch-size 8 --batches 3 --device cuda
"""

import argparse
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from prx.config import load_config
from prx.flops import denoiser_forward_flops, fmt_flops, step_flops
from prx.metrics.extractors import full_size_random
from prx.metrics.stats import FrechetMetric, rbf_mmd
from prx.text import text_width

REFERENCE_HOURS = 24  # the PRX speedrun: its 120k steps took 24 h on 32×H200 (eval included)


def clip_text_tower():
    import transformers as tf

    config = tf.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                               num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                               hidden_act="quick_gelu")
    return tf.CLIPTextModelWithProjection(config).eval()


def flops_of(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, batches: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return (time.perf_counter() - start) / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512, help="eval image size fed to the extractors")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--batches", type=int, default=1, help="timed batches per extractor (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mmd-samples", type=int, default=2000, help="CMMD timed at this n, scaled by n²")
    ap.add_argument("--config", default="speedrun", help="the run whose eval cadence is priced")
    ap.add_argument("--eval-samples", type=int, default=10_000)
    ap.add_argument("--eval-every", type=int, default=10_000, help="training steps between evals")
    ap.add_argument("--sampling-steps", type=int, default=None, help="default: the config's sampling.steps")
    ap.add_argument("--guidance", choices=["cfg", "self", "both", "none"], default=None,
                    help="denoiser passes per sampling step (default: the config's sampling.guidance)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    print(f"settings: {vars(args)}; torch threads {torch.get_num_threads()}")

    # 1. Feature extraction ------------------------------------------------------------------
    images = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8, device=dev)
    def measure(kind: str) -> tuple[int, int, float]:
        extractor = full_size_random(kind).to(dev)
        per_image_flops = flops_of(lambda: extractor(images[:1]))
        seconds = timed(lambda: extractor(images), args.batches) / args.batch_size
        return extractor.preprocessing["size"], per_image_flops, seconds

    rows = {kind: measure(kind) for kind in ("inception", "clip", "dinov2")}  # one network in memory at a time
    text = clip_text_tower().to(dev)
    tokens = torch.randint(0, 49408, (args.batch_size, 77), device=dev)
    with torch.no_grad():
        text_flops = flops_of(lambda: text(input_ids=tokens[:1]))
        text_seconds = timed(lambda: text(input_ids=tokens), args.batches) / args.batch_size

    print(f"\nfeature extraction, {args.batch_size}×{args.batches} image(s) timed per extractor on {dev} "
          f"(random {args.resolution}² uint8 inputs; a sample = 1 real + 1 generated image)")
    header = f"{'metric':<12} {'extractor':<32} {'input':>6} {'GFLOP/img':>10} {'s/img':>8} {'s per 1k samples':>17}"
    print(header + "\n" + "-" * len(header))
    names = {"inception": "FID Inception-v3 (23.9M)", "clip": "CLIP ViT-L/14-336 image (304M)",
             "dinov2": "DINOv2 ViT-L/14 (304M)"}
    for metric, kind in (("fid", "inception"), ("fd_dinov2", "dinov2"), ("cmmd", "clip")):
        size, f, s = rows[kind]
        print(f"{metric:<12} {names[kind]:<32} {size:>6} {f / 1e9:>10.1f} {s:>8.3f} {2000 * s:>17.0f}")
    print(f"{'clip_score':<12} {'+ CLIP text tower (123M, 77 tok)':<32} {77:>6} {text_flops / 1e9:>10.1f} "
          f"{text_seconds:>8.3f} {1000 * text_seconds:>17.0f}   (image embeddings shared with cmmd)")
    total_extract = 2000 * sum(r[2] for r in rows.values()) + 1000 * text_seconds
    print(f"{'all four':<12} {'':<32} {'':>6} {'':>10} {'':>8} {total_extract:>17.0f}")

    # statistics
    d_fid, d_dino, d_clip = 2048, 1024, 768
    stat = {}
    for name, d in (("fid", d_fid), ("fd_dinov2", d_dino)):
        metric = FrechetMetric(num_features=d)
        metric.update(torch.randn(4 * d, d), real=True)
        metric.update(torch.randn(4 * d, d) + 0.1, real=False)
        start = time.perf_counter()
        metric.compute()
        stat[name] = time.perf_counter() - start
    x = torch.nn.functional.normalize(torch.randn(args.mmd_samples, d_clip, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(args.mmd_samples, d_clip, dtype=torch.float64), dim=1)
    start = time.perf_counter()
    rbf_mmd(x, y)
    mmd_seconds = (time.perf_counter() - start) * (args.eval_samples / args.mmd_samples) ** 2
    print(f"\nstatistics (once per eval, float64): Fréchet distance 2048-d {stat['fid']:.1f} s, 1024-d "
          f"{stat['fd_dinov2']:.1f} s; CMMD at n={args.eval_samples} {mmd_seconds:.0f} s "
          f"(timed at n={args.mmd_samples}, ×n²)")

    # 2. In-training eval as a share of training -----------------------------------------------
    cfg = load_config(args.config, [])
    model_cfg = cfg.model if cfg.model.text_dim else replace(cfg.model, text_dim=text_width(cfg.text.encoder) or 384)
    s = cfg.sampling
    steps = args.sampling_steps or s.steps
    guidance = args.guidance or s.guidance
    extract_flops = 2 * sum(r[1] for r in rows.values()) + text_flops  # per sample
    print(f"\nin-training eval of '{args.config}': {args.eval_samples} samples every {args.eval_every} steps, "
          f"{steps} sampling steps, guidance {guidance}, FLOP accounting (equal MFU for eval and training)")
    # the reference's achieved FLOP rate: its 24 h over the FLOPs of all its steps (eval time included)
    run_flops = sum(stage.steps * sum(step_flops(cfg, stage).values()) for stage in cfg.stages)
    seconds_per_flop = REFERENCE_HOURS * 3600 / run_flops
    header = (f"{'stage':<14} {'sample':>12} {'val loss':>11} {'extract':>11} {'eval total':>12} "
              f"{'train 10k st':>14} {'share':>7} {'min/train h':>12} {'s/eval*':>8}")
    print(header + "\n" + "-" * len(header))
    for i, stage in enumerate(cfg.stages):
        res, text_tokens = stage.resolution, cfg.text.max_length
        dense = denoiser_forward_flops(model_cfg, res, res, text_tokens)
        grid = res // model_cfg.patch_size
        n = grid * grid
        kept = n - int(round(cfg.tread.route_ratio * n))
        route = (cfg.tread.start_block % model_cfg.num_layers, cfg.tread.end_block % model_cfg.num_layers)
        routed = denoiser_forward_flops(model_cfg, res, res, text_tokens, 1, route, kept)
        passes = {"none": dense, "cfg": 2 * dense, "self": dense + routed, "both": 2 * dense + routed}[guidance]
        sample = args.eval_samples * steps * passes
        val = args.eval_samples * dense
        extract = args.eval_samples * extract_flops
        total = sample + val + extract
        train = args.eval_every * sum(step_flops(cfg, stage).values())
        share = total / (train + total)
        print(f"{f'{i + 1}: {res}px':<14} {fmt_flops(sample):>12} {fmt_flops(val):>11} {fmt_flops(extract):>11} "
              f"{fmt_flops(total):>12} {fmt_flops(train):>14} {share:>7.2%} {60 * share:>12.1f} "
              f"{total * seconds_per_flop:>8.0f}")
    print(f"share = eval / (training + eval) FLOPs; min/train h = minutes of each wall-clock hour spent in eval. "
          f"Text encoding of the captions is not counted.\n* s/eval: wall clock on the reference's 32×H200 at its "
          f"achieved rate ({1 / seconds_per_flop / 1e15:.2f} PFLOP/s = its {REFERENCE_HOURS} h over the "
          f"{fmt_flops(run_flops)} of all {sum(st.steps for st in cfg.stages)} steps of '{args.config}'), "
          f"i.e. a stage-1 step of {sum(step_flops(cfg, cfg.stages[0]).values()) * seconds_per_flop:.2f} s")


if __name__ == "__main__":
    main()
